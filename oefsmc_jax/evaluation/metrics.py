"""Evaluation metrics (pure numpy): accuracy, per-class / shot-group accuracy, agreement, paired differences.

All accuracies are percentages in ``[0, 100]``. Classes that do not occur in the evaluated labels have no
accuracy: they are reported as ``None`` (never NaN) and left out of every mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

GROUPS: tuple[str, str, str] = ("many", "medium", "few")

# Two-sided 95 % Student-t quantiles t_{0.975, df} for df = 1..30 (fallback when scipy is unavailable).
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip
_Z975 = 1.96


def _labels(a: np.ndarray | Sequence[int], name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise ValueError(f"{name} must hold integer class indices")
    return arr.astype(np.int64)


def _pair(pred: np.ndarray | Sequence[int], y: np.ndarray | Sequence[int], num_classes: int | None = None):
    p = _labels(pred, "pred")
    t = _labels(y, "y")
    if p.shape != t.shape:
        raise ValueError(f"pred and y differ in length: {p.shape[0]} vs {t.shape[0]}")
    if num_classes is not None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        for arr, name in ((p, "pred"), (t, "y")):
            if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
                raise ValueError(f"{name} has class indices outside [0, {num_classes})")
    return p, t


def class_order(train_counts: np.ndarray | Sequence[int]) -> list[int]:
    """Class indices sorted by training count, descending; ties keep the smaller class index first."""
    counts = np.asarray(train_counts, dtype=np.int64)
    if counts.ndim != 1:
        raise ValueError(f"train_counts must be 1-D, got shape {counts.shape}")
    return sorted(range(counts.shape[0]), key=lambda k: (-int(counts[k]), k))


def shot_groups(train_counts: np.ndarray | Sequence[int]) -> list[str]:
    """The shot group ('many' | 'medium' | 'few') of every class, indexed by class.

    Classes are sorted by :func:`class_order` and cut into three consecutive parts of sizes as equal as
    possible; the remainder (``K mod 3``) goes first to 'many', then to 'medium'
    (K=10 -> 4/3/3, K=11 -> 4/4/3).
    """
    order = class_order(train_counts)
    k = len(order)
    base, rem = divmod(k, 3)
    sizes = (base + (rem >= 1), base + (rem >= 2), base)
    groups: list[str] = [""] * k
    pos = 0
    for name, size in zip(GROUPS, sizes):
        for c in order[pos : pos + size]:
            groups[c] = name
        pos += size
    return groups


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def confusion_matrix(
    pred: np.ndarray | Sequence[int], y: np.ndarray | Sequence[int], num_classes: int
) -> np.ndarray:
    """``(num_classes, num_classes)`` int64 counts; row = true class ``y``, column = predicted class."""
    p, t = _pair(pred, y, num_classes)
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    return cm


def classification_metrics(
    pred: np.ndarray | Sequence[int],
    y: np.ndarray | Sequence[int],
    num_classes: int,
    train_counts: np.ndarray | Sequence[int] | None = None,
) -> dict:
    """Top-1, balanced and per-class accuracy (percent) of ``pred`` against ``y``.

    Returns ``{'top1', 'balanced', 'per_class', 'n'}`` and, when ``train_counts`` (length ``num_classes``) is
    given, also ``{'many', 'medium', 'few', 'groups'}``: the mean per-class accuracy of each shot group (see
    :func:`shot_groups`) and the group name of every class. Classes absent from ``y`` have ``per_class``
    None and are left out of ``balanced`` and the group means (a group with no present class gives None).
    """
    p, t = _pair(pred, y, num_classes)
    if t.size == 0:
        raise ValueError("cannot compute metrics on an empty set")
    cm = confusion_matrix(p, t, num_classes)
    support = cm.sum(axis=1)
    per_class: list[float | None] = [
        100.0 * float(cm[k, k]) / float(support[k]) if support[k] > 0 else None for k in range(num_classes)
    ]
    out: dict = {
        "top1": 100.0 * float(np.trace(cm)) / float(t.size),
        "balanced": _mean_or_none(per_class),
        "per_class": per_class,
        "n": int(t.size),
    }
    if train_counts is not None:
        counts = np.asarray(train_counts)
        if counts.shape != (num_classes,):
            raise ValueError(f"train_counts must have length {num_classes}, got shape {counts.shape}")
        groups = shot_groups(counts)
        for g in GROUPS:
            out[g] = _mean_or_none([acc for acc, gk in zip(per_class, groups) if gk == g])
        out["groups"] = groups
    return out


def agreement(pred_a: np.ndarray | Sequence[int], pred_b: np.ndarray | Sequence[int]) -> float:
    """Percentage of positions where the two predictions are equal (e.g. student-teacher top-1 agreement)."""
    a, b = _pair(pred_a, pred_b)
    if a.size == 0:
        raise ValueError("cannot compute agreement on an empty set")
    return 100.0 * float(np.mean(a == b))


def t_critical(df: int, use_scipy: bool = True) -> float:
    """Two-sided 95 % Student-t quantile ``t_{0.975, df}``.

    Uses ``scipy.stats.t`` when importable (and ``use_scipy``), else a built-in table for df 1..30 and the
    normal quantile 1.96 beyond.
    """
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if use_scipy:
        try:
            from scipy import stats
        except ImportError:
            pass
        else:
            return float(stats.t.ppf(0.975, df))
    return _T975[df - 1] if df <= len(_T975) else _Z975


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict:
    """Mean paired difference ``a - b`` (e.g. per seed) with a 95 % two-sided t-interval.

    Returns ``{'mean', 'std', 'se', 'n', 't', 'ci_low', 'ci_high', 'half_width'}``; ``std`` is the sample
    standard deviation (ddof=1), ``se = std / sqrt(n)``, ``t = t_{0.975, n-1}`` and the interval is
    ``mean ± t * se``. With ``n == 1`` every key but ``mean`` and ``n`` is None.
    """
    xa = np.asarray(a, dtype=np.float64)
    xb = np.asarray(b, dtype=np.float64)
    if xa.ndim != 1 or xa.shape != xb.shape:
        raise ValueError(f"a and b must be 1-D of equal length, got shapes {xa.shape} and {xb.shape}")
    n = int(xa.size)
    if n == 0:
        raise ValueError("paired_difference needs at least one pair")
    d = xa - xb
    mean = float(d.mean())
    out: dict = {"mean": mean, "std": None, "se": None, "n": n, "t": None,
                 "ci_low": None, "ci_high": None, "half_width": None}  # fmt: skip
    if n >= 2:
        std = float(d.std(ddof=1))
        se = std / math.sqrt(n)
        tq = t_critical(n - 1)
        half = tq * se
        out.update(std=std, se=se, t=tq, ci_low=mean - half, ci_high=mean + half, half_width=half)
    return out
