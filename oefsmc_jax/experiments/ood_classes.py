"""Which pool classes each OOD selection rule picks, per CIFAR-10 class.

The Tiny-ImageNet pool is partly in-distribution: about 30 of its 200 classes are CIFAR-10 classes in meaning
(``shared/data/tinyimagenet_cifar10_overlap.json``: ``strict`` and ``near`` lists). This tool shows what each rule
takes from such a pool, so that a reader sees what "OOD" means in a result:

* ``random`` (the paper): ``m = K * n_max - n`` pool images uniformly at random, labelled later by draws from the
  complementary distribution, so "the class it was picked for" is the draw; the expected share of each pool class is
  its share of the pool, which the table reports exactly (no draw is needed).
* ``teacher_complement`` and ``teacher_confidence`` (``oe/selection.py``) on the teacher's probabilities over the
  whole pool (a run uses the pool minus a held-out slice of ``oe.heldout`` images; the picture is the same).

For each budget it writes ``ood_classes_nN.md`` (per CIFAR-10 class: images picked, the share from strict / near
overlap classes, and the three most picked pool classes) and ``ood_classes_nN.png`` (stacked bars of those shares),
plus ``ood_classes.json`` with every count and the provenance of the run.

    python -m oefsmc_jax.experiments.ood_classes --out docs/results/ood_classes
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def overlap_groups(overlap: dict, num_pool_classes: int) -> np.ndarray:
    """Per pool class: 2 = a CIFAR-10 class in meaning (``strict``), 1 = close to one (``near``), 0 = disjoint."""
    group = np.zeros(num_pool_classes, np.int64)
    for level, value in (("near", 1), ("strict", 2)):
        for entries in overlap.get(level, {}).values():
            for e in entries:
                group[int(e["index"])] = value
    return group


#: what each ``--pool`` is
POOL_NOTES = {"tiny": "Tiny-ImageNet val", "tiny_disjoint": "Tiny-ImageNet val without the classes that overlap "
              "CIFAR-10 in meaning or nearly", "dtd": "DTD-10 textures, no class overlap at all"}


def load_pool(root: pathlib.Path, kind: str) -> tuple[str, np.ndarray, np.ndarray, list[str], np.ndarray]:
    """The pool ``kind`` (:data:`POOL_NOTES`) from the shared data folder ``root``: its file name, images, class of
    every image, class names, and each class's overlap group (:func:`overlap_groups`; all 0 for DTD). The
    class-disjoint pool drops the classes the runs' ``pool=tiny_disjoint`` drops (``all_indices`` of the overlap
    list)."""
    if kind not in POOL_NOTES:
        raise ValueError(f"--pool {kind!r}: allowed: {', '.join(POOL_NOTES)}")
    name = "dtd10_32x32.npz" if kind == "dtd" else "tinyimagenet_val_32x32.npz"
    pool = np.load(root / name)
    names = [str(n).split(",")[0] for n in pool["class_names"]]
    x, y = pool["x"], np.asarray(pool["y"], np.int64)
    if kind == "dtd":
        return name, x, y, names, np.zeros(len(names), np.int64)
    overlap = json.loads((root / "tinyimagenet_cifar10_overlap.json").read_text())
    group = overlap_groups(overlap, len(names))
    if kind == "tiny_disjoint":
        keep = ~np.isin(y, np.asarray([int(i) for i in overlap["all_indices"]]))
        x, y = x[keep], y[keep]
    return name, x, y, names, group


def picks_by_class(rule: str, probs: np.ndarray, pool_y: np.ndarray, counts: np.ndarray, factor: float,
                   num_pool_classes: int) -> np.ndarray:
    """Expected number of images of each pool class picked for each ID class: ``[K, num_pool_classes]``.

    Teacher rules: exact counts of the selection. ``random``: the paper's ``m`` images, spread over pool classes by
    their pool share and over ID classes by the complementary distribution ``Gamma`` (expected values).
    """
    from oefsmc_jax.oe.complementary import complementary_distribution
    from oefsmc_jax.oe.selection import select

    k = len(counts)
    out = np.zeros((k, num_pool_classes))
    if rule == "random":
        m = int(k * counts.max() - counts.sum())
        gamma = np.asarray(complementary_distribution(np.asarray(counts, np.float32), None), np.float64)
        share = np.bincount(pool_y, minlength=num_pool_classes) / len(pool_y)
        return m * gamma[:, None] * share[None, :]
    sel = select(rule, probs, counts, factor)
    np.add.at(out, (sel.classes, pool_y[sel.indices]), 1.0)
    return out


def table(picks: np.ndarray, group: np.ndarray, pool_names: Sequence[str], id_names: Sequence[str],
          rule: str) -> list[str]:
    """Markdown rows for one rule: per ID class, images, % strict, % near, top-3 pool classes."""
    rows = [f"### `{rule}`", "", "| class | images | strict overlap | near | top pool classes (images) |",
            "| --- | --- | --- | --- | --- |"]
    for c, name in enumerate(id_names):
        n = picks[c].sum()
        if n == 0:
            rows.append(f"| {name} | 0 | | | |")
            continue
        strict = picks[c][group == 2].sum() / n
        near = picks[c][group == 1].sum() / n
        top = np.argsort(-picks[c], kind="stable")[:3]
        tops = ("every pool class in its pool share" if rule == "random" else
                ", ".join(f"{pool_names[j]} ({int(picks[c, j])})" for j in top if picks[c, j] > 0))
        rows.append(f"| {name} | {n:.0f} | {100 * strict:.0f} % | {100 * near:.0f} % | {tops} |")
    tot = picks.sum()
    rows.append(f"| **all** | {tot:.0f} | {100 * picks[:, group == 2].sum() / tot:.0f} % | "
                f"{100 * picks[:, group == 1].sum() / tot:.0f} % | |")
    return rows + [""]


def plot(per_rule: dict[str, np.ndarray], group: np.ndarray, id_names: Sequence[str], path: pathlib.Path,
         title: str) -> None:
    """Stacked bars per ID class and rule: share of picks from strict / near / disjoint pool classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rules = list(per_rule)
    fig, axes = plt.subplots(1, len(rules), figsize=(4.2 * len(rules), 3.6), sharey=True)
    for ax, rule in zip(np.atleast_1d(axes), rules):
        p = per_rule[rule]
        n = np.maximum(p.sum(1), 1e-12)
        parts = [p[:, group == g].sum(1) / n for g in (2, 1, 0)]
        bottom = np.zeros(len(id_names))
        for part, label, color in zip(parts, ("strict overlap", "near overlap", "disjoint"),
                                      ("#d62728", "#ff9896", "#1f77b4")):
            ax.bar(range(len(id_names)), part, bottom=bottom, label=label, color=color)
            bottom += part
        for i, v in enumerate(p.sum(1)):
            ax.text(i, 1.01, f"{v:.0f}", ha="center", fontsize=7)
        ax.set_xticks(range(len(id_names)), id_names, rotation=60, fontsize=8)
        ax.set_title(rule, fontsize=10)
        ax.set_ylim(0, 1.08)
    np.atleast_1d(axes)[0].set_ylabel("share of the images picked for the class")
    np.atleast_1d(axes)[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``ood-classes`` with ``argv`` (without the program name, default ``sys.argv[1:]``): parse with the ``oefsmc
    ood-classes`` parser, then :func:`run`; returns the record written to ``ood_classes.json``."""
    from oefsmc_jax.main import parse_subcommand

    return run(parse_subcommand("ood-classes", argv))


def run_cli(a: argparse.Namespace) -> int:
    """``oefsmc ood-classes``: :func:`run`, exit status 0."""
    run(a)
    return 0


def run(a: argparse.Namespace) -> dict[str, Any]:
    """Compute the teacher's pool probabilities, apply each rule at each budget, write tables, plots and JSON."""

    import jax

    from oefsmc_jax.convert import load_pretrained, teacher_preprocessing
    from oefsmc_jax.data.subsets import class_counts
    from oefsmc_jax.models import build_model
    from oefsmc_jax.provenance import code_version, portable, versions
    from oefsmc_jax.training import xla_cpu
    from oefsmc_jax.training.parallel import make_mesh
    from oefsmc_jax.training.step import make_predict

    root = pathlib.Path(a.data) if a.data else None
    if root is None:
        from oefsmc_jax.experiments.runner import _data_root
        root = pathlib.Path(_data_root())
    teacher_path = sorted((root / "teachers" / "akamaster_cifar10_resnet").glob(f"{a.arch}-*.npz"))
    if not teacher_path:
        raise SystemExit(f"error: no akamaster teacher {a.arch}-*.npz under {root / 'teachers'}")
    pool_file, pool_x, pool_y, pool_names, group = load_pool(root, getattr(a, "pool", "tiny"))
    spec, variables = load_pretrained(teacher_path[0])
    mean, std = teacher_preprocessing(teacher_path[0])
    predict = make_predict(make_mesh(None), build_model(spec), tuple(mean), tuple(std), 500,
                           cpu_fusion=xla_cpu.resolve_mode(""))  # $OEFSMC_CPU_FUSION, else the default
    logits = np.concatenate([predict(variables, pool_x[i:i + 2000])["logits"] for i in range(0, len(pool_y), 2000)])
    probs = np.asarray(jax.nn.softmax(logits, -1), np.float64)
    print(f"teacher {teacher_path[0].name}: pool {pool_file} ({a.pool if hasattr(a, 'pool') else 'tiny'}) of "
          f"{len(pool_y)} images, {int((group == 2).sum())} strict and {int((group == 1).sum())} near overlap "
          "classes", file=sys.stderr)

    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    pool_kind = getattr(a, "pool", "tiny")
    record: dict[str, Any] = {"teacher": teacher_path[0].name, "pool": pool_file, "pool_kind": pool_kind,
                              "factor": a.factor, "rho": a.rho, "budgets": {}, **code_version(),
                              "versions": versions(), "device": jax.devices()[0].device_kind}
    for n in a.per_class:
        counts = class_counts(len(CIFAR10), "exp", n, a.rho, True)
        per_rule = {r: picks_by_class(r, probs, pool_y, counts, a.factor, len(pool_names))
                    for r in ("random", "teacher_complement", "teacher_confidence")}
        lines = [f"# Which pool classes each rule picks: {n} per class, rho = {a.rho:g}, pool {pool_kind}", "",
                 f"Teacher `{teacher_path[0].name}` (akamaster ResNet), pool `{pool_file}` ({POOL_NOTES[pool_kind]}: "
                 f"{len(pool_y):,} images, {len(np.unique(pool_y))} classes), ID counts {counts.tolist()}, teacher "
                 f"rules at c = {a.factor:g}. `random` rows are expected values (pool share x the complementary "
                 "distribution), the teacher rows exact counts. Overlap lists: `tinyimagenet_cifar10_overlap.json`.",
                 ""]
        for r, p in per_rule.items():
            lines += table(p, group, pool_names, CIFAR10, r)
        (out / f"ood_classes_n{n}.md").write_text("\n".join(lines))
        plot(per_rule, group, CIFAR10, out / f"ood_classes_n{n}.png",
             f"Pool classes picked per CIFAR-10 class ({n}/class, rho {a.rho:g}, c {a.factor:g})")
        record["budgets"][str(n)] = {"counts": counts.tolist(),
                                     **{r: np.round(p, 4).tolist() for r, p in per_rule.items()}}
        print(f"n{n}: wrote {out / f'ood_classes_n{n}.md'} and .png", file=sys.stderr)
    if pool_kind == "tiny":  # how often the teacher's argmax is the CIFAR-10 class a strict-overlap image is
        overlap = json.loads((root / "tinyimagenet_cifar10_overlap.json").read_text())
        record["strict_overlap_argmax_share"] = round(_agree(probs, pool_y, overlap), 4)
    record["pool_class_names"] = pool_names
    record["overlap_group"] = group.tolist()
    (out / "ood_classes.json").write_text(json.dumps(portable(record, {"data": root}), indent=1))
    return record


def _agree(probs: np.ndarray, pool_y: np.ndarray, overlap: dict) -> float:
    """Share of the strict-overlap pool images whose teacher argmax is the CIFAR-10 class they overlap."""
    hits = total = 0
    for cname, entries in overlap.get("strict", {}).items():
        k = CIFAR10.index(cname)
        for e in entries:
            sel = pool_y == int(e["index"])
            hits += int((probs[sel].argmax(1) == k).sum())
            total += int(sel.sum())
    return hits / max(total, 1)


if __name__ == "__main__":
    from oefsmc_jax.main import cli

    cli(["ood-classes", *sys.argv[1:]])
