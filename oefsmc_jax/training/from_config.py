"""The training settings of a run read from its config: compile modes, the cached eval forward, and the step and
loop configs of one arm's fine-tuning (:func:`finetune_settings`).

A recipe with its own schedule (CD's official short fine-tuning, :class:`oefsmc_jax.training.recipe.FinetuneSchedule`)
replaces the steps, ID batch, optimizer, augmentation and early stopping of ``train.*``/``optim.*``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax

from oefsmc_jax.kernels import cpu_conv
from oefsmc_jax.models import ArchSpec, build_model
from oefsmc_jax.training import xla_cpu
from oefsmc_jax.training.feed import pool_bytes
from oefsmc_jax.training.recipe import FinetuneSchedule
from oefsmc_jax.training.step import StepConfig, StepData, make_predict
from oefsmc_jax.training.train import LoopConfig
from oefsmc_jax.training.xla_cpu import mesh_platform


def compile_modes(config: Any, mesh: Any = None) -> dict[str, str]:
    """``{'cpu_fusion': ..., 'cpu_wgrad': ...}``: the compile modes ``config`` asks for, its empty fields resolved
    from ``$OEFSMC_CPU_FUSION`` / ``$OEFSMC_CPU_WGRAD`` or the defaults (``training/xla_cpu.py``,
    ``kernels/cpu_conv.py``); the filter-gradient kernel is a CPU kernel, so ``cpu_wgrad`` is ``xla`` when ``mesh``
    (None: JAX's default backend) is not a CPU. The run passes them to what it compiles (``StepConfig``,
    :func:`predict_fn`, ``CompressionContext``); nothing reads them from a process-wide setting."""
    platform = mesh_platform(mesh) if mesh is not None else jax.default_backend()
    return {"cpu_fusion": xla_cpu.resolve_mode(config.cpu_fusion),
            "cpu_wgrad": cpu_conv.resolve_mode(config.cpu_wgrad) if platform == "cpu" else "xla"}


@functools.lru_cache(maxsize=64)
def predict_fn(mesh: Any, spec: ArchSpec, mean: tuple, std: tuple, batch_size: int,
               cpu_fusion: str = xla_cpu.DEFAULT) -> Callable:
    """A cached sharded eval forward for ``spec`` (compiled once per architecture, image shape and XLA:CPU fusion
    mode ``cpu_fusion``)."""
    return make_predict(mesh, build_model(spec), mean, std, batch_size, cpu_fusion=cpu_fusion)


def uses_host_batches(config: Any, host_data: StepData) -> bool:
    """Whether the step's images are gathered on the host (``train.host_batches``: on, off, or auto: when the ID set
    and OOD pool together exceed ``train.device_pool_mb``)."""
    mode = str(config.train.host_batches)
    return mode == "on" or (mode == "auto" and pool_bytes(host_data) > config.train.device_pool_mb * 2**20)


@dataclasses.dataclass(frozen=True)
class FinetuneSettings:
    """The step config, loop config and optimizer config of one arm's fine-tuning, and whether it stops early."""

    step: StepConfig
    loop: LoopConfig
    optim: dict
    early_stopping: bool
    note: str | None = None  # one progress line when the recipe's own schedule replaced the config's


def finetune_settings(config: Any, mesh: Any, schedule: FinetuneSchedule | None, oe: dict,
                      num_train: int, host_batches: bool, early_stopping: bool,
                      track_best: bool = False) -> FinetuneSettings:
    """The fine-tuning settings of one arm: ``train.*``, ``optim.*`` and ``data.*`` augmentation, or the recipe's own
    ``schedule`` where it has one; ``oe``: OE-FSMC's step terms of the arm (``ood``: whether it has OOD images,
    ``lambda_jd``, ``eta``, ``bn_mode``); ``num_train``: the few-sample set's size; ``early_stopping``: whether the
    arm may stop early (a schedule can refuse it); ``track_best``: whether an arm that does not stop early still
    scores the held-out agreement to record what early stopping would have kept."""
    tr = config.train
    steps, batch_id, optim_cfg = tr.steps, tr.batch_id, config.optim.to_dict()
    pad, flip = config.data.pad, config.data.flip
    note = None
    if schedule is not None:
        steps, batch_id = schedule.steps, schedule.batch(num_train, len(mesh.devices.flat))
        optim_cfg = schedule.optim(optim_cfg)
        pad, flip = (pad, flip) if schedule.augment else (0, False)
        early_stopping = early_stopping and schedule.early_stopping
        note = (f"the method's own fine-tuning: {steps} steps of {batch_id} ID images, lr {schedule.lr:g}, "
                f"augmentation {'on' if schedule.augment else 'off'}")
    step_cfg = StepConfig(batch_id=batch_id, batch_ood=tr.batch_ood if oe["ood"] else 0,
                          pad=pad, flip=flip, mean=tuple(config.data.mean),
                          std=tuple(config.data.std), lambda_jd=oe["lambda_jd"], eta=oe["eta"], tau=config.method.tau,
                          bn_mode=oe["bn_mode"], host_batches=host_batches, **compile_modes(config, mesh))
    scored = early_stopping or track_best
    loop = LoopConfig(steps=steps, log_every=tr.log_every, eval_every=config.oe.eval_every if scored else 0,
                      patience=config.oe.patience, ckpt_every=tr.ckpt_every, max_nonfinite=tr.max_nonfinite,
                      stop_early=early_stopping)
    return FinetuneSettings(step_cfg, loop, optim_cfg, early_stopping, note)
