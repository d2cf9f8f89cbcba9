"""The scheduler that lets unchanged run code train its runs in groups.

:class:`GroupScheduler` runs several grid cells in threads, each inside its :class:`oefsmc_jax.cell.Cell`;
when a cell's run reaches :func:`oefsmc_jax.training.loop.finetune` the run is handed to the scheduler and the
cell waits. Once every live cell is waiting, the scheduler (in the calling thread) trains the largest set of waiting
runs that can share a program (at most ``max_group``; :func:`oefsmc_jax.training.loop.finetune_group`), hands back
their results, and repeats. Compression, evaluation and records stay in the cells' threads.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from oefsmc_jax import cell
from oefsmc_jax.training import preemption
from oefsmc_jax.training.loop import finetune_group, finetune_one
from oefsmc_jax.training.step import CPU_UNROLL_MAX, resolve_group_impl
from oefsmc_jax.training.train import RunJob
from oefsmc_jax.training.xla_cpu import mesh_platform


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

    def _train(self, batch: list[_Pending]) -> list[Any]:
        """The results of a batch of runs: one by one when groups are off or the runs are fed from the host."""
        if (len(batch) == 1 and self.max_group == 1) or batch[0].job.step_cfg.host_batches:
            return [finetune_one(p.job, self.log) for p in batch]
        return finetune_group([p.job for p in batch], self.log, self.impl)

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
                results = self._train(batch)
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
