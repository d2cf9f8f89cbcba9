"""Preemption, interruption and non-finite numbers: how a run stops early without losing what it finished.

* **SIGTERM** (what a preempted TPU VM or a cluster scheduler sends) and **SIGINT** (Ctrl-C): :func:`handle_signals`
  turns either into a flag; the train loop finishes the step it is in, writes a checkpoint (waiting for Orbax's
  asynchronous finalisation) and raises :class:`Preempted`; a compression stage or the teacher's pool pass stops
  at the next unit boundary (a layer, a block, a chunk of images; :func:`check`), writing nothing half-done. The
  command line exits with :data:`EXIT_PREEMPTED` (75, ``EX_TEMPFAIL``: "try again") after a SIGTERM and with
  :data:`EXIT_INTERRUPTED` (130, the shell's code for SIGINT) after a SIGINT; :func:`exit_code` gives the one that
  applies (the first signal decides). Rerunning the same command resumes and ends with the same parameters as an
  uninterrupted run. A second signal while stopping is reported in one line and changes neither the exit code nor
  the checkpoint being written: once a signal has arrived the handlers stay installed until the process exits (its
  last moments ignore both signals), so no second signal can kill it half-way. With several processes the
  processes agree on the step through JAX's preemption sync point (``multihost_utils.reached_preemption_sync_point``),
  so every host saves the same step; there JAX's own notifier owns SIGTERM and :func:`check` never fires.
* **Non-finite loss or gradient**: the step skips the update (``training.step``); after ``train.max_nonfinite``
  consecutive skips the loop raises :class:`NonFiniteError` without writing a checkpoint, so the last good one stays
  the newest; the command line exits with :data:`EXIT_NONFINITE` (3).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import threading
from collections.abc import Iterator

EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130
EXIT_NONFINITE = 3

_flag = threading.Event()
_received: list[int] = []  # the stop signals the handler has received, in order
_stage = threading.local()  # per thread: (label, what, hint) that check() reports; see stage()


class Preempted(Exception):
    """A SIGTERM or SIGINT arrived; the run wrote a checkpoint (or left a stage unfinished) and stopped: rerun the
    same command to resume."""


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient; the last good checkpoint is kept."""


def requested() -> bool:
    """True once a stop signal has been received by this process (see :func:`handle_signals`) or requested."""
    return _flag.is_set()


def request() -> None:
    """Mark this process as preempted (what the signal handler does; also for tests)."""
    _flag.set()


def clear() -> None:
    """Forget an earlier request (a new run in the same process starts clean)."""
    _flag.clear()


def exit_code() -> int:
    """The command line's exit code for a :class:`Preempted` run: 130 when the first signal was SIGINT, else 75."""
    return EXIT_INTERRUPTED if _received and _received[0] == signal.SIGINT else EXIT_PREEMPTED


@contextlib.contextmanager
def stage(label: str, what: str, hint: str) -> Iterator[None]:
    """Within the block (in this thread), :func:`check` raises ``Preempted("{label} preempted during {what}
    ({where}); {hint}")``, e.g. ``stage("[oe]", "compression", "rerun the same command to restart this arm's
    compression")``."""
    previous = getattr(_stage, "value", None)
    _stage.value = (label, what, hint)
    try:
        yield
    finally:
        _stage.value = previous


def check(where: str) -> None:
    """Raise :class:`Preempted` if a stop was requested; called between units of work (``where`` says how far the
    work got, e.g. ``"cd, 6 of 19 layers done"``) by loops that run long without a train step. Outside a
    :func:`stage` the message is ``"preempted during {where}; rerun the same command to resume"``."""
    if not _flag.is_set():
        return
    value = getattr(_stage, "value", None)
    if value is None:
        raise Preempted(f"preempted during {where}; rerun the same command to resume")
    label, what, hint = value
    raise Preempted(f"{label} preempted during {what} ({where}); {hint}")


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


def _ignore_signals() -> None:
    """The process's last moments (interpreter teardown, after every checkpoint is written): Python resets its own
    handlers there, so both signals are ignored instead, and a late one cannot change the exit code."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(ValueError, OSError):
            signal.signal(sig, signal.SIG_IGN)


def _on_signal(signum: int, frame: object, _write=os.write) -> None:  # noqa: ARG001
    # os.write, not print: a handler runs between two bytecodes of the main thread, possibly inside its own write
    # to sys.stderr, where a buffered write would fail as reentrant
    try:
        name = signal.Signals(signum).name
        if not _received:
            atexit.register(_ignore_signals)  # runs first among the exit callbacks: after every Python-level wait
            msg = f"preemption: {name} received; stopping after the current step or unit of work\n"
        else:
            msg = f"preemption: {name} received; already stopping; finishing the checkpoint\n"
        _received.append(signum)
        _flag.set()
        _write(2, msg.encode())
    except BaseException:  # noqa: BLE001, S110 - a handler must never raise into the code it interrupted
        _flag.set()


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT set the preemption flag (one line each) instead of killing the process.

    Left normally, the previous handlers come back; left by an exception after a signal arrived (the process is
    stopping), the handlers stay, so a second signal during the last writes and the exit is only reported. Outside
    the main thread (where Python cannot install handlers), and with several processes (where JAX's own preemption
    notifier handles SIGTERM and :func:`should_stop` asks it), this does nothing.
    """
    import jax

    if threading.current_thread() is not threading.main_thread() or jax.process_count() > 1:
        yield
        return
    _flag.clear()
    _received.clear()
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    stopping = False
    try:
        yield
    except BaseException:
        stopping = bool(_received)
        raise
    finally:
        if not stopping:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


handle_sigterm = handle_signals  # the older name
