"""OE-FSMC's own pieces (method.md §2-§4b): the complementary distribution, the OOD subset and its selection rules,
the calibration set with class-aware weights, and the table of arms."""

from oefsmc_jax.oe.arms import ARMS, Arm, arm_names, arm_selection, arms_of, class_balanced_probs, uses_ood
from oefsmc_jax.oe.calibration import Calibration, calibration_set
from oefsmc_jax.oe.selection import SELECTIONS, Selection, select

__all__ = ["ARMS", "SELECTIONS", "Arm", "Calibration", "Selection", "arm_names", "arm_selection", "arms_of",
           "calibration_set", "class_balanced_probs", "select", "uses_ood"]
