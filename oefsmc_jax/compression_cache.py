"""A content-addressed store of compressed students, so that a grid whose cells share a compression stage runs it
once (e.g. a tuning sweep whose groups change only fine-tuning settings).

An entry is keyed by everything the compression stage reads: the method and its hyper-parameters, the teacher's
architecture and weights, the calibration set (images, labels, weights, which rows are OOD), the run's seed,
normalisation, latency mode, batch size and XLA:CPU fusion mode, the device count, and the commit of the code. A tree
with uncommitted changes is never cached (its code cannot be named). Entries live in ``oe.cache_dir`` (default
``WORKDIR/cache``; a grid shares one) as ``compressed_KEY/`` with the model and what the stages decided
(``compression/``); an entry is written to a temporary name and renamed, so a kill never leaves half of one.
Only single-process runs with a local cache use it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from typing import Any

import jax
import numpy as np

from oefsmc_jax import paths
from oefsmc_jax.models import ArchSpec
from oefsmc_jax.oe.calibration import Calibration
from oefsmc_jax.provenance import code_version
from oefsmc_jax.training.checkpoint import load_model, save_model


@functools.cache
def _commit() -> str | None:
    """The commit of a clean checkout, else None (nothing is cached)."""
    v = code_version()
    return v["git_commit"] if v["git_commit"] and v["git_dirty"] is False else None


def key(config: Any, method: Any, teacher: tuple[ArchSpec, dict], calibration: Calibration,
        modes: dict[str, str]) -> str | None:
    """The entry's key, or None when this run cannot be cached (uncommitted code, several processes)."""
    commit = _commit()
    if commit is None or jax.process_count() > 1:
        return None
    t_spec, t_vars = teacher
    h = hashlib.sha256()
    fixed = [commit, method.describe(), t_spec.to_dict(), list(config.data.mean), list(config.data.std),
             int(config.seed), str(config.method.latency), int(config.eval.batch_size), modes["cpu_fusion"],
             bool(config.student.export_before_finetune), jax.device_count(), jax.default_backend()]
    h.update(json.dumps(fixed, sort_keys=True, default=str).encode())
    for leaf in jax.tree.leaves(t_vars):
        h.update(np.ascontiguousarray(leaf).tobytes())
    for a in (calibration.x, calibration.y, calibration.weights, calibration.is_ood):
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:24]


def _entry(cache_dir: paths.Path, k: str) -> paths.Path:
    return cache_dir / f"compressed_{k}"


def load(cache_dir: paths.Path, k: str, workdir: paths.Path) -> tuple[ArchSpec, dict] | None:
    """The cached student of key ``k`` (None when absent), with what its stages decided copied into
    ``workdir/compression``."""
    entry = _entry(cache_dir, k)
    if not paths.is_local(cache_dir) or not (entry / "model").exists():
        return None
    spec, variables, _ = load_model(entry / "model")
    if (entry / "compression").is_dir():
        shutil.copytree(os.fspath(entry / "compression"), os.fspath(workdir / "compression"), dirs_exist_ok=True)
    return spec, variables


def store(cache_dir: paths.Path, k: str, spec: ArchSpec, variables: dict, workdir: paths.Path) -> None:
    """Keep ``(spec, variables)`` and ``workdir/compression`` under key ``k`` (first writer wins)."""
    if not paths.is_local(cache_dir):
        return
    entry = _entry(cache_dir, k)
    if entry.exists():
        return
    tmp = cache_dir / f".compressed_{k}.{os.getpid()}.tmp"
    if tmp.exists():
        shutil.rmtree(os.fspath(tmp))
    save_model(tmp / "model", spec, variables)
    if (workdir / "compression").is_dir():
        shutil.copytree(os.fspath(workdir / "compression"), os.fspath(tmp / "compression"))
    try:
        os.replace(os.fspath(tmp), os.fspath(entry))
    except OSError:  # another process stored the same entry first
        shutil.rmtree(os.fspath(tmp), ignore_errors=True)
