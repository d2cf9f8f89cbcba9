"""Complementary label distribution of OE-FSMC (method.md §2): pure, jittable functions.

``beta_k = n_k / n`` is the in-distribution class prior of the few-sample set. The complementary distribution
``Gamma_k = (alpha - beta_k) / sum_j (alpha - beta_j)`` puts more mass on the classes the set lacks. OOD images get
labels ``y~ ~ Categorical(Gamma)`` drawn afresh every step, and the regulariser weights them by ``w_k = K * Gamma_k``.
Ranks and dtypes are checked with chex at the boundaries (at trace time under ``jit``).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

# Below this, sum_j (alpha - beta_j) is treated as the 0/0 limit (alpha = max(beta) on a balanced set).
_DEGENERATE = 1e-12


def class_prior(counts: jax.Array) -> jax.Array:
    """The ID class prior ``beta_k = n_k / n`` (float32, sums to 1)."""
    counts = jnp.asarray(counts, jnp.float32)
    chex.assert_rank(counts, 1)
    return counts / jnp.sum(counts)


def complementary_distribution(counts: jax.Array, alpha: float | None = None) -> jax.Array:
    """``Gamma_k = (alpha - beta_k) / sum_j (alpha - beta_j)``; ``alpha=None`` means ``max(beta) + min(beta)``.

    Any ``alpha >= max(beta)`` is valid. When every ``alpha - beta_j`` is zero (``alpha = max(beta)`` on a balanced
    set, the 0/0 limit) the result is the uniform distribution, never NaN.
    """
    beta = class_prior(counts)
    a = jnp.max(beta) + jnp.min(beta) if alpha is None else jnp.asarray(alpha, jnp.float32)
    gap = jnp.maximum(a - beta, 0.0)
    total = jnp.sum(gap)
    uniform = jnp.full_like(beta, 1.0 / beta.shape[0])
    safe_total = jnp.where(total > _DEGENERATE, total, 1.0)
    return jnp.where(total > _DEGENERATE, gap / safe_total, uniform)


def class_weights(gamma: jax.Array) -> jax.Array:
    """Class-dependent regulariser weights ``w_k = K * Gamma_k`` (mean 1 over classes)."""
    chex.assert_rank(gamma, 1)
    return gamma.shape[0] * gamma


def sample_ood_labels(key: jax.Array, gamma: jax.Array, num: int) -> jax.Array:
    """Dynamic complementary labels: ``num`` draws from ``Categorical(Gamma)`` with this step's key."""
    chex.assert_rank(gamma, 1)
    return jax.random.categorical(key, jnp.log(jnp.maximum(gamma, 1e-30)), shape=(num,))


def expected_class_counts(counts: jax.Array, m: int, alpha: float | None = None) -> jax.Array:
    """Expected per-class count of ``D ∪ D_o`` when ``m`` OOD images carry labels drawn from Gamma."""
    counts = jnp.asarray(counts, jnp.float32)
    return counts + m * complementary_distribution(counts, alpha)


def balancing_weights(labels: jax.Array, num_classes: int) -> jax.Array:
    """Per-sample weights ``1 / count(label)`` (method.md §3), normalised to mean 1 over the set.

    Every class present weighs the same in an objective that sums the weighted per-sample terms.
    """
    labels = jnp.asarray(labels)
    chex.assert_rank(labels, 1)
    chex.assert_type(labels, int)
    counts = jnp.bincount(labels, length=num_classes).astype(jnp.float32)
    w = 1.0 / jnp.maximum(counts[labels], 1.0)
    return w * labels.shape[0] / jnp.sum(w)
