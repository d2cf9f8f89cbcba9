"""Primary contrasts of a grid: declared in its config before it runs, tested with a Holm correction over them.

A grid config may set ``primary_contrasts``: a list of entries, each a mapping with the two arms ``a`` and ``b`` of
a paired contrast ``a - b`` (same seed, subset, pool and test split) and filters that pick one setting of the grid:
``group``, ``method``, ``arch``, ``per_class`` and ``mode`` (a filter left out matches every value); ``label`` is
optional. The summary reports these contrasts in a table of their own: the mean paired difference, its 95 %
t-interval, the two-sided paired t-test p and the Holm-adjusted p over the declared family (step-down, monotone,
capped at 1); every other contrast of the summary is exploratory. A declared contrast without records counts as
p = 1 in the family, so that the family is the one declared, not the one that happened to run.
``primary_declared_after_results: True`` marks entries written after the grid's results were seen (old grids);
the summary says so above the table.
"""

from __future__ import annotations

import collections
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from oefsmc_jax.errors import ConfigError
from oefsmc_jax.evaluation import format_table, paired_difference
from oefsmc_jax.experiments.grid import expand, setting_key
from oefsmc_jax.oe.arms import ARMS

FILTERS = ("group", "method", "arch", "per_class", "mode")
ENTRY_KEYS = ("a", "b", "label") + FILTERS
FIELD = "config.primary_contrasts"


def paired_t_pvalue(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided p of the paired t-test of ``a - b`` against a zero mean (``scipy.stats.ttest_rel``); None with
    fewer than two pairs. Identical differences give p = 1 when they are all zero and p = 0 otherwise."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    n = d.size
    if n < 2:
        return None
    sd = float(d.std(ddof=1))
    mean = float(d.mean())
    if sd == 0.0:
        return 1.0 if mean == 0.0 else 0.0
    from scipy import stats  # a dependency of scikit-learn, which requirements.txt lists

    t = mean / (sd / math.sqrt(n))
    return float(2.0 * stats.t.sf(abs(t), n - 1))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order: the ``i``-th smallest p times ``m - i`` (``i`` from
    0), made non-decreasing in that order and capped at 1."""
    p = [float(x) for x in pvalues]
    for x in p:
        if not 0.0 <= x <= 1.0:
            raise ValueError(f"holm: p-values must lie in [0, 1], got {x}")
    m = len(p)
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda j: p[j])):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def _entries(config_value: Any) -> list[dict]:
    """The declared entries as plain dicts, checked; raises :class:`ConfigError` naming the entry."""
    if config_value is None:
        return []
    if isinstance(config_value, (str, bytes)) or not isinstance(config_value, Sequence):
        raise ConfigError(f"{FIELD}: a list of contrasts, each a mapping with arms 'a' and 'b', got "
                          f"{type(config_value).__name__}")
    out = []
    for i, e in enumerate(config_value):
        if not isinstance(e, Mapping) and not hasattr(e, "to_dict"):
            raise ConfigError(f"{FIELD}[{i}]: a mapping with arms 'a' and 'b' (and optional {', '.join(FILTERS)}, "
                              f"label), got {e!r}")
        e = dict(e.to_dict() if hasattr(e, "to_dict") else e)
        bad = sorted(set(e) - set(ENTRY_KEYS))
        if bad:
            raise ConfigError(f"{FIELD}[{i}]: unknown key(s) {', '.join(bad)}; allowed: {', '.join(ENTRY_KEYS)}")
        for side in ("a", "b"):
            if e.get(side) not in ARMS:
                raise ConfigError(f"{FIELD}[{i}].{side}: {e.get(side)!r} is not an arm; allowed: {', '.join(ARMS)}")
        if e["a"] == e["b"]:
            raise ConfigError(f"{FIELD}[{i}]: arms a and b are both {e['a']!r}; a contrast needs two arms")
        if "per_class" in e and (isinstance(e["per_class"], bool) or not isinstance(e["per_class"], int)):
            raise ConfigError(f"{FIELD}[{i}].per_class: an integer budget, got {e['per_class']!r}")
        out.append(e)
    return out


def _matches(entry: Mapping, setting: Mapping) -> bool:
    return all(f not in entry or entry[f] == setting[f] for f in FILTERS)


def _describe(entry: Mapping) -> str:
    return ", ".join(f"{f}={entry[f]}" for f in FILTERS if f in entry) or "no filter"


def check_primary_contrasts(config: Any) -> None:
    """Check a grid config's ``primary_contrasts`` (and ``primary_declared_after_results``) against its groups:
    each entry names two arms and picks exactly one setting of the grid in which both arms run. Raises
    :class:`ConfigError` with one line naming the entry."""
    after = config.get("primary_declared_after_results", False)
    if not isinstance(after, bool):
        raise ConfigError(f"config.primary_declared_after_results: True or False, got {after!r}")
    entries = _entries(config.get("primary_contrasts"))
    settings: dict = collections.defaultdict(set)
    for cell in expand(config.groups):
        s = cell.settings()
        key = (s["group"], s["method"], s["arch"], s["per_class"], s["mode"], json.dumps(s["overrides"],
                                                                                      sort_keys=True))
        settings[key] |= set(cell.arms)
    for i, e in enumerate(entries):
        hits = [k for k, arms in settings.items()
                if {e["a"], e["b"]} <= arms and _matches(e, dict(zip(FILTERS, k[:5])))]
        if len(hits) != 1:
            found = "; ".join(f"group={k[0]}, method={k[1]}, per_class={k[3]}, mode={k[4]}" for k in hits[:3])
            raise ConfigError(
                f"{FIELD}[{i}] ({e['a']} - {e['b']}, {_describe(e)}): must pick exactly one setting of the grid "
                f"in which both arms run, picks {len(hits)}" + (f" ({found}{', ...' if len(hits) > 3 else ''}); "
                                                                "add a filter" if hits else ""))


def contrast_label(entry: Mapping) -> str:
    """The entry's ``label``, else ``A - B`` in the summary's arm names."""
    if entry.get("label"):
        return str(entry["label"])
    def name(arm: str) -> str:
        return (ARMS[arm].short if arm in ARMS else arm).removeprefix("+ ")

    return f"{name(entry['a'])} − {name(entry['b'])}"


def primary_contrasts(records: list[dict], entries: Any, metric: str = "top1") -> list[dict]:
    """One dict per declared entry, in order: ``label``, ``entry``, ``setting`` (the matched setting's key or
    None), ``status`` (``ok``, ``not run`` or ``ambiguous: N settings``), ``d`` (:func:`paired_difference` of
    ``a - b`` over the seeds where both arms have ``metric``), ``p`` (two-sided paired t-test) and ``p_holm``
    (Holm over all entries; an entry without a p counts as p = 1)."""
    entries = _entries(entries)
    by = collections.defaultdict(dict)
    for r in records:
        by[setting_key(r)].setdefault(r["seed"], {})[r["arm"]] = r["metrics"].get(metric)
    out = []
    for e in entries:
        pairs_by_setting = {}
        for key, seeds in by.items():
            if not _matches(e, dict(zip(FILTERS, key[:5]))):
                continue
            pairs = [(v[e["a"]], v[e["b"]]) for _, v in sorted(seeds.items())
                     if v.get(e["a"]) is not None and v.get(e["b"]) is not None]
            if pairs:
                pairs_by_setting[key] = pairs
        row = {"label": contrast_label(e), "entry": e, "setting": None, "d": None, "p": None}
        if not pairs_by_setting:
            row["status"] = "not run"
        elif len(pairs_by_setting) > 1:
            row["status"] = f"ambiguous: {len(pairs_by_setting)} settings"
        else:
            (key, pairs), = pairs_by_setting.items()
            a, b = [x for x, _ in pairs], [y for _, y in pairs]
            row.update(status="ok", setting=key, d=paired_difference(a, b), p=paired_t_pvalue(a, b))
        out.append(row)
    adjusted = holm([1.0 if r["p"] is None else r["p"] for r in out])
    for r, q in zip(out, adjusted):
        r["p_holm"] = q
    return out


def _p(p: float | None) -> str:
    if p is None:
        return "-"
    return "<0.0001" if p < 1e-4 else f"{p:.4f}"


def primary_table(records: list[dict], entries: Any, declared_after_results: bool = False,
                  metric: str = "top1") -> str:
    """The markdown section of the declared primary contrasts (a short preamble and the table); '' when none is
    declared."""
    rows = primary_contrasts(records, entries, metric)
    if not rows:
        return ""
    body = []
    for i, r in enumerate(rows):
        d, k = r["d"], r["setting"]
        setting = (f"{k[0]}: {k[1].upper()}, {k[3]}/class, {k[4]}" if k is not None else _describe(r["entry"]))
        ci = "-" if d is None or d.get("ci_low") is None else f"[{d['ci_low']:+.1f}, {d['ci_high']:+.1f}]"
        body.append({"i": i + 1, "contrast": r["label"], "setting": setting,
                     "n": d["n"] if d is not None else (r["status"] if r["status"] != "ok" else "-"),
                     "mean": "-" if d is None else f"{d['mean']:+.2f}", "ci": ci, "p": _p(r["p"]),
                     "holm": _p(r["p_holm"]), "holds": "yes" if r["p_holm"] < 0.05 else "no"})
    when = ("**declared after the results were seen** (`primary_declared_after_results`): this grid ran before "
            "contrasts were declared, so these were chosen from its committed reading; the correction limits the "
            "family, it cannot undo that choice" if declared_after_results else
            "declared in the grid config before the grid ran")
    head = [f"{len(rows)} contrast(s) {when}. Paired by seed; 95 % t-interval; p: two-sided paired t-test; "
            f"Holm: step-down over these {len(rows)} (a contrast not run counts as p = 1); holds: Holm p < 0.05.",
            ""]
    return "\n".join(head) + "\n" + format_table(body, [
        ("i", "#", None), ("contrast", "Contrast (a − b)", None), ("setting", "Setting", None),
        ("n", "Seeds", None), ("mean", f"Mean Δ {metric}", None), ("ci", "95 % CI", None), ("p", "p", None),
        ("holm", "p (Holm)", None), ("holds", "Holds", None)])
