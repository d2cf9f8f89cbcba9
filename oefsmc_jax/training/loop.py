"""The fine-tuning loop: one loop for a run trained alone and for a group of runs trained by one compiled program.

:func:`train_runs` steps a program (:class:`oefsmc_jax.training.train.SoloProgram` for one run,
:class:`oefsmc_jax.training.group.GroupProgram` for ``R`` runs stacked on a leading axis) and keeps each run's books
with a :class:`oefsmc_jax.training.run_state.RunState`: metrics (JSONL + TensorBoard) and progress lines, held-out
evaluation and early stopping, resumable Orbax checkpoints, the stop after too many non-finite steps, and a
checkpoint of every unfinished run when a SIGTERM or SIGINT asks the process to stop (``training/preemption.py``).

:func:`finetune` is what a run calls (``oefsmc_jax.run``); inside a cell of a
:class:`oefsmc_jax.training.scheduler.GroupScheduler` it hands the run to the scheduler, which trains it together
with other runs of the same shapes (:func:`finetune_group`; same result, to float rounding).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import numpy as np

from oefsmc_jax import cell
from oefsmc_jax.training import preemption
from oefsmc_jax.training.compile_cache import CompileClock
from oefsmc_jax.training.group import GroupProgram, same_tree
from oefsmc_jax.training.preemption import NonFiniteError
from oefsmc_jax.training.run_state import FinetuneResult, RunState
from oefsmc_jax.training.step import GroupStep, resolve_group_impl
from oefsmc_jax.training.train import RunJob, SoloProgram, Trainer, make_trainer
from oefsmc_jax.training.xla_cpu import mesh_platform

Log = Callable[[str], None]


class Program(Protocol):
    """The runs' arrays on the devices and the compiled step that advances them; run ``r`` is the loop's
    ``runs[r]``. ``grouped``: several runs share the step (progress is one line for the group)."""

    label: str
    grouped: bool

    def advance(self, active: list[bool], steps: list[int]) -> Any: ...
    def wait(self) -> None: ...
    def run_metrics(self, host: dict, r: int) -> dict[str, float]: ...
    def nonfinite(self) -> np.ndarray: ...
    def skipped(self) -> np.ndarray: ...
    def variables(self, r: int) -> dict: ...
    def run_tree(self, r: int) -> dict: ...
    def close(self) -> None: ...


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def finetune(job: RunJob, log: Log | None = None) -> FinetuneResult:
    """Fine-tune ``job``'s student for ``job.loop.steps`` steps, resuming from ``job.workdir``; see
    :func:`finetune_one`. Inside a grid cell (:mod:`oefsmc_jax.cell`) the run, named
    ``{cell}/{job.name}``, is handed to the cell's scheduler, which may train it together with other runs."""
    current = cell.current()
    if current is not None:
        return current.submit(dataclasses.replace(job, name=f"{current.name}/{job.name}"))
    return finetune_one(job, log)


def finetune_one(job: RunJob, log: Log | None = None) -> FinetuneResult:
    """Train ``job`` alone. Rerunning with the same workdir continues from the newest checkpoint and ends with the
    same parameters as an uninterrupted run. Raises the run's :class:`NonFiniteError` after ``loop.max_nonfinite``
    consecutive non-finite steps, and ``preemption.Preempted`` after checkpointing when a stop signal arrives."""
    log = log or _stderr
    started = time.time()
    trainer = make_trainer(job.mesh, job.spec, job.teacher_spec, job.recipe, job.step_cfg, job.optim_cfg,
                           job.loop.steps)
    run, arrays = RunState.restore(job, 0, trainer.tx, log)
    program = SoloProgram(trainer.step, job, arrays, run.active, log)
    del arrays  # the program replaces them step by step; a reference here would keep the first state on the devices
    outcome, = train_runs(trainer, program, [run], log, started)
    if isinstance(outcome, NonFiniteError):
        raise outcome
    return outcome


def finetune_group(jobs: Sequence[RunJob], log: Log | None = None,
                   impl: str = "auto") -> list[FinetuneResult | NonFiniteError]:
    """Train ``jobs`` (equal :meth:`RunJob.key`) as one program; returns, per job, its ``FinetuneResult`` or the
    :class:`NonFiniteError` that stopped it (the rest of the group goes on). Raises ``preemption.Preempted`` after
    checkpointing every unfinished run when a SIGTERM or SIGINT asks the process to stop. ``impl``: how the program
    runs its runs (``oefsmc_jax.training.step.GROUP_IMPLS``; ``auto`` = batched on an accelerator, one after another
    inside the program on a CPU)."""
    log = log or _stderr
    if not jobs:
        return []
    if any(j.step_cfg.host_batches for j in jobs):
        raise ValueError("finetune_group: runs fed with host batches (StepConfig.host_batches) train one by one")
    if len({j.key() for j in jobs}) != 1:
        raise ValueError("finetune_group: the runs differ in settings or shapes; group only runs of equal key()")
    j0 = jobs[0]
    started = time.time()
    shared = j0.teacher_variables is None or same_tree([j.teacher_variables for j in jobs])
    group = GroupStep(shared_teacher=shared, impl=resolve_group_impl(impl, mesh_platform(j0.mesh)))
    trainer = make_trainer(j0.mesh, j0.spec, j0.teacher_spec, j0.recipe, j0.step_cfg, j0.optim_cfg, j0.loop.steps,
                           group)
    label = f"group of {len(jobs)}"
    log(f"[{label}] training together ({group.impl}): {', '.join(j.name for j in jobs)}"
        + ("" if shared else " (teachers differ: one each)"))
    runs, arrays = zip(*(RunState.restore(j, r, trainer.tx, log) for r, j in enumerate(jobs)))
    program = GroupProgram(label, trainer.step, jobs, arrays, shared)
    del arrays  # stacked into the program; the runs' own copies can go
    outcomes = train_runs(trainer, program, list(runs), log, started)
    log(f"[{label}] done in {time.time() - started:.0f} s "
        f"({sum(run.step - run.first_step for run in runs)} run-steps)")
    return outcomes


def train_runs(trainer: Trainer, program: Program, runs: list[RunState], log: Log,
               started: float) -> list[FinetuneResult | NonFiniteError]:
    """Step ``program`` until every one of its ``runs`` has finished, early-stopped or failed; returns, per run, its
    result or the :class:`NonFiniteError` that stopped it. ``started``: when the runs' set-up began (their
    ``wall_s`` counts from there)."""
    loop = runs[0].loop
    check_every = max(1, min(loop.log_every, loop.max_nonfinite))
    progress = _Progress(runs[0].job.step_cfg.batch_id + runs[0].job.step_cfg.batch_ood)
    clock: CompileClock | None = CompileClock()
    while any(active := [run.active for run in runs]):
        metrics = program.advance(active, [run.step for run in runs])
        progress.it += 1
        stepped = [run for run, a in zip(runs, active) if a]
        for run in stepped:
            run.step += 1
        if clock is not None:  # the first call compiles (or loads) the step function
            program.wait()
            log(f"[{program.label}] train step {clock.describe()}")
            clock = None
        _check_nonfinite(program, [run for run in stepped if run.step % check_every == 0], log)
        _report(program, runs, stepped, metrics, progress, trainer.schedule, log)
        for run in stepped:
            if run.error is None:
                _end_step(program, run, trainer.predict, log)
        if any(run.active for run in runs) and preemption.should_stop(progress.it):
            _checkpoint_unfinished(program, runs)
            _close(program, runs)
            raise preemption.Preempted(_preempted_message(program, runs))
    _close(program, runs)
    wall = time.time() - started
    skipped = program.skipped()
    return [run.error if run.error is not None else
            run.result(program.variables(run.index), int(skipped[run.index]), wall) for run in runs]


class _Progress:
    """The loop's iteration count, and the throughput and time left shown by the progress lines."""

    def __init__(self, images_per_step: int):
        self.images_per_step = images_per_step
        self.it = self.last_it = 0
        self.t0 = self.last_t = time.time()

    def rates(self, n_runs: int, steps_left: int) -> tuple[float, float]:
        """Images per second (all ``n_runs`` running runs together) since the previous call, and the seconds left
        for ``steps_left`` more steps at the pace so far."""
        now = time.time()
        ips = (self.it - self.last_it) * self.images_per_step * n_runs / max(now - self.last_t, 1e-9)
        eta = steps_left * (now - self.t0) / max(self.it, 1)
        self.last_t, self.last_it = now, self.it
        return ips, eta


def _format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _fail(program: Program, run: RunState, count: int, log: Log) -> None:
    run.fail(count)
    if program.grouped:
        log(f"[{run.name}] stopped: {count} non-finite steps in a row (the rest of the group goes on)")


def _check_nonfinite(program: Program, due: list[RunState], log: Log) -> None:
    """Stop each of the ``due`` runs whose streak of non-finite steps has reached ``loop.max_nonfinite``."""
    if not due:
        return
    nonfinite = program.nonfinite()
    for run in due:
        if nonfinite[run.index] >= run.loop.max_nonfinite:
            _fail(program, run, int(nonfinite[run.index]), log)


def _report(program: Program, runs: list[RunState], stepped: list[RunState], metrics: Any, progress: _Progress,
            schedule: Callable, log: Log) -> None:
    """Train metrics of each run that stepped and is due (every ``log_every`` steps and at its last step) and the
    progress line: one per run trained alone, one per group every ``log_every`` iterations and when it ends."""
    loop = runs[0].loop
    due = [run for run in stepped if run.error is None and (run.step % loop.log_every == 0 or run.step == loop.steps)]
    summary = program.grouped and (progress.it % loop.log_every == 0 or not any(run.active for run in runs))
    if not due and not summary:
        return
    host = jax.device_get(metrics)
    skipped = program.skipped()
    ips, eta = progress.rates(len(stepped), max((loop.steps - run.step for run in runs if run.active), default=0))
    for run in due:
        values = program.run_metrics(host, run.index)
        values["lr"] = float(schedule(run.step - 1))
        values["skipped_steps"] = float(skipped[run.index])
        values["images_per_s"] = ips / max(len(stepped), 1)
        run.writer.write(run.step, "train", values)
        if not program.grouped:
            terms = " ".join(f"{k} {values[k]:.4f}" for k in ("base", "jd", "reg") if k in values)
            n_skipped = int(skipped[run.index])
            note = f" ({n_skipped} non-finite steps skipped)" if n_skipped else ""
            log(f"[{run.name}] step {run.step}/{loop.steps} loss {values['loss']:.4f} ({terms}) "
                f"acc {values['train_acc']:.1f}% lr {values['lr']:.2e} {ips:,.0f} img/s ETA {_format_eta(eta)}{note}")
    if summary:
        losses = [program.run_metrics(host, run.index)["loss"] for run in stepped]
        log(f"[{program.label}] step {max(run.step for run in runs)}/{loop.steps}: {len(stepped)} runs training, "
            f"loss {min(losses):.4f}..{max(losses):.4f}, {ips:,.0f} img/s in all, ETA {_format_eta(eta)}")


def _end_step(program: Program, run: RunState, predict: Callable, log: Log) -> None:
    """After ``run``'s step: its held-out evaluation when one is due, then its final checkpoint when it has finished
    or early-stopped (it fails instead when that step ends a streak of non-finite steps), else a regular one every
    ``ckpt_every`` steps."""
    loop = run.loop
    if run.job.heldout is not None and loop.eval_every and run.step % loop.eval_every == 0:
        run.evaluate(program.variables(run.index), predict)
    if run.stopped or run.step == loop.steps:
        nonfinite = int(program.nonfinite()[run.index])
        if nonfinite >= loop.max_nonfinite:
            _fail(program, run, nonfinite, log)
        else:
            run.finish(program.run_tree(run.index))
    elif run.step % loop.ckpt_every == 0 and int(program.nonfinite()[run.index]) == 0:  # never inside a bad streak
        run.save(program.run_tree(run.index))


def _checkpoint_unfinished(program: Program, runs: list[RunState]) -> None:
    for run in runs:
        if run.active and run.saved_at != run.step:  # a regular save at this step is finished by close()
            run.save(program.run_tree(run.index), force=True)


def _close(program: Program, runs: list[RunState]) -> None:
    program.close()
    for run in runs:
        run.close()


def _preempted_message(program: Program, runs: list[RunState]) -> str:
    if program.grouped:
        return (f"[{program.label}] preempted: checkpoints written for {', '.join(run.name for run in runs)}; rerun "
                "the same command to resume")
    run, = runs
    return (f"[{run.name}] preempted: checkpoint written at step {run.step} in {run.workdir / 'checkpoints'}; rerun "
            "the same command to resume")
