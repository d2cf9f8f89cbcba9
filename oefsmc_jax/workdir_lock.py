"""One process per workdir: an exclusive lock file ``WORKDIR/.lock`` taken before anything else is written there.

A scheduler that requeues a job while the old one still runs would otherwise start a second writer on the same
checkpoints, results and ``metrics.jsonl``. The second run is refused in one line that names the holder
(:class:`WorkdirBusy`; the command line exits with 73, ``EX_CANTCREAT``: :data:`oefsmc_jax.cli_util.EXIT_LOCKED`).

- **Local (and mounted) workdirs**: :func:`fcntl.flock` on ``.lock``. The kernel drops the lock when its process
  dies (crash, ``kill -9``, a lost node's NFS lease), so a lock file left by a dead process is taken over without
  asking. The holder's PID, host and start time are written inside for the refusal's message; the file is removed
  when the lock is released.
- **Object stores** (``gs://``): there is no ``flock``. The holder file is written and removed the same way, but the
  lock is **advisory**: a file left by another holder is reported in one line and then overwritten, since a live
  run cannot be told from a dead one there.
- **Several processes** (``jax.process_count() > 1``): only process 0 takes the lock (the others write nothing
  that it does not coordinate).

Use: decorate the function that owns the workdir with :func:`scope` and call :func:`take` where it would create the
workdir. Locks taken inside a scoped call are released when it returns or raises. Scopes are per thread, so the cells
of a grouped grid (one thread each, one sub-workdir each) hold their own locks beside the grid's; :func:`take`
never blocks, so nothing can deadlock on a lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import functools
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from oefsmc_jax import paths

__all__ = ["LOCK_NAME", "WorkdirBusy", "scope", "take"]

LOCK_NAME = ".lock"

F = TypeVar("F", bound=Callable[..., Any])


class WorkdirBusy(Exception):
    """Another live process holds the workdir's lock (the message names it)."""


@dataclasses.dataclass
class _Held:
    workdir: paths.Path
    lock: paths.Path
    fd: int | None  # the flock'ed descriptor (local); None on an object store
    text: str  # what this process wrote into the lock file


_frames = threading.local()  # per thread: a stack of lists of locks, one list per active scope


def _stack() -> list[list[_Held]]:
    if not hasattr(_frames, "stack"):
        _frames.stack = []
    return _frames.stack


def _holder_text() -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": " ".join(sys.argv)[:300]}) + "\n"


def describe_holder(text: str) -> str:
    """``PID 1234 on HOST since TIME`` from a lock file's contents (or a neutral phrase when it is unreadable)."""
    try:
        h = json.loads(text)
        return f"PID {h['pid']} on {h['host']} since {h['since']}"
    except (ValueError, KeyError, TypeError):
        return "another process (its lock file names no holder)"


def _busy(workdir: paths.Path, text: str) -> WorkdirBusy:
    return WorkdirBusy(f"workdir {workdir} is in use by {describe_holder(text)}; wait for it or stop it (a lock "
                       "left by a dead process is taken over)")


def _read_fd(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode(errors="replace")


def _note(msg: str) -> None:
    print(f"workdir: {msg}", file=sys.stderr, flush=True)


def _take_local(workdir: paths.Path, lock: paths.Path) -> _Held:
    name = os.fspath(lock)
    while True:
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = _read_fd(fd)
            os.close(fd)
            raise _busy(workdir, text) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise
            _note(f"{workdir}'s filesystem has no file locks ({e.strerror}); the lock file is advisory only")
            break
        # the previous holder removes the file on release: a descriptor opened just before that is locked on a
        # name that no longer exists, so check that the locked file is still the one at that name
        try:
            same = os.stat(name).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        old = _read_fd(fd)
        if old.strip():
            _note(f"took over the lock of {describe_holder(old)}, which no longer holds it ({lock})")
        text = _holder_text()
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode(), 0)
        os.fsync(fd)
    except OSError as e:
        os.close(fd)
        raise OSError(e.errno, e.strerror, name) from None
    return _Held(workdir, lock, fd, text)


def _take_remote(workdir: paths.Path, lock: paths.Path) -> _Held:
    if lock.exists():
        with contextlib.suppress(OSError):
            _note(f"{lock} names {describe_holder(lock.read_text())}: on an object store the lock is advisory (no "
                  "flock); make sure that run has stopped. Taking it over")
    text = _holder_text()
    paths.write_text_atomic(lock, text)
    return _Held(workdir, lock, None, text)


def _release(held: _Held) -> None:
    with contextlib.suppress(OSError):
        if held.fd is None:
            if held.lock.exists() and held.lock.read_text() == held.text:
                held.lock.unlink()
            return
        try:
            os.unlink(os.fspath(held.lock))  # while still locked: a waiting open then sees a new file (see above)
        finally:
            os.close(held.fd)


def take(workdir: paths.PathLike) -> paths.Path:
    """Create ``workdir`` (with its parents) and lock it for the innermost :func:`scope` of this thread; returns
    the workdir as a path. Raises :class:`WorkdirBusy` at once when another live process (or another scope of this
    one) holds it, and ``OSError`` naming the lock file when it cannot be written (a read-only or full disk).
    Outside any scope the lock is held until the process exits."""
    import jax

    workdir = paths.as_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() != 0:
        return workdir
    lock = workdir / LOCK_NAME
    held = _take_local(workdir, lock) if paths.is_local(workdir) else _take_remote(workdir, lock)
    stack = _stack()
    if stack:
        stack[-1].append(held)
    else:
        import atexit

        atexit.register(_release, held)
    return workdir


def scope(fn: F) -> F:
    """Decorator: the workdir locks that ``fn`` takes (:func:`take`) are released when it returns or raises. An
    error escaping ``fn`` while it held a lock gets that workdir as ``error.oefsmc_workdir`` (unless an inner
    scope set it), so a one-line report can name where a write failed when the error itself names no file."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        stack = _stack()
        stack.append([])
        try:
            return fn(*args, **kwargs)
        except BaseException as e:
            if stack[-1] and getattr(e, "oefsmc_workdir", None) is None:
                with contextlib.suppress(AttributeError, TypeError):
                    e.oefsmc_workdir = os.fspath(stack[-1][0].workdir)
            raise
        finally:
            for held in reversed(stack.pop()):
                _release(held)

    return wrapped  # type: ignore[return-value]
