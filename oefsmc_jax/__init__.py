"""oefsmc_jax: few-sample, class-imbalanced model compression with out-of-distribution data (OE-FSMC) in JAX/Flax.

``oefsmc_jax.load_compressed(OUT)`` (from :mod:`oefsmc_jax.export`) is resolved lazily (PEP 562), so importing the
package stays cheap and does not import JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {"load_compressed": "oefsmc_jax.export"}


def __getattr__(name: str) -> Any:
    """Resolve the lazily imported public names on first use."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
