"""Progress lines and the JSON files a run writes: what every stage of a run reports through.

:func:`log` writes one flushed line to stderr; inside a grid cell (:mod:`oefsmc_jax.cell`) it is prefixed with the
cell's name, so the lines of cells trained together stay apart. :func:`write_json` writes atomically (a kill never
leaves half a file) and only on process 0 of a multi-host run.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import jax
import numpy as np

from oefsmc_jax import cell, paths


def log(msg: str) -> None:
    """Progress output (stderr, flushed), prefixed with the current grid cell's name inside one."""
    current = cell.current()
    if current is not None:
        msg = f"[{current.name}] {msg}"
    print(msg, file=sys.stderr, flush=True)


def json_default(o: Any) -> Any:
    """JSON encoding of the NumPy values a result holds (arrays as lists, scalars as Python numbers); anything
    else as its ``str``."""
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    return str(o)


def write_json(path: paths.Path, obj: Any) -> None:
    """Write JSON atomically (a crash never leaves a half-written result); only process 0 writes."""
    if jax.process_index() != 0:
        return
    paths.write_text_atomic(path, json.dumps(obj, indent=1, default=json_default))
