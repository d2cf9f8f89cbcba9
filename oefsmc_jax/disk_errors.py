"""A full or read-only disk, whichever writer meets it, as one ``OSError`` line and no traceback from any thread.

Python writes raise ``OSError(ENOSPC | EROFS | ...)``; Orbax's tensorstore writes raise ``ValueError`` /
``RuntimeError`` (``XlaRuntimeError``) whose text says ``RESOURCE_EXHAUSTED`` or ``No space left on device``; and
Orbax's asynchronous checkpoint threads log the failure with its traceback (absl, at ERROR) before the main thread
sees it. :func:`as_os_error` maps all of these to one ``OSError``; :func:`quiet_background` keeps the background
threads' tracebacks of such errors off stderr (recording the first one, whose path the main line can name), and
:func:`ending` silences every background report once the process is ending with that one line.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["as_os_error", "ending", "line", "quiet_background"]

#: errno values that mean "the disk cannot take this write"
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG})
_TEXT = [  # (pattern in an error's text, errno it stands for)
    (re.compile(r"Read-only file system|\bEROFS\b|\[Errno 30\]|errno[ =:]*30\b", re.I), errno.EROFS),
    (re.compile(r"Disk quota exceeded|\bEDQUOT\b", re.I), errno.EDQUOT),
    (re.compile(r"No space left on device|\bENOSPC\b|\[Errno 28\]|errno[ =:]*28\b", re.I), errno.ENOSPC),
    # tensorstore's status for a failed write; XLA uses the same code for device memory, which is no disk error
    (re.compile(r"RESOURCE_EXHAUSTED(?!.*(memory|allocat))(?=.*(file|writ))", re.I | re.S), errno.ENOSPC),
]
_PATH = re.compile(r"""["'](/[^"'\n]+|[a-z][a-z0-9+.-]*://[^"'\n]+)["']|directory: (\S+)""")

_state: dict[str, Any] = {"first": None, "ending": False}


def _chain(e: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while e is not None and id(e) not in seen and len(seen) < 16:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _path_in(text: str) -> str | None:
    m = _PATH.search(text)
    return (m.group(1) or m.group(2)) if m else None


def as_os_error(e: BaseException) -> OSError | None:
    """``e`` (or an error it was raised from) as an ``OSError`` with a disk errno and, where one is known, a file
    name; ``None`` when it is not a disk error. An ``OSError`` with such an errno is returned as is."""
    for err in _chain(e):
        if isinstance(err, OSError) and err.errno in DISK_ERRNOS:
            return err
    for err in _chain(e):
        if isinstance(err, OSError) and err.errno is not None:
            continue  # another errno: not a disk error, whatever its text says
        text = str(err)
        for pattern, code in _TEXT:
            if pattern.search(text):
                return OSError(code, os.strerror(code), _path_in(text))
    return None


def line(e: BaseException) -> str:
    """The one-line description of the disk error ``e`` (any ``OSError``, or a wrapped one: see
    :func:`as_os_error`), with the path it hit: its own file name, else the path a background thread's report named,
    else the workdir of the run it escaped from (``oefsmc_workdir``, see :func:`oefsmc_jax.workdir_lock.scope`)."""
    os_err = as_os_error(e) or (e if isinstance(e, OSError) else OSError(str(e)))
    if os_err.filename:
        return str(os_err)
    first = _state["first"]
    where = first[1] if first is not None and first[1] else getattr(e, "oefsmc_workdir", None)
    text = f"[Errno {os_err.errno}] {os_err.strerror}" if os_err.errno and os_err.strerror else str(os_err)
    text = text or type(os_err).__name__
    return f"{text} (writing under {where})" if where else text


def _record(exc: BaseException | None, text: str = "") -> None:
    """Keep the first background disk error, and the first path any report of one names."""
    if exc is None:
        return
    err = as_os_error(exc)
    path = (err.filename if err is not None and err.filename else None) or _path_in(text)
    first = _state["first"]
    if first is None or (first[1] is None and path):
        _state["first"] = (first[0] if first is not None else exc, path)


def _abandoned(exc: BaseException | None) -> bool:
    """A native (tensorstore) completion that arrived after the asyncio loop awaiting it was closed: what every
    write still in flight reports once a failed save gave up on them; it carries no error of its own."""
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def _is_disk(exc: BaseException | None, text: str = "") -> bool:
    if exc is not None and as_os_error(exc) is not None:
        return True
    return exc is None and any(p.search(text) for p, _ in _TEXT)


class _Filter(logging.Filter):
    """Drops log records of disk errors (Orbax's background save failures), and every record once ending."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _state["ending"]:
            return False
        if record.levelno < logging.WARNING:
            return True
        exc = record.exc_info[1] if record.exc_info else None
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is not ours to judge
            return True
        if _is_disk(exc, text):
            _record(exc or OSError(text), text)
            return False
        return True


@contextlib.contextmanager
def quiet_background() -> Iterator[None]:
    """While inside: a background thread's uncaught disk error, an atexit/unraisable one, and a logged one (with
    its traceback) print nothing; the first is kept for :func:`line`. So do tensorstore's completions of abandoned
    writes ("Event loop is closed"). Other errors print as before. When a disk
    error leaves the block the hooks stay installed (the caller reports it, calls :func:`ending` and exits); usable
    as a decorator."""
    _state["first"], _state["ending"] = None, False
    old_thread, old_unraisable = threading.excepthook, sys.unraisablehook

    def thread_hook(args: Any) -> None:
        if _state["ending"] or _is_disk(args.exc_value):
            _record(args.exc_value)
            return
        old_thread(args)

    def unraisable_hook(u: Any) -> None:
        if _abandoned(u.exc_value):
            return
        if _state["ending"] or _is_disk(u.exc_value):
            _record(u.exc_value)
            return
        old_unraisable(u)

    flt = _Filter()
    targets = [logging.getLogger("absl"), logging.getLogger(), *logging.getLogger().handlers]
    threading.excepthook, sys.unraisablehook = thread_hook, unraisable_hook
    for t in targets:
        t.addFilter(flt)
    try:
        yield
    except BaseException as e:
        if as_os_error(e) is None and not isinstance(e, OSError):
            _restore(old_thread, old_unraisable, flt, targets)
        raise  # a disk error: the process reports it and ends, so pending saves stay quiet until then
    _restore(old_thread, old_unraisable, flt, targets)


def _restore(old_thread: Any, old_unraisable: Any, flt: logging.Filter, targets: list) -> None:
    threading.excepthook, sys.unraisablehook = old_thread, old_unraisable
    for t in targets:
        t.removeFilter(flt)


def ending() -> None:
    """The process is ending with a one-line error: from now on background threads, atexit callbacks and log
    records print nothing (Orbax's pending saves fail the same way as the one that was reported), nor do errors
    printed through ``sys.excepthook``."""
    _state["ending"] = True
    sys.excepthook = lambda *args: None
