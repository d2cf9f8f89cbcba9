"""Helpers shared by the tests: the repository's config files, loaded by path as the command line loads them, and
the set-up several test files need (the tiny architecture, ...)."""

from __future__ import annotations

import importlib.util
import pathlib
from types import ModuleType
from typing import TYPE_CHECKING

from oefsmc_jax.config_defaults import sibling

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

if TYPE_CHECKING:
    from oefsmc_jax.models import ArchSpec


def config(name: str) -> ModuleType:
    """``configs/NAME.py`` as a module (loaded once per process)."""
    return sibling(str(CONFIGS / f"{name}.py"), name)


def config_import(name: str) -> str:
    """The lines a generated config file needs to use ``configs/NAME.py`` as ``NAME``."""
    return (f"from oefsmc_jax.config_defaults import sibling\n"
            f"{name} = sibling({str(CONFIGS / f'{name}.py')!r}, {name!r})\n")


def module_at(path: pathlib.Path) -> ModuleType:
    """The Python file at ``path`` as a module (a script that is not on the import path)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def in_fresh_process(nodeid: str) -> bool:
    """For a test that must not share its process with the tests before it: False in the child (run the body
    there), True in the parent after the same test passed in a fresh ``pytest`` process. XLA:CPU has crashed
    (SIGSEGV) inside the ImageNet-layout end-to-end run, but only late in a long test process and never alone; a
    fresh process keeps such a crash, if it comes, to this test's own failure."""
    import os
    import subprocess
    import sys

    if os.environ.get("OEFSMC_TEST_CHILD") == nodeid:
        return False
    env = {**os.environ, "OEFSMC_TEST_CHILD": nodeid}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                          "--durations=0", nodeid], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, f"{nodeid} in a fresh process (exit {out.returncode}):\n{out.stdout[-3000:]}" \
                                f"\n{out.stderr[-3000:]}"
    return True


def tiny_spec(depth: int = 8, num_classes: int = 10, shortcut: str = "A") -> ArchSpec:
    """The tests' tiny CIFAR ResNet: ``cifar_resnet_spec(depth, num_classes, shortcut, widths=(4, 8, 8))``
    (depth 8: one block per stage; 14: two, so PRACTISE has candidates)."""
    from oefsmc_jax.models import cifar_resnet_spec

    return cifar_resnet_spec(depth, num_classes, shortcut=shortcut, widths=(4, 8, 8))
