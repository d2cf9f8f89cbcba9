"""Compiles paid once: JAX's persistent compilation cache, and what each compile cost.

:func:`enable` points JAX's persistent cache at a directory (``config.compile_cache``, or ``$OEFSMC_COMPILE_CACHE``,
default ``~/.cache/oefsmc_jax/xla``; ``off`` disables it), so a second run, a resumed grid or the next cell of the
same shapes loads its executables instead of compiling them. Executables that compiled faster than
``$OEFSMC_COMPILE_CACHE_MIN_S`` seconds (default 0.5) are not stored; 0 stores every one, the many small eager
operations included, which makes a short process that runs again (a test, a resumed tiny run) start faster.
:class:`CompileClock` reads JAX's monitoring events:
seconds spent tracing/lowering/compiling and persistent-cache hits and misses since it was started, which the train
loop prints for its step function.
"""

from __future__ import annotations

import math
import os
import pathlib
import threading

import jax
from jax import monitoring

from oefsmc_jax.errors import ConfigError

_lock = threading.Lock()
_totals = {"compile_s": 0.0, "trace_s": 0.0, "hits": 0, "misses": 0}
_registered = False


def _on_duration(name: str, secs: float, **_: object) -> None:
    key = {"/jax/core/compile/backend_compile_duration": "compile_s",
           "/jax/core/compile/jaxpr_to_mlir_module_duration": "trace_s",
           "/jax/core/compile/jaxpr_trace_duration": "trace_s"}.get(name)
    if key:
        with _lock:
            _totals[key] += float(secs)


def _on_event(name: str, **_: object) -> None:
    key = {"/jax/compilation_cache/cache_hits": "hits", "/jax/compilation_cache/cache_misses": "misses"}.get(name)
    if key:
        with _lock:
            _totals[key] += 1


def _register() -> None:
    global _registered
    with _lock:
        if _registered:
            return
        _registered = True
    monitoring.register_event_duration_secs_listener(_on_duration)
    monitoring.register_event_listener(_on_event)


def default_dir() -> str:
    """``$OEFSMC_COMPILE_CACHE`` or ``$XDG_CACHE_HOME/oefsmc_jax/xla`` (``~/.cache/oefsmc_jax/xla``)."""
    env = os.environ.get("OEFSMC_COMPILE_CACHE")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or str(pathlib.Path.home() / ".cache")
    return str(pathlib.Path(base) / "oefsmc_jax" / "xla")


MIN_S_ENV = "OEFSMC_COMPILE_CACHE_MIN_S"
#: executables that compiled faster than this many seconds are not stored (unless ``$OEFSMC_COMPILE_CACHE_MIN_S``)
DEFAULT_MIN_S = 0.5


def min_compile_seconds() -> float:
    """``$OEFSMC_COMPILE_CACHE_MIN_S`` as a number of seconds ≥ 0, else :data:`DEFAULT_MIN_S`; another value is a
    ConfigError that names the variable."""
    raw = os.environ.get(MIN_S_ENV, "").strip()
    if not raw:
        return DEFAULT_MIN_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0.0):
        raise ConfigError(f"${MIN_S_ENV}: {raw!r} is not allowed; a number of seconds, 0 or more (0 stores "
                          "every executable)")
    return value


def enable(directory: str | None = None, min_compile_s: float | None = None) -> str | None:
    """Use the persistent compilation cache in ``directory`` ('' = :func:`default_dir`, 'off' = none); returns the
    directory in use (None when off). Executables that took under ``min_compile_s`` (None:
    :func:`min_compile_seconds`) to compile are not stored."""
    _register()
    if min_compile_s is None:
        min_compile_s = min_compile_seconds()
    directory = directory or default_dir()
    if directory.lower() in ("off", "none", "0"):
        return None
    try:
        pathlib.Path(directory).mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # an unwritable cache only costs compile time
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_s))
    return directory


class CompileClock:
    """Compile seconds and persistent-cache hits/misses since construction (all threads of this process)."""

    def __init__(self) -> None:
        _register()
        with _lock:
            self._start = dict(_totals)

    def read(self) -> dict[str, float]:
        """``{'compile_s', 'trace_s', 'hits', 'misses'}`` since the clock started."""
        with _lock:
            return {k: _totals[k] - self._start[k] for k in _totals}

    def describe(self) -> str:
        """One phrase, e.g. ``compiled in 12.3 s (trace 1.1 s; persistent cache: 0 hits, 2 misses)``."""
        r = self.read()
        cache = f"; persistent cache: {int(r['hits'])} hits, {int(r['misses'])} misses" if r["hits"] + r["misses"] \
            else ""
        return f"compiled in {r['compile_s']:.1f} s (trace {r['trace_s']:.1f} s{cache})"
