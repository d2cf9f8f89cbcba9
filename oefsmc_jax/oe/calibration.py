"""The compression stage's calibration set (method.md §3): ``D``, plus with OE-FSMC the OOD subset with
complementary (or teacher-chosen) labels, every sample weighted by ``1 / count(its label)``, or with a fixed share
of the total weight on the OOD rows (``oe.calibration_ood_share``). The one place the calibration weights are built:
every data-dependent compression stage reads them from here."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from oefsmc_jax import seeds
from oefsmc_jax.data.prepare import RunData
from oefsmc_jax.data.sources import ImageSet
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
                    seed: int = 0, ood_share: float | None = None) -> Calibration:
    """``D`` (``x_id``, ``y_id``), plus ``ood_x`` when given, labelled by ``ood_labels`` or, without them, by labels
    drawn once from ``gamma`` with ``PRNGKey(seed)``. Weights (mean 1 over the set, so that every objective that
    sums weighted per-sample terms sees them):

    * ``ood_share=None``: every sample weighs ``1 / count(label)`` over ID and OOD rows together, so that each
      class weighs the same (method.md §3); the OOD rows' total weight then follows the counts.
    * ``ood_share=s`` in [0, 1): the OOD rows weigh ``s`` of the total and the ID rows ``1 - s``, each part
      class-balanced within itself (``1 / count(label)`` among its own rows); ``s = 0`` drops the OOD rows. Without
      OOD rows the ID rows carry all the weight.
    """
    x, y = x_id, y_id.astype(np.int32)
    is_ood = np.zeros(len(y), bool)
    if ood_share is not None and not 0.0 <= ood_share < 1.0:
        raise ValueError(f"oe.calibration_ood_share must be in [0, 1), got {ood_share}")
    if ood_share == 0.0:
        ood_x = None
    if ood_x is not None and len(ood_x):
        if ood_labels is None:
            if gamma is None:
                raise ValueError("calibration_set: OOD images need ood_labels or gamma")
            ood_labels = np.asarray(complementary.sample_ood_labels(jax.random.PRNGKey(seed), jnp.asarray(gamma),
                                                                    len(ood_x)))
        x = np.concatenate([x, ood_x])
        y = np.concatenate([y, np.asarray(ood_labels).astype(np.int32)])
        is_ood = np.concatenate([is_ood, np.ones(len(ood_x), bool)])
    if ood_share is None or not is_ood.any():
        w = np.asarray(complementary.balancing_weights(jnp.asarray(y), num_classes))
    else:
        w = np.zeros(len(y), np.float64)
        for part, total in ((~is_ood, 1.0 - ood_share), (is_ood, ood_share)):
            counts = np.bincount(y[part], minlength=num_classes).astype(np.float64)
            wp = 1.0 / counts[y[part]]
            w[part] = wp * total / wp.sum()
        w = (w * len(y)).astype(np.float32)  # mean 1
    return Calibration(x=x, y=y, weights=w, is_ood=is_ood)


def arm_calibration(config: Any, data: RunData, oe_on: bool, gamma: np.ndarray, ood: ImageSet | None = None,
                    ood_labels: np.ndarray | None = None, ood_share: float | None = None) -> Calibration:
    """The calibration set of one arm's compression stage (method.md §3): ``D``, plus with OE (and
    ``oe.in_compression``) the arm's OOD images ``ood`` (by default the run's OOD subset ``data.ood``) carrying
    ``ood_labels`` (by default labels drawn once from Gamma on the ``calibration`` stream), weighted as
    :func:`calibration_set` does with ``ood_share`` (the method's ``calibration_ood_share``;
    :func:`oefsmc_jax.methods.resolve_oe`)."""
    ood = data.ood if ood is None else ood
    with_ood = oe_on and config.oe.in_compression and ood is not None and len(ood)
    return calibration_set(data.train.x, data.train.y, config.data.num_classes,
                           ood_x=ood.x if with_ood else None, ood_labels=ood_labels if with_ood else None,
                           gamma=gamma, seed=seeds.seed(config.seed, "calibration"), ood_share=ood_share)
