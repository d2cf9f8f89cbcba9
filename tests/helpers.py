"""Helpers shared by the tests: the repository's config files, loaded by path as the command line loads them."""

import importlib.util
import pathlib
from types import ModuleType

from oefsmc_jax.config_defaults import sibling

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


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
