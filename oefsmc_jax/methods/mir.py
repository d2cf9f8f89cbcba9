"""MiR, Mimicking then Replacing (CVPR 2022), as the official code in DoctorKey/Practise does it (baselines.md §1).

The student (here: L1-pruned internal widths, initialised from the teacher) is fine-tuned label-free to match the
teacher's feature map after the last stage, before global average pooling: ``mean_{b,c,h,w} (F_S - F_T)^2``. The
student's BatchNorm runs in train mode, the teacher in eval mode, and the classifier is the teacher's and gets
neither updates nor weight decay (in the PyTorch code its gradient is None, so SGD skips it; here it is masked out
of the optimizer). The official schedule is SGD lr 0.02, momentum 0.9, wd 1e-4, batch 64, 2,000 iterations, lr x0.1
at 40 % and 80 % (``optim.schedule=step``, ``optim.decay_at=(0.4, 0.8)``).

MiR's compression is label-free, so OE-FSMC's calibration set does not change it; OE-FSMC enters through the
fine-tuning stage (joint feature distillation on ID ∪ OOD, method.md §4). Its regulariser R is off by default
(``MiR.oe_defaults``: eta 0): with the classifier frozen and no labels in the recipe, R's cross-entropy on random
complementary labels can only move the backbone's features towards random classes. baselines.md §6 also
suggests class-weighting MiR's own loss; this port keeps the base loss unweighted in every arm, like BP's and KD's,
so that the arms differ only in OE-FSMC's terms.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax

from oefsmc_jax import losses
from oefsmc_jax.methods.base import SHARED_DEFAULTS, Method, OESettings, Stage, prune_ratios, shared
from oefsmc_jax.methods.l1 import l1_prune_stage
from oefsmc_jax.models import ArchSpec
from oefsmc_jax.training.recipe import Recipe

# The classifier's top-level modules (ResNets: head; VGG: fc0, fc1, ... and head); absent names are ignored.
CLASSIFIER = ("head",) + tuple(f"fc{i}" for i in range(8))


def mir_loss(student: dict, teacher: dict | None, labels: jax.Array, label_loss: Any) -> jax.Array:
    """Element-mean MSE between the student's and the teacher's pre-GAP feature maps (labels unused)."""
    return losses.feature_mse(student["features"], teacher["features"])


MIR_RECIPE = Recipe(loss=mir_loss, distill="features", frozen=CLASSIFIER, uses_labels=False)


@dataclasses.dataclass(frozen=True)
class MiR(Method):
    """L1-pruned internal widths (the feature width is never pruned), then MiR fine-tuning."""

    prune_ratio: tuple[float, ...] = (SHARED_DEFAULTS["prune_ratio"],)
    name = "mir"
    # R off: the recipe is label-free and the classifier frozen, so CE on random complementary labels can only
    # push the backbone's features towards random classes (set oe.eta to switch it on). lambda_jd and BatchNorm
    # statistics kept apart for OOD images: chosen on the validation split by the sweep of
    # configs/methods_sweep_cifar10.py (groups sweep_mir_lambda, sweep_mir_bn)
    oe_defaults: ClassVar[OESettings] = OESettings(lambda_jd=3.0, eta=0.0, bn_mode="separate")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], spec: ArchSpec) -> MiR:
        """``method.prune_ratio``."""
        return cls(prune_ratios(shared(cfg, "prune_ratio"), spec.num_stages))

    def stages(self, spec: ArchSpec) -> tuple[Stage, ...]:
        """L1 pruning that leaves the pre-GAP feature width whole."""
        return (l1_prune_stage(self.prune_ratio, keep_feature_width=True),)

    def recipe(self) -> Recipe:
        """Pre-GAP feature MSE, classifier frozen, label-free."""
        return MIR_RECIPE
