"""The fast allocator: run the command-line entry points with tcmalloc preloaded when the system has it.

XLA:CPU allocates and frees many short-lived buffers per train step; with glibc's malloc the step is markedly slower
than with tcmalloc (benchmarks/README.md). ``oefsmc`` / ``python -m oefsmc_jax`` and ``python -m
oefsmc_jax.experiments`` call :func:`maybe_reexec` first: on Linux, when ``libtcmalloc_minimal.so.4`` (package
``libtcmalloc-minimal4``) or ``libtcmalloc.so.4`` (``libgoogle-perftools4``) is installed and not already loaded,
the process re-executes itself once with ``LD_PRELOAD`` naming it, and says so in one line on stderr.

``OEFSMC_TCMALLOC``: ``0`` turns it off, ``1`` (default) finds the library, a path picks one explicitly.

This file imports only the standard library, so ``launch/tcmalloc.sh`` runs it as a script
(``python3 oefsmc_jax/allocator.py ld-preload``) and the shell and Python pick the same library.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

ENV = "OEFSMC_TCMALLOC"
MARK = "OEFSMC_TCMALLOC_REEXEC"  # set in the re-executed process: never a second re-exec
NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")  # the minimal one first: no heap profiler hooks
DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
# the processes that re-execute: `python -m oefsmc_jax`, `python -m oefsmc_jax.experiments`, the `oefsmc` script
ENTRY_MODULES = ("oefsmc_jax.__main__", "oefsmc_jax.experiments.__main__")
ENTRY_SCRIPTS = ("oefsmc",)


def find_tcmalloc(setting: str | None = None, dirs: Sequence[str] = DIRS) -> str | None:
    """The tcmalloc library to preload, per ``setting`` (default ``$OEFSMC_TCMALLOC``): ``None`` for ``0``, or
    when ``1``/unset and none of :data:`NAMES` is in :data:`DIRS`; a path is used as given. A path that is not a
    file raises :class:`ValueError` with one line naming the variable."""
    setting = os.environ.get(ENV, "1") if setting is None else setting
    setting = setting.strip() or "1"
    if setting == "0":
        return None
    if setting != "1":
        if not os.path.isfile(setting):
            raise ValueError(f"{ENV}={setting} is not a file; set it to 0 (off), 1 (find it) or a library path")
        return setting
    for name in NAMES:
        for d in dirs:
            path = os.path.join(d, name)
            if os.path.isfile(path):
                return path
    return None


def ld_preload(lib: str | None, current: str = "") -> str:
    """``LD_PRELOAD`` with ``lib`` in front of ``current``, unless it is already listed (or ``lib`` is None)."""
    parts = [p for p in current.split(":") if p]
    if lib is None or lib in parts:
        return current
    return ":".join([lib, *parts])


def loaded() -> bool:
    """Whether a tcmalloc is mapped into this process already (preloaded, or linked in)."""
    try:
        with open("/proc/self/maps") as f:
            return "libtcmalloc" in f.read()
    except OSError:
        return False


def _is_entry_point() -> bool:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None:
        return spec.name in ENTRY_MODULES
    return os.path.basename(getattr(main, "__file__", "") or "") in ENTRY_SCRIPTS


def reexec_env(environ: Mapping[str, str] | None = None, platform: str | None = None) -> dict[str, str] | None:
    """The environment to re-execute with, or ``None`` when there is nothing to do: not Linux, already
    re-executed, turned off, no library, or one already loaded or listed in ``LD_PRELOAD``."""
    environ = os.environ if environ is None else environ
    if not (platform or sys.platform).startswith("linux") or environ.get(MARK):
        return None
    lib = find_tcmalloc(environ.get(ENV, "1"))
    current = environ.get("LD_PRELOAD", "")
    if lib is None or ld_preload(lib, current) == current or loaded():
        return None
    return {**environ, "LD_PRELOAD": ld_preload(lib, current), MARK: "1"}


def maybe_reexec() -> None:
    """Re-execute this process once with tcmalloc preloaded (see the module docstring); returns when it does
    not. A bad ``OEFSMC_TCMALLOC`` exits 2 with one line. Only the command-line entry points re-execute, never a
    process that merely imports them (a test runner calling ``cli()``)."""
    if not _is_entry_point():
        return
    try:
        env = reexec_env()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if env is None:
        return
    print(f"oefsmc: preloading {env['LD_PRELOAD'].split(':')[0]} (faster CPU steps; {ENV}=0 turns it off)",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    argv = list(getattr(sys, "orig_argv", [])) or [sys.executable, *sys.argv]
    os.execve(sys.executable, [sys.executable, *argv[1:]], env)


def main(argv: Sequence[str]) -> int:
    """``allocator.py ld-preload``: print ``LD_PRELOAD`` with the library in front (what ``launch/tcmalloc.sh``
    exports); ``allocator.py find``: print the library's path (empty when none). Exit 2 on a bad setting."""
    if len(argv) != 1 or argv[0] not in ("ld-preload", "find"):
        print("usage: allocator.py ld-preload|find", file=sys.stderr)
        return 2
    try:
        lib = find_tcmalloc()
    except ValueError as e:
        print(f"launch: {e}", file=sys.stderr)
        return 2
    if argv[0] == "find":
        print(lib or "")
    else:
        print(ld_preload(lib, os.environ.get("LD_PRELOAD", "")))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
