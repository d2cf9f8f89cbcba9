"""The fine-tuning loop: progress, metrics (JSONL + TensorBoard), early stopping, resumable Orbax checkpoints."""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from oefsmc_jax import paths
from oefsmc_jax.kernels import cpu_conv
from oefsmc_jax.models import ArchSpec, build_model, mask_multipliers
from oefsmc_jax.training import cell, preemption, xla_cpu
from oefsmc_jax.training.checkpoint import Checkpointer
from oefsmc_jax.training.compile_cache import CompileClock
from oefsmc_jax.training.feed import HostFeeder, pool_bytes
from oefsmc_jax.training.metric_writer import MetricWriter
from oefsmc_jax.training.optim import make_optimizer
from oefsmc_jax.training.parallel import replicate
from oefsmc_jax.training.preemption import NonFiniteError
from oefsmc_jax.training.recipe import Recipe
from oefsmc_jax.training.step import StepConfig, StepData, init_state, make_predict, make_train_step


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """How long to train and how often to log, evaluate and checkpoint."""

    steps: int
    log_every: int = 50
    eval_every: int = 0  # 0 = no early stopping (fixed budget)
    patience: int = 5
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    max_nonfinite: int = 10  # consecutive skipped (non-finite) steps before the run stops


@dataclasses.dataclass
class FinetuneResult:
    """Outcome of one fine-tuning run."""

    variables: dict
    steps_run: int
    best_step: int
    best_agreement: float | None
    stopped_early: bool
    wall_s: float
    skipped_steps: int = 0  # steps whose update was skipped for a non-finite loss or gradient


def _freeze(value):
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


@dataclasses.dataclass
class RunJob:
    """One fine-tuning run, as :func:`finetune` receives it (and hands it to a group scheduler, if any)."""

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
        return (self.mesh, self.spec, self.teacher_spec, self.recipe, self.step_cfg, _freeze(dict(self.optim_cfg)),
                self.loop, shapes(self.data), shapes(self.variables), shapes(self.teacher_variables))


@dataclasses.dataclass(frozen=True)
class Trainer:
    """What :func:`make_trainer` builds: the optimizer, its schedule, the jitted train step and eval forward."""

    tx: Any
    schedule: Any
    step: Callable
    predict: Callable


def make_trainer(mesh: Mesh, spec: ArchSpec, teacher_spec: ArchSpec | None, recipe: Recipe, step_cfg: StepConfig,
                 optim_cfg: dict, steps: int) -> Trainer:
    """The one owner of the train step: model with synced BatchNorm, optimizer with the recipe's frozen parameters
    masked out, the jitted step and eval forward. Cached on its (hashable) arguments and the compile modes in use
    (:func:`compile_modes`), so a grid, the benchmark and the tests reuse compiled steps across runs of the same
    shapes, and a change of mode builds a new step."""
    return _make_trainer(mesh, spec, teacher_spec, recipe, step_cfg, _freeze(dict(optim_cfg)), int(steps),
                         modes=compile_modes())


def compile_modes() -> tuple[str, str]:
    """What decides the compiled step besides its arguments: the XLA:CPU fusion mode (``training/xla_cpu``) and
    the filter-gradient mode (``kernels/cpu_conv``) in use now. Part of :func:`make_trainer`'s cache key."""
    return xla_cpu.get_mode(), cpu_conv.get_mode()


@functools.lru_cache(maxsize=64)
def _make_trainer(mesh: Mesh, spec: ArchSpec, teacher_spec: ArchSpec | None, recipe: Recipe, step_cfg: StepConfig,
                  optim_items: tuple, steps: int, grouped: bool = False, shared_teacher: bool = True,
                  group_impl: str = "auto", modes: tuple[str, str] = ("", "")) -> Trainer:
    del modes  # only part of the cache key: make_train_step reads the modes in use itself
    optim_cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in optim_items}
    student = build_model(spec, bn_axis_name="data")
    teacher = build_model(teacher_spec) if teacher_spec is not None else None
    # the parameter tree depends on the spec only (32x32 is large enough for every family's pooling)
    abstract = jax.eval_shape(lambda: build_model(spec).init(jax.random.PRNGKey(0),
                                                             jnp.zeros((1, 32, 32, spec.in_channels)), train=False))
    tx, schedule = make_optimizer(optim_cfg, steps, recipe.trainable(abstract["params"]))
    step = make_train_step(mesh, student, teacher, recipe, tx, step_cfg, grouped=grouped,
                           shared_teacher=shared_teacher, group_impl=group_impl)
    return Trainer(tx, schedule, step, make_predict(mesh, build_model(spec), step_cfg.mean, step_cfg.std))


def _format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _restore_run(job: RunJob, tx: Any, mesh: Mesh, log: Callable[[str], None]) -> tuple[dict, Checkpointer, Any, bool]:
    """A run's checkpointed tree ``{'state', 'es', 'masks'}`` on the mesh (its newest checkpoint, else fresh), its
    Checkpointer, the restored step (None when fresh) and whether the run had already finished."""
    v = job.variables
    es = {"best_params": v["params"], "best_batch_stats": v.get("batch_stats", {}),
          "best_agreement": jnp.asarray(-1.0, jnp.float32), "best_step": jnp.asarray(0, jnp.int32),
          "bad_evals": jnp.asarray(0, jnp.int32)}
    tree = replicate({"state": init_state(v, tx, job.seed), "es": es, "masks": v.get("masks", {})}, mesh)
    ckpt = Checkpointer(paths.as_path(job.workdir) / "checkpoints", max_to_keep=job.loop.keep_checkpoints)
    start, restored = ckpt.restore_latest(tree, log=lambda s: log(f"[{job.name}] {s}"))
    finished = False
    if start is not None:
        tree, saved_meta = restored
        finished = bool(saved_meta.get("stopped", False))
        log(f"[{job.name}] resumed from step {start}" + (" (run had already finished)" if finished else ""))
    return tree, ckpt, start, finished


def _nonfinite_error(name: str, count: int, step: int, ckpt: Checkpointer, workdir: Any) -> NonFiniteError:
    """The one-line error of a run stopped by ``count`` consecutive non-finite steps."""
    last = ckpt.latest_step()
    newest = f"step {last}" if last is not None else "none"
    return NonFiniteError(
        f"[{name}] {count} consecutive steps (to step {step}) had a non-finite loss or gradient, so their updates "
        f"were skipped and the run stopped; the newest checkpoint is {newest}"
        f" in {paths.as_path(workdir) / 'checkpoints'}, untouched. Lower optim.lr or check the data; raise "
        "train.max_nonfinite to tolerate more.")


def _early_stopping(es: dict, agree: float, params: Any, batch_stats: Any, step: int, mesh: Mesh) -> dict:
    """The early-stopping state after a held-out agreement of ``agree`` at ``step``: the new best (copies of the
    weights) or one more evaluation without improvement. Scalars are placed on the whole mesh (global arrays), so
    every host can checkpoint them."""
    if agree > float(es["best_agreement"]):
        return {"best_params": jax.tree.map(jnp.copy, params), "best_batch_stats": jax.tree.map(jnp.copy, batch_stats),
                **replicate({"best_agreement": np.float32(agree), "best_step": np.int32(step),
                             "bad_evals": np.int32(0)}, mesh)}
    return {**es, "bad_evals": replicate(np.int32(int(es["bad_evals"]) + 1), mesh)}


def _result(job: RunJob, es: dict, params: Any, batch_stats: Any, masks: Any, step: int, wall: float,
            skipped: int) -> FinetuneResult:
    """A run's outcome: its best held-out weights when it early-stopped on them, else its last weights."""
    use_best = job.heldout is not None and job.loop.eval_every and float(es["best_agreement"]) >= 0
    out_vars = jax.device_get({"params": es["best_params"] if use_best else params,
                               "batch_stats": es["best_batch_stats"] if use_best else batch_stats, "masks": masks})
    return FinetuneResult(variables=out_vars, steps_run=step, best_step=int(es["best_step"]) if use_best else step,
                          best_agreement=float(es["best_agreement"]) if use_best else None,
                          stopped_early=step < job.loop.steps, wall_s=wall, skipped_steps=int(skipped))


def finetune(*, name: str, workdir: str | pathlib.Path, mesh: Mesh, spec: ArchSpec, variables: dict,
             recipe: Recipe, teacher_spec: ArchSpec | None, teacher_variables: dict | None, data: StepData,
             step_cfg: StepConfig, optim_cfg: dict, loop: LoopConfig, seed: int,
             heldout: tuple[np.ndarray, np.ndarray] | None = None, meta: dict | None = None,
             log: Callable[[str], None] | None = None) -> FinetuneResult:
    """Fine-tune the student ``(spec, variables)`` for ``loop.steps`` steps, resuming from ``workdir``.

    ``heldout`` = (uint8 images, teacher predictions) enables early stopping on student-teacher agreement every
    ``loop.eval_every`` steps; the best weights are kept. Checkpoints hold the train state, the early-stopping
    state and ``meta``; rerunning with the same ``workdir`` continues from the newest one and ends with the same
    parameters as an uninterrupted run. The checkpoint holds the student's variables (parameters, BatchNorm
    statistics, masks), the optimizer state, the step, the RNG key, the early-stopping state, and ``meta`` (the
    pipeline stores the architecture spec and the subset indices there).

    Inside a cell (:mod:`oefsmc_jax.training.cell`) of a :class:`oefsmc_jax.training.group.GroupScheduler` the run,
    named ``{cell}/{name}``, is handed to the scheduler, which trains it together with other runs of the same shapes
    (same result, to float rounding).
    """
    job = RunJob(name=name, workdir=paths.as_path(workdir), mesh=mesh, spec=spec, variables=variables, recipe=recipe,
                 teacher_spec=teacher_spec, teacher_variables=teacher_variables, data=data, step_cfg=step_cfg,
                 optim_cfg=dict(optim_cfg), loop=loop, seed=seed, heldout=heldout, meta=meta)
    current = cell.current()
    if current is not None:
        job.name = f"{current.name}/{name}"
        return current.submit(job)
    return finetune_one(job, log)


def finetune_one(job: RunJob, log: Callable[[str], None] | None = None) -> FinetuneResult:
    """Train one run alone (what :func:`finetune` does outside a group scheduler)."""
    name, workdir, mesh, spec, variables, recipe = job.name, job.workdir, job.mesh, job.spec, job.variables, job.recipe
    teacher_spec, teacher_variables, data, step_cfg = job.teacher_spec, job.teacher_variables, job.data, job.step_cfg
    optim_cfg, loop, heldout, meta = job.optim_cfg, job.loop, job.heldout, job.meta
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    workdir = paths.as_path(workdir)
    t0 = time.time()
    trainer = make_trainer(mesh, spec, teacher_spec, recipe, step_cfg, optim_cfg, loop.steps)
    tx, schedule, step_fn, predict = trainer.tx, trainer.schedule, trainer.step, trainer.predict
    mult = mask_multipliers(spec, variables)
    ckpt_tree, ckpt, start, stopped = _restore_run(job, tx, mesh, log)
    state, es, masks = ckpt_tree["state"], ckpt_tree["es"], ckpt_tree["masks"]
    teacher_vars, mult = replicate((teacher_variables, mult), mesh)
    writer = MetricWriter(workdir, resume_step=start or 0)
    step = int(state.step)
    imgs_per_step = step_cfg.batch_id + step_cfg.batch_ood
    last_t, last_step = time.time(), step
    run_t0 = time.time()

    def save(force: bool = False, stopped_flag: bool = False):
        ckpt.save(step, {"state": state, "es": es, "masks": masks},
                  {**(meta or {}), "stopped": stopped_flag, "name": name}, force=force)

    check_every = max(1, min(loop.log_every, loop.max_nonfinite))

    def stop_nonfinite() -> None:
        if feeder is not None:
            feeder.close()
        ckpt.close()
        writer.close()
        raise _nonfinite_error(name, int(state.nonfinite), step, ckpt, workdir)

    feeder = None
    if step_cfg.host_batches and step < loop.steps and not stopped:
        feeder = HostFeeder(step_cfg, data, np.asarray(jax.device_get(state.rng)), step, mesh)
        log(f"[{name}] host batches: each step's {step_cfg.batch_id} + {step_cfg.batch_ood} images are gathered on "
            f"the host ({pool_bytes(data) / 2**20:,.0f} MiB of ID and OOD images stay off the devices)")
    clock = CompileClock()
    while step < loop.steps and not stopped:
        state, metrics = step_fn(state, feeder.get(step) if feeder is not None else data, teacher_vars, masks, mult)
        step += 1
        if clock is not None:  # the first call compiles (or loads) the step function
            jax.block_until_ready(state.step)
            log(f"[{name}] train step {clock.describe()}")
            clock = None
        if step % check_every == 0 and int(state.nonfinite) >= loop.max_nonfinite:
            stop_nonfinite()
        if step % loop.log_every == 0 or step == loop.steps:
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            metrics["lr"] = float(schedule(step - 1))
            metrics["skipped_steps"] = float(state.skipped)
            now = time.time()
            ips = (step - last_step) * imgs_per_step / max(now - last_t, 1e-9)
            eta = (loop.steps - step) * (now - run_t0) / max(step - (start or 0), 1)
            metrics["images_per_s"] = ips
            writer.write(step, "train", metrics)
            terms = " ".join(f"{k} {metrics[k]:.4f}" for k in ("base", "jd", "reg") if k in metrics)
            skipped = f" ({int(state.skipped)} non-finite steps skipped)" if int(state.skipped) else ""
            log(f"[{name}] step {step}/{loop.steps} loss {metrics['loss']:.4f} ({terms}) "
                f"acc {metrics['train_acc']:.1f}% lr {metrics['lr']:.2e} {ips:,.0f} img/s ETA {_format_eta(eta)}"
                f"{skipped}")
            last_t, last_step = now, step
        if heldout is not None and loop.eval_every and step % loop.eval_every == 0:
            cur = {"params": state.params, "batch_stats": state.batch_stats, "masks": masks}
            preds = np.argmax(predict(cur, heldout[0])["logits"], -1)
            agree = float(np.mean(preds == heldout[1]) * 100.0)
            best = float(es["best_agreement"])
            es = _early_stopping(es, agree, state.params, state.batch_stats, step, mesh)
            writer.write(step, "eval", {"heldout_agreement": agree, "best_agreement": max(agree, best)})
            log(f"[{name}] step {step}: held-out OOD agreement with teacher {agree:.2f}% "
                f"(best {max(agree, best):.2f}% at step {int(es['best_step'])})")
            if int(es["bad_evals"]) >= loop.patience:
                stopped = True
                log(f"[{name}] early stop at step {step}: no improvement in {loop.patience} evaluations")
        if stopped or step == loop.steps:
            if int(state.nonfinite) >= loop.max_nonfinite:
                stop_nonfinite()
            save(force=True, stopped_flag=True)
            stopped = True
        elif preemption.should_stop(step):
            save(force=True)
            if feeder is not None:
                feeder.close()
            ckpt.close()
            writer.close()
            raise preemption.Preempted(f"[{name}] preempted: checkpoint written at step {step} in "
                                       f"{workdir / 'checkpoints'}; rerun the same command to resume")
        elif step % loop.ckpt_every == 0 and int(state.nonfinite) == 0:  # never checkpoint inside a bad streak
            save()
    if feeder is not None:
        feeder.close()
    ckpt.close()
    writer.close()

    return _result(job, es, state.params, state.batch_stats, masks, step, time.time() - t0,
                   int(jax.device_get(state.skipped)))
