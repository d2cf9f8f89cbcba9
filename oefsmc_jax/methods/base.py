"""The interface every few-sample compression method implements (method.md §3-§5, design.md).

A method is one frozen dataclass of its hyper-parameters (defaults, validation in ``__post_init__``,
``from_config``) with two parts, in the spirit of optax's small composable transformations:

* its **compression stage**, a chain of pure stages ``(spec, variables, ctx) -> (spec, variables)`` (``stages()``;
  ``compress(ctx)`` runs the chain on the teacher). Data-dependent stages read ``ctx.calibration`` (the few-sample
  set, plus with OE-FSMC the OOD images with complementary labels and class-aware weights) and use the services of
  :class:`CompressionContext`: activations at named points, an inner fitting loop, latency.
* its **fine-tuning recipe** (``recipe()``): the base loss on the ID images, the distillation signal OE-FSMC's joint
  distillation uses on ID ∪ OOD, which top-level parameter modules stay frozen, whether to fine-tune at all.

Adding a method is one file plus one line in ``oefsmc_jax.methods.METHODS``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from oefsmc_jax.data.augment import normalize
from oefsmc_jax.errors import fail
from oefsmc_jax.models import ArchSpec, build_model
from oefsmc_jax.models.probe import forward
from oefsmc_jax.oe.arms import CrossEntropy
from oefsmc_jax.oe.calibration import Calibration

Stage = Callable[[ArchSpec, dict, "CompressionContext"], tuple[ArchSpec, dict]]
DISTILL = ("logits", "features")


def chain(*stages: Stage) -> Stage:
    """One stage that runs ``stages`` in order (like ``optax.chain``)."""

    def run(spec: ArchSpec, variables: dict, ctx: CompressionContext) -> tuple[ArchSpec, dict]:
        for stage in stages:
            spec, variables = stage(spec, variables, ctx)
        return spec, variables

    return run


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a method fine-tunes its student (method.md §4-5). Hashable, so equal recipes share a compiled step.

    ``loss(student, teacher, labels, label_loss)`` is the method's own loss on the ID part of the batch (model
    outputs have ``logits`` and ``features``; ``label_loss(logits, labels)`` is the supervised term, which the
    ``logit_adjust`` arm replaces). ``distill`` is the signal of OE-FSMC's joint distillation: ``logits``
    (``tau^2 KL``) or ``features`` (pre-GAP MSE). ``frozen`` names top-level parameter modules that get neither
    updates nor weight decay (MiR's classifier).
    """

    loss: Callable[..., Any]
    distill: str = "logits"
    frozen: tuple[str, ...] = ()
    finetunes: bool = True
    needs_teacher: bool = True
    uses_labels: bool = True
    label_loss: Callable[[Any, Any], Any] = CrossEntropy()

    def __post_init__(self) -> None:
        if self.distill not in DISTILL:
            raise ValueError(f"distill must be one of {DISTILL}, got {self.distill!r}")

    def _key(self) -> tuple:
        # a bound method compares by the identity of its object; compare the (hashable, frozen) object by value,
        # so the recipes of two equal method objects (e.g. two cells of a grid) are equal and share compiled steps
        def value(f: Any) -> Any:
            obj, func = getattr(f, "__self__", None), getattr(f, "__func__", None)
            return ("bound", func, obj) if obj is not None and func is not None else f

        return tuple(value(getattr(self, f.name)) for f in dataclasses.fields(self))

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._key() == other._key()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._key())

    def base_loss(self, student: dict, teacher: dict | None, labels: jax.Array) -> jax.Array:
        """The method's loss on the ID images with this recipe's supervised term."""
        return self.loss(student, teacher, labels, self.label_loss)

    def trainable(self, params: Mapping[str, Any]) -> Any:
        """Pytree of bools over ``params``: False under the frozen modules."""
        return {k: jax.tree.map(lambda _, f=k in self.frozen: not f, v) for k, v in params.items()}


@dataclasses.dataclass(frozen=True)
class CompressionContext:
    """Everything a compression stage may use: the teacher, the calibration set and the services."""

    teacher_spec: ArchSpec
    teacher_variables: dict
    calibration: Calibration
    mean: tuple[float, ...]
    std: tuple[float, ...]
    key: jax.Array
    mesh: Any = None
    workdir: pathlib.Path | None = None  # where stages write what they decided (scores, latencies)
    latency: str = "macs"  # measure | macs: how stages that need latency get it
    batch_size: int = 256
    log: Callable[[str], None] = dataclasses.field(default=lambda s: print(s, file=sys.stderr, flush=True))

    def images(self, idx: np.ndarray | None = None) -> jax.Array:
        """The calibration images (or a subset), normalised float32 NHWC."""
        x = self.calibration.x if idx is None else self.calibration.x[np.asarray(idx)]
        return normalize(jnp.asarray(x), jnp.asarray(self.mean, jnp.float32), jnp.asarray(self.std, jnp.float32))

    def activations(self, spec: ArchSpec, variables: dict, points: Sequence[str], *, x: jax.Array | None = None,
                    train: bool = False, edits: Mapping[str, Callable] | None = None,
                    keep: Sequence[str] | None = None) -> dict[str, jax.Array]:
        """Activations at named ``points`` (see ``models.probe``) of ``(spec, variables)`` on ``x`` (default: the
        whole calibration set, normalised), in train (batch statistics) or eval BatchNorm mode, in batches of
        ``batch_size`` (train mode: one batch, as BatchNorm statistics depend on it).

        ``keep`` returns only those of ``points``: a stage that visits points one by one passes all of them every
        time, so one compiled forward serves every point, and keeps one (memory: one batch of every point).
        """
        x = self.images() if x is None else x
        fn = _activation_fn(spec, tuple(points), train, edits is not None)
        keep = list(points) if keep is None else list(keep)

        def run(xb):
            out = fn(variables, xb, edits) if edits is not None else fn(variables, xb)
            return {k: out[k] for k in keep}

        if train or len(x) <= self.batch_size:
            return run(x)
        parts = [run(x[i:i + self.batch_size]) for i in range(0, len(x), self.batch_size)]
        return {k: jnp.concatenate([p[k] for p in parts]) for k in keep}

    def record(self, name: str, obj: Any) -> None:
        """Write what a stage decided to ``workdir/compression/NAME.json`` (process 0 only)."""
        if self.workdir is None or jax.process_index() != 0:
            return
        from oefsmc_jax import paths

        paths.write_text_atomic(paths.as_path(self.workdir) / "compression" / f"{name}.json",
                                json.dumps(obj, indent=1, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.ndarray, jax.Array)):
        return np.asarray(o).tolist()
    if isinstance(o, np.generic):
        return o.item()
    return str(o)


@functools.lru_cache(maxsize=128)
def _activation_fn(spec: ArchSpec, points: tuple[str, ...], train: bool, with_edits: bool) -> Callable:
    """The forward that captures ``points`` of ``spec``: jitted once per (spec, points, mode); with edits (functions
    that may close over arrays being fitted) it is traced on every call instead."""
    model = build_model(spec)
    if with_edits:
        return lambda v, x, e: forward(model, v, x, train=train, capture=points, edits=e)[1]
    return jax.jit(lambda v, x: forward(model, v, x, train=train, capture=points)[1])


@dataclasses.dataclass(frozen=True)
class Method:
    """Base class: subclasses are frozen dataclasses of their hyper-parameters and set ``name``."""

    name: ClassVar[str] = ""
    uses_calibration: ClassVar[bool] = False  # True if a compression stage reads the calibration set

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], spec: ArchSpec) -> Method:
        """Build from ``config.method`` (a mapping) for the teacher ``spec``; bad values fail with one line."""
        raise NotImplementedError

    def stages(self, spec: ArchSpec) -> tuple[Stage, ...]:
        """The compression stage of this method for a teacher of ``spec``, as a chain of pure stages."""
        raise NotImplementedError

    def recipe(self) -> Recipe:
        """The fine-tuning recipe."""
        raise NotImplementedError

    def compress(self, ctx: CompressionContext) -> tuple[ArchSpec, dict]:
        """Run the compression stage on the teacher: the student's ``(spec, variables)``. A requested preemption
        stops it before the next stage (and inside the long stages, before their next unit): ``Preempted``."""
        from oefsmc_jax.training import preemption

        stages = self.stages(ctx.teacher_spec)
        spec, variables = ctx.teacher_spec, ctx.teacher_variables
        for i, stage in enumerate(stages):
            preemption.check(f"{self.name}, {i} of {len(stages)} stages done")
            spec, variables = stage(spec, variables, ctx)
        return spec, variables

    def describe(self) -> str:
        """One line naming the method and its hyper-parameters (for logs, reports and records)."""
        fields = ", ".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))
        return f"{self.name}({fields})"


def prune_ratios(value: Any, num_stages: int, field: str = "method.prune_ratio") -> tuple[float, ...]:
    """Per-stage prune ratios from a float or a sequence, each in [0, 1) (one-line ``ConfigError`` otherwise)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        ratios = (float(value),) * num_stages
    else:
        ratios = tuple(float(v) for v in value)
        if len(ratios) != num_stages:
            fail(field, f"expected 1 or {num_stages} values (one per stage), got {len(ratios)}")
    for r in ratios:
        if not 0.0 <= r < 1.0:
            fail(field, f"{r} is outside the allowed range [0, 1)")
    return ratios


def sub_config(cfg: Mapping[str, Any], name: str) -> dict[str, Any]:
    """``config.method.NAME`` as a plain dict ({} when absent)."""
    sub = cfg.get(name) if hasattr(cfg, "get") else None
    if sub is None:
        return {}
    return dict(sub.to_dict() if hasattr(sub, "to_dict") else sub)


def hparams_from(cls: type, sub: Mapping[str, Any], field: str, **extra: Any) -> Any:
    """Instantiate the dataclass ``cls`` from ``sub`` (+ ``extra``), refusing unknown keys in one line."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(sub) - names)
    if unknown:
        fail(f"{field}.{unknown[0]}", f"unknown field; allowed: {', '.join(sorted(names - set(extra)))}")
    return cls(**{**{k: v for k, v in sub.items()}, **extra})
