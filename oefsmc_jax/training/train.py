"""A fine-tuning run (:class:`RunJob`, :class:`LoopConfig`; :meth:`RunJob.key` says which runs can share one
compiled program), the compiled train step's one owner (:func:`make_trainer`), and one run on the devices
(:class:`SoloProgram`).

:func:`oefsmc_jax.training.loop.train_runs` steps a :class:`SoloProgram` for a run trained alone and a
:class:`oefsmc_jax.training.group.GroupProgram` for runs trained together; both are built from a :class:`Trainer`.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from oefsmc_jax.models import ArchSpec, build_model, mask_multipliers
from oefsmc_jax.training.feed import HostFeeder, pool_bytes
from oefsmc_jax.training.optim import freeze, make_optimizer
from oefsmc_jax.training.parallel import replicate
from oefsmc_jax.training.recipe import Recipe
from oefsmc_jax.training.step import GroupStep, StepConfig, StepData, make_predict, make_train_step


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """How long to train and how often to log, evaluate and checkpoint."""

    steps: int
    log_every: int = 50
    eval_every: int = 0  # 0 = no held-out evaluation (fixed budget)
    patience: int = 5
    # False: evaluate and keep the best weights as early stopping would, but never stop and report the last weights
    # (what early stopping would have kept is recorded beside them)
    stop_early: bool = True
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    max_nonfinite: int = 10  # consecutive skipped (non-finite) steps before the run stops


@dataclasses.dataclass
class RunJob:
    """One fine-tuning run: the student ``(spec, variables)`` trained with ``recipe`` against the teacher on
    ``data`` for ``loop.steps`` steps, resuming from ``workdir``.

    ``heldout`` = (uint8 images, teacher predictions) enables early stopping on student-teacher agreement every
    ``loop.eval_every`` steps; the best weights are kept. ``meta`` is stored in every checkpoint (a run
    stores the architecture spec and the subset indices there).
    """

    name: str
    workdir: pathlib.Path
    mesh: Mesh
    spec: ArchSpec
    variables: dict
    recipe: Recipe
    teacher_spec: ArchSpec | None
    teacher_variables: dict | None
    data: StepData
    step_cfg: StepConfig
    optim_cfg: dict
    loop: LoopConfig
    seed: int
    heldout: tuple[np.ndarray, np.ndarray] | None = None
    meta: dict | None = None

    def key(self) -> tuple:
        """Runs with equal keys can be trained by one grouped program."""
        shapes = lambda t: (jax.tree.structure(t), tuple(np.shape(x) + (str(np.asarray(x).dtype)
                                                                            if not isinstance(x, jax.Array)
                                                                            else str(x.dtype),)
                                                         for x in jax.tree.leaves(t)))
        return (self.mesh, self.spec, self.teacher_spec, self.recipe, self.step_cfg, freeze(dict(self.optim_cfg)),
                self.loop, shapes(self.data), shapes(self.variables), shapes(self.teacher_variables))


@dataclasses.dataclass(frozen=True)
class Trainer:
    """What :func:`make_trainer` builds: the optimizer, its schedule, the jitted train step and eval forward."""

    tx: Any
    schedule: Any
    step: Callable
    predict: Callable


@dataclasses.dataclass(frozen=True)
class _TrainerKey:
    mesh: Mesh
    spec: ArchSpec
    teacher_spec: ArchSpec | None
    recipe: Recipe
    step_cfg: StepConfig
    optim_items: tuple
    steps: int
    group: GroupStep | None


def make_trainer(mesh: Mesh, spec: ArchSpec, teacher_spec: ArchSpec | None, recipe: Recipe, step_cfg: StepConfig,
                 optim_cfg: dict, steps: int, group: GroupStep | None = None) -> Trainer:
    """The one owner of the train step: model with synced BatchNorm, optimizer with the recipe's frozen parameters
    masked out, the jitted step (grouped over a leading run axis with ``group``) and eval forward. Cached on its
    (hashable) arguments, so a grid, the benchmark and the tests reuse compiled steps across runs of the same
    shapes; the compile modes (``step_cfg.cpu_fusion``, ``step_cfg.cpu_wgrad``) are part of that key, so a change
    of mode builds a new step."""
    return _build_trainer(_TrainerKey(mesh, spec, teacher_spec, recipe, step_cfg, freeze(dict(optim_cfg)), int(steps),
                                      group))


def clear_trainer_cache() -> None:
    """Forget every step :func:`make_trainer` has built (tests that count traces start from none)."""
    _build_trainer.cache_clear()


@functools.lru_cache(maxsize=64)
def _build_trainer(key: _TrainerKey) -> Trainer:
    optim_cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in key.optim_items}
    spec, group = key.spec, key.group
    student = build_model(spec, bn_axis_name="data")
    teacher = build_model(key.teacher_spec) if key.teacher_spec is not None else None
    # the parameter tree depends on the spec only (32x32 is large enough for every family's pooling)
    abstract = jax.eval_shape(lambda: build_model(spec).init(jax.random.PRNGKey(0),
                                                             jnp.zeros((1, 32, 32, spec.in_channels)), train=False))
    tx, schedule = make_optimizer(optim_cfg, key.steps, key.recipe.trainable(abstract["params"]))
    step = make_train_step(key.mesh, student, teacher, key.recipe, tx, key.step_cfg, group)
    return Trainer(tx, schedule, step, make_predict(key.mesh, build_model(spec), key.step_cfg.mean, key.step_cfg.std,
                                                        cpu_fusion=key.step_cfg.cpu_fusion))


class SoloProgram:
    """One run's train state on the devices and the (ungrouped) step that advances it (what
    :func:`oefsmc_jax.training.loop.train_runs` steps for a run trained alone).

    ``tree``: the run's restored ``{'state', 'masks'}``. With ``step_cfg.host_batches`` each step's images are
    gathered on the host (``training/feed.py``) while ``feed`` (the run has steps left); else the data stays on the
    devices.
    """

    grouped = False

    def __init__(self, step: Callable, job: RunJob, tree: dict, feed: bool, log: Callable[[str], None]):
        self.label, self._step, self.data = job.name, step, job.data
        self.state, self.masks = tree["state"], tree["masks"]
        self.teacher, self.mult = replicate((job.teacher_variables, mask_multipliers(job.spec, job.variables)),
                                            job.mesh)
        self.feeder = None
        cfg = job.step_cfg
        if cfg.host_batches and feed:
            self.feeder = HostFeeder(cfg, job.data, np.asarray(jax.device_get(self.state.rng)), int(self.state.step),
                                     job.mesh)
            log(f"[{job.name}] host batches: each step's {cfg.batch_id} + {cfg.batch_ood} images are gathered on "
                f"the host ({pool_bytes(job.data) / 2**20:,.0f} MiB of ID and OOD images stay off the devices)")

    def advance(self, active: list[bool], steps: list[int]) -> Any:
        """One step of the run (``active`` is ``[True]``; ``steps`` holds its step before this one); returns the
        step's metrics."""
        del active
        data = self.feeder.get(steps[0]) if self.feeder is not None else self.data
        self.state, metrics = self._step(self.state, data, self.teacher, self.masks, self.mult)
        return metrics

    def wait(self) -> None:
        """Block until the last step has run."""
        jax.block_until_ready(self.state.step)

    def run_metrics(self, host: dict, r: int) -> dict[str, float]:
        """The step metrics ``host`` (fetched from the devices) as floats (``r`` is 0)."""
        del r
        return {k: float(v) for k, v in host.items()}

    def nonfinite(self) -> np.ndarray:
        """The run's current streak of non-finite steps, as a one-run vector."""
        return np.atleast_1d(np.asarray(jax.device_get(self.state.nonfinite)))

    def skipped(self) -> np.ndarray:
        """How many of the run's steps were skipped for a non-finite loss or gradient, as a one-run vector."""
        return np.atleast_1d(np.asarray(jax.device_get(self.state.skipped)))

    def variables(self, r: int) -> dict:
        """The run's current student variables (``r`` is 0)."""
        del r
        return {"params": self.state.params, "batch_stats": self.state.batch_stats, "masks": self.masks}

    def run_tree(self, r: int) -> dict:
        """The run's train state and masks, as its checkpoint holds them (``r`` is 0)."""
        del r
        return {"state": self.state, "masks": self.masks}

    def close(self) -> None:
        """Stop the host feeder's thread."""
        if self.feeder is not None:
            self.feeder.close()
