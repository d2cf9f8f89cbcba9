"""Import pretrained teachers from other frameworks as Orbax model checkpoints (see :mod:`.akamaster`).

The names below are loaded lazily (PEP 562), so ``python -m oefsmc_jax.convert.akamaster`` runs the module
once without the "found in sys.modules" warning, and importing the package stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "AKAMASTER_MEAN",
    "AKAMASTER_STD",
    "akamaster_key_map",
    "convert_akamaster_state_dict",
    "evaluate_top1",
    "import_teacher",
    "load_akamaster_npz",
    "load_akamaster_th",
    "main",
]


def __getattr__(name: str) -> Any:
    """Resolve the public names from :mod:`oefsmc_jax.convert.akamaster` on first use."""
    if name in __all__:
        return getattr(importlib.import_module("oefsmc_jax.convert.akamaster"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
