"""The one path layer for everything a run writes and reads: workdirs, checkpoints, records, reports and caches.

Paths are :class:`etils.epath.Path` (what Orbax and tfds use): a local path behaves as :mod:`pathlib` does, and a
``gs://`` (or ``s3://``) workdir works the same way, so every host of a TPU slice reads and writes one shared run
directory. Object stores have no atomic rename and no append, so the helpers here say what they do on each:

- :func:`write_bytes_atomic` / :func:`write_text_atomic`: write a temporary sibling, then ``replace`` it over the
  target (atomic on a local disk, with ``fsync`` of the file before and of the folder after; on an object store
  the target appears whole once the copy finishes, as an object upload does).
- :func:`append_text`: whole lines, appended and ``fsync``'ed locally; read, extend and rewrite the object elsewhere.
- :func:`save_npy` / :func:`load_npy`: numpy arrays through the same layer (memory-mapped only from a local file).
- :func:`check_output_dir` / :func:`replace_dir`: the rule for a command that writes a folder (an existing, non-empty
  one only with ``--overwrite``; never one that is, holds or lies inside what it reads), and the write-beside-then-swap
  that replaces it.

Local paths keep their ``os`` semantics exactly; only the spelling goes through :mod:`etils.epath`. Remote
backends need their filesystem package at run time (``gcsfs`` for ``gs://`` without TensorFlow; see the README).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from etils import epath

Path = epath.Path
PathLike = str | os.PathLike

__all__ = ["Path", "PathLike", "append_text", "as_path", "check_output_dir", "check_reachable", "is_local", "load_npy",
           "local_file", "os_error_line", "read_json", "replace_dir", "rmtree", "save_npy", "tmp_sibling",
           "write_bytes_atomic", "write_text_atomic"]


def as_path(path: PathLike) -> epath.Path:
    """``path`` as an :class:`etils.epath.Path`; a local path is made absolute, a URI (``gs://...``) kept as is."""
    p = epath.Path(path)
    return p if not is_local(p) else epath.Path(os.path.abspath(os.fspath(p)))


def is_local(path: PathLike) -> bool:
    """Whether ``path`` is on a local (or mounted) filesystem, i.e. not a ``scheme://`` URI."""
    return "://" not in os.fspath(path)


def check_reachable(path: PathLike, what: str) -> None:
    """Fail early, in one line, when ``path`` is a URI whose filesystem this machine cannot reach (no backend
    package, no credentials, no network); local paths always pass."""
    if is_local(path):
        return
    try:
        epath.Path(path).exists()
    except Exception as e:  # noqa: BLE001 - the backends raise many types; all mean "cannot use this path"
        msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise ValueError(f"{what} {os.fspath(path)}: cannot reach it ({type(e).__name__}{': ' + msg if msg else ''}); "
                         "gs:// paths need the gcsfs package (pip install gcsfs) or TensorFlow, and credentials "
                         "(gcloud auth application-default login, or the VM's service account)") from None


def tmp_sibling(path: epath.Path, tag: str = "tmp") -> epath.Path:
    """A temporary name next to ``path``, unique per process, host and thread."""
    import jax

    return path.with_name(f"{path.name}.{tag}{jax.process_index()}-{os.getpid()}-{threading.get_ident()}")


def _fsync(name: str, directory: bool = False) -> None:
    """Flush a local file (or a folder's entries) to the disk."""
    fd = os.open(name, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if not (directory and e.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF)):  # some filesystems refuse
            raise
    finally:
        os.close(fd)


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all: a temporary sibling is written, flushed to the disk
    (``fsync``) and renamed over ``path``; locally the folder is flushed too, so neither a crash nor a power cut
    leaves an empty or torn file under the name. A failed write (a full disk) removes its temporary file."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(path)
    try:
        tmp.write_bytes(data)
        if not is_local(path):
            tmp.replace(path)
            return
        _fsync(os.fspath(tmp))
        os.replace(os.fspath(tmp), os.fspath(path))
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    _fsync(os.fspath(path.parent), directory=True)


def write_text_atomic(path: PathLike, text: str) -> None:
    """:func:`write_bytes_atomic` for UTF-8 text."""
    write_bytes_atomic(path, text.encode())


def append_text(path: PathLike, text: str) -> None:
    """Append ``text`` as whole lines to ``path`` (created if missing): a newline is added at its end if it lacks
    one, and before it if the file's last line was torn (left without its newline), so the torn bytes keep a line of
    their own. Locally an append, flushed to the disk (``fsync``) before returning; on an object store a rewrite."""
    path = epath.Path(path)
    data = text.encode()
    if data and not data.endswith(b"\n"):
        data += b"\n"
    if not is_local(path):
        old = path.read_bytes() if path.exists() else b""
        write_bytes_atomic(path, old + (b"\n" if old and not old.endswith(b"\n") else b"") + data)
        return
    fd = os.open(os.fspath(path), os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError as e:
        raise OSError(e.errno, e.strerror, os.fspath(path)) from None
    finally:
        os.close(fd)


def save_npy(path: PathLike, array: np.ndarray) -> None:
    """``np.save`` through the path layer, atomically."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    write_bytes_atomic(path, buf.getvalue())


def load_npy(path: PathLike, mmap: bool = False) -> np.ndarray:
    """``np.load`` of an ``.npy`` through the path layer; memory-mapped when ``mmap`` and the file is local."""
    path = epath.Path(path)
    if mmap and is_local(path):
        return np.load(os.fspath(path), mmap_mode="r", allow_pickle=False)
    with path.open("rb") as f:
        return np.load(io.BytesIO(f.read()), allow_pickle=False)


def local_file(path: PathLike) -> str:
    """A local filename for reading ``path``: itself when local, else a copy in the temporary directory."""
    path = epath.Path(path)
    if is_local(path):
        return os.fspath(path)
    import tempfile

    fd, tmp = tempfile.mkstemp(suffix=path.suffix)
    os.close(fd)
    path.copy(epath.Path(tmp), overwrite=True)
    return tmp


def rmtree(path: PathLike) -> None:
    """Remove the directory tree at ``path`` if it exists."""
    path = epath.Path(path)
    if path.exists():
        path.rmtree()


# ---------------------------------------------------------------------- folders a command writes
def read_json(path: PathLike) -> Any:
    """The JSON value in ``path``; a file that does not parse raises one ``ValueError`` line naming it."""
    path = epath.Path(path)
    try:
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" ({e.msg}: line {e.lineno} column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise ValueError(f"{os.fspath(path)} is not valid JSON (truncated or corrupt?){where}") from None


def _real(path: PathLike) -> str:
    """A comparable spelling of ``path``: symlinks resolved locally, no trailing slash."""
    s = os.path.realpath(os.fspath(path)) if is_local(path) else os.fspath(path)
    return s.rstrip("/") or "/"


def _inside(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def check_output_dir(out: PathLike, *, overwrite: bool = False,
                     protected: Iterable[PathLike | tuple[PathLike, str]] = (), what: str = "--out") -> epath.Path:
    """Check that a command may write the folder ``out`` (then written with :func:`replace_dir`); returns it.

    Refused in one line, always: ``out`` equal to, inside or containing a ``protected`` path (given as a path or
    ``(path, label)``, e.g. the run directory that is read), since replacing it would delete that; ``out`` or one
    of its parents being a plain file (``ValueError``). Refused unless ``overwrite``: ``out`` existing and not empty
    (``FileExistsError``). ``what`` names ``out`` in the messages (the flag or argument the user typed).
    """
    out = as_path(out)
    real = _real(out)
    for item in protected:
        p, label = item if isinstance(item, tuple) else (item, "a folder this command reads")
        pr = _real(p)
        if real == pr:
            raise ValueError(f"{what} {out} is {label} itself; writing there would delete it: choose a folder "
                             "outside it")
        if _inside(real, pr):
            raise ValueError(f"{what} {out} lies inside {label} {p}; choose a folder outside it")
        if _inside(pr, real):
            raise ValueError(f"{what} {out} contains {label} {p}; replacing it would delete that: choose a folder "
                             "outside it")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{what} {out} is a file, not a folder; choose another path")
    if is_local(out):
        parent = os.path.dirname(real)
        while not os.path.lexists(parent):  # the nearest existing ancestor ("/" always exists)
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise ValueError(f"{what} {out}: {parent} is a file, not a folder; choose another path")
    if out.is_dir() and not overwrite:
        held = sorted(p.name for p in out.iterdir())
        if held:
            shown = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
            raise FileExistsError(f"{what} {out} already exists and is not empty (it holds: {shown}); choose "
                                  "another folder, or pass --overwrite (overwrite=True) to replace it")
    return out


def replace_dir(path: PathLike, write: Callable[[epath.Path], None]) -> None:
    """Write the folder ``path`` whole or not at all: ``write(tmp)`` fills a temporary sibling, then the old folder
    (if any) is renamed aside, the new one renamed in, and only then the old one removed. A failure in ``write``
    removes the temporary folder and leaves ``path`` as it was; a crash between the two renames leaves both folders
    on disk under their temporary names, never neither. Check ``path`` with :func:`check_output_dir` first."""
    path = epath.Path(path)
    tmp = tmp_sibling(path)
    rmtree(tmp)
    try:
        write(tmp)
    except BaseException:
        with contextlib.suppress(OSError):
            rmtree(tmp)
        raise
    old = tmp_sibling(path, "old")
    had_old = path.exists() or (is_local(path) and os.path.islink(os.fspath(path)))
    if had_old:
        path.replace(old)
    try:
        tmp.replace(path)
    except BaseException:
        if had_old:
            old.replace(path)
        with contextlib.suppress(OSError):
            rmtree(tmp)
        raise
    if had_old:
        if is_local(old) and os.path.islink(os.fspath(old)):
            os.unlink(os.fspath(old))  # a link OUT is replaced; the folder it pointed to is not ours to delete
        else:
            rmtree(old)


def os_error_line(e: OSError, path: PathLike) -> str:
    """One line for an ``OSError`` met while writing ``path``: the error (with its file name, when it has one)."""
    text = f"{e.strerror}: {e.filename}" if e.strerror and e.filename else (str(e) or type(e).__name__)
    return text if e.filename else f"{text} (writing {os.fspath(path)})"
