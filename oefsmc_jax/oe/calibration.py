"""The compression stage's calibration set (method.md §3): ``D``, plus with OE-FSMC the OOD subset with
complementary (or teacher-chosen) labels, every sample weighted by ``1 / count(its label)``."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from oefsmc_jax.oe import complementary


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Calibration set for data-dependent compression: uint8 images, labels and per-sample weights (mean 1)."""

    x: np.ndarray
    y: np.ndarray
    weights: np.ndarray
    is_ood: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


def calibration_set(x_id: np.ndarray, y_id: np.ndarray, num_classes: int, *, ood_x: np.ndarray | None = None,
                    ood_labels: np.ndarray | None = None, gamma: np.ndarray | None = None,
                    seed: int = 0) -> Calibration:
    """``D`` (``x_id``, ``y_id``), plus ``ood_x`` when given, labelled by ``ood_labels`` or, without them, by labels
    drawn once from ``gamma`` with ``PRNGKey(seed)``; every sample weighs ``1 / count(label)`` (normalised to mean
    1), so that each class weighs the same in an objective that sums weighted per-sample terms."""
    x, y = x_id, y_id.astype(np.int32)
    is_ood = np.zeros(len(y), bool)
    if ood_x is not None and len(ood_x):
        if ood_labels is None:
            if gamma is None:
                raise ValueError("calibration_set: OOD images need ood_labels or gamma")
            ood_labels = np.asarray(complementary.sample_ood_labels(jax.random.PRNGKey(seed), jnp.asarray(gamma),
                                                                    len(ood_x)))
        x = np.concatenate([x, ood_x])
        y = np.concatenate([y, np.asarray(ood_labels).astype(np.int32)])
        is_ood = np.concatenate([is_ood, np.ones(len(ood_x), bool)])
    w = np.asarray(complementary.balancing_weights(jnp.asarray(y), num_classes))
    return Calibration(x=x, y=y, weights=w, is_ood=is_ood)
