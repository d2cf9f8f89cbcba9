"""The interface every few-sample compression method implements.

A method has two stages (method.md §3-5):

* ``compress(ctx)``: turn the teacher into a student, ``(spec, variables) -> (spec', variables')``. Methods whose
  decisions use data (least squares, layer-wise reconstruction, block scoring) read ``ctx.calibration``: the ID
  few-sample set, plus with OE-FSMC the OOD images with complementary labels and class-balancing weights.
  Label-free criteria (L1 norms) ignore it.
* fine-tuning: ``base_loss(student_id, teacher_id, labels)`` is the method's own loss on the ID part of the batch;
  ``jd_kind`` names the distillation signal OE-FSMC's joint distillation applies to ID and OOD images together;
  ``trainable(params)`` says which parameters fine-tuning may change (MiR and PRACTISE freeze some);
  ``finetunes=False`` (FSKD) skips SGD altogether.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from oefsmc_jax import losses
from oefsmc_jax.models import ArchSpec


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Calibration set for data-dependent compression: uint8 images, labels and per-sample weights."""

    x: np.ndarray
    y: np.ndarray
    weights: np.ndarray
    is_ood: np.ndarray


@dataclasses.dataclass(frozen=True)
class CompressionContext:
    """Everything a compression stage may use."""

    teacher_spec: ArchSpec
    teacher_variables: dict
    calibration: Calibration
    mean: tuple[float, ...]
    std: tuple[float, ...]
    key: jax.Array
    mesh: Any = None


class Method:
    """Base class of compression methods; subclasses set the class variables and override the hooks."""

    name: ClassVar[str] = ""
    jd_kind: ClassVar[str] = "logits"  # 'logits' (KL at temperature tau) or 'features' (pre-GAP MSE)
    uses_labels: ClassVar[bool] = True
    needs_teacher: ClassVar[bool] = True
    data_dependent_compression: ClassVar[bool] = False
    finetunes: ClassVar[bool] = True

    def compress(self, ctx: CompressionContext) -> tuple[ArchSpec, dict]:
        """Compression stage: return the student's (spec, variables), initialised from the teacher."""
        raise NotImplementedError

    def base_loss(self, student: dict, teacher: dict | None, labels: jax.Array) -> jax.Array:
        """The method's own fine-tuning loss on the ID images (model outputs have ``logits``/``features``)."""
        raise NotImplementedError

    label_prior: tuple[float, ...] | None = None  # set by with_logit_adjustment

    def label_loss(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
        """The supervised term on ID labels: cross-entropy, or logit-adjusted CE when a prior is set."""
        if self.label_prior is None:
            return losses.cross_entropy(logits, labels)
        return losses.logit_adjusted_cross_entropy(logits, labels, jnp.asarray(self.label_prior, jnp.float32))

    def with_logit_adjustment(self, prior: np.ndarray) -> Method:
        """A copy whose supervised term is logit-adjusted CE with the class ``prior`` (a no-OOD baseline)."""
        out = copy.copy(self)
        out.label_prior = tuple(float(p) for p in prior)
        return out

    def trainable(self, params: dict) -> dict:
        """Pytree of bools over ``params``: True where fine-tuning updates the parameter (default: all)."""
        return jax.tree.map(lambda _: True, params)

    def describe(self) -> str:
        """One line naming the method and its hyper-parameters (for logs and reports)."""
        fields = ", ".join(f"{k}={v}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{self.name}({fields})"
