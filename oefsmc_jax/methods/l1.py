"""BP and KD with label-free L1-norm filter pruning (method.md §5), and the L1 stage other methods reuse."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

from oefsmc_jax import losses
from oefsmc_jax.errors import fail
from oefsmc_jax.methods.base import (
    SHARED_DEFAULTS,
    CompressionContext,
    Method,
    OESettings,
    Stage,
    prune_ratios,
    shared,
)
from oefsmc_jax.models import ArchSpec, l1_prune, width_links
from oefsmc_jax.training.recipe import Recipe


def l1_prune_stage(ratios: tuple[float, ...], keep_feature_width: bool = False) -> Stage:
    """Mask the lowest-L1 filters of every internal width at the per-stage ``ratios`` (label-free, so the
    calibration set is not read). ``keep_feature_width`` leaves the width that feeds global pooling unpruned
    (VGG's last conv), which feature-distilling methods need."""

    def stage(spec: ArchSpec, variables: dict, ctx: CompressionContext) -> tuple[ArchSpec, dict]:
        exclude = feature_width_keys(spec) if keep_feature_width else ()
        return l1_prune(spec, variables, ratios, exclude=exclude)

    return stage


def feature_width_keys(spec: ArchSpec) -> tuple[tuple[int, int, int], ...]:
    """The prunable widths that are the pre-GAP feature map's channels (VGG's last conv; none for ResNets, whose
    pruning only touches block-internal widths)."""
    if spec.is_resnet:
        return ()
    return tuple(lk.key for lk in width_links(spec) if lk.consumer in (("head",), ("fc0",)))


@dataclasses.dataclass(frozen=True)
class BP(Method):
    """Prune, then fine-tune every weight (classifier included) with cross-entropy on the few ID samples."""

    prune_ratio: tuple[float, ...] = (SHARED_DEFAULTS["prune_ratio"],)
    name = "bp"
    # a weaker R: chosen on the validation split by the sweep of configs/methods_sweep_cifar10.py (group
    # sweep_bp_eta; lambda_jd and bn_mode kept)
    oe_defaults: ClassVar[OESettings] = OESettings(eta=0.01)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], spec: ArchSpec) -> BP:
        """``method.prune_ratio``."""
        return cls(prune_ratios(shared(cfg, "prune_ratio"), spec.num_stages))

    def stages(self, spec: ArchSpec) -> tuple[Stage, ...]:
        """L1 pruning."""
        return (l1_prune_stage(self.prune_ratio),)

    def recipe(self) -> Recipe:
        """CE, logit distillation for OE-FSMC, everything trained; the teacher only for joint distillation."""
        return Recipe(loss=losses.supervised_term, distill="logits", needs_teacher=False)


@dataclasses.dataclass(frozen=True)
class KD(Method):
    """Prune, then distil (Hinton): ``(1-gamma) * CE + gamma * tau^2 * KL``."""

    prune_ratio: tuple[float, ...] = (SHARED_DEFAULTS["prune_ratio"],)
    gamma: float = SHARED_DEFAULTS["kd_gamma"]
    tau: float = SHARED_DEFAULTS["tau"]
    name = "kd"
    # R off: chosen on the validation split by the sweep of configs/methods_sweep_cifar10.py (group sweep_kd_eta;
    # lambda_jd and bn_mode kept), by its declared rule, on a gain whose interval spans zero widely
    oe_defaults: ClassVar[OESettings] = OESettings(eta=0.0)

    def __post_init__(self) -> None:
        if not 0.0 <= self.gamma <= 1.0:
            fail("method.kd_gamma", f"must be in [0, 1], got {self.gamma}")
        if not self.tau > 0:
            fail("method.tau", f"must be > 0, got {self.tau}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], spec: ArchSpec) -> KD:
        """``method.prune_ratio``, ``method.kd_gamma``, ``method.tau``."""
        return cls(prune_ratios(shared(cfg, "prune_ratio"), spec.num_stages), float(shared(cfg, "kd_gamma")),
                   float(shared(cfg, "tau")))

    def stages(self, spec: ArchSpec) -> tuple[Stage, ...]:
        """L1 pruning."""
        return (l1_prune_stage(self.prune_ratio),)

    def recipe(self) -> Recipe:
        """KD loss, logit distillation for OE-FSMC, everything trained."""
        return Recipe(loss=losses.HintonKD(self.gamma, self.tau), distill="logits")


@dataclasses.dataclass(frozen=True)
class Supervised(Method):
    """Plain supervised training with cross-entropy (no compression); trains the demo's teacher."""

    name = "supervised"

    def stages(self, spec: ArchSpec) -> tuple[Stage, ...]:
        """No compression."""
        return ()

    def recipe(self) -> Recipe:
        """CE, no teacher."""
        return Recipe(loss=losses.plain_cross_entropy, needs_teacher=False)
