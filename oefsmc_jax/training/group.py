"""Many fine-tuning runs in one compiled program (a leading run axis), and the scheduler that forms the groups.

:func:`finetune_group` trains ``R`` runs whose static settings and array shapes agree (the same student spec,
recipe, step config, optimizer, loop and teacher architecture; e.g. the seeds of one grid cell, or two OE arms) with
the grouped step of :func:`oefsmc_jax.training.step.make_train_step` (``jax.vmap`` of the one-run step inside the
same ``shard_map``). Each run keeps everything a single run has: its own parameters, optimizer and BatchNorm state,
data, keys, early stopping, non-finite counter, checkpoints (in its own workdir, in the same format as a single run,
so a run can be resumed alone or in another group), metrics files and result. A stopped run (early stopping, or
too many non-finite steps) is masked out of the update while the others continue.

:class:`GroupScheduler` lets unchanged pipeline code use it: it runs several cells in threads, each inside its
:class:`oefsmc_jax.training.cell.Cell`; when a cell's
pipeline reaches ``training.train.finetune`` it hands the run to the scheduler and waits. Once every live cell is
waiting, the scheduler (in the calling thread) trains the largest set of waiting runs that can share a program (at
most ``max_group``), hands back their results, and repeats. Compression, evaluation and records stay in the cells'
threads.
"""

from __future__ import annotations

import functools
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from oefsmc_jax.models import mask_multipliers
from oefsmc_jax.training import cell, preemption
from oefsmc_jax.training.compile_cache import CompileClock
from oefsmc_jax.training.metric_writer import MetricWriter
from oefsmc_jax.training.parallel import replicate, replicated
from oefsmc_jax.training.step import CPU_UNROLL_MAX, resolve_group_impl
from oefsmc_jax.training.train import (
    RunJob,
    _early_stopping,
    _format_eta,
    _freeze,
    _make_trainer,
    _nonfinite_error,
    _restore_run,
    _result,
    compile_modes,
    finetune_one,
)
from oefsmc_jax.training.xla_cpu import mesh_platform


@functools.lru_cache(maxsize=8)
def _take(mesh: Mesh) -> Callable:
    """Run ``r`` of a stacked tree, replicated on the mesh (jitted once per mesh)."""
    return jax.jit(lambda tree, r: jax.tree.map(lambda a: a[r], tree), out_shardings=replicated(mesh))


def _same_tree(trees: Sequence[Any]) -> bool:
    first = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(trees[0]))]
    for t in trees[1:]:
        other = jax.tree.leaves(jax.device_get(t))
        if len(other) != len(first) or not all(np.array_equal(a, b) for a, b in zip(first, other)):
            return False
    return True


def _stack(trees: Sequence[Any], mesh: Mesh) -> Any:
    host = [jax.device_get(t) for t in trees]
    return replicate(jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *host), mesh)


def finetune_group(jobs: Sequence[RunJob], log: Callable[[str], None] | None = None,
                   impl: str = "auto") -> list[Any]:
    """Train ``jobs`` (equal :meth:`RunJob.key`) as one program; returns, per job, its ``FinetuneResult`` or the
    exception that stopped it (a :class:`NonFiniteError` of its own). Raises ``preemption.Preempted`` after
    checkpointing every unfinished run when a SIGTERM or SIGINT asks the process to stop. ``impl``: how the program runs
    its runs (``oefsmc_jax.training.step.GROUP_IMPLS``; ``auto`` = batched on an accelerator, one after another
    inside the program on a CPU)."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if not jobs:
        return []
    if any(j.step_cfg.host_batches for j in jobs):
        raise ValueError("finetune_group: runs fed with host batches (StepConfig.host_batches) train one by one")
    keys = {j.key() for j in jobs}
    if len(keys) != 1:
        raise ValueError("finetune_group: the runs differ in settings or shapes; group only runs of equal key()")
    j0, n_runs = jobs[0], len(jobs)
    mesh, loop, step_cfg = j0.mesh, j0.loop, j0.step_cfg
    t0 = time.time()
    shared = j0.teacher_variables is None or _same_tree([j.teacher_variables for j in jobs])
    trainer = _make_trainer(mesh, j0.spec, j0.teacher_spec, j0.recipe, step_cfg, _freeze(dict(j0.optim_cfg)),
                            int(loop.steps), True, shared, resolve_group_impl(impl, mesh_platform(mesh)),
                            modes=compile_modes())
    tx, schedule, step_fn, predict, take = trainer.tx, trainer.schedule, trainer.step, trainer.predict, _take(mesh)
    names = [j.name for j in jobs]
    label = f"group of {n_runs}"
    log(f"[{label}] training together ({resolve_group_impl(impl, mesh_platform(mesh))}): {', '.join(names)}"
        + ("" if shared else " (teachers differ: one each)"))

    # per run: restore its own checkpoint (same format as a single run's) or start fresh
    ckpts, trees, stopped, steps, metas, starts = [], [], [], [], [], []
    for j in jobs:
        tree, ck, start, done = _restore_run(j, tx, mesh, log)
        starts.append(start or 0)
        ckpts.append(ck)
        trees.append(jax.device_get(tree))
        stopped.append(done)
        steps.append(int(trees[-1]["state"].step))
        metas.append(j.meta or {})
    state = _stack([t["state"] for t in trees], mesh)
    masks = _stack([t["masks"] for t in trees], mesh)
    es_list = [replicate(t["es"], mesh) for t in trees]
    del trees
    data = _stack([j.data for j in jobs], mesh)
    mult = _stack([mask_multipliers(j.spec, j.variables) for j in jobs], mesh)
    teacher_vars = (replicate(jax.device_get(j0.teacher_variables), mesh) if shared
                    else _stack([j.teacher_variables for j in jobs], mesh))
    writers = [MetricWriter(j.workdir, resume_step=s) for j, s in zip(jobs, starts)]
    results: list[Any] = [None] * n_runs
    imgs_per_step = step_cfg.batch_id + step_cfg.batch_ood
    start_steps = list(steps)
    check_every = max(1, min(loop.log_every, loop.max_nonfinite))

    def active() -> list[bool]:
        return [not stopped[r] and results[r] is None and steps[r] < loop.steps for r in range(n_runs)]

    def run_tree(r: int) -> dict:
        return {"state": take(state, r), "es": es_list[r], "masks": take(masks, r)}

    saved_at = [-1] * n_runs  # the step of each run's newest save (a stop at that step must not save it again)

    def save(r: int, force: bool = False, stopped_flag: bool = False) -> None:
        ckpts[r].save(steps[r], run_tree(r), {**metas[r], "stopped": stopped_flag, "name": names[r]}, force=force)
        saved_at[r] = steps[r]

    clock = CompileClock()
    it, last_t, last_it, run_t0 = 0, time.time(), 0, time.time()
    placed: tuple[tuple[bool, ...], Any] = ((), None)
    while any(act := active()):
        if placed[0] != tuple(act):  # the active mask goes to the devices only when a run starts or stops
            placed = (tuple(act), replicate(np.asarray(act), mesh))
        state, metrics = step_fn(state, data, teacher_vars, masks, mult, placed[1])
        it += 1
        for r in range(n_runs):
            steps[r] += int(act[r])
        if clock is not None:
            jax.block_until_ready(state.step)
            log(f"[{label}] train step {clock.describe()}")
            clock = None
        if it % check_every == 0 or not any(active()):
            nonfinite = np.asarray(jax.device_get(state.nonfinite))
            for r in range(n_runs):
                if act[r] and nonfinite[r] >= loop.max_nonfinite:
                    results[r] = _nonfinite_error(names[r], int(nonfinite[r]), steps[r], ckpts[r], jobs[r].workdir)
                    log(f"[{names[r]}] stopped: {int(nonfinite[r])} non-finite steps in a row (the rest of the group "
                        "goes on)")
        log_now = it % loop.log_every == 0 or not any(active())
        if log_now:
            host = jax.device_get(metrics)
            skipped = np.asarray(jax.device_get(state.skipped))
            now = time.time()
            ips = (it - last_it) * imgs_per_step * sum(act) / max(now - last_t, 1e-9)
            remaining = max((loop.steps - steps[r] for r in range(n_runs) if active()[r]), default=0)
            eta = remaining * (now - run_t0) / max(it, 1)
            losses = []
            for r in range(n_runs):
                if not act[r]:
                    continue
                m = {k: float(v[r]) for k, v in host.items()}
                m["lr"] = float(schedule(steps[r] - 1))
                m["skipped_steps"] = float(skipped[r])
                m["images_per_s"] = ips / max(sum(act), 1)
                writers[r].write(steps[r], "train", m)
                losses.append(m["loss"])
            log(f"[{label}] step {max(steps)}/{loop.steps}: {sum(act)} runs training, loss "
                f"{min(losses):.4f}..{max(losses):.4f}, {ips:,.0f} img/s in all, ETA {_format_eta(eta)}")
            last_t, last_it = now, it
        for r in range(n_runs):
            if not act[r] or results[r] is not None:
                continue
            j = jobs[r]
            if j.heldout is not None and loop.eval_every and steps[r] % loop.eval_every == 0:
                cur = {"params": take(state.params, r), "batch_stats": take(state.batch_stats, r),
                       "masks": take(masks, r)}
                preds = np.argmax(predict(cur, j.heldout[0])["logits"], -1)
                agree = float(np.mean(preds == j.heldout[1]) * 100.0)
                best = float(es_list[r]["best_agreement"])
                es_list[r] = _early_stopping(es_list[r], agree, cur["params"], cur["batch_stats"], steps[r], mesh)
                writers[r].write(steps[r], "eval", {"heldout_agreement": agree, "best_agreement": max(agree, best)})
                log(f"[{names[r]}] step {steps[r]}: held-out OOD agreement with teacher {agree:.2f}% "
                    f"(best {max(agree, best):.2f}% at step {int(es_list[r]['best_step'])})")
                if int(es_list[r]["bad_evals"]) >= loop.patience:
                    stopped[r] = True
                    log(f"[{names[r]}] early stop at step {steps[r]}: no improvement in {loop.patience} evaluations")
            if stopped[r] or steps[r] == loop.steps:
                save(r, force=True, stopped_flag=True)
                stopped[r] = True
            elif steps[r] % loop.ckpt_every == 0 and int(jax.device_get(state.nonfinite[r])) == 0:
                save(r)
        if any(active()) and preemption.should_stop(it):
            for r in range(n_runs):
                if active()[r] and saved_at[r] != steps[r]:  # a regular save at this step is finished by close()
                    save(r, force=True)
            for c in ckpts:
                c.close()
            for w in writers:
                w.close()
            raise preemption.Preempted(f"[{label}] preempted: checkpoints written for {', '.join(names)}; rerun the "
                                       "same command to resume")
    for c in ckpts:
        c.close()
    for w in writers:
        w.close()
    skipped = np.asarray(jax.device_get(state.skipped))
    wall = time.time() - t0
    for r, j in enumerate(jobs):
        if results[r] is not None:
            continue
        results[r] = _result(j, es_list[r], take(state.params, r), take(state.batch_stats, r), take(masks, r),
                             steps[r], wall, int(skipped[r]))
    log(f"[{label}] done in {wall:.0f} s ({sum(s - s0 for s, s0 in zip(steps, start_steps))} run-steps)")
    return results


# ---------------------------------------------------------------------------------------------------- scheduler
class _Pending:
    def __init__(self, job: RunJob, order: int):
        self.job, self.order = job, order
        self.key = job.key()
        self.result: Any = None
        self.ready = False


class GroupScheduler:
    """Runs cell functions in threads and trains their fine-tuning runs in groups of at most ``max_group``."""

    def __init__(self, max_group: int, log: Callable[[str], None] | None = None, impl: str = "auto"):
        if max_group < 1:
            raise ValueError(f"group size must be >= 1, got {max_group}")
        resolve_group_impl(impl, "cpu")  # refuse an unknown implementation now, not in the first group
        self.max_group, self.impl = max_group, impl
        self.log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self._cond = threading.Condition()
        self._waiting: list[_Pending] = []
        self._live = 0
        self._order = 0
        self.groups_run: list[list[str]] = []  # names of each group trained, in order (for tests and logs)

    def submit(self, job: RunJob) -> Any:
        """Called from a cell's thread (by ``finetune``): wait until the run has been trained; its result."""
        with self._cond:
            p = _Pending(job, self._order)
            self._order += 1
            self._waiting.append(p)
            self._cond.notify_all()
            self._cond.wait_for(lambda: p.ready)
        if isinstance(p.result, BaseException):
            raise p.result
        return p.result

    def _pick(self) -> list[_Pending]:
        by_key: dict[tuple, list[_Pending]] = {}
        for p in sorted(self._waiting, key=lambda q: q.order):
            by_key.setdefault(p.key, []).append(p)
        best = max(by_key.values(), key=lambda ps: (len(ps), -ps[0].order))
        limit = self.max_group
        if self.impl == "auto" and mesh_platform(best[0].job.mesh) == "cpu":
            limit = min(limit, CPU_UNROLL_MAX)  # unrolled copies: compile time grows with the group
        return best[:limit]

    def run(self, fns: Sequence[Callable[[], Any]], names: Sequence[str] | None = None) -> list[Any]:
        """Call every ``fns[i]()`` in its own thread, inside the cell ``names[i]``, training their runs in groups in
        this thread; returns each function's return value or the exception it raised (a ``Preempted`` of a group is
        raised here after every thread has ended)."""
        names = list(names or [f"cell{i}" for i in range(len(fns))])
        out: list[Any] = [None] * len(fns)

        def body(i: int) -> None:
            try:
                with cell.entered(cell.Cell(names[i], self.submit)):
                    out[i] = fns[i]()
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                out[i] = e
            finally:
                with self._cond:
                    self._live -= 1
                    self._cond.notify_all()

        threads = [threading.Thread(target=body, args=(i,), name=f"cell:{names[i]}", daemon=True)
                   for i in range(len(fns))]
        with self._cond:
            self._live = len(threads)
        for t in threads:
            t.start()
        preempted: BaseException | None = None
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._live == len(self._waiting))
                if self._live == 0:
                    break
                batch = self._pick()
                for p in batch:
                    self._waiting.remove(p)
            self.groups_run.append([p.job.name for p in batch])
            try:
                if preempted is not None:  # the process is stopping: no new group starts
                    raise preempted
                if (len(batch) == 1 and self.max_group == 1) or batch[0].job.step_cfg.host_batches:
                    results = [finetune_one(p.job, self.log) for p in batch]  # host-fed runs train one by one
                else:
                    results = finetune_group([p.job for p in batch], self.log, self.impl)
            except preemption.Preempted as e:
                preempted = e
                results = [e] * len(batch)
            except Exception as e:  # noqa: BLE001 - every run of the group gets it
                results = [e] * len(batch)
            with self._cond:
                for p, r in zip(batch, results):
                    p.result, p.ready = r, True
                self._cond.notify_all()
        for t in threads:
            t.join()
        if preempted is not None:
            raise preempted
        return out
