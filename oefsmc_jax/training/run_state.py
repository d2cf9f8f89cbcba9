"""One run's bookkeeping in the fine-tuning loop, the same whether it trains alone or in a group: its checkpoints
(restored on start, written every ``ckpt_every`` steps and when it ends), metrics files, held-out evaluation and
early-stopping state, step, and outcome.

A checkpoint holds the tree ``{'state', 'es', 'masks'}``: the student's variables (parameters, BatchNorm statistics,
masks), the optimizer state, the step, the RNG key and the early-stopping state, with the job's ``meta`` beside it;
rerunning with the same workdir continues from the newest one and ends with the same parameters as an
uninterrupted run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from oefsmc_jax import paths
from oefsmc_jax.training.checkpoint import Checkpointer
from oefsmc_jax.training.metric_writer import MetricWriter
from oefsmc_jax.training.parallel import replicate
from oefsmc_jax.training.preemption import NonFiniteError
from oefsmc_jax.training.step import init_state
from oefsmc_jax.training.train import RunJob


@dataclasses.dataclass
class TrackedBest:
    """What early stopping would have kept in a run that did not stop (``LoopConfig.stop_early = False``): the step
    of the best held-out agreement before it would have stopped, that agreement, the step it would have stopped at
    (None: it would have run to the end) and the weights at the best step."""

    step: int
    agreement: float
    stop_step: int | None
    variables: dict


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
    tracked: TrackedBest | None = None  # what early stopping would have kept, when the run did not stop early


class RunState:
    """Run ``index`` of a program in the loop (see :meth:`restore`): ``step``, ``stopped`` (finished or
    early-stopped), ``error`` (the :class:`NonFiniteError` that stopped it), its early-stopping state ``es``, its
    :class:`Checkpointer` and :class:`MetricWriter`."""

    def __init__(self, job: RunJob, index: int, ckpt: Checkpointer, tree: dict, restored: int | None,
                 finished: bool, log: Callable[[str], None]):
        self.job, self.index, self.ckpt, self.log = job, index, ckpt, log
        self.name, self.loop, self.workdir = job.name, job.loop, paths.as_path(job.workdir)
        self.es = tree["es"]
        self.step = self.first_step = int(tree["state"].step)
        self.stopped = finished
        self.error: NonFiniteError | None = None
        self.saved_at = -1  # the step of the newest save (a stop at that step must not save it again)
        self.writer = MetricWriter(self.workdir, resume_step=restored or 0)

    @classmethod
    def restore(cls, job: RunJob, index: int, tx: Any, log: Callable[[str], None]) -> tuple[RunState, dict]:
        """The run's state from its newest checkpoint (else fresh), and its ``{'state', 'masks'}`` on the mesh for
        the program that trains it."""
        v = job.variables
        es = {"best_params": v["params"], "best_batch_stats": v.get("batch_stats", {}),
              "best_agreement": jnp.asarray(-1.0, jnp.float32), "best_step": jnp.asarray(0, jnp.int32),
              "bad_evals": jnp.asarray(0, jnp.int32)}
        tree = replicate({"state": init_state(v, tx, job.seed), "es": es, "masks": v.get("masks", {})}, job.mesh)
        ckpt = Checkpointer(paths.as_path(job.workdir) / "checkpoints", max_to_keep=job.loop.keep_checkpoints)
        start, restored = ckpt.restore_latest(tree, log=lambda s: log(f"[{job.name}] {s}"))
        finished = False
        if start is not None:
            tree, saved_meta = restored
            finished = bool(saved_meta.get("stopped", False))
            log(f"[{job.name}] resumed from step {start}" + (" (run had already finished)" if finished else ""))
        run = cls(job, index, ckpt, tree, start, finished, log)
        return run, {"state": tree["state"], "masks": tree["masks"]}

    @property
    def active(self) -> bool:
        """Whether the run takes the next step: not finished, early-stopped or failed."""
        return not self.stopped and self.error is None and self.step < self.loop.steps

    def evaluate(self, variables: dict, predict: Callable) -> None:
        """The held-out agreement with the teacher at this step: a new best (its weights kept) or one more
        evaluation without improvement; its metrics and log line. After ``loop.patience`` evaluations without
        improvement the run stops; a run that only tracks (``loop.stop_early = False``) goes on, and stops
        evaluating, since early stopping's choice is made."""
        if not self.loop.stop_early and int(self.es["bad_evals"]) >= self.loop.patience:
            return
        images, teacher_preds = self.job.heldout
        preds = np.argmax(predict(variables, images)["logits"], -1)
        agree = float(np.mean(preds == teacher_preds) * 100.0)
        best = float(self.es["best_agreement"])
        self.es = _early_stopping(self.es, agree, variables["params"], variables["batch_stats"], self.step,
                                  self.job.mesh)
        self.writer.write(self.step, "eval", {"heldout_agreement": agree, "best_agreement": max(agree, best)})
        self.log(f"[{self.name}] step {self.step}: held-out OOD agreement with teacher {agree:.2f}% "
                 f"(best {max(agree, best):.2f}% at step {int(self.es['best_step'])})")
        if int(self.es["bad_evals"]) >= self.loop.patience:
            if not self.loop.stop_early:
                self.log(f"[{self.name}] step {self.step}: early stopping would stop here and keep step "
                         f"{int(self.es['best_step'])}; tracking only, training goes on")
                return
            self.stopped = True
            self.log(f"[{self.name}] early stop at step {self.step}: no improvement in {self.loop.patience} "
                     "evaluations")

    def fail(self, count: int) -> None:
        """Stop the run for ``count`` consecutive non-finite steps; its newest checkpoint stays as it is."""
        last = self.ckpt.latest_step()
        newest = f"step {last}" if last is not None else "none"
        self.error = NonFiniteError(
            f"[{self.name}] {count} consecutive steps (to step {self.step}) had a non-finite loss or gradient, so "
            f"their updates were skipped and the run stopped; the newest checkpoint is {newest}"
            f" in {self.workdir / 'checkpoints'}, untouched. Lower optim.lr or check the data; raise "
            "train.max_nonfinite to tolerate more.")

    def save(self, tree: dict, force: bool = False) -> None:
        """Checkpoint the run at this step; ``tree`` holds its train state and masks."""
        self._write(tree, force=force, stopped=False)

    def finish(self, tree: dict) -> None:
        """Write the run's final checkpoint (marked finished, so a rerun returns it without training)."""
        self._write(tree, force=True, stopped=True)
        self.stopped = True

    def _write(self, tree: dict, force: bool, stopped: bool) -> None:
        self.ckpt.save(self.step, {"state": tree["state"], "es": self.es, "masks": tree["masks"]},
                       {**(self.job.meta or {}), "stopped": stopped, "name": self.name}, force=force)
        self.saved_at = self.step

    def close(self) -> None:
        """Finish pending checkpoint saves and close the metrics files."""
        self.ckpt.close()
        self.writer.close()

    def result(self, variables: dict, skipped: int, wall: float) -> FinetuneResult:
        """The run's outcome: its best held-out weights when it early-stopped on them, else ``variables`` (its last
        weights), with what early stopping would have kept when it only tracked."""
        scored = self.job.heldout is not None and self.loop.eval_every and float(self.es["best_agreement"]) >= 0
        use_best = scored and self.loop.stop_early
        es = self.es
        tracked = None
        if scored and not use_best:
            would_stop = int(es["bad_evals"]) >= self.loop.patience
            best = int(es["best_step"])
            tracked = TrackedBest(
                step=best, agreement=float(es["best_agreement"]),
                stop_step=best + self.loop.patience * self.loop.eval_every if would_stop else None,
                variables=jax.device_get({"params": es["best_params"], "batch_stats": es["best_batch_stats"],
                                          "masks": variables["masks"]}))
        out_vars = jax.device_get({"params": es["best_params"] if use_best else variables["params"],
                                   "batch_stats": es["best_batch_stats"] if use_best else variables["batch_stats"],
                                   "masks": variables["masks"]})
        return FinetuneResult(variables=out_vars, steps_run=self.step,
                              best_step=int(es["best_step"]) if use_best else self.step,
                              best_agreement=float(es["best_agreement"]) if use_best else None,
                              stopped_early=self.step < self.loop.steps, wall_s=wall, skipped_steps=int(skipped),
                              tracked=tracked)


def _early_stopping(es: dict, agree: float, params: Any, batch_stats: Any, step: int, mesh: Mesh) -> dict:
    """The early-stopping state after a held-out agreement of ``agree`` at ``step``: the new best (copies of the
    weights) or one more evaluation without improvement. Scalars are placed on the whole mesh (global arrays), so
    every host can checkpoint them."""
    if agree > float(es["best_agreement"]):
        return {"best_params": jax.tree.map(jnp.copy, params), "best_batch_stats": jax.tree.map(jnp.copy, batch_stats),
                **replicate({"best_agreement": np.float32(agree), "best_step": np.int32(step),
                             "bad_evals": np.int32(0)}, mesh)}
    return {**es, "bad_evals": replicate(np.int32(int(es["bad_evals"]) + 1), mesh)}
