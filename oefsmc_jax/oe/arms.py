"""The arms of a run: one table that the run, config validation and the summary all read.

An *arm* is one way of compressing the same teacher on the same few-sample set. All arms of a run share the ID
subset, the OOD pool, the held-out OOD slice and the test split, so they are compared paired. An arm is a small
wrapper around the base method's fine-tuning recipe and a data rule:

* the OOD rule: no OOD images (``None``), the rule in ``oe.selection`` (``"config"``, the ``oe`` arm), or a named
  teacher-guided rule (method.md §4b);
* the ID sampling rule: uniform, or class-balanced (``resample``, a no-OOD rebalancing baseline);
* the supervised term: cross-entropy, or logit-adjusted cross-entropy (``logit_adjust``, Menon et al. 2021), which
  only applies to methods that use labels and is refused for label-free ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from oefsmc_jax import seeds
from oefsmc_jax.data.prepare import DataNeeds, RunData
from oefsmc_jax.data.sources import ImageSet
from oefsmc_jax.errors import fail
from oefsmc_jax.losses import LogitAdjusted
from oefsmc_jax.oe.selection import select


@dataclasses.dataclass(frozen=True)
class Arm:
    """One row of :data:`ARMS`."""

    name: str
    label: str  # report label; {M} is the method's name
    short: str  # summary label, relative to the base method
    ood: str | None = None  # None: no OOD images; "config": oe.selection; else a selection rule
    id_sampling: str = "uniform"  # uniform | class_balanced
    logit_adjust: bool = False
    count: str = "rule"  # rule: the rule's own count; teacher_complement: as many as the teacher complement picks
    reg: str = "rule"  # rule: R as the rule has it (the method's eta random, oe.selection_eta teacher-guided); on; off
    fixed_labels: bool = False  # R's labels: the class each image was chosen for (else drawn from Gamma each step)

    @property
    def needs_teacher_probs(self) -> bool:
        """Whether the arm needs the teacher's probabilities on the pool (its rule or its count)."""
        return self.uses_ood and (self.ood.startswith("teacher_") or self.count == "teacher_complement")

    def eta(self, config: Any, eta: float) -> float:
        """The weight of OE-FSMC's regulariser R in this arm; ``eta`` is the method's (``methods.resolve_oe``:
        ``oe.eta``, or the method's default where it is -1)."""
        if self.reg == "on":
            return float(eta)
        if self.reg == "off":
            return 0.0
        return float(config.oe.selection_eta if self.selection(config).startswith("teacher_") else eta)

    @property
    def uses_ood(self) -> bool:
        """Whether the arm adds OOD images (OE-FSMC)."""
        return self.ood is not None

    def selection(self, config: Any) -> str:
        """The OOD selection rule of this arm under ``config`` ('none' without OOD images)."""
        if self.ood is None:
            return "none"
        return config.oe.selection if self.ood == "config" else self.ood

    def check(self, method: Any) -> None:
        """Refuse (one line) an arm that cannot apply to ``method``."""
        if self.logit_adjust and not method.recipe().uses_labels:
            fail("arms", f"arm {self.name!r} adjusts the cross-entropy on labels, but method {method.name!r} is "
                         "label-free and has none; drop the arm for this method")
        if self.id_sampling == "class_balanced" and not method.recipe().finetunes:
            fail("arms", f"arm {self.name!r} changes how fine-tuning samples images, but method {method.name!r} "
                         "does not fine-tune (enable its fine-tuning or drop the arm)")

    def wrap(self, recipe: Any, counts: np.ndarray) -> Any:
        """The fine-tuning recipe of this arm: the method's, with the supervised term replaced if asked."""
        if not self.logit_adjust:
            return recipe
        prior = np.asarray(counts, np.float64) / np.sum(counts)
        return dataclasses.replace(recipe, label_loss=LogitAdjusted(tuple(float(p) for p in prior)))

    def id_probs(self, labels: np.ndarray, num_classes: int) -> np.ndarray | None:
        """Sampling probabilities of the ID images (None = uniform)."""
        if self.id_sampling == "uniform":
            return None
        return class_balanced_probs(labels, num_classes)


ARMS: dict[str, Arm] = {a.name: a for a in (
    Arm("base", "{M}", "base"),
    Arm("oe", "{M} + OE-FSMC", "+ OE-FSMC", ood="config"),
    Arm("oe_complement", "{M} + OOD by teacher complement", "+ OOD teacher complement", ood="teacher_complement"),
    Arm("oe_confidence", "{M} + OOD by teacher confidence", "+ OOD teacher confidence", ood="teacher_confidence"),
    # arms that separate the causes of the teacher arm's gain: same count as the teacher complement with
    # random images, R on or off; the teacher complement with R on (labels: the class each image was chosen for)
    Arm("oe_random_matched", "{M} + random OOD at the teacher count, R off", "+ random OOD, teacher count, R off",
        ood="random", count="teacher_complement", reg="off"),
    Arm("oe_random_matched_r", "{M} + random OOD at the teacher count, R on", "+ random OOD, teacher count, R on",
        ood="random", count="teacher_complement", reg="on"),
    Arm("oe_complement_r", "{M} + OOD by teacher complement, R on", "+ OOD teacher complement, R on",
        ood="teacher_complement", reg="on", fixed_labels=True),
    Arm("resample", "{M} + class-balanced resampling", "+ resampling", id_sampling="class_balanced"),
    Arm("logit_adjust", "{M} + logit adjustment", "+ logit adj.", logit_adjust=True),
)}


def class_balanced_probs(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Sampling probabilities that draw every class equally often (``1 / n_y``, normalised): the resampling
    baseline."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    p = 1.0 / counts[labels]
    return (p / p.sum()).astype(np.float32)


def arm_names(config: Any) -> list[str]:
    """The arms named in ``config.arms`` (comma separated)."""
    return [a.strip() for a in str(config.arms).split(",") if a.strip()]


def get_arm(name: str) -> Arm:
    """The arm called ``name`` (one-line error listing the allowed names otherwise)."""
    if name not in ARMS:
        fail("arms", f"unknown arm {name!r}; allowed: {', '.join(ARMS)}")
    return ARMS[name]


def arms_of(config: Any) -> list[Arm]:
    """The arms of ``config``, validated by name."""
    names = arm_names(config)
    if not names:
        fail("arms", f"names no arm; allowed: {', '.join(ARMS)} (comma separated)")
    return [get_arm(n) for n in names]


def uses_ood(config: Any) -> bool:
    """Whether any arm of the run needs the OOD pool."""
    return any(a.uses_ood for a in arms_of(config))


def needs_teacher_probs(config: Any) -> bool:
    """Whether any arm of the run needs the teacher's probabilities on the pool."""
    return any(a.needs_teacher_probs for a in arms_of(config)) or (
        any(a.ood == "config" for a in arms_of(config)) and str(config.oe.selection).startswith("teacher_"))


def scores_heldout(config: Any) -> bool:
    """Whether runs score their agreement with the teacher on the held-out OOD slice: to stop early
    (``oe.early_stopping``) or only to record what early stopping would have kept (``oe.track_best``)."""
    return bool(config.oe.early_stopping or config.oe.get("track_best", False))


def data_needs(config: Any) -> DataNeeds:
    """What the run's arms need of the OOD pool: the OOD subset (an arm adds OOD images), the held-out slice (also
    for arms without OOD images when ``oe.early_stopping_arms`` is ``all``), the selection candidates (an arm
    selects with the teacher)."""
    heldout = bool(scores_heldout(config) and config.oe.early_stopping_arms == "all")
    return DataNeeds(ood=uses_ood(config), heldout=heldout, candidates=needs_teacher_probs(config))


@dataclasses.dataclass(frozen=True)
class ArmOOD:
    """The OOD images one arm trains on (None without OE-FSMC), the fixed classes they were chosen for (None when
    R draws them from Gamma each step), and one line saying how they were chosen (None for the drawn subset)."""

    images: ImageSet | None
    labels: np.ndarray | None = None
    note: str | None = None
    warning: str | None = None


def arm_ood(config: Any, arm: Arm, data: RunData, pool_probs: np.ndarray | None) -> ArmOOD:
    """The OOD images of ``arm``: the run's random OOD subset (the paper's rule), the images a teacher-guided rule
    selects from the candidates (``pool_probs``: the teacher's probabilities on them) with the class each was
    chosen for, or, for arms matched to the teacher complement's count, that many random candidates."""
    if not arm.uses_ood:
        return ArmOOD(data.ood)
    rule = arm.selection(config)
    c = config.oe.selection_factor
    if rule != "random":
        sel = select(rule, pool_probs, data.counts, c)
        per_class = np.bincount(sel.classes, minlength=config.data.num_classes).tolist()
        return ArmOOD(data.candidates.take(sel.indices), sel.classes.astype(np.int32),
                      f"{rule}: selected {len(sel.indices)} OOD images (c = {c:g}), per class {per_class}",
                      sel.shortfall_message() if sel.short else None)
    if arm.count == "teacher_complement":
        # random images, as many as the teacher complement would pick: separates the count from the choice
        n = len(select("teacher_complement", pool_probs, data.counts, c).indices)
        idx = np.sort(seeds.rng(config.seed, "count_matched").choice(len(data.candidates), n, replace=False))
        return ArmOOD(data.candidates.take(idx), None,
                      f"random: {n} OOD images, the teacher complement's count (c = {c:g})")
    return ArmOOD(data.ood)


def arm_selection(config: Any, arm: str) -> str:
    """The OOD selection rule of ``arm`` under ``config`` ('none' for arms without OOD images)."""
    return get_arm(arm).selection(config)


def check_arms(arms: Sequence[Arm], method: Any) -> None:
    """Validate every arm against ``method``."""
    for a in arms:
        a.check(method)
