"""Optimizers and learning-rate schedules from config (optax)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import optax

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "constant")


def freeze(value: Any) -> Any:
    """A hashable form of a config value (dicts become sorted item tuples, lists tuples), for cache and group keys."""
    if isinstance(value, dict):
        return tuple(sorted((k, freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def make_schedule(cfg: Mapping[str, Any], total_steps: int) -> optax.Schedule:
    """Learning-rate schedule: ``cosine`` (to 0), ``step`` (x ``decay_factor`` at ``decay_at`` of the run, one
    fraction or a list of them) or
    ``constant``, each after ``warmup_steps`` of linear warm-up."""
    lr = float(cfg["lr"])
    warmup = int(cfg.get("warmup_steps", 0))
    kind = cfg.get("schedule", "cosine")
    rest = max(1, total_steps - warmup)
    if kind == "cosine":
        main = optax.cosine_decay_schedule(lr, rest)
    elif kind == "step":
        at = cfg.get("decay_at", 0.4)
        fractions = [float(a) for a in at] if isinstance(at, (list, tuple)) else [float(at)]
        factor = float(cfg.get("decay_factor", 0.1))
        bounds: dict[int, float] = {}
        for a in fractions:  # x decay_factor at each fraction of the run (MiR/PRACTISE: 0.4 and 0.8)
            b = max(1, int(round(a * total_steps)) - warmup)
            bounds[b] = bounds.get(b, 1.0) * factor
        main = optax.piecewise_constant_schedule(lr, bounds)
    elif kind == "constant":
        main = optax.constant_schedule(lr)
    else:
        raise ValueError(f"optim.schedule: unknown schedule {kind!r}; allowed: {', '.join(SCHEDULES)}")
    if warmup <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def make_optimizer(cfg: Mapping[str, Any], total_steps: int, trainable: Any | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer named ``cfg['name']`` with PyTorch-style weight decay; parameters where ``trainable`` is
    False get zero updates. Returns ``(tx, schedule)``."""
    name = cfg.get("name", "sgd")
    schedule = make_schedule(cfg, total_steps)
    wd = float(cfg.get("weight_decay", 0.0))
    if name == "sgd":
        tx = optax.chain(optax.add_decayed_weights(wd) if wd else optax.identity(),
                         optax.sgd(schedule, momentum=float(cfg.get("momentum", 0.9)) or None,
                                   nesterov=bool(cfg.get("nesterov", False))))
    elif name == "adam":
        tx = optax.chain(optax.add_decayed_weights(wd) if wd else optax.identity(), optax.adam(schedule))
    elif name == "adamw":
        tx = optax.adamw(schedule, weight_decay=wd)
    else:
        raise ValueError(f"optim.name: unknown optimizer {name!r}; allowed: {', '.join(OPTIMIZERS)}")
    if trainable is not None and not all(jax.tree.leaves(trainable)):
        labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable)
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule
