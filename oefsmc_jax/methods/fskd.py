"""FSKD, Few-Sample Knowledge Distillation (Li et al., CVPR 2020), as its official code does it (baselines.md §3).

Compression: L1-norm filter pruning of every internal width, then, in network order on the already-corrected
student, a 1x1 correction ``Q`` after every conv's BatchNorm (pre-ReLU): each block's internal width and, by
default, its output BN before the residual add (``method.fskd.block_output``), solved in closed form by least
squares against the teacher's BN output at the kept channels (``methods/fskd_solver.py``). With
``method.fskd.target=block`` the block-output ``Q`` is fitted to the block's output after the residual add
instead (pre-ReLU: the teacher's branch plus its shortcut, minus the student's shortcut), so the correction also
absorbs what pruning changed upstream on the shortcut path. The official network has no BN; with BN, ``Q`` after
BN folds as ``BN(Wx) Q = (W diag(s) Q) x + b Q`` (s = gamma / sqrt(var + eps), b = beta - s * mean), exactly in
eval mode only. ``Q`` stays its own layer (``spec.corrections``, ``q_<bn>`` parameters) through compression and
fine-tuning and is folded at export (``method.fskd.fold=export``, the default); ``fold=solve`` folds each ``Q``
right after its solve. No labels; with OE-FSMC the calibration set holds OOD images and the least squares are
weighted by the class-aware weights (every H*W row of sample i scaled by sqrt(w_i)).

Fine-tuning: none in the original (``method.fskd.finetune=False``, the default: the compressed student is
evaluated as it is). Switched on, the student is fine-tuned label-free on the teacher's logits (``tau^2 KL``),
with ``Q`` trained as its own layer after the BN that BatchNorm's train mode re-standardises (folding first and
then training the folded BN would not be the same network).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np

from oefsmc_jax import losses
from oefsmc_jax.errors import fail
from oefsmc_jax.methods.base import (
    SHARED_DEFAULTS,
    CompressionContext,
    Method,
    OESettings,
    Stage,
    hparams_from,
    prune_ratios,
    shared,
    sub_config,
)
from oefsmc_jax.methods.fskd_solver import (
    CorrectionPoint,
    correction_param,
    correction_points,
    fold_bn_correction,
    weighted_lstsq,
)
from oefsmc_jax.methods.l1 import l1_prune_stage
from oefsmc_jax.models import ArchSpec, shrink, width_links
from oefsmc_jax.models.surgery import _copy, _set
from oefsmc_jax.training import preemption
from oefsmc_jax.training.recipe import Recipe


@dataclasses.dataclass(frozen=True)
class FSKDParams:
    """``config.method.fskd``."""

    # Q after every conv, as the original: also after each block's output BN (full stage width, before the
    # residual add). Without it a pruned block's loss is never corrected: its bn1 output at the kept channels is
    # the teacher's already, and only the next conv sees the missing channels.
    block_output: bool = True
    finetune: bool = False  # the original does not fine-tune
    # export: Q stays a layer (q_<bn>) until the student is exported; solve: each Q is folded into its conv + BN
    # right after its solve (identical in eval mode up to float rounding; not when fine-tuning in train mode)
    fold: str = "export"
    # what the block-output Q is fitted to: branch (the teacher's last BN output, before the add, as the official
    # code) or block (the teacher's block output after the add, pre-ReLU, less the student's shortcut, so the
    # residual stream's accumulated error is corrected too). The validation sweep of
    # configs/methods_sweep_cifar10.py chose block for ResNets with identity shortcuts, but block is not defined
    # for projection shortcuts (no probe of the student's shortcut output) nor without the block-output Q, so the
    # default stays branch and configs of identity-shortcut ResNets set block (configs/methods_fair_cifar10.py)
    target: str = "branch"

    def __post_init__(self) -> None:
        if self.fold not in ("export", "solve"):
            fail("method.fskd.fold", f"must be 'export' or 'solve', got {self.fold!r}")
        if self.target not in ("branch", "block"):
            fail("method.fskd.target", f"must be 'branch' or 'block', got {self.target!r}")
        if self.target == "block" and not self.block_output:
            fail("method.fskd.target", "'block' fits the block-output Q, which needs method.fskd.block_output=true")


def _kept_channels(spec: ArchSpec, variables: dict) -> dict[str, np.ndarray]:
    """For every prunable width, the teacher channels the (masked) student keeps, keyed by its BN's path."""
    out = {}
    for lk in width_links(spec):
        mask = np.asarray(variables["masks"][lk.block][lk.mask])
        out["/".join(lk.bn)] = np.nonzero(mask)[0]
    return out


def _shortcut(spec: ArchSpec, block: str, acts: dict, points: list[str]) -> np.ndarray:
    """The shortcut of ``block`` from its captured input ``acts[points[0]]`` (NHWC): identity, option A
    (subsample, zero-pad channels) or option B (the projection BN's output, ``acts[points[1]]``)."""
    s, b = (int(v) for v in block[1:].split("b"))
    x = np.asarray(acts[points[0]])
    if spec.identity_shortcut(s, b):
        return x
    if spec.shortcut == "B":
        return np.asarray(acts[points[1]])
    stride, diff = spec.block_stride(s, b), spec.block_out_width(s, b) - spec.block_in_width(s, b)
    sc = x[:, ::stride, ::stride, :]
    return np.pad(sc, ((0, 0), (0, 0), (0, 0), (diff // 2, diff - diff // 2)))


def _block_points(spec: ArchSpec, pt: CorrectionPoint) -> list[str]:
    block = pt.bn[0]
    return [f"{block}:in"] + ([f"{block}/proj_bn:out"] if spec.shortcut == "B" else [])


def fskd_stage(block_output: bool, fold: str = "solve", target: str = "branch") -> Stage:
    """Shrink the masked student, then fit one ``Q`` per correction point, in network order: folded right away
    (``fold=solve``) or kept as a ``q_<bn>`` layer for export (``fold=export``); ``target`` as ``FSKDParams``."""

    def stage(spec: ArchSpec, variables: dict, ctx: CompressionContext) -> tuple[ArchSpec, dict]:
        kept = _kept_channels(spec, variables)
        spec, variables = shrink(spec, variables)
        weights = np.asarray(ctx.calibration.weights, np.float64)
        pts = correction_points(spec, block_output)
        last_bn = {p.bn for p in pts if block_output and spec.is_resnet
                   and p.bn[-1] == f"bn{len(spec.inner_widths[0][0]) + 1}"}
        block_target = target == "block" and bool(last_bn)
        if fold == "export":
            spec = dataclasses.replace(spec, corrections=tuple(dict.fromkeys(p.bn[-1] for p in pts)))
            variables = _with_identity_q(spec, variables, pts)
        residuals = []
        every = ["/".join(p.bn) + ":out" for p in pts]  # one compiled forward per network for all points
        if block_target:
            every += [q for p in pts if p.bn in last_bn for q in _block_points(spec, p)]
        t_spec, t_vars = ctx.teacher_spec, ctx.teacher_variables
        for i, pt in enumerate(pts):
            preemption.check(f"fskd, {i} of {len(pts)} corrections done")
            point = every[i]
            extra = _block_points(spec, pt) if block_target and pt.bn in last_bn else []
            acts = ctx.activations(spec, variables, every, keep=[point, *extra])
            z = np.asarray(acts[point])
            t_acts = ctx.activations(t_spec, t_vars, every, keep=[point, *extra])
            t = np.asarray(t_acts[point])
            idx = kept.get("/".join(pt.bn))
            if idx is not None:
                t = t[..., idx]
            if extra:  # the block's output after the add: T_branch + T_shortcut - S_shortcut
                t = t + _shortcut(t_spec, pt.bn[0], t_acts, extra) - _shortcut(spec, pt.bn[0], acts, extra)
            q = weighted_lstsq(z, t, weights)
            before = float(np.mean((z - t) ** 2))
            after = float(np.mean((z @ q - t) ** 2))
            residuals.append({"bn": "/".join(pt.bn), "width": pt.width, "mse_before": before, "mse_after": after,
                              "target": "block" if extra else "branch"})
            if fold == "export":
                variables = _copy(variables)
                _set(variables["params"], correction_param(pt), jnp.asarray(q))
            else:
                spec, variables = fold_bn_correction(spec, variables, pt.conv, pt.bn, q)
            if (i + 1) % 10 == 0 or i + 1 == len(pts):
                ctx.log(f"fskd: {i + 1}/{len(pts)} corrections solved ({len(weights)} images, "
                        f"{'kept as layers until export' if fold == 'export' else 'folded'})")
        ctx.record("fskd", {"images": len(weights), "fold": fold, "target": target, "corrections": residuals})
        return spec, variables

    return stage


def _with_identity_q(spec: ArchSpec, variables: dict, pts: list[CorrectionPoint]) -> dict:
    """``variables`` with an identity ``q_<bn>`` at every correction point of the ``spec.corrections`` model."""
    out = _copy(variables)
    for pt in correction_points(spec, block_output=True):
        if pt.bn[-1] in spec.corrections:
            _set(out["params"], correction_param(pt), jnp.eye(pt.width, dtype=jnp.float32))
    return out


@dataclasses.dataclass(frozen=True)
class FSKD(Method):
    """L1 pruning, then closed-form 1x1 corrections folded into the convs; no fine-tuning by default."""

    config_params = FSKDParams
    prune_ratio: tuple[float, ...] = (SHARED_DEFAULTS["prune_ratio"],)
    params: FSKDParams = FSKDParams()
    tau: float = SHARED_DEFAULTS["tau"]
    name = "fskd"
    uses_calibration = True
    # FSKD does not fine-tune, so OOD images can act only through its least squares; the validation sweep of
    # configs/methods_sweep_cifar10.py (group sweep_fskd_share) gave them no weight there (share 0), which makes
    # OE-FSMC's arm the base method unless oe.calibration_ood_share or method.fskd.finetune says otherwise
    oe_defaults: ClassVar[OESettings] = OESettings(calibration_ood_share=0.0)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], spec: ArchSpec) -> FSKD:
        """``method.prune_ratio``, ``method.fskd.*``, ``method.tau`` (fine-tuning distillation temperature)."""
        return cls(prune_ratios(shared(cfg, "prune_ratio"), spec.num_stages),
                   hparams_from(FSKDParams, sub_config(cfg, "fskd"), "method.fskd"), float(shared(cfg, "tau")))

    def stages(self, spec: ArchSpec) -> tuple[Stage, ...]:
        """L1 pruning, then the least-squares corrections."""
        p = self.params
        return (l1_prune_stage(self.prune_ratio), fskd_stage(p.block_output, p.fold, p.target))

    def recipe(self) -> Recipe:
        """No fine-tuning unless ``method.fskd.finetune``."""
        return Recipe(loss=losses.LogitKL(self.tau), distill="logits", finetunes=self.params.finetune,
                      uses_labels=False)
