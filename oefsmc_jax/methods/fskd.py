"""FSKD, Few-Sample Knowledge Distillation (Li et al., CVPR 2020), as its official code does it (baselines.md §3).

Compression: L1-norm filter pruning of every internal width, then, in network order on the already-corrected
student, a 1x1 correction ``Q`` after every conv's BatchNorm (pre-ReLU): each block's internal width and, by
default, its output BN before the residual add (``method.fskd.block_output``), solved in closed form by least
squares against the teacher's BN output at the kept channels (``methods/fskd_solver.py``), and folded exactly into
the conv and an identity BN (eval mode). The official network has no BN; with BN, ``Q`` after BN folds as ``BN(Wx) Q
= (W diag(s) Q) x + b Q`` (s = gamma / sqrt(var + eps), b = beta - s * mean). No labels; with OE-FSMC the
calibration set holds OOD images and the least squares are weighted by the class-aware weights (every H*W row of
sample i scaled by sqrt(w_i)).

Fine-tuning: none in the original (``method.fskd.finetune=False``, the default: the compressed student is
evaluated as it is). Switched on, the student is fine-tuned label-free on the teacher's logits (``tau^2 KL``); the
fold is exact in eval mode only, so fine-tuning in BatchNorm train mode starts from a reparameterised network.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from oefsmc_jax import losses
from oefsmc_jax.methods.base import CompressionContext, Method, Recipe, Stage, hparams_from, prune_ratios, sub_config
from oefsmc_jax.methods.fskd_solver import correction_points, fold_bn_correction, weighted_lstsq
from oefsmc_jax.methods.l1 import l1_prune_stage
from oefsmc_jax.models import ArchSpec, shrink, width_links
from oefsmc_jax.training import preemption


@dataclasses.dataclass(frozen=True)
class FSKDParams:
    """``config.method.fskd``."""

    # Q after every conv, as the original: also after each block's output BN (full stage width, before the
    # residual add). Without it a pruned block's loss is never corrected: its bn1 output at the kept channels is
    # the teacher's already, and only the next conv sees the missing channels.
    block_output: bool = True
    finetune: bool = False  # the original does not fine-tune


def _kept_channels(spec: ArchSpec, variables: dict) -> dict[str, np.ndarray]:
    """For every prunable width, the teacher channels the (masked) student keeps, keyed by its BN's path."""
    out = {}
    for lk in width_links(spec):
        mask = np.asarray(variables["masks"][lk.block][lk.mask])
        out["/".join(lk.bn)] = np.nonzero(mask)[0]
    return out


def fskd_stage(block_output: bool) -> Stage:
    """Shrink the masked student, then fit and fold one ``Q`` per correction point, in network order."""

    def stage(spec: ArchSpec, variables: dict, ctx: CompressionContext) -> tuple[ArchSpec, dict]:
        kept = _kept_channels(spec, variables)
        spec, variables = shrink(spec, variables)
        weights = np.asarray(ctx.calibration.weights, np.float64)
        pts = correction_points(spec, block_output)
        residuals = []
        every = ["/".join(p.bn) + ":out" for p in pts]  # one compiled forward per network for all points
        for i, pt in enumerate(pts):
            preemption.check(f"fskd, {i} of {len(pts)} corrections done")
            point = every[i]
            z = np.asarray(ctx.activations(spec, variables, every, keep=[point])[point])
            t = np.asarray(ctx.activations(ctx.teacher_spec, ctx.teacher_variables, every, keep=[point])[point])
            idx = kept.get("/".join(pt.bn))
            if idx is not None:
                t = t[..., idx]
            q = weighted_lstsq(z, t, weights)
            before = float(np.mean((z - t) ** 2))
            after = float(np.mean((z @ q - t) ** 2))
            residuals.append({"bn": "/".join(pt.bn), "width": pt.width, "mse_before": before, "mse_after": after})
            spec, variables = fold_bn_correction(spec, variables, pt.conv, pt.bn, q)
            if (i + 1) % 10 == 0 or i + 1 == len(pts):
                ctx.log(f"fskd: {i + 1}/{len(pts)} corrections solved and folded ({len(weights)} images)")
        ctx.record("fskd", {"images": len(weights), "corrections": residuals})
        return spec, variables

    return stage


@dataclasses.dataclass(frozen=True)
class FSKD(Method):
    """L1 pruning, then closed-form 1x1 corrections folded into the convs; no fine-tuning by default."""

    prune_ratio: tuple[float, ...] = (0.5,)
    params: FSKDParams = FSKDParams()
    tau: float = 4.0
    name = "fskd"
    uses_calibration = True

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], spec: ArchSpec) -> FSKD:
        """``method.prune_ratio``, ``method.fskd.*``, ``method.tau`` (fine-tuning distillation temperature)."""
        return cls(prune_ratios(cfg.get("prune_ratio", 0.5), spec.num_stages),
                   hparams_from(FSKDParams, sub_config(cfg, "fskd"), "method.fskd"), float(cfg.get("tau", 4.0)))

    def stages(self, spec: ArchSpec) -> tuple[Stage, ...]:
        """L1 pruning, then the least-squares corrections."""
        return (l1_prune_stage(self.prune_ratio), fskd_stage(self.params.block_output))

    def loss(self, student: dict, teacher: dict | None, labels: jax.Array, label_loss: Any) -> jax.Array:
        """Label-free logit distillation (only when fine-tuning is switched on)."""
        return losses.kd_kl(student["logits"], teacher["logits"], self.tau)

    def recipe(self) -> Recipe:
        """No fine-tuning unless ``method.fskd.finetune``."""
        return Recipe(loss=self.loss, distill="logits", finetunes=self.params.finetune, uses_labels=False)
