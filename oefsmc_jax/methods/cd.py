"""Cross Distillation (Bai et al., AAAI 2020) for channel pruning, as its official code does it (baselines.md §4).

Compression: the student starts as the teacher; every 3x3 conv except the stem is visited in forward order. For
conv ``l`` the inputs ``Xs`` (student) and ``Xt`` (teacher) are collected on the calibration set with
both networks in eval mode (the official code uses train mode for VGG, which moves the BN statistics towards the
batch; eval mode is this port's [choice] for every family), and the student's kernel is fitted by Adam on
``mu * ||S(Xt) - T(Xt)||^2 + (1 - mu) * ||T(Xs) - S(Xs)||^2`` with a hard top-k projection of its input channels
(``methods/cd_solver.py``). The pruned input channels of a block's conv2 become the block's internal-width mask, so
the student shrinks like an L1-pruned one. Rows: every ID image of the calibration set, plus its OOD rows (with
OE-FSMC, weighted by ``oe.calibration_ood_share``) up to ``method.cd.max_images`` rows in all (a seeded subset of
the OOD rows beyond that, re-weighted to keep their share; the activations of every row at one conv are held in
memory). ``method.cd.batch_size = N > 0`` instead takes one fixed random subset of N rows of the whole calibration
set (the official ``min(128, n)`` batch; with OOD rows it holds fewer ID images). With OE-FSMC the class-aware
weights weight both terms per sample. The top-k projection always keeps exactly k channels; the official code
keeps k - 1 in about a third of its projections through float rounding (``cd_solver.py``, deviations).

Fine-tuning (``method.cd.finetune``): ``official`` (the default) is the official code's own: CE on the ID labels,
``finetune_steps`` full-batch steps (-1: 100 for ResNets, 40 for VGG, the shipped scripts; a batch of every ID
image, at most 128), SGD lr ``finetune_lr`` (1e-5), momentum 0.9, wd 5e-4, lr x0.1 at 50 % and 75 %, the student's
BatchNorm in train mode, no augmentation unless ``finetune_augment`` (the chnl scripts set no ``--data_aug``); at
this lr it mostly re-estimates the BatchNorm statistics. ``ce`` is the project's generic loop (``train.*``,
``optim.*``, augmentation, early stopping) with CE, and ``kd`` the same loop with KD, so that OE-FSMC's
distillation can be compared with KD without OOD images. With OE-FSMC, its terms join the same loop. The kept
fraction is ``1 - method.prune_ratio`` (``int(r*C)+1`` channels on CIFAR ResNets, ``int(r*C)`` on VGG), a single
value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
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
from oefsmc_jax.methods.cd_solver import CDSolveConfig, LayerProblem, cd_plan, cd_solve_layer
from oefsmc_jax.methods.l1 import KD
from oefsmc_jax.models import ArchSpec, set_masks
from oefsmc_jax.models.surgery import _copy, _get, _set
from oefsmc_jax.training import preemption
from oefsmc_jax.training.recipe import FinetuneSchedule, Recipe


@dataclasses.dataclass(frozen=True)
class CDParams:
    """``config.method.cd``; ``lr``/``mu`` at -1 take the official value of the family (ResNet 1e-3 / 0.9, VGG
    5e-4 / 0.6)."""

    iters: int = 3000  # official; cheap since the solver works on the im2col Gram (cd_solver.py)
    lr: float = -1.0
    mu: float = -1.0
    # 0: every ID row plus the OOD rows, at most max_images rows; N > 0: one fixed random subset of N rows of the
    # whole calibration set (the official min(128, n) images)
    batch_size: int = 0
    max_images: int = 2048  # bound on the rows of one layer solve (their activations at one conv are in memory)
    finetune: str = "official"  # official (CD's short CE fine-tuning) | ce (the project's loop, CE) | kd (same, KD)
    finetune_steps: int = -1  # official: -1 = 100 for ResNets, 40 for VGG (the shipped scripts)
    finetune_lr: float = 1e-5  # official
    finetune_augment: bool = False  # official: no augmentation (pad-crop and flip of data.* when on)

    def __post_init__(self) -> None:
        if self.iters < 1:
            fail("method.cd.iters", f"must be >= 1, got {self.iters}")
        if self.lr != -1.0 and not self.lr > 0:
            fail("method.cd.lr", f"must be > 0 (or -1 for the official value), got {self.lr}")
        if self.mu != -1.0 and not 0.0 <= self.mu <= 1.0:
            fail("method.cd.mu", f"must be in [0, 1] (or -1 for the official value), got {self.mu}")
        if self.batch_size < 0:
            fail("method.cd.batch_size", f"must be 0 (every ID row) or >= 1 (a fixed subset), got {self.batch_size}")
        if self.max_images < 1:
            fail("method.cd.max_images", f"must be >= 1, got {self.max_images}")
        if self.finetune not in FINETUNES:
            fail("method.cd.finetune", f"must be one of {', '.join(FINETUNES)}, got {self.finetune!r}")
        if self.finetune_steps == 0 or self.finetune_steps < -1:
            fail("method.cd.finetune_steps", f"must be >= 1 or -1 (official), got {self.finetune_steps}")
        if not self.finetune_lr > 0:
            fail("method.cd.finetune_lr", f"must be > 0, got {self.finetune_lr}")


FINETUNES = ("official", "ce", "kd")


def layer_rows(cal: Any, p: CDParams, key: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """The calibration rows of every layer solve and their weights: ``p.batch_size > 0``, one fixed random subset
    of that many rows (official); else every ID row and the OOD rows, at most ``p.max_images`` in all (a seeded
    subset beyond that, ID rows first; the OOD rows kept are re-weighted to their full share of the weight)."""
    n = len(cal)
    rng = np.random.default_rng(int(np.asarray(key).ravel()[-1]))
    if p.batch_size > 0:
        idx = np.sort(rng.choice(n, min(n, p.batch_size), replace=False)) if n > p.batch_size else np.arange(n)
        return idx, np.asarray(cal.weights[idx], np.float32)
    is_ood = np.asarray(cal.is_ood, bool)
    id_rows, ood_rows = np.nonzero(~is_ood)[0], np.nonzero(is_ood)[0]
    if len(id_rows) > p.max_images:
        id_rows = np.sort(rng.choice(id_rows, p.max_images, replace=False))
    room = p.max_images - len(id_rows)
    if len(ood_rows) > room:
        ood_rows = np.sort(rng.choice(ood_rows, room, replace=False))
    idx = np.concatenate([id_rows, ood_rows])
    w = np.asarray(cal.weights, np.float64)
    sub = w[idx]
    share = w[is_ood].sum() / w.sum() if is_ood.any() else 0.0
    if len(ood_rows) and len(id_rows) and 0 < share < 1:  # the OOD rows kept carry the whole set's OOD share
        k = len(id_rows)
        sub[k:] *= share * sub[:k].sum() / ((1.0 - share) * sub[k:].sum())
    return idx, sub.astype(np.float32)


def cd_stage(keep_ratio: float, p: CDParams) -> Stage:
    """The layer-wise cross-distillation stage."""

    def stage(spec: ArchSpec, variables: dict, ctx: CompressionContext) -> tuple[ArchSpec, dict]:
        vgg = not spec.is_resnet
        lr = p.lr if p.lr > 0 else (5e-4 if vgg else 1e-3)
        mu = p.mu if p.mu >= 0 else (0.6 if vgg else 0.9)
        idx, w = layer_rows(ctx.calibration, p, ctx.key)
        x = ctx.images(idx)
        w = jnp.asarray(w, jnp.float32)
        t_vars = ctx.teacher_variables
        plan = cd_plan(spec, keep_ratio)
        solve_cfg = CDSolveConfig(iters=p.iters, lr=lr, mu=mu)
        records = []
        every = ["/".join(layer.path) + ":in" for layer in plan]  # one compiled forward per network
        for i, layer in enumerate(plan):
            preemption.check(f"cd, {i} of {len(plan)} layers done")
            point = every[i]
            xs = ctx.activations(spec, variables, every, x=x, keep=[point])[point]
            xt = ctx.activations(ctx.teacher_spec, t_vars, every, x=x, keep=[point])[point]
            w_t = jnp.asarray(_get(t_vars["params"], layer.path)["kernel"])
            w_s = jnp.asarray(_get(variables["params"], layer.path)["kernel"])
            problem = LayerProblem(w_t, xs, xt, stride=layer.stride, padding=1, weights=w)
            res = cd_solve_layer(w_s, problem, keep=layer.keep, config=solve_cfg)
            out = _copy(variables)
            _set(out["params"], (*layer.path, "kernel"), res.w)
            variables = out
            if layer.width_key is not None and layer.keep < layer.c_in:
                spec, variables = set_masks(spec, variables, {layer.width_key: np.asarray(res.in_mask) > 0})
            records.append({"conv": "/".join(layer.path), "keep": layer.keep, "c_in": layer.c_in,
                            "loss_init": float(res.loss_init), "loss_final": float(res.loss_final),
                            "kept": np.nonzero(np.asarray(res.in_mask))[0].tolist()})
            if (i + 1) % 10 == 0 or i + 1 == len(plan):
                ctx.log(f"cd: {i + 1}/{len(plan)} convs fitted ({p.iters} Adam steps each, {len(idx)} images)")
        ctx.record("cd", {"lr": lr, "mu": mu, "iters": p.iters, "images": len(idx), "layers": records})
        return spec, variables

    return stage


@dataclasses.dataclass(frozen=True)
class CD(Method):
    """Cross Distillation: layer-wise channel pruning with cross-connected reconstruction, then CE fine-tuning."""

    config_params = CDParams
    keep_ratio: float = 0.5
    params: CDParams = CDParams()
    kd_gamma: float = SHARED_DEFAULTS["kd_gamma"]
    tau: float = SHARED_DEFAULTS["tau"]
    finetune_steps: int = 100  # the official fine-tuning's steps for this teacher (CDParams.finetune_steps resolved)
    name = "cd"
    uses_calibration = True
    # chosen on the validation split by the sweep of configs/methods_sweep_cifar10.py (groups sweep_cd_lambda and
    # sweep_cd_share; eta and bn_mode kept): joint distillation 3, OOD rows half the weight of each layer solve
    oe_defaults: ClassVar[OESettings] = OESettings(lambda_jd=3.0, calibration_ood_share=0.5)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], spec: ArchSpec) -> CD:
        """``method.prune_ratio`` (one value: the kept fraction is ``1 - prune_ratio``), ``method.cd.*``;
        ``method.kd_gamma``/``method.tau`` when ``cd.finetune=kd``."""
        ratios = set(prune_ratios(shared(cfg, "prune_ratio"), spec.num_stages))
        if len(ratios) != 1:
            fail("method.prune_ratio", "CD takes one prune ratio for all layers, got one per stage")
        p = hparams_from(CDParams, sub_config(cfg, "cd"), "method.cd")
        try:
            cd_plan(spec, 1.0 - ratios.pop())
        except ValueError as e:
            fail("method.name", f"cd: {e}")
        steps = p.finetune_steps if p.finetune_steps > 0 else (100 if spec.is_resnet else 40)
        return cls(1.0 - prune_ratios(shared(cfg, "prune_ratio"), spec.num_stages)[0], p,
                   float(shared(cfg, "kd_gamma")), float(shared(cfg, "tau")), steps)

    def stages(self, spec: ArchSpec) -> tuple[Stage, ...]:
        """Layer-wise cross distillation."""
        return (cd_stage(self.keep_ratio, self.params),)

    def recipe(self) -> Recipe:
        """The official short CE fine-tuning (its own schedule), or the project's loop with CE or KD."""
        p = self.params
        if p.finetune == "kd":
            return KD(gamma=self.kd_gamma, tau=self.tau).recipe()
        if p.finetune == "ce":
            return Recipe(loss=losses.supervised_term, distill="logits", needs_teacher=False)
        return Recipe(loss=losses.supervised_term, distill="logits", needs_teacher=False,
                      schedule=FinetuneSchedule(steps=self.finetune_steps, lr=p.finetune_lr, momentum=0.9,
                                                weight_decay=5e-4, decay_at=(0.5, 0.75), decay_factor=0.1,
                                                batch_id=0, max_batch=128, augment=p.finetune_augment))

