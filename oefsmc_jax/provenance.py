"""Provenance of a record: the code (git commit, dirty tree), the package versions, and portable paths."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import pathlib
import platform
import subprocess
from typing import Any

from oefsmc_jax import paths

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "numpy", "ml_collections")
REPO = pathlib.Path(__file__).resolve().parents[1]


@functools.cache
def code_version() -> dict[str, Any]:
    """The git commit of the package's checkout and whether its tracked files differ from it (None outside git)."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": None if dirty is None else bool(dirty)}


@functools.cache
def host_cpu() -> str:
    """The host CPU as a record names it: model name, family/model numbers and the widest x86 vector extension (XLA's
    CPU code differs between CPU models, so a CPU result is bitwise reproducible only on the same kind), e.g.
    ``AMD EPYC, family 25 model 17, avx512``; on other systems what :mod:`platform` knows."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    name = info.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    parts = [name]
    if "cpu family" in info and "model" in info:
        parts.append(f"family {info['cpu family']} model {info['model']}")
    flags = set(info.get("flags", "").split())
    isa = next((x for x in ("avx512f", "avx2", "avx", "sse4_2") if x in flags), None)
    if isa:
        parts.append(isa.replace("avx512f", "avx512").replace("sse4_2", "sse4.2"))
    return ", ".join(parts)


@functools.cache
def device_description(mesh: Any) -> str:
    """The devices a run or grid runs on, for its records and report: e.g. ``1 x gpu (NVIDIA H200)``, or for CPU
    devices the host's CPU, ``2 x cpu (AMD EPYC, family 25 model 17, avx512)``."""
    d = mesh.devices.flat[0]
    kind = host_cpu() if d.platform == "cpu" else d.device_kind
    return f"{mesh.devices.size} x {d.platform} ({kind})"


def versions() -> dict[str, str | None]:
    """Installed versions of the packages a result depends on, and Python's."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p] = None
    return out


def portable(obj: Any, roots: dict[str, str | os.PathLike]) -> Any:
    """``obj`` (nested dicts/lists/strings) with every string under one of ``roots`` written relative to it, as
    ``<name>/rest`` (e.g. ``<data>/cifar10_test_jpeg75.npz``), so committed records hold no machine paths."""
    prefixes = sorted(((str(paths.as_path(p)).rstrip("/") + "/", name) for name, p in roots.items()),
                      key=lambda t: -len(t[0]))

    def fix(o: Any) -> Any:
        if isinstance(o, dict):
            return {k: fix(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [fix(v) for v in o]
        if isinstance(o, str):
            for prefix, name in prefixes:
                if o.startswith(prefix):
                    return f"<{name}>/{o[len(prefix):]}"
        return o

    return fix(obj)
