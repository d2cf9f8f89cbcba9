"""How a method fine-tunes its student: the :class:`Recipe` the train step is built from (method.md §4-5), and a
method's own fine-tuning loop (:class:`FinetuneSchedule`). Methods (:mod:`oefsmc_jax.methods`) return recipes;
the training code reads them and never imports a method."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax

from oefsmc_jax.losses import CrossEntropy

DISTILL = ("logits", "features")


@dataclasses.dataclass(frozen=True)
class FinetuneSchedule:
    """A method's own fine-tuning loop, replacing ``train.steps``/``train.batch_id``/``optim.*``, the augmentation
    and early stopping of the project's generic loop for this method (e.g. CD's official short fine-tuning).

    ``batch_id = 0`` is full-batch: every ID image each step, at most ``max_batch`` (rounded down to a multiple of
    the device count). SGD with momentum and coupled weight decay, lr x ``decay_factor`` at each ``decay_at``
    fraction of ``steps``. OE-FSMC's terms, when the arm has them, are added in the same loop.
    """

    steps: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    decay_at: tuple[float, ...] = (0.5, 0.75)
    decay_factor: float = 0.1
    batch_id: int = 0
    max_batch: int = 128
    augment: bool = False
    early_stopping: bool = False

    def optim(self, base: Mapping[str, Any]) -> dict[str, Any]:
        """``base`` (``config.optim``) with this schedule's optimizer settings."""
        return {**dict(base), "name": "sgd", "lr": self.lr, "momentum": self.momentum, "nesterov": False,
                "weight_decay": self.weight_decay, "schedule": "step", "warmup_steps": 0,
                "decay_at": tuple(self.decay_at), "decay_factor": self.decay_factor}

    def batch(self, n: int, num_devices: int) -> int:
        """The ID batch for a set of ``n`` images on ``num_devices`` devices."""
        b = self.batch_id if self.batch_id > 0 else min(n, self.max_batch)
        return max(num_devices, b - b % num_devices)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a method fine-tunes its student (method.md §4-5). Hashable and compared by value (its losses are module
    functions or frozen callables), so equal recipes share a compiled step.

    ``loss(student, teacher, labels, label_loss)`` is the method's own loss on the ID part of the batch (model
    outputs have ``logits`` and ``features``; ``label_loss(logits, labels)`` is the supervised term, which the
    ``logit_adjust`` arm replaces). ``distill`` is the signal of OE-FSMC's joint distillation: ``logits``
    (``tau^2 KL``) or ``features`` (pre-GAP MSE). ``frozen`` names top-level parameter modules that get neither
    updates nor weight decay (MiR's classifier). ``schedule``, when set, is the method's own fine-tuning loop
    (:class:`FinetuneSchedule`) instead of the project's.
    """

    loss: Callable[..., Any]
    distill: str = "logits"
    frozen: tuple[str, ...] = ()
    finetunes: bool = True
    needs_teacher: bool = True
    uses_labels: bool = True
    label_loss: Callable[[Any, Any], Any] = CrossEntropy()
    schedule: FinetuneSchedule | None = None  # the method's own loop; None: the project's (train.*, optim.*)

    def __post_init__(self) -> None:
        if self.distill not in DISTILL:
            raise ValueError(f"distill must be one of {DISTILL}, got {self.distill!r}")

    def base_loss(self, student: dict, teacher: dict | None, labels: jax.Array) -> jax.Array:
        """The method's loss on the ID images with this recipe's supervised term."""
        return self.loss(student, teacher, labels, self.label_loss)

    def trainable(self, params: Mapping[str, Any]) -> Any:
        """Pytree of bools over ``params``: False under the frozen modules."""
        return {k: jax.tree.map(lambda _, f=k in self.frozen: not f, v) for k, v in params.items()}
