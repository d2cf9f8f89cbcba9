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
from oefsmc_jax.oe.calibration import Calibration
from oefsmc_jax.training.recipe import Recipe

Stage = Callable[[ArchSpec, dict, "CompressionContext"], tuple[ArchSpec, dict]]
BN_MODES = ("joint", "separate")
#: the value of ``oe.lambda_jd``/``oe.eta`` (-1) and ``oe.bn_mode``/``oe.calibration_ood_share`` ("method") that
#: means "the method's own default" (``Method.oe_defaults``); :func:`resolve_oe` replaces it
METHOD_DEFAULT_NUMBER = -1.0
METHOD_DEFAULT = "method"
#: ``oe.calibration_ood_share`` value for the plain ``1 / count(label)`` weighting over ID and OOD rows together
SHARE_COUNT = "count"


@dataclasses.dataclass(frozen=True)
class OESettings:
    """OE-FSMC's settings for one method (method.md §3-§4): joint-distillation weight ``lambda_jd``, regulariser
    weight ``eta`` (0 = R off), the student's BatchNorm mode on ID ∪ OOD (``bn_mode``), and the total weight of
    the OOD rows in every compression-stage objective (``calibration_ood_share``: a fraction in [0, 1), or None
    for ``1 / count(label)`` over ID and OOD rows together, which leaves the OOD share to the counts)."""

    lambda_jd: float = 0.3
    eta: float = 0.1
    bn_mode: str = "joint"
    calibration_ood_share: float | None = None

    def __post_init__(self) -> None:
        for f in ("lambda_jd", "eta"):
            if not getattr(self, f) >= 0:
                fail(f"oe.{f}", f"must be >= 0 (0 switches the term off) or -1 (the method's default), "
                                f"got {getattr(self, f)}")
        if self.bn_mode not in BN_MODES:
            fail("oe.bn_mode", f"must be one of {', '.join(BN_MODES)} or '{METHOD_DEFAULT}' (the method's "
                               f"default), got {self.bn_mode!r}")
        s = self.calibration_ood_share
        if s is not None and not 0.0 <= s < 1.0:
            fail("oe.calibration_ood_share", f"must be a fraction in [0, 1), '{SHARE_COUNT}' or "
                                             f"'{METHOD_DEFAULT}', got {s!r}")

    def describe(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict (share None written as 'count')."""
        d = dataclasses.asdict(self)
        if d["calibration_ood_share"] is None:
            d["calibration_ood_share"] = SHARE_COUNT
        return d


def parse_share(value: Any) -> float | None | str:
    """``oe.calibration_ood_share`` as given: ``METHOD_DEFAULT``, None (``count``) or a float; a bad value fails
    with one line naming the field."""
    if isinstance(value, str):
        v = value.strip().lower()
        if v in (METHOD_DEFAULT, ""):
            return METHOD_DEFAULT
        if v in (SHARE_COUNT, "as_now"):
            return None
        try:
            value = float(v)
        except ValueError:
            fail("oe.calibration_ood_share", f"{value!r} is not allowed; a fraction in [0, 1) such as 0.25, "
                                             f"'{SHARE_COUNT}' (1 / count(label) over all rows) or "
                                             f"'{METHOD_DEFAULT}' (the method's default)")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail("oe.calibration_ood_share", f"{value!r} is not allowed; a fraction in [0, 1), '{SHARE_COUNT}' or "
                                         f"'{METHOD_DEFAULT}'")
    if not 0.0 <= float(value) < 1.0:
        fail("oe.calibration_ood_share", f"must be a fraction in [0, 1), '{SHARE_COUNT}' or '{METHOD_DEFAULT}', "
                                         f"got {value!r}")
    return float(value)


def resolve_oe(config: Any, method: Method | type[Method]) -> OESettings:
    """OE-FSMC's settings of a run: ``config.oe.lambda_jd``, ``eta``, ``bn_mode`` and ``calibration_ood_share``,
    each replaced by ``method.oe_defaults`` where it holds the sentinel (-1 / 'method'). The one place these
    fields are read; a bad value fails with one line naming the field."""
    oe = config.oe if hasattr(config, "oe") else config["oe"]
    get = oe.get if hasattr(oe, "get") else (lambda k, d=None: oe[k] if k in oe else d)
    d = method.oe_defaults

    def number(field: str, default: float) -> float:
        v = get(field, METHOD_DEFAULT_NUMBER)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            fail(f"oe.{field}", f"must be a number >= 0, or -1 for the method's default, got {v!r}")
        return default if float(v) == METHOD_DEFAULT_NUMBER else float(v)

    bn = str(get("bn_mode", METHOD_DEFAULT))
    share = parse_share(get("calibration_ood_share", METHOD_DEFAULT))
    return OESettings(lambda_jd=number("lambda_jd", d.lambda_jd), eta=number("eta", d.eta),
                      bn_mode=d.bn_mode if bn == METHOD_DEFAULT else bn,
                      calibration_ood_share=d.calibration_ood_share if share == METHOD_DEFAULT else share)


def chain(*stages: Stage) -> Stage:
    """One stage that runs ``stages`` in order (like ``optax.chain``)."""

    def run(spec: ArchSpec, variables: dict, ctx: CompressionContext) -> tuple[ArchSpec, dict]:
        for stage in stages:
            spec, variables = stage(spec, variables, ctx)
        return spec, variables

    return run


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
    cpu_fusion: str = "exact"  # the XLA:CPU fusion mode of jitted fitting loops (training/xla_cpu.py)
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
    #: the frozen dataclass of the method's own hyper-parameters, ``config.method.<name>`` (None: it has none);
    #: the base config builds that sub-config from the dataclass's defaults
    config_params: ClassVar[type | None] = None
    #: OE-FSMC's settings for this method where the config leaves them at the sentinel (:func:`resolve_oe`). The
    #: base values are the project's: lambda_jd 0.3 and eta 0.1 from the KD sweep of configs/paper_cifar10.py.
    #: Each method overrides what the validation sweep of configs/methods_sweep_cifar10.py (groups
    #: ``sweep_<method>_*``, rule ``tuning_rule``) chose for it; tests/test_tuning.py ties them to its records.
    oe_defaults: ClassVar[OESettings] = OESettings()

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


#: defaults of the ``config.method`` fields that several methods read: the methods' own dataclass defaults and
#: :func:`shared` take them from here (``config_defaults.base_config`` declares the same values; a test keeps them
#: equal)
SHARED_DEFAULTS: dict[str, Any] = {"prune_ratio": 0.5, "kd_gamma": 0.9, "tau": 4.0, "latency": "macs"}


def shared(cfg: Mapping[str, Any], key: str) -> Any:
    """``config.method.KEY`` for one of :data:`SHARED_DEFAULTS`, or its default where a hand-written method config
    (a plain dict) leaves it out."""
    return cfg.get(key, SHARED_DEFAULTS[key]) if hasattr(cfg, "get") else SHARED_DEFAULTS[key]


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
