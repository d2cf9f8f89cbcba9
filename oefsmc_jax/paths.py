"""The one path layer for everything a run writes and reads: workdirs, checkpoints, records, reports and caches.

Paths are :class:`etils.epath.Path` (what Orbax and tfds use): a local path behaves as :mod:`pathlib` does, and a
``gs://`` (or ``s3://``) workdir works the same way, so every host of a TPU slice reads and writes one shared run
directory. Object stores have no atomic rename and no append, so the helpers here say what they do on each:

- :func:`write_bytes_atomic` / :func:`write_text_atomic`: write a temporary sibling, then ``replace`` it over the
  target (atomic on a local disk; on an object store the target appears whole once the copy finishes, as an
  object upload does).
- :func:`append_text`: ``open("a")`` locally; read, extend and rewrite the object elsewhere.
- :func:`save_npy` / :func:`load_npy`: numpy arrays through the same layer (memory-mapped only from a local file).

Local paths keep their ``os`` semantics exactly; only the spelling goes through :mod:`etils.epath`. Remote
backends need their filesystem package at run time (``gcsfs`` for ``gs://`` without TensorFlow; see the README).
"""

from __future__ import annotations

import io
import os
import threading

import numpy as np
from etils import epath

Path = epath.Path
PathLike = str | os.PathLike

__all__ = ["Path", "PathLike", "append_text", "as_path", "check_reachable", "is_local", "load_npy", "local_file",
           "rmtree", "save_npy", "tmp_sibling", "write_bytes_atomic", "write_text_atomic"]


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


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all (a temporary sibling replaced over it)."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(path)
    tmp.write_bytes(data)
    tmp.replace(path)


def write_text_atomic(path: PathLike, text: str) -> None:
    """:func:`write_bytes_atomic` for UTF-8 text."""
    write_bytes_atomic(path, text.encode())


def append_text(path: PathLike, text: str) -> None:
    """Append ``text`` to ``path`` (created if missing): an append locally, a whole rewrite on an object store."""
    path = epath.Path(path)
    if is_local(path):
        with open(os.fspath(path), "a") as f:
            f.write(text)
        return
    old = path.read_text() if path.exists() else ""
    write_text_atomic(path, old + text)


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
