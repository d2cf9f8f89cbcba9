"""Choosing the OOD subset from the pool (method.md §1 and §4b): pure functions over teacher probabilities.

* ``random`` (the paper): ``m`` pool images uniformly at random; they get labels from the complementary distribution.
* ``teacher_complement`` (ours, §4b): for each class ``k`` the ``ceil(c * (n_max - n_k))`` pool images with the
  highest teacher probability of ``k``, no image twice, so that ID plus selected OOD is balanced under the
  teacher's view; classes with the largest need pick first.
* ``teacher_confidence``: the ``ceil(c * sum_k (n_max - n_k))`` pool images with the highest maximum teacher
  probability, whatever the class (an ablation: does the complement matter, or only confidence?).
"""

from __future__ import annotations

import dataclasses

import numpy as np

SELECTIONS = ("random", "teacher_complement", "teacher_confidence")


@dataclasses.dataclass(frozen=True)
class Selection:
    """Chosen pool indices, the class each was chosen for (-1 = none), and what the pool could not supply."""

    indices: np.ndarray  # int64 [m], positions in the candidate pool
    classes: np.ndarray  # int64 [m]
    requested: np.ndarray  # int64 [K] per-class request (complement) or [1] total (confidence)
    supplied: np.ndarray  # same shape as requested

    @property
    def short(self) -> bool:
        """True when the pool could not supply every requested image."""
        return bool(np.any(self.supplied < self.requested))

    def shortfall_message(self) -> str:
        """One line describing the shortfall ('' when there is none)."""
        if not self.short:
            return ""
        missing = (self.requested - self.supplied).sum()
        return (f"the OOD pool ran short: {int(missing)} of {int(self.requested.sum())} requested images could not "
                f"be supplied (per request {self.requested.tolist()} -> supplied {self.supplied.tolist()})")


def complement_requests(counts: np.ndarray, factor: float) -> np.ndarray:
    """Per-class number of OOD images to select: ``ceil(c * (n_max - n_k))``."""
    counts = np.asarray(counts, np.int64)
    if factor < 0:
        raise ValueError(f"oe.selection_factor must be >= 0, got {factor}")
    return np.ceil(factor * (counts.max() - counts) - 1e-9).astype(np.int64)


def select_teacher_complement(probs: np.ndarray, counts: np.ndarray, factor: float) -> Selection:
    """For each class, the pool images with the highest teacher probability of that class (no image twice).

    Classes with the largest request choose first (ties: lower class index), each taking its top images among those
    not yet taken; when the pool runs out, a class gets what is left. ``probs`` may be memory-mapped: it is read
    one class column at a time.
    """
    req = complement_requests(counts, factor)
    taken = np.zeros(len(probs), bool)
    idx, cls = [], []
    supplied = np.zeros_like(req)
    for k in sorted(range(len(req)), key=lambda c: (-req[c], c)):
        if req[k] == 0:
            continue
        order = np.argsort(-np.asarray(probs[:, k], np.float64), kind="stable")
        free = order[~taken[order]][: req[k]]
        taken[free] = True
        idx.append(free)
        cls.append(np.full(len(free), k))
        supplied[k] = len(free)
    indices = np.concatenate(idx) if idx else np.zeros(0, np.int64)
    classes = np.concatenate(cls) if cls else np.zeros(0, np.int64)
    return Selection(indices.astype(np.int64), classes.astype(np.int64), req, supplied)


def select_teacher_confidence(probs: np.ndarray, counts: np.ndarray, factor: float) -> Selection:
    """The pool images with the highest maximum teacher probability, as many as the complement would take.
    ``probs`` may be memory-mapped: it is read in blocks of rows."""
    total = int(complement_requests(counts, factor).sum())
    top = np.concatenate([np.asarray(probs[i:i + 65536], np.float64).max(axis=1)
                          for i in range(0, len(probs), 65536)] or [np.zeros(0)])
    order = np.argsort(-top, kind="stable")[:total]
    picked = np.asarray(probs[np.sort(order)], np.float64)[np.argsort(np.argsort(order))]
    return Selection(order.astype(np.int64), picked.argmax(axis=1).astype(np.int64), np.array([total]),
                     np.array([len(order)]))


def select(rule: str, probs: np.ndarray, counts: np.ndarray, factor: float) -> Selection:
    """Dispatch on ``rule`` (``teacher_complement`` or ``teacher_confidence``; ``random`` needs no teacher and is
    drawn by :func:`oefsmc_jax.data.subsets.ood_split`)."""
    if rule == "teacher_complement":
        return select_teacher_complement(probs, counts, factor)
    if rule == "teacher_confidence":
        return select_teacher_confidence(probs, counts, factor)
    raise ValueError(f"oe.selection: {rule!r} is not a teacher rule; allowed: {', '.join(SELECTIONS)}")
