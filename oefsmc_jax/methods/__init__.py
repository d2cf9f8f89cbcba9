"""Few-sample compression methods: a registry from config names to :class:`Method` instances."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from oefsmc_jax.methods.base import Calibration, CompressionContext, Method
from oefsmc_jax.methods.pruning import BP, KD, Supervised

METHODS: dict[str, type[Method]] = {"bp": BP, "kd": KD}


def prune_ratios(value: Any, num_stages: int) -> tuple[float, ...]:
    """Per-stage prune ratios from a float or a sequence (validated to lie in [0, 1))."""
    if isinstance(value, (int, float)):
        ratios = (float(value),) * num_stages
    else:
        ratios = tuple(float(v) for v in value)
        if len(ratios) != num_stages:
            raise ValueError(f"method.prune_ratio: expected 1 or {num_stages} values (one per stage), "
                             f"got {len(ratios)}")
    for r in ratios:
        if not 0.0 <= r < 1.0:
            raise ValueError(f"method.prune_ratio: {r} is outside the allowed range [0, 1)")
    return ratios


def build_method(cfg: Mapping[str, Any], num_stages: int) -> Method:
    """Instantiate the method named ``cfg['name']`` with its hyper-parameters from ``cfg``."""
    name = cfg["name"]
    if name not in METHODS:
        raise ValueError(f"method.name: unknown method {name!r}; allowed: {', '.join(sorted(METHODS))}")
    ratios = prune_ratios(cfg["prune_ratio"], num_stages)
    if name == "bp":
        return BP(ratios)
    return KD(ratios, gamma=cfg.get("kd_gamma", 0.9), tau=cfg.get("tau", 4.0))


__all__ = ["BP", "KD", "METHODS", "Calibration", "CompressionContext", "Method", "Supervised", "build_method",
           "prune_ratios"]
