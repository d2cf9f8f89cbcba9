"""The same arms on several OOD pools, side by side: a table and a figure of paired contrasts per pool.

    python -m oefsmc_jax.experiments.pools --results tiny=DIR_A/results.jsonl \
        --results tiny_disjoint=DIR_B/results.jsonl --results dtd=DIR_C/results.jsonl --group factorial \
        --out docs/results/deconfound_cifar10

For each pool (``name=results.jsonl``) and each setting of the group (method, budget, set), every contrast of
:data:`POOL_CONTRASTS` whose two arms were run is paired by seed with a 95 % t-interval; ``pools.md`` has the table,
``pools.png`` one panel per pool and setting. Used for the class-disjoint controls (``deconfound_cifar10``),
and, with ``--stem budgets --label steps``, to set the same grid at two step budgets side by side.
"""

from __future__ import annotations

import argparse
import sys

from oefsmc_jax import paths
from oefsmc_jax.evaluation import format_table
from oefsmc_jax.experiments.summarize import contrasts, plot_contrasts

#: label, arm a, arm b: "a - b" per seed
POOL_CONTRASTS = (
    ("OE-FSMC (paper) − base", "oe", "base"),
    ("teacher complement − base", "oe_complement", "base"),
    ("teacher complement − OE-FSMC (paper)", "oe_complement", "oe"),
    ("teacher complement − random images, same count, R off (the choice of images)", "oe_complement",
     "oe_random_matched"),
    ("teacher complement, R on − OE-FSMC (paper)", "oe_complement_r", "oe"),
    ("teacher complement, R on − base", "oe_complement_r", "base"),
    ("random images, teacher count, R off − OE-FSMC (paper)", "oe_random_matched", "oe"),
)


def compare(pools: dict[str, list[dict]], group: str | None = None,
            label: str = "OOD pool") -> tuple[str, dict[str, list[dict]]]:
    """The markdown table and the figure panels of :data:`POOL_CONTRASTS` for ``pools`` (name -> records),
    restricted to the records of ``group`` when given; ``label`` names what the grids differ in (the first
    column's header and the panels' prefix), an OOD pool by default."""
    rows, panels = [], {}
    for name, records in pools.items():
        recs = [r for r in records if group is None or r.get("group") == group]
        for c in contrasts(recs, POOL_CONTRASTS):
            k, d = c["key"], c["d"]
            setting = f"{k[1].upper()}, {k[3]}/class, {k[4]}"
            ci = "-" if d.get("ci_low") is None else f"[{d['ci_low']:+.1f}, {d['ci_high']:+.1f}]"
            rows.append({"pool": name, "setting": setting, "contrast": c["label"], "n": d["n"],
                         "mean": f"{d['mean']:+.2f}", "ci": ci})
            panels.setdefault(f"{label} {name}: {setting}", []).append(c)
    if not rows:
        return "", {}
    table = format_table(rows, [("pool", label, None), ("setting", "Setting", None),
                                ("contrast", "Contrast (paired by seed)", None), ("n", "Seeds", None),
                                ("mean", "Mean Δ top-1", None), ("ci", "95 % CI", None)])
    return table, panels


def main(argv: list[str] | None = None) -> int:
    """``pools`` with ``argv`` (without the program name, default ``sys.argv[1:]``): parse with the ``oefsmc
    pools`` parser, then :func:`run_cli`."""
    from oefsmc_jax.main import parse_subcommand

    return run_cli(parse_subcommand("pools", argv))


def run_cli(a: argparse.Namespace) -> int:
    """Write ``STEM.md`` and ``STEM.png`` for the pools that ``a`` (``oefsmc pools``'s flags) names; 2 after one
    line when a results file has no records or no contrast has both arms."""
    from oefsmc_jax.experiments.runner import read_results

    pools = {}
    for item in a.results:
        name, _, path = item.partition("=")  # the parser checked the form NAME=PATH
        pools[name] = read_results(path)
        if not pools[name]:
            print(f"error: --results {item!r}: no records in {path}", file=sys.stderr)
            return 2
    table, panels = compare(pools, a.group, a.label)
    if not table:
        print("error: no contrast has both of its arms in any pool", file=sys.stderr)
        return 2
    out = paths.as_path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_contrasts(panels, out / f"{a.stem}.png", f"{a.title} (paired by seed, 95 % CI)")
    text = [f"# {a.title}", "", table, "", f"![{a.stem}]({a.stem}.png)", ""]
    paths.write_text_atomic(out / f"{a.stem}.md", "\n".join(text))
    print(f"{a.stem}: {out / (a.stem + '.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from oefsmc_jax.main import cli

    cli(["pools", *sys.argv[1:]])
