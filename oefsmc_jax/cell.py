"""The grid cell whose work runs in this context (a :class:`contextvars.ContextVar`).

:class:`oefsmc_jax.training.scheduler.GroupScheduler` runs each cell of a grouped grid in its own thread and enters
the cell there: progress lines (:func:`oefsmc_jax.progress.log`) carry the cell's name, and a fine-tuning run
started inside it (``training.loop.finetune``) is handed to the scheduler instead of being trained on the spot.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any


@dataclasses.dataclass(frozen=True)
class Cell:
    """A grid cell: its name, and how a fine-tuning run started in it reaches the scheduler (``submit(job)`` returns
    the run's result once it has been trained)."""

    name: str
    submit: Callable[[Any], Any]


_current: contextvars.ContextVar[Cell | None] = contextvars.ContextVar("oefsmc_cell", default=None)


def current() -> Cell | None:
    """The cell entered in this context, or None outside a grouped grid's cells."""
    return _current.get()


@contextlib.contextmanager
def entered(cell: Cell) -> Iterator[Cell]:
    """Within the block (in this thread), :func:`current` is ``cell``."""
    token = _current.set(cell)
    try:
        yield cell
    finally:
        _current.reset(token)
