"""The tuning rule of a sweep: which value of each swept setting becomes a method's default.

A sweep config declares its rule before its records are read, as ``config.tuning_rule``::

    config.tuning_rule = {"metric": "top1", "margin": 0.5,
                        "candidates": {"oe": {"eta": [0, 0.01, 0.1], "calibration_ood_share": ["0", "count"]}}}

For each method and each swept field (a record's ``overrides`` key), the records run with that one override are
paired by seed with the method's reference records (same method, teacher, budget, set and arm, run with no
override), on the rule's metric of the validation split. A field's candidate values are the reference (the
method's default at the time of the sweep) and every value a record ran with. The value with the highest paired
mean gain over the reference is chosen if that gain is at least ``margin`` points; otherwise the reference is kept
(a tie or a gain within the noise of a few seeds does not move a default).

Which arm scores a field: OE-FSMC's settings (``oe.*``) are scored on the OE-FSMC arm (``oe``), a method's own
recipe (``method.*``) on its base arm, since the base arm is that recipe.

The reference's value is read from the reference records' config; where that holds the "method's default"
sentinel (-1 or ``method``), it is the one candidate of ``candidates[field]`` that no record ran with (a sweep
leaves each default out of the values it runs). A field is *complete* when every candidate has a record for every
seed of the reference; only complete fields are chosen.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from oefsmc_jax.errors import ConfigError
from oefsmc_jax.evaluation import format_table, paired_difference

#: the config values that mean "the method's own default" (``methods.base``'s sentinels)
_SENTINELS = (-1, -1.0, "method")


@dataclasses.dataclass(frozen=True)
class TuningRule:
    """A sweep's declared rule: the validation ``metric``, the ``margin`` (points of paired mean gain) a value
    needs over the reference to replace it, and per field its ``candidates`` (to name a sentinel default)."""

    metric: str = "top1"
    margin: float = 0.5
    candidates: Mapping[str, Sequence[Any]] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_config(cls, value: Any) -> TuningRule | None:
        """The rule of ``config.tuning_rule`` (a mapping), None where the config declares none; a bad value fails
        with one line naming the field."""
        if value is None:
            return None
        v = dict(value.to_dict() if hasattr(value, "to_dict") else value)
        if not isinstance(v.get("candidates", {}), Mapping):
            raise ConfigError("config.tuning_rule.candidates: a mapping of fields to their lists of values, got "
                              f"{v['candidates']!r}")
        unknown = set(v) - {"metric", "margin", "candidates"}
        if unknown:
            raise ConfigError(f"config.tuning_rule: unknown key(s) {', '.join(sorted(unknown))}; allowed: metric, "
                              "margin, candidates")
        margin = v.get("margin", 0.5)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin < 0:
            raise ConfigError(f"config.tuning_rule.margin: a number of points >= 0, got {margin!r}")
        cands = _flatten(v.get("candidates") or {})
        for k, vals in cands.items():
            if not isinstance(vals, (list, tuple)) or len(vals) < 2:
                raise ConfigError(f"config.tuning_rule.candidates.{k}: a list of at least two values, got {vals!r}")
        return cls(metric=str(v.get("metric", "top1")), margin=float(margin),
                   candidates={k: [canonical(x) for x in vals] for k, vals in cands.items()})


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{"oe": {"eta": [...]}}`` as ``{"oe.eta": [...]}`` (a config cannot hold dotted keys)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def canonical(value: Any) -> Any:
    """A setting's value in one form, so that ``0``, ``0.0`` and ``"0"`` name the same value: a number as a
    float, anything else as a lower-case string."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return float(value)
    s = str(value).strip().lower()
    try:
        return float(s)
    except ValueError:
        return s


def scoring_arm(field: str) -> str:
    """The arm whose records score ``field``: OE-FSMC's settings on the OE-FSMC arm, a method's recipe on base."""
    return "oe" if field.startswith("oe.") else "base"


def _config_value(record: Mapping, field: str) -> Any:
    node: Any = record.get("config") or {}
    for part in field.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


@dataclasses.dataclass(frozen=True)
class Choice:
    """One method's choice for one field: its reference (default) value, per other value the paired gain over
    it (mean, 95 % interval, seeds), the chosen value, and whether every candidate ran on every seed."""

    method: str
    field: str
    arm: str
    reference: Any
    reference_mean: float
    gains: dict[Any, dict]
    chosen: Any
    complete: bool
    seeds: int


def choose(records: Sequence[Mapping], rule: TuningRule) -> list[Choice]:
    """Apply ``rule`` to a sweep's ``records`` (see the module docstring); one :class:`Choice` per method and
    swept field, in method then field order. Records with more than one override are left out."""
    reference: dict[tuple, dict[int, float]] = collections.defaultdict(dict)
    ref_records: dict[tuple, Mapping] = {}
    swept: dict[tuple, dict[Any, dict[int, float]]] = collections.defaultdict(lambda: collections.defaultdict(dict))
    for r in records:
        value = r["metrics"].get(rule.metric)
        if value is None:
            continue
        key = (r["method"], r["arch"], r["per_class"], r["mode"], r["arm"])
        ov = dict(r.get("overrides") or {})
        if not ov:
            reference[key][r["seed"]] = float(value)
            ref_records[key] = r
        elif len(ov) == 1:
            (field, v), = ov.items()
            if scoring_arm(field) == r["arm"]:
                swept[key + (field,)][canonical(v)][r["seed"]] = float(value)
    out = []
    for skey in sorted(swept, key=lambda k: (k[0], k[1], k[2], k[3], k[5])):
        key, field = skey[:5], skey[5]
        ref = reference.get(key)
        if not ref:
            continue
        runs = swept[skey]
        ref_value = canonical(_config_value(ref_records[key], field))
        if ref_value in _SENTINELS or ref_value is None:
            missing = [c for c in rule.candidates.get(field, []) if c not in runs]
            ref_value = missing[0] if len(missing) == 1 else None
        cands = rule.candidates.get(field)
        complete = ref_value is not None and all(
            set(runs.get(c, {})) >= set(ref) for c in (cands or runs) if c != ref_value)
        gains = {}
        for v, by_seed in runs.items():
            seeds = sorted(set(by_seed) & set(ref))
            if seeds:
                d = paired_difference([by_seed[s] for s in seeds], [ref[s] for s in seeds])
                gains[v] = {"mean": d["mean"], "ci_low": d.get("ci_low"), "ci_high": d.get("ci_high"),
                            "n": d["n"], "value_mean": float(np.mean([by_seed[s] for s in seeds]))}
        chosen = ref_value
        if complete and gains:
            # the largest gain; among equal gains the value listed first in the candidates (then the smaller)
            order = list(cands or sorted(gains, key=str))
            best = max(gains, key=lambda v: (round(gains[v]["mean"], 9),
                                             -(order.index(v) if v in order else len(order))))
            if gains[best]["mean"] >= rule.margin:
                chosen = best
        out.append(Choice(method=key[0], field=field, arm=key[4], reference=ref_value,
                          reference_mean=float(np.mean(list(ref.values()))), gains=gains, chosen=chosen,
                          complete=complete, seeds=len(ref)))
    return out


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return "?" if value is None else str(value)


def chosen_settings(choices: Sequence[Choice]) -> dict[str, dict[str, Any]]:
    """Per method, the chosen value of each complete field (``{"oe.eta": 0.0, "method.fskd.target": "block"}``)."""
    out: dict[str, dict[str, Any]] = collections.defaultdict(dict)
    for c in choices:
        if c.complete:
            out[c.method][c.field] = c.chosen
    return dict(out)


def tuning_table(choices: Sequence[Choice], rule: TuningRule) -> str:
    """The choices as a markdown table: per method and field the reference, each other value's paired gain with
    its 95 % interval, and the chosen value ('' when there are none)."""
    rows = []
    for c in choices:
        others = []
        for v, g in sorted(c.gains.items(), key=lambda kv: str(kv[0])):
            ci = "" if g.get("ci_low") is None else f" [{g['ci_low']:+.1f}, {g['ci_high']:+.1f}]"
            others.append(f"{_show(v)}: {g['mean']:+.2f}{ci}")
        rows.append({"method": c.method.upper(), "field": c.field, "arm": c.arm, "seeds": c.seeds,
                     "reference": f"{_show(c.reference)} ({c.reference_mean:.1f})", "gains": "; ".join(others),
                     "chosen": _show(c.chosen) if c.complete else "(incomplete)",
                     "moved": "yes" if c.complete and c.chosen != c.reference else ""})
    if not rows:
        return ""
    return format_table(rows, [("method", "Method", None), ("field", "Setting", None), ("arm", "Scored on", None),
                               ("seeds", "Seeds", None), ("reference", f"Default ({rule.metric})", None),
                               ("gains", "Other values: paired gain [95 % CI]", None), ("chosen", "Chosen", None),
                               ("moved", "Default moved", None)])


def write_chosen(choices: Sequence[Choice], path: Any) -> None:
    """``chosen.json``: the chosen settings per method (complete fields only), for the defaults' test to read."""
    from oefsmc_jax.progress import write_json

    write_json(path, {m: dict(sorted(v.items())) for m, v in sorted(chosen_settings(choices).items())})


def describe_rule(rule: TuningRule) -> str:
    """The rule in one sentence, for the summary."""
    return (f"Rule (declared in the sweep config, `config.tuning_rule`): per method and setting, the value with the "
            f"highest paired mean gain in validation {rule.metric} over the default replaces it if that gain is at "
            f"least {rule.margin:g} points; OE-FSMC's settings are scored on the OE-FSMC arm, a method's recipe on "
            "its base arm. Only settings whose every value ran on every seed are chosen. "
            + (f"Candidates: {json.dumps(dict(rule.candidates))}." if rule.candidates else ""))
