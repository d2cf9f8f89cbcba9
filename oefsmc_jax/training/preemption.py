"""Preemption and non-finite numbers: how a run stops early without losing what it finished.

* **SIGTERM** (what a preempted TPU VM or a cluster scheduler sends): :func:`handle_sigterm` turns it into a flag;
  the train loop finishes the step it is in, writes a checkpoint and raises :class:`Preempted`, and the command
  line exits with :data:`EXIT_PREEMPTED` (75, ``EX_TEMPFAIL``: "try again"). Rerunning the same command resumes
  and ends with the same parameters as an uninterrupted run. With several processes the processes agree on the
  step through JAX's preemption sync point (``multihost_utils.reached_preemption_sync_point``), so every host
  saves the same step.
* **Non-finite loss or gradient**: the step skips the update (``training.step``); after ``train.max_nonfinite``
  consecutive skips the loop raises :class:`NonFiniteError` without writing a checkpoint, so the last good one stays
  the newest; the command line exits with :data:`EXIT_NONFINITE` (3).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

EXIT_PREEMPTED = 75
EXIT_NONFINITE = 3

_flag = threading.Event()


class Preempted(Exception):
    """A SIGTERM arrived; the run wrote a checkpoint and stopped (rerun the same command to resume)."""


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient; the last good checkpoint is kept."""


def requested() -> bool:
    """True once a SIGTERM has been received by this process (see :func:`handle_sigterm`)."""
    return _flag.is_set()


def request() -> None:
    """Mark this process as preempted (what the SIGTERM handler does; also for tests)."""
    _flag.set()


def clear() -> None:
    """Forget an earlier request (a new run in the same process starts clean)."""
    _flag.clear()


def should_stop(step: int) -> bool:
    """Whether every process should stop after ``step``: the local flag on one process, JAX's preemption sync
    point (all processes agree on the step) on several."""
    import jax

    if jax.process_count() == 1:
        return requested()
    from jax.experimental import multihost_utils

    try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
    except RuntimeError:  # the distributed runtime has no preemption service: fall back to an all-reduce of flags
        import numpy as np

        flags = multihost_utils.process_allgather(np.asarray([requested()], np.int32))
        return bool(np.any(flags))


@contextlib.contextmanager
def handle_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM sets the preemption flag (first one logged) instead of killing the process.

    Outside the main thread (where Python cannot install handlers), and with several processes (where JAX's own
    preemption notifier handles SIGTERM and :func:`should_stop` asks it), this does nothing.
    """
    import jax

    if threading.current_thread() is not threading.main_thread() or jax.process_count() > 1:
        yield
        return

    def on_term(signum, frame):  # noqa: ARG001
        if not _flag.is_set():
            print("preemption: SIGTERM received; finishing the step and writing a checkpoint", file=sys.stderr,
                  flush=True)
        _flag.set()

    _flag.clear()
    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
