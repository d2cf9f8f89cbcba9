"""Helpers shared by the tests: the repository's config files, loaded by path as the command line loads them, and
the set-up several test files need (the tiny architecture, a stand-in torch, the command line in a subprocess)."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys
import types
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any

from oefsmc_jax.config_defaults import sibling

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

if TYPE_CHECKING:
    import numpy as np
    import pytest

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


def run_cli(args, env: dict | None = None, timeout: float = 300, *, cwd: str | pathlib.Path | None = REPO,
            module: str = "oefsmc_jax") -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` (by default the ``oefsmc`` command line) in a fresh interpreter in ``cwd``, its
    output captured as text; ``env=None`` passes this process's environment on."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def xla_flags(devices: int) -> str:
    """This process's ``XLA_FLAGS`` with the simulated CPU device count set to ``devices``: a process a test starts
    with another device count compiles with the same other flags as the test process (conftest.py sets them)."""
    flag = "--xla_force_host_platform_device_count"
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(flag)]
    return " ".join([*kept, f"{flag}={devices}"])


def in_fresh_process(nodeid: str) -> bool:
    """For a test that must not share its process with the tests before it: False in the child (run the body
    there), True in the parent after the same test passed in a fresh ``pytest`` process. XLA:CPU has crashed
    (SIGSEGV) inside the ImageNet-layout end-to-end run, but only late in a long test process and never alone; a
    fresh process keeps such a crash, if it comes, to this test's own failure."""
    import os

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


class FakeTensor:
    """A stand-in torch tensor around a NumPy array: ``t.detach().cpu().numpy()`` is the array."""

    def __init__(self, a):
        self.a = a

    def detach(self):
        return self

    def cpu(self):
        return self

    def numpy(self):
        return self.a


def torch_state_dict(arrays: Mapping[str, np.ndarray], prefix: str = "") -> dict[str, FakeTensor]:
    """``arrays`` (a dict or an open ``.npz``) as a stand-in torch state dict, each key with ``prefix`` in front."""
    return {prefix + k: FakeTensor(v) for k, v in arrays.items()}


def fake_torch(monkeypatch: pytest.MonkeyPatch, checkpoint: Callable[[], Any]) -> list[tuple]:
    """Put a stand-in ``torch`` module in ``sys.modules`` (torch is not installed here): its
    ``torch.load(path, map_location=None, weights_only=None)`` returns ``checkpoint()`` and records
    ``(str(path), map_location, weights_only)`` in the list this returns."""
    calls: list[tuple] = []

    def load(path, map_location=None, weights_only=None):
        calls.append((str(path), map_location, weights_only))
        return checkpoint()

    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(load=load))
    return calls
