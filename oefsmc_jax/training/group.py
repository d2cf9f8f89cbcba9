"""Many fine-tuning runs in one compiled program: :class:`GroupProgram`, their arrays on a leading run axis.

A group holds ``R`` runs whose static settings and array shapes agree (equal
:meth:`oefsmc_jax.training.train.RunJob.key`: the same student spec, recipe, step config, optimizer, loop and teacher
architecture; e.g. the seeds of one grid cell, or two OE arms) and trains them with the grouped step of
:func:`oefsmc_jax.training.step.make_train_step` (the one-run step mapped over a leading run axis inside the same
``shard_map``). Each run keeps everything a single run has: its own parameters, optimizer and BatchNorm state, data,
keys and non-finite counter here, and its bookkeeping (early stopping, checkpoints in the single-run format, metrics
files, result) in :class:`oefsmc_jax.training.run_state.RunState`, as when it trains alone. A stopped run is masked
out of the update while the others continue.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from oefsmc_jax.models import mask_multipliers
from oefsmc_jax.training.parallel import replicate, replicated
from oefsmc_jax.training.train import RunJob


@functools.lru_cache(maxsize=8)
def _take(mesh: Mesh) -> Callable:
    """Run ``r`` of a stacked tree, replicated on the mesh (jitted once per mesh)."""
    return jax.jit(lambda tree, r: jax.tree.map(lambda a: a[r], tree), out_shardings=replicated(mesh))


def same_tree(trees: Sequence[Any]) -> bool:
    """Whether every tree of ``trees`` has the same leaves as the first (e.g. one teacher shared by every run)."""
    first = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(trees[0]))]
    for t in trees[1:]:
        other = jax.tree.leaves(jax.device_get(t))
        if len(other) != len(first) or not all(np.array_equal(a, b) for a, b in zip(first, other)):
            return False
    return True


def _stack(trees: Sequence[Any], mesh: Mesh) -> Any:
    host = [jax.device_get(t) for t in trees]
    return replicate(jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *host), mesh)


class GroupProgram:
    """The arrays of ``R`` runs stacked on a leading run axis on the devices, and the grouped step that advances
    them (what :func:`oefsmc_jax.training.loop.train_runs` steps for a group).

    ``trees``: per run, its restored ``{'state', 'masks'}``; ``shared_teacher``: every run has the same teacher
    variables (placed once), else one teacher per run.
    """

    grouped = True

    def __init__(self, label: str, step: Callable, jobs: Sequence[RunJob], trees: Sequence[dict],
                 shared_teacher: bool):
        mesh = jobs[0].mesh
        self.label, self._step, self._take, self._mesh = label, step, _take(mesh), mesh
        self.state = _stack([t["state"] for t in trees], mesh)
        self.masks = _stack([t["masks"] for t in trees], mesh)
        self.data = _stack([j.data for j in jobs], mesh)
        self.mult = _stack([mask_multipliers(j.spec, j.variables) for j in jobs], mesh)
        self.teacher = (replicate(jax.device_get(jobs[0].teacher_variables), mesh) if shared_teacher
                        else _stack([j.teacher_variables for j in jobs], mesh))
        self._placed: tuple[tuple[bool, ...], Any] = ((), None)

    def advance(self, active: list[bool], steps: list[int]) -> Any:
        """One step of every run where ``active`` (the others keep their state); returns the step's metrics."""
        del steps  # every run's data is on the devices
        if self._placed[0] != tuple(active):  # the mask goes to the devices only when a run starts or stops
            self._placed = (tuple(active), replicate(np.asarray(active), self._mesh))
        self.state, metrics = self._step(self.state, self.data, self.teacher, self.masks, self.mult, self._placed[1])
        return metrics

    def wait(self) -> None:
        """Block until the last step has run."""
        jax.block_until_ready(self.state.step)

    def run_metrics(self, host: dict, r: int) -> dict[str, float]:
        """Run ``r``'s values of the step metrics ``host`` (fetched from the devices)."""
        return {k: float(v[r]) for k, v in host.items()}

    def nonfinite(self) -> np.ndarray:
        """Per run, its current streak of non-finite steps."""
        return np.asarray(jax.device_get(self.state.nonfinite))

    def skipped(self) -> np.ndarray:
        """Per run, how many of its steps were skipped for a non-finite loss or gradient."""
        return np.asarray(jax.device_get(self.state.skipped))

    def variables(self, r: int) -> dict:
        """Run ``r``'s current student variables."""
        return {"params": self._take(self.state.params, r), "batch_stats": self._take(self.state.batch_stats, r),
                "masks": self._take(self.masks, r)}

    def run_tree(self, r: int) -> dict:
        """Run ``r``'s train state and masks, as its checkpoint holds them."""
        return {"state": self._take(self.state, r), "masks": self._take(self.masks, r)}

    def close(self) -> None:
        """Nothing to release: the runs' arrays go with the program."""
