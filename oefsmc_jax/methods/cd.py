"""Cross Distillation (Bai et al., AAAI 2020) for channel pruning, as its official code does it (baselines.md §4).

Compression: the student starts as the teacher; every 3x3 conv except the stem is visited in forward order. For
conv ``l`` the inputs ``Xs`` (student) and ``Xt`` (teacher) are collected on one batch of the calibration set with
both networks in eval mode (the official code uses train mode for VGG, which moves the BN statistics towards the
batch; eval mode is this port's [choice] for every family), and the student's kernel is fitted by Adam on
``mu * ||S(Xt) - T(Xt)||^2 + (1 - mu) * ||T(Xs) - S(Xs)||^2`` with a hard top-k projection of its input channels
(``methods/cd_solver.py``). The pruned input channels of a block's conv2 become the block's internal-width mask, so
the student shrinks like an L1-pruned one. With OE-FSMC the calibration set holds OOD images too and the class-aware
weights weight both terms per sample.

Fine-tuning: the official code ends with a negligible CE fine-tuning (tens of full-batch steps at lr 1e-5); here the
project's fine-tuning stage runs with CE (``method.cd.finetune_loss=ce``, switchable to ``kd``), so its length and
optimizer are ``train.*``/``optim.*`` like every method's. The kept fraction is ``1 - method.prune_ratio``
(``int(r*C)+1`` channels on CIFAR ResNets, ``int(r*C)`` on VGG), a single value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from oefsmc_jax.errors import fail
from oefsmc_jax.methods.base import CompressionContext, Method, Recipe, Stage, hparams_from, prune_ratios, sub_config
from oefsmc_jax.methods.cd_solver import cd_plan, cd_solve_layer
from oefsmc_jax.methods.l1 import KD
from oefsmc_jax.models import ArchSpec, set_masks
from oefsmc_jax.models.surgery import _copy, _get, _set
from oefsmc_jax.training import preemption


@dataclasses.dataclass(frozen=True)
class CDParams:
    """``config.method.cd``; ``lr``/``mu`` at -1 take the official value of the family (ResNet 1e-3 / 0.9, VGG
    5e-4 / 0.6)."""

    iters: int = 3000  # official; cheap since the solver works on the im2col Gram (cd_solver.py)
    lr: float = -1.0
    mu: float = -1.0
    batch_size: int = 128  # official: min(128, n) images per layer
    finetune_loss: str = "ce"  # ce (the original) | kd

    def __post_init__(self) -> None:
        if self.iters < 1:
            fail("method.cd.iters", f"must be >= 1, got {self.iters}")
        if self.lr != -1.0 and not self.lr > 0:
            fail("method.cd.lr", f"must be > 0 (or -1 for the official value), got {self.lr}")
        if self.mu != -1.0 and not 0.0 <= self.mu <= 1.0:
            fail("method.cd.mu", f"must be in [0, 1] (or -1 for the official value), got {self.mu}")
        if self.batch_size < 1:
            fail("method.cd.batch_size", f"must be >= 1, got {self.batch_size}")
        if self.finetune_loss not in ("ce", "kd"):
            fail("method.cd.finetune_loss", f"must be 'ce' or 'kd', got {self.finetune_loss!r}")


def cd_stage(keep_ratio: float, p: CDParams) -> Stage:
    """The layer-wise cross-distillation stage."""

    def stage(spec: ArchSpec, variables: dict, ctx: CompressionContext) -> tuple[ArchSpec, dict]:
        vgg = not spec.is_resnet
        lr = p.lr if p.lr > 0 else (5e-4 if vgg else 1e-3)
        mu = p.mu if p.mu >= 0 else (0.6 if vgg else 0.9)
        cal = ctx.calibration
        n = len(cal)
        rng = np.random.default_rng(int(np.asarray(ctx.key).ravel()[-1]))
        idx = np.sort(rng.choice(n, min(n, p.batch_size), replace=False)) if n > p.batch_size else np.arange(n)
        x = ctx.images(idx)
        w = jnp.asarray(cal.weights[idx], jnp.float32)
        t_vars = ctx.teacher_variables
        plan = cd_plan(spec, keep_ratio)
        records = []
        every = ["/".join(layer.path) + ":in" for layer in plan]  # one compiled forward per network
        for i, layer in enumerate(plan):
            preemption.check(f"cd, {i} of {len(plan)} layers done")
            point = every[i]
            xs = ctx.activations(spec, variables, every, x=x, keep=[point])[point]
            xt = ctx.activations(ctx.teacher_spec, t_vars, every, x=x, keep=[point])[point]
            w_t = jnp.asarray(_get(t_vars["params"], layer.path)["kernel"])
            w_s = jnp.asarray(_get(variables["params"], layer.path)["kernel"])
            res = cd_solve_layer(w_s, w_t, xs, xt, keep=layer.keep, iters=p.iters, lr=lr, mu=mu,
                                 stride=layer.stride, padding=1, weights=w)
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

    keep_ratio: float = 0.5
    params: CDParams = CDParams()
    kd_gamma: float = 0.9
    tau: float = 4.0
    name = "cd"
    uses_calibration = True

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], spec: ArchSpec) -> CD:
        """``method.prune_ratio`` (one value: the kept fraction is ``1 - prune_ratio``), ``method.cd.*``;
        ``method.kd_gamma``/``method.tau`` when ``cd.finetune_loss=kd``."""
        ratios = set(prune_ratios(cfg.get("prune_ratio", 0.5), spec.num_stages))
        if len(ratios) != 1:
            fail("method.prune_ratio", "CD takes one prune ratio for all layers, got one per stage")
        p = hparams_from(CDParams, sub_config(cfg, "cd"), "method.cd")
        try:
            cd_plan(spec, 1.0 - ratios.pop())
        except ValueError as e:
            fail("method.name", f"cd: {e}")
        return cls(1.0 - prune_ratios(cfg.get("prune_ratio", 0.5), spec.num_stages)[0], p,
                   float(cfg.get("kd_gamma", 0.9)), float(cfg.get("tau", 4.0)))

    def stages(self, spec: ArchSpec) -> tuple[Stage, ...]:
        """Layer-wise cross distillation."""
        return (cd_stage(self.keep_ratio, self.params),)

    def recipe(self) -> Recipe:
        """CE on the ID labels (the original), or KD."""
        if self.params.finetune_loss == "kd":
            return KD(gamma=self.kd_gamma, tau=self.tau).recipe()
        return Recipe(loss=_ce_loss, distill="logits", needs_teacher=False)


def _ce_loss(student: dict, teacher: dict | None, labels: jax.Array, label_loss: Any) -> jax.Array:
    return label_loss(student["logits"], labels)
