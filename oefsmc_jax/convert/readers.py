"""Read a teacher's PyTorch ``state_dict`` from disk as a dict of numpy arrays, whatever the file format.

Three formats hold the same arrays under the same keys (PyTorch layouts: conv weights OIHW, linear ``[out, in]``):

- ``.npz`` (numpy only): one array per key, e.g. ``np.savez(path, **state_dict)``.
- ``.safetensors`` (numpy only, parsed here without the ``safetensors`` package): an 8-byte little-endian header
  length ``N``, ``N`` bytes of JSON ``{key: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, ...,
  "__metadata__": {...}}``, then the raw little-endian buffers (offsets relative to the end of the header).
- ``.th`` / ``.pth`` / ``.pt`` (needs ``torch``, the optional extra ``oefsmc_jax[torch]``): a torch pickle of a bare
  state dict or of ``{'state_dict': ...}``; a ``module.`` prefix (``DataParallel``) is removed.

Every reader raises one one-line :class:`ValueError` naming the file for a truncated, corrupt or foreign file, and
:class:`FileNotFoundError` for a missing one. This module imports no converter, so every family's converter can
use it without an import cycle.
"""

from __future__ import annotations

import json
import os
import pathlib
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "SAFETENSORS_DTYPES",
    "STATE_SUFFIXES",
    "TORCH_SUFFIXES",
    "read_npz_state",
    "read_safetensors_state",
    "read_state",
    "read_torch_state",
    "safetensors_keys",
    "state_format",
    "state_keys",
    "write_safetensors",
]

TORCH_SUFFIXES: tuple[str, ...] = (".th", ".pth", ".pt")
STATE_SUFFIXES: tuple[str, ...] = (".npz", ".safetensors", *TORCH_SUFFIXES)
# safetensors dtype name -> numpy dtype (little-endian). BF16 is read through ml_dtypes (a JAX dependency) and
# widened to float32, which holds every bfloat16 value exactly.
SAFETENSORS_DTYPES: dict[str, str] = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
}
_NUMPY_TO_SAFETENSORS = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}
_MAX_HEADER = 100 << 20  # the format's own limit on the JSON header


def read_npz_state(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All arrays of a ``.npz`` state-dict export (``allow_pickle=False``); a truncated, corrupt or non-npz file
    raises one :class:`ValueError` naming it (a missing one :class:`FileNotFoundError`)."""
    from oefsmc_jax.data.sources import read_npz

    return read_npz(pathlib.Path(path))[1]


def _safetensors_header(path: pathlib.Path, f: Any, size: int) -> tuple[dict[str, Any], int]:
    """``(entries, data_start)`` of an open safetensors file, every entry checked against the file's size."""
    head = f.read(8)
    if len(head) < 8:
        raise ValueError(f"{path}: not a safetensors file: {size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", head)
    if n > min(_MAX_HEADER, size - 8):
        raise ValueError(f"{path}: not a safetensors file (or truncated): header length {n} but the file has "
                         f"{size} bytes")
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a safetensors file: its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file: its header is a JSON {type(header).__name__}, not an "
                         "object")
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    for key, e in header.items():
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
            raise ValueError(f"{path}: tensor {key!r}: header entry needs dtype, shape and data_offsets, got {e!r}")
        dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES and dtype != "BF16":
            raise ValueError(f"{path}: tensor {key!r}: unsupported dtype {dtype!r}; expected one of "
                             f"{sorted([*SAFETENSORS_DTYPES, 'BF16'])}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise ValueError(f"{path}: tensor {key!r}: shape must be a list of non-negative ints, got {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_len):
            raise ValueError(f"{path}: tensor {key!r}: data_offsets {offsets!r} outside the {data_len}-byte data "
                             "(truncated file?)")
        itemsize = 2 if dtype == "BF16" else np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize
        want = itemsize * int(np.prod(shape, dtype=np.int64))
        if offsets[1] - offsets[0] != want:
            raise ValueError(f"{path}: tensor {key!r}: {offsets[1] - offsets[0]} bytes for {dtype} shape "
                             f"{tuple(shape)}, which needs {want}")
    return header, 8 + n


def _open_checked(path: str | os.PathLike) -> pathlib.Path:
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher file {path} does not exist")
    return path


def safetensors_keys(path: str | os.PathLike) -> list[str]:
    """The tensor names of a ``.safetensors`` file (only its header is read and checked)."""
    path = _open_checked(path)
    with open(path, "rb") as f:
        return list(_safetensors_header(path, f, path.stat().st_size)[0])


def read_safetensors_state(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a ``.safetensors`` file as numpy arrays (BF16 widened to float32), parsed with numpy."""
    path = _open_checked(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        header, start = _safetensors_header(path, f, size)
        out: dict[str, np.ndarray] = {}
        for key, e in header.items():
            begin, end = e["data_offsets"]
            f.seek(start + begin)
            buf = f.read(end - begin)
            if e["dtype"] == "BF16":
                import ml_dtypes

                a = np.frombuffer(buf, ml_dtypes.bfloat16).astype(np.float32)
            else:
                dt = np.dtype(SAFETENSORS_DTYPES[e["dtype"]])
                a = np.frombuffer(buf, dt).astype(dt.newbyteorder("="))  # a writable, native-order copy
            out[key] = a.reshape(e["shape"])
    return out


def write_safetensors(path: str | os.PathLike, arrays: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write ``arrays`` as a ``.safetensors`` file (the inverse of :func:`read_safetensors_state`; tensors in
    sorted key order, 8-byte aligned header as the reference writer pads it)."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs, offset = [], 0
    for key in sorted(arrays):
        a = np.asarray(arrays[key])
        little = a.dtype.newbyteorder("<")
        name = _NUMPY_TO_SAFETENSORS.get(little)
        if name is None:
            raise ValueError(f"{key!r}: dtype {a.dtype} cannot be written to safetensors")
        blob = np.ascontiguousarray(a, dtype=little).tobytes()
        header[key] = {"dtype": name, "shape": list(a.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for blob in blobs:
            f.write(blob)


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            "reading a .th teacher needs PyTorch: `pip install torch` (or the optional extra "
            "`pip install oefsmc_jax[torch]`), or use the torch-free .npz export"
        ) from e
    return torch


def read_torch_state(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The state dict of a torch checkpoint as numpy arrays (needs ``torch``).

    Accepts ``{'state_dict': ...}`` (``best_prec1`` etc. ignored) or a bare state dict; a ``module.`` prefix
    (from ``DataParallel``) is removed. Raises :class:`ImportError` when torch is not installed.
    """
    torch = _import_torch()
    path = pathlib.Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except TypeError:  # torch < 1.13 has no weights_only
        obj = torch.load(path, map_location="cpu")
    state = obj["state_dict"] if isinstance(obj, Mapping) and "state_dict" in obj else obj
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict or {{'state_dict': ...}}, got {type(obj).__name__}")
    arrays: dict[str, np.ndarray] = {}
    for k, v in state.items():
        name = k[len("module."):] if k.startswith("module.") else k
        arrays[name] = v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
    return arrays


def state_format(path: str | os.PathLike) -> str:
    """``'npz'``, ``'safetensors'`` or ``'th'`` (any torch pickle) from the file's suffix; others raise."""
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    if suffix in (".npz", ".safetensors"):
        return suffix[1:]
    if suffix in TORCH_SUFFIXES:
        return "th"
    raise ValueError(f"{path}: unknown teacher format {suffix!r}; expected .npz, .safetensors or one of "
                     f"{TORCH_SUFFIXES}")


def read_state(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The state dict in ``path`` (format from the suffix: :func:`state_format`) as numpy arrays."""
    fmt = state_format(path)
    if fmt == "npz":
        return read_npz_state(path)
    if fmt == "safetensors":
        return read_safetensors_state(path)
    return read_torch_state(path)


def state_keys(path: str | os.PathLike) -> list[str]:
    """The keys of the state dict in ``path``; ``.npz`` and ``.safetensors`` read only the names."""
    fmt = state_format(path)
    if fmt == "npz":
        from oefsmc_jax.data.sources import read_npz

        return read_npz(pathlib.Path(path), ())[0]
    if fmt == "safetensors":
        return safetensors_keys(path)
    return list(read_torch_state(path))
