"""PRACTISE (Wang et al., CVPR 2023): drop the residual blocks that are easiest to recover, then fine-tune with MiR,
as the official code (DoctorKey/Practise) does it (baselines.md §2).

Compression stage:

1. Candidates are blocks ``1..n-1`` of every stage (block 0 never), in forward order.
2. Each candidate is scored on its own: the student is the model with only that block's gate at 0; identity
   1x1 adaptors (C x C matrices, no bias) are inserted around the gap (:func:`adaptor_points`, §2.3) and **only the
   adaptors** are trained, both networks in eval mode, on the pre-GAP feature MSE against the teacher, weighted
   per sample by the calibration weights (``sum w_i mse_i / sum w_i``; all ones without OE-FSMC): SGD lr 0.02,
   momentum 0.9, weight decay 1e-4 (coupled, PyTorch-style, so it pulls the adaptors towards 0), lr x0.1 at 40 %
   and 80 % of T, batch 64 drawn from the calibration set with pad-4 random crop + flip (the [choice] for CIFAR).
   T is ``method.practise.fit_steps``: the official scripts use 2,000; the default here is 300 so a CPU grid can
   afford it (say so when reporting results).
3. Recoverability = the weighted pre-GAP MSE after the fit over the whole calibration set in the test-time view
   (no augmentation; the same images as the fit, §2.2 step 4). ``score = recoverability / latency reduction (%)``,
   latency from :func:`oefsmc_jax.models.latency.latency_cost` (``config.method.latency``: ``measure`` = median ms
   of a jitted forward, ``macs`` = analytic MACs; with MACs every block of a CIFAR ResNet stage costs the same).
4. The ``k`` lowest-score blocks are dropped together (or, with ``latency_target``, the smallest ``k`` whose chosen
   set reaches that latency reduction, a [choice] the official code does not have); the adaptors are discarded.
   With neither set, the target is :data:`DEFAULT_LATENCY_TARGET` % (the paper's ResNet-34 setting), so the method
   runs on any ResNet with a droppable block.
   Everything decided is written to ``workdir/compression/practise.json``.

All candidates share one compiled fitting loop (``methods/fit.py``): the adaptors of every candidate's positions
are inputs of the same program, and a candidate's positions are switched on by a boolean per position; a position
that is off passes its activation through untouched and gets no gradient, so a candidate's adaptors follow exactly
the trajectory they would follow alone. The price: every fit back-propagates from the first position of the union
(early in stage 0), not from its own first position. Cost on CPU: one adaptor-fit step of CIFAR ResNet-56 (batch 64,
teacher forward + student forward and backward) takes seconds on two cores, so 24 candidates x ``fit_steps`` steps
are hours at the default 300; on a GPU it is minutes.

Fine-tuning: MiR (``methods/mir.py``). With OE-FSMC, the calibration set's OOD images and class-aware weights enter
the adaptor fit and the recoverability, so they change which blocks are dropped.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from oefsmc_jax.data.augment import augment_batch, normalize
from oefsmc_jax.errors import fail
from oefsmc_jax.methods.base import CompressionContext, Method, OESettings, Stage, hparams_from, shared, sub_config
from oefsmc_jax.methods.fit import FitConfig, fit
from oefsmc_jax.methods.mir import MIR_RECIPE
from oefsmc_jax.models import ArchSpec, build_model, count_flops, drop_blocks, droppable_blocks, shrink
from oefsmc_jax.models.latency import LATENCY_MODES, latency_cost
from oefsmc_jax.models.probe import forward, points
from oefsmc_jax.training import preemption
from oefsmc_jax.training.parallel import make_mesh, num_devices
from oefsmc_jax.training.recipe import Recipe

FIELD = "method.practise"
# The latency reduction (%) PRACTISE reaches when neither k nor latency_target is set: the ResNet-34 setting of the
# official scripts (exp/r34_reduce_16_lat.sh, baselines.md §2.5). A target rather than a k fits every depth.
DEFAULT_LATENCY_TARGET = 16.0


def _int(v: Any, name: str) -> int:
    try:
        ok = not isinstance(v, bool) and float(v) == int(v)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        fail(f"{FIELD}.{name}", f"must be an integer, got {v!r}")
    return int(v)


def _float(v: Any, name: str) -> float:
    try:
        if isinstance(v, bool):
            raise TypeError
        return float(v)
    except (TypeError, ValueError):
        fail(f"{FIELD}.{name}", f"must be a number, got {v!r}")
    raise AssertionError  # unreachable: fail raises


@dataclasses.dataclass(frozen=True)
class PractiseParams:
    """``config.method.practise``. Set at most one of ``k`` (blocks to drop) and ``latency_target`` (wanted
    latency reduction in %); 0 means unset (so both can be overridden from the command line), and with neither set
    the target is :data:`DEFAULT_LATENCY_TARGET`."""

    k: int = 0
    latency_target: float = 0.0
    fit_steps: int = 300  # official 2,000; shortened for CPU grids [choice]
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 64
    pad: int = 4  # random-crop padding of the adaptor fit (0 = off)
    flip: bool = True
    latency_batch: int = 128  # images per timed forward with method.latency=measure

    def __post_init__(self) -> None:
        set_ = lambda name, v: object.__setattr__(self, name, v)
        for name in ("k", "fit_steps", "batch_size", "pad", "latency_batch"):
            set_(name, _int(getattr(self, name), name))
        for name in ("latency_target", "lr", "momentum", "weight_decay"):
            set_(name, _float(getattr(self, name), name))
        if not isinstance(self.flip, (bool, np.bool_)):
            fail(f"{FIELD}.flip", f"must be true or false, got {self.flip!r}")
        set_("flip", bool(self.flip))
        if self.k < 0:
            fail(f"{FIELD}.k", f"must be >= 1 (or 0 = unset), got {self.k}")
        if not 0.0 <= self.latency_target < 100.0:
            fail(f"{FIELD}.latency_target", f"must be a reduction in % in (0, 100) (or 0 = unset), got "
                                           f"{self.latency_target}")
        for name in ("fit_steps", "batch_size", "latency_batch"):
            if getattr(self, name) < 1:
                fail(f"{FIELD}.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.pad < 0:
            fail(f"{FIELD}.pad", f"must be >= 0, got {self.pad}")
        if not self.lr > 0:
            fail(f"{FIELD}.lr", f"must be > 0, got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            fail(f"{FIELD}.momentum", f"must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            fail(f"{FIELD}.weight_decay", f"must be >= 0, got {self.weight_decay}")

    def check_choice(self) -> None:
        """Fail when both ``k`` and ``latency_target`` are set."""
        if self.k > 0 and self.latency_target > 0:
            fail(f"{FIELD}.k", f"set at most one of {FIELD}.k (blocks to drop) and {FIELD}.latency_target "
                               f"(latency reduction in %), got both")

    @property
    def target(self) -> float:
        """The latency reduction (%) to reach: 0 when ``k`` is set, else ``latency_target`` or the default."""
        if self.k > 0:
            return 0.0
        return self.latency_target or DEFAULT_LATENCY_TARGET


# ---------------------------------------------------------------------- candidates and adaptor placement
def candidates(spec: ArchSpec) -> list[tuple[int, int]]:
    """The blocks PRACTISE may drop: kept blocks ``1..n-1`` of every stage (block 0 never), in forward order."""
    if not spec.is_resnet:
        return []
    return [(s, b) for s, b in droppable_blocks(spec) if b > 0]


def _has_proj(spec: ArchSpec, s: int, b: int) -> bool:
    return spec.shortcut == "B" and not spec.identity_shortcut(s, b)


def adaptor_points(spec: ArchSpec, stage: int, block: int) -> tuple[str, ...]:
    """The probe points of the adaptors that recover the removal of block ``(stage, block)`` (baselines.md §2.3),
    in forward order.

    *After* adaptors (``PATH:out``, a conv's output before its BN): the last conv (``conv2``; bottleneck ``conv3``)
    of every kept block of the stage before the gap, and the projection conv of the stage's first block when it
    has one (option B). *Pre* adaptors (``PATH:in``, a conv's input): ``conv1`` of every kept block of the stage
    after the gap, and ``conv1`` and, separately, ``proj_conv`` of the next stage's first kept block. Identity and
    option-A (zero-pad) shortcuts and the stem get none; after the last stage there is nothing to adapt.
    """
    if (stage, block) not in candidates(spec):
        raise ValueError(f"block ({stage},{block}) is not a PRACTISE candidate of this architecture; candidates: "
                         f"{candidates(spec)}")
    last = "conv2" if spec.block == "basic" else "conv3"
    name = spec.block_name
    kept = [b for b, k in enumerate(spec.kept[stage]) if k]
    pts = []
    for b in kept:
        if b < block:
            pts.append(f"{name(stage, b)}/{last}:out")
            if _has_proj(spec, stage, b):
                pts.append(f"{name(stage, b)}/proj_conv:out")
    pts += [f"{name(stage, b)}/conv1:in" for b in kept if b > block]
    nxt = next(((s, b) for s, b in spec.blocks() if s > stage), None)
    if nxt is not None:
        pts.append(f"{name(*nxt)}/conv1:in")
        if _has_proj(spec, *nxt):
            pts.append(f"{name(*nxt)}/proj_conv:in")
    return tuple(pts)


def identity_adaptors(spec: ArchSpec, variables: dict, image_size: int,
                      pts: tuple[str, ...]) -> dict[str, jax.Array]:
    """One identity matrix ``C x C`` per point (``C`` = the channels there)."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, spec.in_channels), jnp.float32)
    shapes = points(build_model(spec), variables, x)
    return {p: jnp.eye(shapes[p][-1], dtype=jnp.float32) for p in pts}


def adaptor_edits(adaptors: Mapping[str, jax.Array], use: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Probe edits ``a -> a @ P`` for ``models.probe.forward``; where ``use[point]`` is False the activation passes
    through untouched (and ``P`` gets no gradient). The product is taken at full float32 precision, so an identity
    adaptor is exact on every backend."""

    def edit(a, P, on):
        out = jnp.matmul(a, P.astype(a.dtype), precision=lax.Precision.HIGHEST)
        return out if on is None else jnp.where(on, out, a)

    use = use or {}
    return {p: functools.partial(edit, P=P, on=use.get(p)) for p, P in adaptors.items()}


# ---------------------------------------------------------------------- the compiled pieces (cached per spec)
def _per_sample_mse(a: jax.Array, b: jax.Array) -> jax.Array:
    d = (a.astype(jnp.float32) - b.astype(jnp.float32)) ** 2
    return jnp.mean(d.reshape(d.shape[0], -1), axis=-1)


@functools.lru_cache(maxsize=16)
def _adaptor_loss(spec: ArchSpec, teacher_spec: ArchSpec, mean: tuple[float, ...], std: tuple[float, ...], pad: int,
                  flip: bool):
    """``loss_fn(adaptors, batch, keys, consts)`` of the adaptor fit, for ``fit``: the weighted pre-GAP MSE on an
    augmented batch, both networks in eval mode; returns ``(sum w_i mse_i, sum w_i)``."""
    student, teacher = build_model(spec), build_model(teacher_spec)
    mean_a, std_a = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)

    def loss_fn(adaptors, batch, keys, consts):
        x = batch["x"]
        if pad or flip:
            x = augment_batch(keys, x, pad=pad, flip=flip)
        x = normalize(x, mean_a, std_a)
        t = lax.stop_gradient(teacher.apply(consts["teacher"], x, train=False)["features"])
        out, _ = forward(student, consts["student"], x, train=False, edits=adaptor_edits(adaptors, consts["use"]))
        w = batch["w"]
        return jnp.sum(w * _per_sample_mse(out["features"], t)), jnp.sum(w)

    return loss_fn


@functools.lru_cache(maxsize=16)
def _features_fn(spec: ArchSpec):
    """Jitted ``(adaptors, use, variables, x) -> pre-GAP features`` (eval mode)."""
    model = build_model(spec)
    return jax.jit(lambda a, use, v, x: forward(model, v, x, train=False, edits=adaptor_edits(a, use))[0]["features"])


@functools.lru_cache(maxsize=16)
def _optimizer(lr: float, momentum: float, weight_decay: float, steps: int) -> optax.GradientTransformation:
    """PyTorch SGD with coupled weight decay and StepLR(int(0.4 T), 0.1): x0.1 at 40 % and 80 % of T."""
    schedule = optax.exponential_decay(lr, transition_steps=max(1, int(0.4 * steps)), decay_rate=0.1,
                                       staircase=True)
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(schedule, momentum=momentum))


def adapted_features(spec: ArchSpec, variables: dict, adaptors: Mapping[str, jax.Array], use: Mapping[str, Any],
                     x: jax.Array, batch_size: int = 256) -> np.ndarray:
    """Pre-GAP features of ``(spec, variables)`` with ``adaptors`` (switched on where ``use`` says) on all of ``x``
    (normalised; eval mode), in batches of ``batch_size`` (the last one padded, so there is one compile)."""
    run = _features_fn(spec)
    n = int(x.shape[0])
    bs = max(1, min(int(batch_size), n))
    parts = []
    for i in range(0, n, bs):
        xb = x[i:i + bs]
        m = int(xb.shape[0])
        if m < bs:
            xb = jnp.concatenate([xb, jnp.zeros((bs - m, *xb.shape[1:]), xb.dtype)])
        parts.append(np.asarray(run(dict(adaptors), dict(use), variables, xb))[:m])
    return np.concatenate(parts)


def weighted_feature_mse(spec: ArchSpec, variables: dict, adaptors: Mapping[str, jax.Array],
                         use: Mapping[str, Any], x: jax.Array, teacher_features: Any, weights: np.ndarray,
                         batch_size: int = 256) -> float:
    """``sum w_i mse_i / sum w_i`` of the pre-GAP features of ``(spec, variables)`` with ``adaptors`` against
    ``teacher_features`` over all of ``x`` (``mse_i``: the element mean of sample ``i``'s squared error)."""
    s = adapted_features(spec, variables, adaptors, use, x, batch_size).astype(np.float64)
    d = (s - np.asarray(teacher_features, np.float64)) ** 2
    mse = d.reshape(len(d), -1).mean(-1)
    w = np.asarray(weights, np.float64)
    return float(np.sum(w * mse) / np.sum(w))


# ---------------------------------------------------------------------- latency
def _latency(spec: ArchSpec, variables: dict, image_size: int, mode: str, batch: int) -> float:
    return float(latency_cost(*shrink(spec, variables), image_size, mode, batch))


def _reduction(base: float, lat: float) -> float:
    return (base - lat) / base * 100.0


# ---------------------------------------------------------------------- the stage
def practise_stage(p: PractiseParams) -> Stage:
    """Score every candidate block, then drop the chosen ones (gate 0); writes ``compression/practise.json``."""
    p.check_choice()

    def stage(spec: ArchSpec, variables: dict, ctx: CompressionContext) -> tuple[ArchSpec, dict]:
        cands = candidates(spec)
        if not cands:
            fail("method.name", f"practise drops residual blocks 1..n-1 of a stage; this {spec.family} has none")
        if p.k > len(cands):
            fail(f"{FIELD}.k", f"{p.k} blocks requested but there are only {len(cands)} candidates")
        if ctx.latency not in LATENCY_MODES:
            fail("method.latency", f"must be one of {', '.join(LATENCY_MODES)}, got {ctx.latency!r}")
        mesh = ctx.mesh if ctx.mesh is not None else make_mesh(1)
        if p.batch_size % num_devices(mesh):
            fail(f"{FIELD}.batch_size", f"{p.batch_size} is not divisible by the device count {num_devices(mesh)}")
        cal = ctx.calibration
        image_size = int(cal.x.shape[1])
        weights = np.asarray(cal.weights, np.float32)
        t_spec, t_vars = ctx.teacher_spec, ctx.teacher_variables

        placement = {c: adaptor_points(spec, *c) for c in cands}
        union = tuple(dict.fromkeys(pt for c in cands for pt in placement[c]))
        eye = identity_adaptors(spec, variables, image_size, union)
        x_all = ctx.images()
        if t_spec == spec:  # the teacher through the compiled student forward, every adaptor off
            t_feat = adapted_features(spec, t_vars, eye, {pt: jnp.asarray(False) for pt in union}, x_all,
                                      ctx.batch_size)
        else:
            t_feat = np.asarray(ctx.activations(t_spec, t_vars, ["features"], x=x_all)["features"])
        loss_fn = _adaptor_loss(spec, t_spec, tuple(ctx.mean), tuple(ctx.std), p.pad, p.flip)
        fit_cfg = FitConfig(tx=_optimizer(p.lr, p.momentum, p.weight_decay, p.fit_steps), steps=p.fit_steps,
                            batch_size=p.batch_size, mesh=mesh, cpu_fusion=ctx.cpu_fusion)
        data = {"x": np.asarray(cal.x), "w": weights}
        base_lat = _latency(t_spec, t_vars, image_size, ctx.latency, p.latency_batch)
        if p.target > 0:  # fail before the fits if even dropping every candidate is not enough
            best = _reduction(base_lat, _latency(spec, drop_blocks(spec, variables, cands)[1], image_size,
                                                 ctx.latency, p.latency_batch))
            if best < p.target:
                fail(f"{FIELD}.latency_target", f"{p.target:g} % is out of reach: dropping all "
                                                f"{len(cands)} candidates reduces latency by {best:.3g} %")

        rows = []
        for i, (s, b) in enumerate(cands):
            preemption.check(f"practise, {i} of {len(cands)} candidate blocks scored")
            pts = placement[(s, b)]
            _, s_vars = drop_blocks(spec, variables, [(s, b)])
            use = {pt: jnp.asarray(pt in pts) for pt in union}
            before = weighted_feature_mse(spec, s_vars, eye, use, x_all, t_feat, weights, ctx.batch_size)
            fitted, losses = fit(loss_fn, eye, data, config=fit_cfg, key=jax.random.fold_in(ctx.key, i),
                                 consts={"student": s_vars, "teacher": t_vars, "use": use})
            rec = weighted_feature_mse(spec, s_vars, fitted, use, x_all, t_feat, weights, ctx.batch_size)
            lat = _latency(spec, s_vars, image_size, ctx.latency, p.latency_batch)
            red = _reduction(base_lat, lat)
            # no latency gain, or a fit that diverged: never preferred
            score = rec / red if red > 0 and np.isfinite(rec) else float("inf")
            delta = max(float(jnp.max(jnp.abs(fitted[pt] - eye[pt]))) for pt in pts) if pts else 0.0
            rows.append({"block": spec.block_name(s, b), "stage": s, "index": b, "adaptors": list(pts),
                         "mse_identity": before, "recoverability": rec, "fit_loss_first": float(losses[0]),
                         "fit_loss_last": float(losses[-1]), "adaptor_max_change": delta, "latency": lat,
                         "latency_reduction": red, "score": score})
            ctx.log(f"practise: {spec.block_name(s, b)} ({i + 1}/{len(cands)}): recoverability {rec:.4g} "
                    f"(identity adaptors {before:.4g}), latency reduction {red:.3g} %, score {score:.4g}")

        order = sorted(range(len(cands)), key=lambda j: rows[j]["score"])  # stable: ties keep forward order
        if p.k > 0:
            chosen = [cands[j] for j in order[:p.k]]
            _, out = drop_blocks(spec, variables, chosen)
            chosen_red = _reduction(base_lat, _latency(spec, out, image_size, ctx.latency, p.latency_batch))
        else:
            chosen, out, chosen_red = [], variables, 0.0
            for k in range(1, len(cands) + 1):
                chosen = [cands[j] for j in order[:k]]
                _, out = drop_blocks(spec, variables, chosen)
                chosen_red = _reduction(base_lat, _latency(spec, out, image_size, ctx.latency, p.latency_batch))
                if chosen_red >= p.target:
                    break
            else:
                fail(f"{FIELD}.latency_target", f"{p.target:g} % is out of reach: dropping all "
                                                f"{len(cands)} candidates reduces latency by {chosen_red:.3g} %")
        names = [spec.block_name(s, b) for s, b in chosen]
        ctx.log(f"practise: dropping {', '.join(names)} (latency reduction {chosen_red:.3g} %, {ctx.latency})")
        ctx.record("practise", {
            "latency_mode": ctx.latency, "teacher_latency": base_lat, "fit_steps": p.fit_steps,
            "batch_size": p.batch_size, "images": len(weights), "ood_images": int(np.sum(cal.is_ood)),
            "weights_uniform": bool(np.allclose(weights, weights[0])),
            "candidates": [{k: None if isinstance(v, float) and not np.isfinite(v) else v for k, v in r.items()}
                           for r in rows],
            "order": [rows[j]["block"] for j in order], "k": len(chosen),
            "latency_target": p.target or None, "chosen": names, "chosen_latency_reduction": chosen_red,
        })
        return spec, out

    return stage


@dataclasses.dataclass(frozen=True)
class PRACTISE(Method):
    """Drop the k residual blocks with the lowest recoverability / latency reduction, then fine-tune with MiR."""

    params: PractiseParams = PractiseParams(k=1)
    name = "practise"
    config_params = PractiseParams
    # R off: the MiR recipe is label-free (see mir.py); lambda_jd, and no weight for OOD rows in the recoverability
    # scores (they change only which blocks are dropped), chosen on the validation split by the sweep of
    # configs/methods_sweep_cifar10.py (groups sweep_practise_lambda, sweep_practise_share)
    oe_defaults: ClassVar[OESettings] = OESettings(lambda_jd=1.0, eta=0.0, calibration_ood_share=0.0)
    uses_calibration = True

    def __post_init__(self) -> None:
        self.params.check_choice()

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], spec: ArchSpec) -> PRACTISE:
        """``method.practise.*`` (at most one of ``k`` and ``latency_target``); with ``method.latency=macs`` an
        unreachable latency target fails here already."""
        p = hparams_from(PractiseParams, sub_config(cfg, "practise"), FIELD)
        p.check_choice()
        cands = candidates(spec)
        if not cands:
            cifar = spec.family == "cifar_resnet"
            hint = " (a CIFAR ResNet needs depth >= 14, e.g. arch.name=resnet14)" if cifar else ""
            fail("method.name", f"practise drops residual blocks 1..n-1 of a stage; this {spec.family} has none"
                                f"{hint}")
        if p.k > len(cands):
            fail(f"{FIELD}.k", f"{p.k} blocks requested but the teacher has only {len(cands)} candidates")
        if p.target > 0 and shared(cfg, "latency") == "macs":
            kept = [list(st) for st in spec.kept]
            for s, b in cands:
                kept[s][b] = False
            # MAC shares do not depend on the image size (every map scales alike): use the family's nominal one
            size = 32 if spec.family == "cifar_resnet" else 224
            best = _reduction(count_flops(spec, size), count_flops(spec.with_kept(kept), size))
            if best < p.target:
                fail(f"{FIELD}.latency_target", f"{p.target:g} % is out of reach: dropping all "
                                                f"{len(cands)} candidates saves {best:.3g} % of the MACs")
        return cls(p)

    def stages(self, spec: ArchSpec) -> tuple[Stage, ...]:
        """Score every candidate block and drop the chosen ones."""
        return (practise_stage(self.params),)

    def recipe(self) -> Recipe:
        """MiR: pre-GAP feature MSE, classifier frozen, label-free."""
        return MIR_RECIPE


__all__ = ["PRACTISE", "PractiseParams", "adaptor_edits", "adaptor_points", "adapted_features", "candidates",
           "identity_adaptors", "practise_stage", "weighted_feature_mse"]
