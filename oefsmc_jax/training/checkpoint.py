"""Orbax checkpoints: resumable training state, and models saved with their architecture spec beside the arrays."""

from __future__ import annotations

import functools
import os
import sys
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from oefsmc_jax import paths
from oefsmc_jax.models import ArchSpec

#: Orbax's save machinery is not safe to drive from several threads at once (the cells of a grouped grid run in
#: threads): every Orbax call of this module holds this lock, and saves from a cell thread finish before it is freed
_ORBAX = threading.RLock()


def _serial(fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with _ORBAX:
            return fn(*args, **kwargs)

    return wrapped


class Checkpointer:
    """A ``CheckpointManager`` holding a state pytree plus a JSON ``meta`` item per step.

    Saves are asynchronous where Orbax allows; ``close()`` (or ``wait()``) makes sure the last one is on disk.
    """

    @_serial
    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2):
        self.directory = paths.as_path(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        """The newest finished checkpoint's step, or None."""
        return self.manager.latest_step()

    @_serial
    def save(self, step: int, state: Any, meta: dict, force: bool = False) -> None:
        """Save ``state`` (pytree) and ``meta`` (JSON-serialisable dict) at ``step``."""
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=force)
        if threading.current_thread() is not threading.main_thread():
            self.manager.wait_until_finished()

    @_serial
    def restore(self, step: int, target: Any) -> tuple[Any, dict]:
        """Restore the state at ``step`` into the structure, shapes and shardings of ``target``."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                 meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    @_serial
    def restore_latest(self, target: Any, log: Any = None) -> tuple[int | None, tuple[Any, dict] | None]:
        """Restore the newest readable checkpoint into ``target``: ``(step, (state, meta))``, or ``(None, None)``.

        A checkpoint that fails to restore (truncated or corrupted files, a half-written step) is reported in one
        line, moved aside to ``STEP.corrupt`` (kept for inspection, ignored from then on) and the previous one is
        tried.
        """
        log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return step, self.restore(step, target)
            except Exception as e:  # noqa: BLE001 - any failure to read it means this step is unusable
                msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                bad = self.directory / str(step)
                log(f"checkpoint step {step} in {self.directory} is unreadable ({type(e).__name__}: {msg}); "
                    f"moved to {bad.name}.corrupt, trying the previous one")
                if jax.process_index() == 0 and bad.exists():
                    paths.rmtree(bad.with_name(f"{bad.name}.corrupt"))
                    bad.replace(bad.with_name(f"{bad.name}.corrupt"))
                if jax.process_count() > 1:
                    from jax.experimental import multihost_utils

                    multihost_utils.sync_global_devices(f"checkpoint-{step}-set-aside")
                self.manager.reload()
        return None, None

    @_serial
    def wait(self) -> None:
        """Block until pending saves are finished."""
        self.manager.wait_until_finished()

    @_serial
    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


@_serial
def save_model(directory: str | os.PathLike, spec: ArchSpec, variables: dict, extra: dict | None = None) -> None:
    """Write a model (variables + its ``ArchSpec`` as JSON beside the arrays) as an Orbax checkpoint.

    A model already in ``directory`` (e.g. left by a run killed between saving its student and writing its result)
    is replaced. In a single process the new model is written beside it and swapped in with a rename, so a crash
    never leaves a half-written model where a finished one was.
    """
    directory = paths.as_path(directory)
    variables = jax.tree.map(np.asarray, jax.device_get(variables))
    meta = {"spec": spec.to_dict(), **(extra or {})}
    if jax.process_count() > 1:  # every process takes part in an Orbax save; no local swap
        ckpt = Checkpointer(directory, max_to_keep=1)
        ckpt.save(0, variables, meta, force=True)
        ckpt.close()
        return
    tmp = paths.tmp_sibling(directory)
    paths.rmtree(tmp)
    ckpt = Checkpointer(tmp, max_to_keep=1)
    ckpt.save(0, variables, meta, force=True)
    ckpt.close()
    old = paths.tmp_sibling(directory, "old")
    if directory.exists():
        directory.replace(old)
    tmp.replace(directory)
    paths.rmtree(old)


@_serial
def load_model(directory: str | os.PathLike) -> tuple[ArchSpec, dict, dict]:
    """Read a model written by :func:`save_model`; returns ``(spec, variables, meta)`` with host arrays."""
    directory = paths.as_path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"model checkpoint {directory} does not exist")
    ckpt = Checkpointer(directory, max_to_keep=1)
    step = ckpt.latest_step()
    if step is None:
        raise FileNotFoundError(f"model checkpoint {directory} holds no finished checkpoint")
    out = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                             meta=ocp.args.JsonRestore()))
    ckpt.close()
    meta = dict(out["meta"])
    spec = ArchSpec.from_dict(meta.pop("spec"))
    variables = jax.tree.map(np.asarray, out["state"])
    return spec, variables, meta
