"""Logit-based methods with L1-norm filter pruning: BP (fine-tune with CE) and KD (Hinton)."""

from __future__ import annotations

import jax

from oefsmc_jax import losses
from oefsmc_jax.methods.base import CompressionContext, Method
from oefsmc_jax.models import ArchSpec, l1_prune


class L1PruneMixin:
    """Compression stage shared by BP and KD: label-free L1-norm pruning of each block's internal width."""

    prune_ratio: tuple[float, ...]

    def compress(self, ctx: CompressionContext) -> tuple[ArchSpec, dict]:
        """Mask the lowest-L1 filters of every block's internal width at the configured per-stage ratio."""
        return l1_prune(ctx.teacher_spec, ctx.teacher_variables, self.prune_ratio)


class BP(L1PruneMixin, Method):
    """Prune, then fine-tune all weights with cross-entropy on the few ID samples."""

    name = "bp"
    needs_teacher = False

    def __init__(self, prune_ratio: tuple[float, ...]):
        self.prune_ratio = tuple(prune_ratio)

    def base_loss(self, student: dict, teacher: dict | None, labels: jax.Array) -> jax.Array:
        """Cross-entropy of the student on the ID labels."""
        return self.label_loss(student["logits"], labels)


class KD(L1PruneMixin, Method):
    """Prune, then distil: ``(1-gamma) * CE + gamma * tau^2 * KL``."""

    name = "kd"

    def __init__(self, prune_ratio: tuple[float, ...], gamma: float = 0.9, tau: float = 4.0):
        self.prune_ratio = tuple(prune_ratio)
        self.gamma = float(gamma)
        self.tau = float(tau)

    def base_loss(self, student: dict, teacher: dict | None, labels: jax.Array) -> jax.Array:
        """Hinton's KD loss on the ID images."""
        return (1.0 - self.gamma) * self.label_loss(student["logits"], labels) + self.gamma * losses.kd_kl(
            student["logits"], teacher["logits"], self.tau)


class Supervised(Method):
    """Plain supervised training with cross-entropy (no compression); trains the demo's teacher."""

    name = "supervised"
    needs_teacher = False

    def compress(self, ctx: CompressionContext) -> tuple[ArchSpec, dict]:
        """No compression: the student is the model itself."""
        return ctx.teacher_spec, ctx.teacher_variables

    def base_loss(self, student: dict, teacher: dict | None, labels: jax.Array) -> jax.Array:
        """Cross-entropy on the labels."""
        return losses.cross_entropy(student["logits"], labels)
