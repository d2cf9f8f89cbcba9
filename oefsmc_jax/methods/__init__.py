"""Few-sample compression methods: a registry from config names to :class:`Method` classes.

Adding a method is one file (a frozen dataclass of its hyper-parameters with ``from_config``, ``stages`` and
``recipe``) plus one line here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from oefsmc_jax.errors import fail
from oefsmc_jax.methods.base import (
    CompressionContext,
    Method,
    OESettings,
    Stage,
    chain,
    prune_ratios,
    resolve_oe,
)
from oefsmc_jax.methods.cd import CD
from oefsmc_jax.methods.fskd import FSKD
from oefsmc_jax.methods.l1 import BP, KD, Supervised
from oefsmc_jax.methods.mir import MiR
from oefsmc_jax.methods.practise import PRACTISE
from oefsmc_jax.models import ArchSpec
from oefsmc_jax.oe.calibration import Calibration

METHODS: dict[str, type[Method]] = {
    "bp": BP,
    "kd": KD,
    "mir": MiR,
    "practise": PRACTISE,
    "fskd": FSKD,
    "cd": CD,
}


def build_method(cfg: Mapping[str, Any], spec: ArchSpec) -> Method:
    """The method named ``cfg['name']`` with its hyper-parameters from ``cfg`` (``config.method``), for a teacher
    of ``spec``; a bad name or value fails with one line naming the field."""
    name = cfg["name"]
    if name not in METHODS:
        fail("method.name", f"unknown method {name!r}; allowed: {', '.join(sorted(METHODS))}")
    return METHODS[name].from_config(cfg, spec)


__all__ = ["BP", "CD", "FSKD", "KD", "METHODS", "PRACTISE", "Calibration", "CompressionContext", "Method", "MiR",
           "OESettings", "Stage", "Supervised", "build_method", "chain", "prune_ratios", "resolve_oe"]
