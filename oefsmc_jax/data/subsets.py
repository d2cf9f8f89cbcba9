"""Few-sample, class-imbalanced subsets and OOD draws (method.md section 1).

Everything here is pure; random draws take a ``jax.random`` key, and the draw cores are jitted (their shapes
only depend on the number of candidates), so the same key gives the same subset on every backend.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "COUNT_MODES",
    "SHOT_GROUP_NAMES",
    "class_counts",
    "class_order_permutation",
    "default_ood_size",
    "few_sample_indices",
    "ood_split",
    "shot_groups",
]

COUNT_MODES = ("balanced", "exp")
SHOT_GROUP_NAMES = ("many", "medium", "few")


def class_order_permutation(num_classes: int, seed: int) -> np.ndarray:
    """A seeded permutation of the classes: entry ``p`` is the class at position ``p`` of the long tail."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return np.asarray(jax.random.permutation(jax.random.PRNGKey(seed), num_classes), dtype=np.int64)


def _exp_counts(n_max: int, factors: np.ndarray) -> np.ndarray:
    # the tiny epsilon keeps exact products (e.g. 30 * 10**-1) from flooring one below through rounding error
    return np.maximum(1, np.floor(n_max * factors + 1e-9)).astype(np.int64)


def class_counts(
    num_classes: int,
    mode: str,
    per_class: int,
    rho: float = 1.0,
    equal_total: bool = True,
    class_order: Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    """Per-class counts ``n_k`` of a few-sample set.

    ``'balanced'``: ``per_class`` each. ``'exp'``: the class at position ``p`` of ``class_order`` (default:
    class index order) gets ``max(1, floor(n_max * rho ** (-p / (K - 1))))``; with ``equal_total`` ``n_max``
    is the value whose total is closest to ``K * per_class`` (ties: the smaller ``n_max``), otherwise
    ``n_max = per_class``.
    """
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"class_counts: num_classes must be an integer >= 1, got {num_classes}")
    if int(per_class) != per_class or per_class < 1:
        raise ValueError(f"class_counts: per_class must be an integer >= 1, got {per_class}")
    if mode not in COUNT_MODES:
        raise ValueError(f"class_counts: mode must be one of {', '.join(COUNT_MODES)}; got {mode!r}")
    if not rho >= 1.0:
        raise ValueError(f"class_counts: rho must be >= 1 (rho = n_max / n_min), got {rho}")
    k, per_class = int(num_classes), int(per_class)
    if class_order is None:
        order = np.arange(k)
    else:
        order = np.asarray(class_order, dtype=np.int64)
        if order.shape != (k,) or not np.array_equal(np.sort(order), np.arange(k)):
            raise ValueError(
                f"class_counts: class_order must be a permutation of 0..{k - 1}, got {order.tolist()}"
            )
    if mode == "balanced":
        return np.full(k, per_class, np.int64)

    pos = np.arange(k, dtype=np.float64)
    factors = np.asarray(rho, np.float64) ** (-pos / (k - 1)) if k > 1 else np.ones(1)
    if equal_total:
        target = k * per_class
        lo, hi = 1, target  # the total is strictly increasing in n_max, and total(target) >= target
        while lo < hi:
            mid = (lo + hi) // 2
            if _exp_counts(mid, factors).sum() >= target:
                hi = mid
            else:
                lo = mid + 1
        n_max = lo
        if n_max > 1:
            below = target - _exp_counts(n_max - 1, factors).sum()
            above = _exp_counts(n_max, factors).sum() - target
            if below <= above:
                n_max -= 1
    else:
        n_max = per_class
    by_position = _exp_counts(n_max, factors)
    counts = np.empty(k, np.int64)
    counts[order] = by_position
    return counts


@jax.jit
def _selection_mask(key: jax.Array, labels: jax.Array, counts: jax.Array) -> jax.Array:
    """Boolean [N]: the ``counts[c]`` examples of each class ``c`` with the lowest random priority.

    ``labels`` must lie in ``[0, len(counts))``; priorities are a random permutation (no ties).
    """
    n = labels.shape[0]
    num_classes = counts.shape[0]
    priority = jax.random.permutation(key, n)
    order = jnp.lexsort((priority, labels))  # by class, then by priority
    sorted_labels = labels[order]
    class_start = jnp.searchsorted(sorted_labels, jnp.arange(num_classes), side="left")
    rank = jnp.arange(n) - class_start[sorted_labels]
    keep_sorted = rank < counts[sorted_labels]
    return jnp.zeros(n, bool).at[order].set(keep_sorted)


def few_sample_indices(key: jax.Array, labels: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Draw ``counts[k]`` examples of class ``k`` without replacement; indices sorted by class, then index.

    ``labels`` may hold ``-1`` (unlabelled, never drawn); labels ``>= len(counts)`` are an error, as is a
    class with fewer examples than requested.
    """
    labels = np.asarray(labels).reshape(-1)
    counts = np.asarray(counts).reshape(-1)
    num_classes = counts.shape[0]
    if not np.issubdtype(labels.dtype, np.integer) or not np.issubdtype(counts.dtype, np.integer):
        raise ValueError(
            f"few_sample_indices: labels and counts must be integers, got {labels.dtype}, {counts.dtype}"
        )
    if num_classes == 0 or (counts < 0).any():
        raise ValueError(
            f"few_sample_indices: counts must be a non-empty array of counts >= 0, got {counts.tolist()}"
        )
    if labels.size and labels.max() >= num_classes:
        raise ValueError(f"few_sample_indices: label {labels.max()} >= number of classes {num_classes}")
    available = np.bincount(labels[labels >= 0], minlength=num_classes)
    short = np.nonzero(available < counts)[0]
    if short.size:
        c = int(short[0])
        raise ValueError(
            f"few_sample_indices: class {c} has {available[c]} examples but {counts[c]} were requested "
            f"({short.size} class(es) too small: {short.tolist()[:10]})"
        )
    # unlabelled (-1) examples go to an extra class that is drawn 0 times
    safe_labels = np.where(labels < 0, num_classes, labels).astype(np.int32)
    safe_counts = np.concatenate([counts, [0]]).astype(np.int32)
    mask = np.asarray(_selection_mask(key, jnp.asarray(safe_labels), jnp.asarray(safe_counts)))
    idx = np.nonzero(mask)[0]
    return idx[np.argsort(labels[idx], kind="stable")].astype(np.int64)


def default_ood_size(counts: np.ndarray, cap: int | None = None) -> int:
    """``K * max(n_k) - sum(n_k)`` OOD images (what rebalances the set in expectation), at most ``cap``."""
    counts = np.asarray(counts)
    m = int(counts.size * counts.max() - counts.sum()) if counts.size else 0
    return m if cap is None else min(m, int(cap))


def ood_split(key: jax.Array, pool_size: int, m: int, heldout: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint uniform draws without replacement from ``range(pool_size)``.

    Returns ``m`` OOD training indices and ``heldout`` held-out indices, each sorted.
    """
    if m < 0 or heldout < 0:
        raise ValueError(f"ood_split: m and heldout must be >= 0, got m={m}, heldout={heldout}")
    if m + heldout > pool_size:
        raise ValueError(
            f"ood_split: the OOD pool has {pool_size} images but m + heldout = {m} + {heldout} = "
            f"{m + heldout} were requested; lower m or heldout, or use a larger pool"
        )
    perm = np.asarray(jax.random.permutation(key, pool_size), dtype=np.int64)
    return np.sort(perm[:m]), np.sort(perm[m : m + heldout])


def shot_groups(counts: np.ndarray) -> np.ndarray:
    """Many/medium/few-shot group (0/1/2) per class: thirds of the classes by ``n_k``, largest first.

    Classes are ranked by count (descending, ties by class index); group sizes differ by at most one, the
    remainder going to 'many' and then 'medium'.
    """
    counts = np.asarray(counts).reshape(-1)
    k = counts.size
    rank_order = np.lexsort((np.arange(k), -counts))
    base, rem = divmod(k, 3)
    sizes = [base + (rem > 0), base + (rem > 1), base]
    groups = np.empty(k, np.int64)
    groups[rank_order] = np.repeat(np.arange(3), sizes)
    return groups
