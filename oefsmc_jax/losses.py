"""Losses of the base methods and of OE-FSMC (method.md §4-5). Pure and jittable; all return scalar means.

Logits are ``[B, K]``; labels are int ``[B]``; optional ``weights`` are per-example ``[B]`` and give a weighted
*mean* (``sum(w * l) / B``), so that a weight of one everywhere is the plain mean. Shapes and dtypes are checked
with chex at the boundaries (at trace time under ``jit``: free in the compiled step).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax


def _mean(per_example: jax.Array, weights: jax.Array | None) -> jax.Array:
    if weights is None:
        return jnp.mean(per_example)
    chex.assert_equal_shape([per_example, weights])
    return jnp.sum(per_example * weights) / per_example.shape[0]


def cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Softmax cross-entropy with integer labels (weighted mean)."""
    chex.assert_rank([logits, labels], [2, 1])
    chex.assert_type(labels, int)
    chex.assert_equal_shape_prefix([logits, labels], 1)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return _mean(ce, weights)


def kd_kl(student_logits: jax.Array, teacher_logits: jax.Array, tau: float = 4.0,
          weights: jax.Array | None = None) -> jax.Array:
    """Hinton's distillation term ``tau^2 * KL(softmax(z_T/tau) || softmax(z_S/tau))`` (mean over examples)."""
    chex.assert_rank(student_logits, 2)
    chex.assert_equal_shape([student_logits, teacher_logits])
    t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / tau)
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / tau)
    kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1)
    return tau**2 * _mean(kl, weights)


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array, gamma: float = 0.9,
            tau: float = 4.0) -> jax.Array:
    """KD's loss ``(1 - gamma) * CE + gamma * tau^2 * KL``."""
    return (1.0 - gamma) * cross_entropy(student_logits, labels) + gamma * kd_kl(
        student_logits, teacher_logits, tau)


def feature_mse(student_features: jax.Array, teacher_features: jax.Array,
                weights: jax.Array | None = None) -> jax.Array:
    """Mean squared error between feature maps (MiR / PRACTISE), averaged over all elements."""
    chex.assert_equal_shape([student_features, teacher_features])
    d = (student_features.astype(jnp.float32) - teacher_features.astype(jnp.float32)) ** 2
    per_example = jnp.mean(d.reshape(d.shape[0], -1), axis=-1)
    return _mean(per_example, weights)


def class_dependent_regularizer(logits: jax.Array, labels: jax.Array, class_weights: jax.Array) -> jax.Array:
    """OE-FSMC's ``R = mean_j w_{y~_j} * CE(S(x~_j), y~_j)`` on OOD images with complementary labels."""
    chex.assert_rank(class_weights, 1)
    chex.assert_equal_shape_suffix([logits, class_weights], 1)
    return cross_entropy(logits, labels, weights=class_weights[labels])


def joint_distillation(kind: str, student: dict, teacher: dict, tau: float = 4.0) -> jax.Array:
    """OE-FSMC's ``L_jd``: the base method's distillation signal on ID and OOD images together.

    ``kind='logits'`` gives ``tau^2 * KL`` on logits (KD, BP, CD, FSKD); ``kind='features'`` gives the pre-GAP
    feature MSE (MiR, PRACTISE). ``student``/``teacher`` are model outputs with keys ``logits`` and ``features``.
    """
    if kind == "logits":
        return kd_kl(student["logits"], teacher["logits"], tau)
    if kind == "features":
        return feature_mse(student["features"], teacher["features"])
    raise ValueError(f"joint distillation kind must be 'logits' or 'features', got {kind!r}")


def logit_adjusted_cross_entropy(logits: jax.Array, labels: jax.Array, prior: jax.Array,
                                 tau: float = 1.0) -> jax.Array:
    """Logit-adjusted CE (Menon et al. 2021): CE on ``logits + tau * log(prior)`` (a no-OOD rebalancing baseline)."""
    chex.assert_rank(prior, 1)
    chex.assert_equal_shape_suffix([logits, prior], 1)
    return cross_entropy(logits + tau * jnp.log(jnp.maximum(prior, 1e-12)), labels)


@dataclasses.dataclass(frozen=True)
class CrossEntropy:
    """The plain supervised term ``CE(logits, labels)`` (hashable, so compiled steps are shared)."""

    def __call__(self, logits: Any, labels: Any) -> Any:
        return cross_entropy(logits, labels)


@dataclasses.dataclass(frozen=True)
class LogitAdjusted:
    """Logit-adjusted CE with a fixed class ``prior`` (a tuple, so equal priors share a compiled step)."""

    prior: tuple[float, ...]

    def __call__(self, logits: Any, labels: Any) -> Any:
        return logit_adjusted_cross_entropy(logits, labels, jnp.asarray(self.prior, jnp.float32))


# The base losses of the methods' fine-tuning recipes: ``loss(student, teacher, labels, label_loss)`` on the ID part
# of a batch (``training.recipe.Recipe``). Module functions and frozen callables, so that equal recipes compare equal
# and share a compiled step.


def supervised_term(student: dict, teacher: dict | None, labels: jax.Array, label_loss: Any) -> jax.Array:
    """The supervised term alone, ``label_loss(logits, labels)`` (BP; CD's own fine-tuning): an arm may replace it."""
    return label_loss(student["logits"], labels)


def plain_cross_entropy(student: dict, teacher: dict | None, labels: jax.Array, label_loss: Any) -> jax.Array:
    """Cross-entropy on the labels whatever the arm (plain supervised training, e.g. the demo's teacher)."""
    return cross_entropy(student["logits"], labels)


@dataclasses.dataclass(frozen=True)
class HintonKD:
    """Hinton's KD on the ID images: ``(1 - gamma) * label_loss + gamma * tau^2 KL(teacher || student)``."""

    gamma: float
    tau: float

    def __call__(self, student: dict, teacher: dict | None, labels: jax.Array, label_loss: Any) -> jax.Array:
        return (1.0 - self.gamma) * label_loss(student["logits"], labels) + self.gamma * kd_kl(
            student["logits"], teacher["logits"], self.tau)


@dataclasses.dataclass(frozen=True)
class LogitKL:
    """Label-free logit distillation ``tau^2 KL(teacher || student)`` (FSKD when it fine-tunes)."""

    tau: float

    def __call__(self, student: dict, teacher: dict | None, labels: jax.Array, label_loss: Any) -> jax.Array:
        return kd_kl(student["logits"], teacher["logits"], self.tau)
