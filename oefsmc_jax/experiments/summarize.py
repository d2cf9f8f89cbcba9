"""Tables and plots of a grid's ``results.jsonl``: mean ± std over seeds, the imbalance drop, paired arm gains."""

from __future__ import annotations

import collections
import io
import json
import os
from typing import Any

import numpy as np

from oefsmc_jax import paths
from oefsmc_jax.evaluation import format_table, paired_difference, plot_per_class
from oefsmc_jax.experiments.grid import setting_key
from oefsmc_jax.experiments.primary import primary_table
from oefsmc_jax.experiments.runner import read_results
from oefsmc_jax.experiments.tuning import TuningRule, choose, describe_rule, tuning_table, write_chosen
from oefsmc_jax.oe.arms import ARMS

ARM_NAMES = {name: arm.short for name, arm in ARMS.items()}  # the arms table of oefsmc_jax.oe.arms
METRICS = (("top1", "Top-1"), ("balanced", "Balanced"), ("few", "Few-shot"))


def _mean_std(values: list[float]) -> str:
    v = np.asarray([x for x in values if x is not None], float)
    if v.size == 0:
        return "-"
    return f"{v.mean():.1f} ± {v.std(ddof=1):.1f}" if v.size > 1 else f"{v.mean():.1f}"


def _overrides_str(ov: str) -> str:
    d = json.loads(ov)
    return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in d.items()) or "-"


def summary_table(records: list[dict]) -> str:
    """Mean ± std over seeds of top-1, balanced and few-shot accuracy, one row per (setting, arm)."""
    groups: dict = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in records:
        groups[setting_key(r)][r["arm"]].append(r)
    rows = []
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2], k[3], k[4] != "balanced", k[5])):
        g, method, arch, n, mode, ov = key
        for arm in ARM_NAMES:
            rs = groups[key].get(arm)
            if not rs:
                continue
            row = {"group": g, "method": method.upper(), "teacher": arch, "budget": n, "set": mode,
                   "settings": _overrides_str(ov), "arm": ARM_NAMES[arm], "seeds": len(rs),
                   "teacher_top1": np.mean([r["teacher"]["top1"] for r in rs])}
            for m, _ in METRICS:
                row[m] = _mean_std([r["metrics"].get(m) for r in rs])
            rows.append(row)
    cols = [("group", "Group", None), ("method", "Method", None), ("teacher", "Teacher", None),
            ("budget", "Per class", None), ("set", "Set", None), ("settings", "Settings", None),
            ("arm", "Arm", None), ("seeds", "Seeds", None)] + [(m, h, None) for m, h in METRICS] + [
            ("teacher_top1", "Teacher top-1", ".1f")]
    return format_table(rows, cols)


def paired_table(records: list[dict], metric: str = "top1", reference: str = "base",
                 arms: tuple[str, ...] | None = None) -> str:
    """For every setting and every arm other than ``reference`` (default ``base``; only ``arms`` if given): the
    mean paired difference to ``reference`` (same seed, same subset) with its 95 % t-interval; '' if none."""
    by = collections.defaultdict(dict)
    for r in records:
        by[setting_key(r) + (r["seed"],)][r["arm"]] = r["metrics"].get(metric)
    diffs = collections.defaultdict(lambda: ([], []))
    for key, by_arm in by.items():
        if reference not in by_arm or by_arm[reference] is None:
            continue
        for arm, v in by_arm.items():
            if arm != reference and v is not None and (arms is None or arm in arms):
                a, b = diffs[key[:-1] + (arm,)]
                a.append(v)
                b.append(by_arm[reference])
    rows = []
    for key in sorted(diffs, key=lambda k: (k[0], k[1], k[2], k[3], k[4] != "balanced", k[5], k[6])):
        a, b = diffs[key]
        d = paired_difference(a, b)
        ci = "-" if d.get("ci_low") is None else f"[{d['ci_low']:+.1f}, {d['ci_high']:+.1f}]"
        per_seed = ", ".join(f"{x - y:+.1f}" for x, y in zip(a, b))
        rows.append({"method": key[1].upper(), "teacher": key[2], "budget": key[3], "set": key[4],
                     "settings": _overrides_str(key[5]), "arm": ARM_NAMES.get(key[6], key[6]), "n": d["n"],
                     "mean": f"{d['mean']:+.2f}", "ci": ci, "per_seed": per_seed})
    if not rows:
        return ""
    cols = [("method", "Method", None), ("teacher", "Teacher", None), ("budget", "Per class", None),
            ("set", "Set", None), ("settings", "Settings", None),
            ("arm", f"Arm vs {ARM_NAMES.get(reference, reference).lstrip('+ ')}", None), ("n", "Seeds", None),
            ("mean", f"Mean Δ {metric}", None), ("ci", "95 % CI", None), ("per_seed", "Per seed", None)]
    return format_table(rows, cols)


def imbalance_table(records: list[dict]) -> str:
    """Claim 1, per method, budget and arm: mean top-1 on the balanced set, on the long-tailed set of the same total,
    and the imbalance drop ``balanced - long-tailed`` paired by seed (a seed draws both sets from one key, so they
    are paired) with its 95 % t-interval."""
    acc: dict = collections.defaultdict(dict)
    for r in records:
        if r.get("overrides"):
            continue
        acc[(r["method"], r["arch"], r["per_class"], r["arm"], r["mode"])][r["seed"]] = r["metrics"]["top1"]
    rows = []  # no balanced cells: no rows, and the summary leaves the section out
    for (method, arch, n, arm, mode) in sorted(acc):
        if mode != "balanced" or (method, arch, n, arm, "exp") not in acc:
            continue
        bal, exp = acc[(method, arch, n, arm, "balanced")], acc[(method, arch, n, arm, "exp")]
        seeds = sorted(set(bal) & set(exp))
        d = paired_difference([bal[s] for s in seeds], [exp[s] for s in seeds]) if seeds else None
        ci = "-" if d is None or d.get("ci_low") is None else f"[{d['ci_low']:+.1f}, {d['ci_high']:+.1f}]"
        rows.append({"method": method.upper(), "teacher": arch, "budget": n, "arm": ARM_NAMES.get(arm, arm),
                     "bal": np.mean(list(bal.values())), "exp": np.mean(list(exp.values())),
                     "drop": "-" if d is None else f"{d['mean']:+.1f}", "n": len(seeds), "ci": ci})
    if not rows:
        return ""
    return format_table(rows, [("method", "Method", None), ("teacher", "Teacher", None),
                               ("budget", "Per class", None), ("arm", "Arm", None), ("bal", "Balanced set", ".1f"),
                               ("exp", "Long-tailed set", ".1f"), ("n", "Paired seeds", None),
                               ("drop", "Imbalance drop", None), ("ci", "95 % CI", None)])


def plot_budget(records: list[dict], path: paths.Path) -> paths.Path | None:
    """Accuracy against budget: one panel per (method, teacher); a line per (arm, set), mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in records if not r.get("overrides")]
    panels = sorted({(r["method"], r["arch"]) for r in recs})
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (method, arch) in zip(axes[0], panels):
        lines = collections.defaultdict(lambda: collections.defaultdict(list))
        for r in recs:
            if (r["method"], r["arch"]) == (method, arch):
                lines[(r["arm"], r["mode"])][r["per_class"]].append(r["metrics"]["top1"])
        for (arm, mode), pts in sorted(lines.items()):
            xs = sorted(pts)
            ys = [np.mean(pts[x]) for x in xs]
            es = [np.std(pts[x]) for x in xs]
            ax.errorbar(xs, ys, yerr=es, marker="o" if mode == "exp" else "s", capsize=3,
                        linestyle="-" if mode == "exp" else "--", label=f"{ARM_NAMES.get(arm, arm)}, {mode}")
        ax.set_xscale("log")
        ax.set_xticks(sorted({r["per_class"] for r in recs}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"{method.upper()}, teacher {arch}")
        ax.set_xlabel("samples per class (mean)")
        ax.set_ylabel("test top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    paths.write_bytes_atomic(path, buf.getvalue())
    return path


# What the teacher arm's gain over the paper's rule is made of: each contrast changes one thing.
FACTORS = (
    ("choice of images (same count, R off)", "oe_complement", "oe_random_matched"),
    ("R, on teacher-chosen images (labels: the chosen class)", "oe_complement_r", "oe_complement"),
    ("R, on random images", "oe_random_matched_r", "oe_random_matched"),
    ("count: teacher's instead of K*n_max - n (random images, R on)", "oe_random_matched_r", "oe"),
    ("all together: teacher complement, R off, vs the paper's arm", "oe_complement", "oe"),
    ("all together, R on: teacher complement, R on, vs the paper's arm", "oe_complement_r", "oe"),
)


def contrasts(records: list[dict], factors: tuple = FACTORS, metric: str = "top1") -> list[dict]:
    """The paired contrasts ``(label, a, b)`` of ``factors`` per setting (same seed, subset and pool): one dict per
    setting and contrast with the setting's key, ``label``, and :func:`paired_difference` of ``a - b``."""
    by = collections.defaultdict(dict)
    for r in records:
        by[setting_key(r) + (r["seed"],)][r["arm"]] = r["metrics"].get(metric)
    out = []
    settings = sorted({k[:-1] for k in by}, key=lambda k: (k[0], k[1], k[2], k[3], k[4] != "balanced", k[5]))
    for key in settings:
        seeds = sorted(k[-1] for k in by if k[:-1] == key)
        for label, a, b in factors:
            pairs = [(by[key + (s,)][a], by[key + (s,)][b]) for s in seeds
                     if by[key + (s,)].get(a) is not None and by[key + (s,)].get(b) is not None]
            if pairs:
                out.append({"key": key, "label": label,
                            "d": paired_difference([x for x, _ in pairs], [y for _, y in pairs])})
    return out


def factorial_table(records: list[dict], metric: str = "top1") -> str:
    """The paired contrasts of :data:`FACTORS` per setting (same seed, subset and pool), with 95 % t-intervals;
    '' when no setting has both arms of any contrast."""
    rows = []
    for c in contrasts(records, FACTORS, metric):
        d, key = c["d"], c["key"]
        ci = "-" if d.get("ci_low") is None else f"[{d['ci_low']:+.1f}, {d['ci_high']:+.1f}]"
        rows.append({"method": key[1].upper(), "budget": key[3], "set": key[4], "settings": _overrides_str(key[5]),
                     "factor": c["label"], "n": d["n"], "mean": f"{d['mean']:+.2f}", "ci": ci})
    if not rows:
        return ""
    return format_table(rows, [("method", "Method", None), ("budget", "Per class", None), ("set", "Set", None),
                               ("settings", "Settings", None), ("factor", "What changes", None),
                               ("n", "Seeds", None), ("mean", f"Mean Δ {metric}", None), ("ci", "95 % CI", None)])


def early_stopping_table(records: list[dict], metric: str = "top1") -> str:
    """What early stopping does to each arm: the records run with ``oe.early_stopping = False`` paired with the
    records of the same method, teacher, budget, set, arm, seed and other overrides run with it on (another group
    may hold them); per arm the mean top-1 with it on and off, the paired difference ``on - off`` with its 95 %
    t-interval, and how many runs with it on kept an earlier checkpoint; '' when nothing pairs."""
    on, off = {}, []
    for r in records:
        if r["metrics"].get(metric) is None:
            continue
        ov = dict(r.get("overrides") or {})
        stopping = ov.pop("oe.early_stopping", True) is not False
        key = (r["method"], r["arch"], r["per_class"], r["mode"], json.dumps(ov, sort_keys=True), r["arm"])
        if stopping:
            on[key + (r["seed"],)] = r
        else:
            off.append((key, r))
    pairs: dict = collections.defaultdict(list)
    for key, r in off:
        if key + (r["seed"],) in on:
            pairs[key].append((on[key + (r["seed"],)], r))
    order = list(ARM_NAMES)
    rows = []
    for key in sorted(pairs, key=lambda k: (k[0], k[1], k[2], k[3] != "balanced", k[4] != "{}", k[4],
                                            order.index(k[5]) if k[5] in order else len(order))):
        ps = pairs[key]
        a = [p[0]["metrics"][metric] for p in ps]
        b = [p[1]["metrics"][metric] for p in ps]
        d = paired_difference(a, b)
        ci = "-" if d.get("ci_low") is None else f"[{d['ci_low']:+.1f}, {d['ci_high']:+.1f}]"
        kept = sum(bool(p[0].get("stopped_early")) or
                   (p[0].get("best_step") is not None and p[0].get("steps") is not None
                    and p[0]["best_step"] < p[0]["steps"]) for p in ps)
        rows.append({"method": key[0].upper(), "budget": key[2], "set": key[3], "settings": _overrides_str(key[4]),
                     "arm": ARM_NAMES.get(key[5], key[5]), "n": d["n"], "on": float(np.mean(a)),
                     "off": float(np.mean(b)), "mean": f"{d['mean']:+.2f}", "ci": ci, "kept": f"{kept}/{len(ps)}"})
    if not rows:
        return ""
    return format_table(rows, [("method", "Method", None), ("budget", "Per class", None), ("set", "Set", None),
                               ("settings", "Settings", None), ("arm", "Arm", None), ("n", "Seeds", None),
                               ("on", f"{metric}, on", ".1f"), ("off", f"{metric}, off", ".1f"),
                               ("mean", "Mean Δ (on - off)", None), ("ci", "95 % CI", None),
                               ("kept", "Kept an earlier checkpoint", None)])


def tracked_best_table(records: list[dict], metric: str = "top1") -> str:
    """What early stopping would have kept in the runs that trained their whole budget with ``oe.track_best``: per
    method, budget, set, settings and arm, the mean final ``metric``, the mean ``metric`` of the student early
    stopping would have kept, their paired difference ``kept - final`` with its 95 % t-interval, the kept steps
    (median and range) and how many runs early stopping would have stopped; '' when no record tracked."""
    groups: dict = collections.defaultdict(list)
    for r in records:
        t = r.get("tracked_best")
        if not t or r["metrics"].get(metric) is None or t["metrics"].get(metric) is None:
            continue
        key = (r["method"], r["arch"], r["per_class"], r["mode"],
               json.dumps(r.get("overrides") or {}, sort_keys=True), r["arm"])
        groups[key].append(r)
    order = list(ARM_NAMES)
    rows = []
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2], k[3] != "balanced", k[4] != "{}", k[4],
                                             order.index(k[5]) if k[5] in order else len(order))):
        rs = sorted(groups[key], key=lambda r: r["seed"])
        final = [r["metrics"][metric] for r in rs]
        kept = [r["tracked_best"]["metrics"][metric] for r in rs]
        d = paired_difference(kept, final)
        ci = "-" if d.get("ci_low") is None else f"[{d['ci_low']:+.1f}, {d['ci_high']:+.1f}]"
        steps = [r["tracked_best"]["step"] for r in rs]
        stops = sum(r["tracked_best"].get("stop_step") is not None for r in rs)
        rows.append({"method": key[0].upper(), "budget": key[2], "set": key[3], "settings": _overrides_str(key[4]),
                     "arm": ARM_NAMES.get(key[5], key[5]), "n": d["n"], "final": float(np.mean(final)),
                     "kept": float(np.mean(kept)), "mean": f"{d['mean']:+.2f}", "ci": ci,
                     "steps": f"{int(np.median(steps))} ({min(steps)}-{max(steps)})", "stops": f"{stops}/{len(rs)}"})
    if not rows:
        return ""
    return format_table(rows, [("method", "Method", None), ("budget", "Per class", None), ("set", "Set", None),
                               ("settings", "Settings", None), ("arm", "Arm", None), ("n", "Seeds", None),
                               ("final", f"{metric}, final", ".1f"), ("kept", f"{metric}, kept", ".1f"),
                               ("mean", "Mean Δ (kept - final)", None), ("ci", "95 % CI", None),
                               ("steps", "Kept step, median (range)", None),
                               ("stops", "Would have stopped", None)])


def plot_contrasts(panels: dict[str, list[dict]], path: str | os.PathLike, title: str = "",
                   metric: str = "top1") -> paths.Path | None:
    """A figure of paired contrasts: one horizontal bar per contrast (the mean difference) with its 95 % interval,
    one panel per entry of ``panels`` (name -> :func:`contrasts` output); None when there is nothing to draw."""
    panels = {k: v for k, v in panels.items() if v}
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(c["label"] for v in panels.values() for c in v))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 2.5, 0.5 * len(labels) + 1.4),
                             sharey=True, squeeze=False)
    for ax, (name, rows) in zip(axes[0], panels.items()):
        for i, label in enumerate(labels):
            row = next((c for c in rows if c["label"] == label), None)
            if row is None:
                continue
            d = row["d"]
            lo = d["mean"] - d["ci_low"] if d.get("ci_low") is not None else 0.0
            hi = d["ci_high"] - d["mean"] if d.get("ci_high") is not None else 0.0
            excl = d.get("ci_low") is not None and (d["ci_low"] > 0 or d["ci_high"] < 0)
            ax.barh(i, d["mean"], color="tab:blue" if excl else "tab:gray", alpha=0.8)
            ax.errorbar(d["mean"], i, xerr=[[lo], [hi]], color="black", capsize=3, lw=1)
            ax.text(d["mean"], i + 0.32, f"{d['mean']:+.1f} (n={d['n']})", fontsize=7, ha="center")
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(f"paired Δ {metric} (points), 95 % CI")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(labels)), labels, fontsize=8)
    axes[0][0].invert_yaxis()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    path = paths.as_path(path)
    paths.write_bytes_atomic(path, buf.getvalue())
    return path


def _short(path: str | os.PathLike) -> str:
    p = paths.as_path(path)
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


def join_results(results: str | os.PathLike, also: tuple = ()) -> tuple[list[dict], list[tuple[str, int]]]:
    """The records of ``results`` plus those of each file in ``also`` whose (group, cell, arm) is not already there
    (the first file that has a record wins), and per file its short name and how many records it gave."""
    records, seen, sources = [], set(), []
    for f in (results, *also):
        n = 0
        for r in read_results(f):
            k = (r.get("group"), r.get("cell"), r.get("arm"))
            if k not in seen:
                seen.add(k)
                records.append(r)
                n += 1
        sources.append((_short(f), n))
    return records, sources


def settings_table(records: list[dict], metric: str = "top1") -> str:
    """What each setting does against the method's defaults: every record run with overrides (other than
    ``oe.early_stopping``, which :func:`early_stopping_table` pairs) paired with the record of the same method,
    teacher, budget, set, arm and seed run without any (another group may hold it: a sweep's reference group); per
    setting and arm the mean with it and at the defaults, and the paired difference with its 95 % t-interval; ''
    when nothing pairs."""
    defaults, changed = {}, collections.defaultdict(list)
    for r in records:
        if r["metrics"].get(metric) is None:
            continue
        key = (r["method"], r["arch"], r["per_class"], r["mode"], r["arm"])
        ov = dict(r.get("overrides") or {})
        if not ov:
            defaults[key + (r["seed"],)] = r["metrics"][metric]
        elif "oe.early_stopping" not in ov:
            changed[key + (json.dumps(ov, sort_keys=True),)].append(r)
    order = list(ARM_NAMES)
    rows = []
    for key in sorted(changed, key=lambda k: (k[0], k[1], k[2], k[3] != "balanced", k[5],
                                              order.index(k[4]) if k[4] in order else len(order))):
        pairs = [(r["metrics"][metric], defaults[key[:5] + (r["seed"],)]) for r in
                 sorted(changed[key], key=lambda r: r["seed"]) if key[:5] + (r["seed"],) in defaults]
        if not pairs:
            continue
        a, b = [p[0] for p in pairs], [p[1] for p in pairs]
        d = paired_difference(a, b)
        ci = "-" if d.get("ci_low") is None else f"[{d['ci_low']:+.1f}, {d['ci_high']:+.1f}]"
        rows.append({"method": key[0].upper(), "budget": key[2], "set": key[3], "settings": _overrides_str(key[5]),
                     "arm": ARM_NAMES.get(key[4], key[4]), "n": d["n"], "with": float(np.mean(a)),
                     "default": float(np.mean(b)), "mean": f"{d['mean']:+.2f}", "ci": ci,
                     "per_seed": ", ".join(f"{x - y:+.1f}" for x, y in pairs)})
    if not rows:
        return ""
    return format_table(rows, [("method", "Method", None), ("budget", "Per class", None), ("set", "Set", None),
                               ("settings", "Setting", None), ("arm", "Arm", None), ("n", "Seeds", None),
                               ("with", f"{metric}, setting", ".1f"), ("default", f"{metric}, defaults", ".1f"),
                               ("mean", "Mean Δ", None), ("ci", "95 % CI", None), ("per_seed", "Per seed", None)])


def summarize(results: str | os.PathLike, out_dir: str | os.PathLike, class_names: list[str] | None = None,
              title: str = "Results", also: tuple = (), primary: Any = None,
              primary_after_results: bool = False, tuning_rule: Any = None) -> paths.Path:
    """Write ``summary.md``, ``accuracy_vs_budget.png`` and one per-class plot into ``out_dir``, from the records of
    ``results`` joined with those of the files in ``also`` (:func:`join_results`). ``primary``: the grid config's
    ``primary_contrasts`` (:mod:`oefsmc_jax.experiments.primary`), reported first with a Holm correction; every
    other contrast is labelled exploratory. ``primary_after_results``: they were declared after the results.
    ``tuning_rule``: a tuning sweep's ``config.tuning_rule`` (:mod:`oefsmc_jax.experiments.tuning`); its choices
    are reported and written to ``chosen.json``."""
    for f in also:
        if not paths.as_path(f).exists():
            raise FileNotFoundError(f"--also {os.fspath(f)}: no such results file")
    records, sources = join_results(results, tuple(also))
    if not records:  # an empty summary would read as a grid that ran and found nothing
        raise ValueError(f"{os.fspath(results)}: no grid records to summarize (the file is missing, empty or "
                         "unreadable); run the grid first")
    out = paths.as_path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    origin = ", ".join(f"{n} from `{name}`" for name, n in sources) if also else f"from `{sources[0][0]}`"
    parts = [f"# {title}", "", f"{len(records)} arm results {origin} "
             f"({len({r['cell'] for r in records})} cells). Accuracies in %, mean ± std over seeds.", ""]
    if also:
        parts += ["Joined files: where two files hold the same group, cell and arm, the first file's record is kept.",
                  ""]
    commits = collections.Counter(str(r.get("git_commit") or "unknown")[:7] for r in records)
    if len(commits) > 1:
        parts += ["Git commits: " + ", ".join(f"`{c}` ({n} records)" for c, n in sorted(commits.items())) + ".",
                  ""]
    trained = collections.Counter(str(r["trained_commit"])[:7] for r in records if r.get("trained_commit"))
    if trained:
        parts += ["Trained at commits: " + ", ".join(f"`{c}` ({n} records)" for c, n in sorted(trained.items()))
                  + f" ({len(records) - sum(trained.values())} records do not say).", ""]
    devices = sorted({r["device"] for r in records if r.get("device")})
    if devices:
        parts += [f"Run on: {'; '.join(devices)}.", ""]
    parts += ["## All settings", "", summary_table(records), ""]
    declared = primary_table(records, primary, primary_after_results)
    if declared:
        parts += ["## Primary contrasts (declared in the grid config, Holm-corrected)", "", declared, "",
                  "Every other contrast below is **exploratory**: intervals without a correction for the many "
                  "comparisons, to be read as leads, not findings.", ""]
    else:
        parts += ["No primary contrasts are declared for this grid (`config.primary_contrasts`): every contrast "
                  "below is **exploratory**.", ""]
    splits = {((r.get("config") or {}).get("eval") or {}).get("split", "test") for r in records}
    split = {frozenset({"val"}): "validation split", frozenset({"test"}): "test split"}.get(frozenset(splits),
                                                                                          "evaluation split")
    parts += [f"## Paired differences to the base method (same seed, same subset, same {split}) — exploratory", "",
              paired_table(records, "top1"), "", paired_table(records, "few"), ""]
    guided = ("oe_complement", "oe_confidence")
    vs_paper = paired_table(records, "top1", reference="oe", arms=guided)
    if vs_paper:
        parts += ["## Teacher-guided OOD selection against the paper's rule (paired, same OOD pool) — exploratory",
                  "",
                  vs_paper, "", paired_table(records, "few", reference="oe", arms=guided), ""]
    factorial = factorial_table(records)
    if factorial:
        parts += ["## What the teacher arm's gain is made of (one change per row, paired) — exploratory", "",
                  factorial, ""]
        panels = collections.defaultdict(list)
        for c in contrasts(records):
            k = c["key"]
            panels[f"{k[1].upper()}, {k[3]}/class, {k[4]}" + (f", {_overrides_str(k[5])}" if k[5] != "{}" else "")] \
                .append(c)
        if plot_contrasts(dict(panels), out / "factorial.png", title):
            parts += ["![factorial](factorial.png)", ""]
    rule = TuningRule.from_config(tuning_rule)
    if rule is not None:
        choices = choose(records, rule)
        write_chosen(choices, out / "chosen.json")
        parts += ["## The defaults this sweep chooses (`chosen.json`)", "", describe_rule(rule), "",
                  tuning_table(choices, rule) or "No setting has both its default and another value run yet.",
                  ""]
    settings = settings_table(records)
    if settings:
        parts += ["## What each setting does against the method's defaults (same arm, paired by seed) — exploratory",
                  "", settings, ""]
    stopping = early_stopping_table(records)
    if stopping:
        parts += ["## What early stopping does to each arm (on minus off, paired by seed) — exploratory", "",
                  stopping, ""]
    tracked = tracked_best_table(records)
    if tracked:
        parts += ["## What early stopping would have kept (runs that trained their whole budget; kept minus final, "
                  "paired by seed) — exploratory", "", tracked, ""]
    imbalance = imbalance_table(records)
    if imbalance:
        parts += ["## What imbalance costs (balanced minus long-tailed set of the same total) — exploratory", "",
                  imbalance, ""]
    if plot_budget(records, out / "accuracy_vs_budget.png"):
        parts += ["## Accuracy against budget", "", "![accuracy against budget](accuracy_vs_budget.png)", ""]
    cell = next((r for r in records if r["mode"] == "exp" and not r.get("overrides") and r["arm"] == "oe"
                 and "per_class" in r["metrics"] and "config" in r and "subset" in r["config"]), None)
    if cell is not None:
        arms = {ARM_NAMES.get(r["arm"], r["arm"]): r["metrics"]["per_class"] for r in records
                if r["cell"] == cell["cell"]}
        train_counts = _counts_of(cell)
        names = class_names or [str(i) for i in range(len(train_counts))]
        plot_per_class(out / "per_class.png", names, train_counts, arms, cell["teacher"]["per_class"],
                       title=cell["cell"])
        parts += [f"## Per-class accuracy of one cell ({cell['cell']})", "", "![per-class](per_class.png)", ""]
    path = out / "summary.md"
    path.write_text("\n".join(parts))
    return path


def _counts_of(record: dict) -> list[int]:
    from oefsmc_jax.data import class_counts

    s = record["config"]["subset"]
    k = record["config"]["data"]["num_classes"]
    order = None
    if s["class_order"] == "random":
        from oefsmc_jax.data import class_order_permutation

        order = class_order_permutation(k, s["seed"])
    return class_counts(k, s["mode"], s["per_class"], s["rho"], s["equal_total"], order).tolist()
