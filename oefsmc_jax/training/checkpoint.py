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

    Saves are asynchronous where Orbax allows; ``close()`` makes sure the last one is on disk.
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
    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


@_serial
def save_model(directory: str | os.PathLike, spec: ArchSpec, variables: dict, extra: dict | None = None) -> None:
    """Write a model (variables + its ``ArchSpec`` as JSON beside the arrays) as an Orbax checkpoint.

    A model already in ``directory`` (e.g. left by a run killed between saving its student and writing its result)
    is replaced. In a single process the new model is written beside it and swapped in with
    :func:`oefsmc_jax.paths.replace_dir`, so a crash never leaves a half-written model where a finished one was. A
    command writing a folder the user named checks it first with :func:`oefsmc_jax.paths.check_output_dir`.
    """
    directory = paths.as_path(directory)
    variables = jax.tree.map(np.asarray, jax.device_get(variables))
    meta = {"spec": spec.to_dict(), **(extra or {})}
    if jax.process_count() > 1:  # every process takes part in an Orbax save; no local swap
        ckpt = Checkpointer(directory, max_to_keep=1)
        ckpt.save(0, variables, meta, force=True)
        ckpt.close()
        return

    def write(tmp: paths.Path) -> None:
        ckpt = Checkpointer(tmp, max_to_keep=1)
        ckpt.save(0, variables, meta, force=True)
        ckpt.close()

    paths.replace_dir(directory, write)


#: the JSON files of a model's step folder (Orbax's own and the meta item), checked before Orbax reads them so that
#: a truncated one is named
_MODEL_JSON = ("_CHECKPOINT_METADATA", "meta/metadata", "state/_METADATA")


def check_model_json(directory: paths.Path) -> None:
    """Raise one ``ValueError`` line naming the first JSON file of the model in ``directory`` that does not parse."""
    for step in directory.iterdir():
        if step.name.isdigit() and step.is_dir():
            for rel in _MODEL_JSON:
                if (step / rel).is_file():
                    paths.read_json(step / rel)


def unreadable_model(directory: paths.Path, e: BaseException) -> ValueError:
    """The one-line error for a model folder Orbax cannot restore (a truncated or damaged array file)."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    msg = msg if len(msg) <= 240 else msg[:240] + "..."
    return ValueError(f"model checkpoint {directory} is unreadable (truncated or corrupt?): "
                      f"{type(e).__name__}{': ' + msg if msg else ''}")


@_serial
def _restore_model(directory: paths.Path, with_arrays: bool) -> dict:
    """The newest finished checkpoint of a model folder written by :func:`save_model`: ``{'meta': ...}`` and, with
    ``with_arrays``, ``{'state': ...}``; every failure is one line naming the folder."""
    if not directory.exists():
        raise FileNotFoundError(f"model checkpoint {directory} does not exist")
    if not directory.is_dir():
        raise ValueError(f"model checkpoint {directory} is a file, not a model folder")
    check_model_json(directory)
    ckpt = Checkpointer(directory, max_to_keep=1)
    parts = {"meta": ocp.args.JsonRestore()}
    if with_arrays:
        parts = {"state": ocp.args.StandardRestore(), **parts}
    try:
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"model checkpoint {directory} holds no finished checkpoint")
        return ckpt.manager.restore(step, args=ocp.args.Composite(**parts))
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - Orbax/tensorstore raise many types; all mean "these files are damaged"
        raise unreadable_model(directory, e) from None
    finally:
        ckpt.close()


def load_model_meta(directory: str | os.PathLike) -> dict:
    """The JSON meta of a model written by :func:`save_model` (the arrays are not read); errors as
    :func:`load_model`'s."""
    return dict(_restore_model(paths.as_path(directory), with_arrays=False)["meta"])


def load_model(directory: str | os.PathLike) -> tuple[ArchSpec, dict, dict]:
    """Read a model written by :func:`save_model`; returns ``(spec, variables, meta)`` with host arrays.

    Raises ``FileNotFoundError`` (no such folder, or no finished checkpoint in it) or ``ValueError`` in one line
    naming the file or folder (a JSON file that does not parse, arrays that cannot be read, no architecture spec).
    """
    out = _restore_model(paths.as_path(directory), with_arrays=True)
    meta = dict(out["meta"])
    try:
        spec = ArchSpec.from_dict(meta.pop("spec"))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"model checkpoint {directory} has no valid architecture spec in its meta "
                         f"({type(e).__name__}: {e}); it was not written by save_model") from None
    variables = jax.tree.map(np.asarray, out["state"])
    return spec, variables, meta
