"""Numerical core of Cross Distillation (CD, Bai et al., AAAI 2020), ported from the official code.

Reference: ``haolibai/Cross-Distillation`` @ f80ba59, ``learners/chnl_learner.py`` (``__solve_lst_pgd`` L272-364,
``__get_cfgs`` L415-494); see ``shared/baselines.md`` §4 and §7 item 8.  This module is pure numerics: one conv
layer at a time, on activations that the caller (``methods/cd.py``) collects.

Layer problem (all arrays float32, NHWC activations, HWIO kernels, no bias)::

    Lc = ||conv(xt, w) - conv(xt, w_t)||^2      correction: student layer on the teacher's input
    Li = ||conv(xs, w_t) - conv(xs, w)||^2      imitation:  both layers on the student's input
    L  = mu * Lc + (1 - mu) * Li

each term an element mean over the (n, h, w, c) output, or with per-sample weights ``weights[i]``
``sum_i w_i ||.||^2_i / (sum_i w_i * h*w*c)`` (OE-FSMC's class-aware weights, method.md §3).  By linearity each
term is evaluated as ONE conv of the kernel difference, ``conv(x, w - w_t)``; this is mathematically the
official two-conv difference (and exactly 0 at ``w == w_t``).

Solver (:func:`cd_solve_layer`), per step ``i = 0 .. iters-1``, as the official loop:

1. gradient of L at ``w`` (L is quadratic in ``D = w - w_t``: ``L = tr(D^T A D)`` with ``A`` the weighted im2col
   Gram ``sum_i w_i (mu Pt_i^T Pt_i + (1 - mu) Ps_i^T Ps_i) / norm``, built once per layer, so the gradient is
   ``2 A D``, one [9 C_in]^2 matmul per step instead of four convs: the same value up to float rounding, far
   cheaper on a CPU, ``benchmarks/cd_layer_solve.py``); the gradient and BOTH Adam moments are multiplied by the
   current input-channel mask;
   one Adam step (PyTorch formula: beta 0.9/0.999, eps 1e-8, no weight decay) with the step's lr;
2. for ``i <= iters//3``: target ``k_i = int((C_in - keep) * (iters/3 - i) / (iters/3)) + keep`` (computed in
   Python float64, exactly as the official code); whenever ``k_i`` falls below the previous target, every input
   channel whose L2 norm over (kh, kw, out) is not among the ``k_i`` largest is zeroed and the mask rebuilt;
3. for ``i > iters//3`` the mask is frozen and the lr is ``0.1 * lr``.

Deviations from the official code (each documented where it happens):

* **Ties** [choice]: the official projection keeps every channel whose norm is >= the k-th largest, so ties keep
  more than k.  Here channels are ranked by (currently kept first, norm descending, lower channel index first) with
  a stable sort and exactly ``k_i`` are kept.  Identical to the official rule whenever the k-th and (k+1)-th
  largest norms differ; it also never revives a channel pruned earlier.
* **Exactly k** [choice]: in the official code about a third of the projections keep k - 1 channels instead of k,
  through float rounding in its top-k threshold; this port always keeps exactly ``k_i`` (the ranking below).
* **Mask** [choice]: the official code rebuilds the mask from the non-zero columns at every step of the first
  third; here the mask is the selected top-k set.  The two agree unless a selected column is exactly zero
  (degenerate), in which case the official code would drop it and the kept count would fall below the target.
* **Last target** [fix]: the official ``k_i`` at ``i = iters//3`` is
  ``int((C_in - keep) * frac(iters/3) / (iters/3)) + keep``, which misses ``keep`` when ``iters`` is not a
  multiple of 3 and ``C_in - keep`` is large relative to ``iters`` (e.g. C_in 16, keep 3, iters 10 gives 4).  It
  is forced to ``keep`` at ``i = iters//3`` so the final kept count always equals ``keep``; no change for the
  shipped settings (iters 3000, or 1000 with ``C_in - keep < 1000``).
* **lr off-by-one** [kept by default]: the official code sets the lr to ``0.1 * lr`` *after* the step of
  ``i = iters//3 + 1``, so that step still uses the full lr.  Kept (``CDSolveConfig.fix_lr_offbyone=False``);
  with ``fix_lr_offbyone=True`` every step ``i > iters//3`` uses ``0.1 * lr``.
* The official mask is applied to the moments at the start of the next step; here the moments are also masked
  right after a projection (idempotent, so the iterates are the same), which makes the returned moments of
  pruned channels exactly 0 even when the last projection falls on the last step.
* Convs run at ``lax.Precision.HIGHEST`` by default (no TF32 on GPUs), like PyTorch's float32 convs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from oefsmc_jax.models.spec import ArchSpec

Array = Any
PaddingLike = int | str | Sequence[int] | Sequence[tuple[int, int]]

ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8
LATE_LR_FACTOR = 0.1

#: Official ResNet-56 "sensitive" blocks whose conv2 input is not pruned (conv ids 16, 20, 38, 54).
RESNET56_SKIP: frozenset[tuple[int, int]] = frozenset({(0, 7), (1, 0), (2, 0), (2, 8)})
#: Official ResNet-34 (ILSVRC) blocks whose conv2 input is not pruned: skip ids 6, 12, 14, 24, plus ids > 24
#: (``layer3.5`` and stage 4), which the official id->stage thresholds put in the ratio-1.0 "stage 4" bucket.
RESNET34_SKIP: frozenset[tuple[int, int]] = frozenset(
    {(0, 2), (1, 2), (1, 3), (2, 4), (2, 5), (3, 0), (3, 1), (3, 2)}
)


# ---------------------------------------------------------------------- loss
def _norm_stride(stride: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(stride, (int, np.integer)):
        return int(stride), int(stride)
    s = tuple(int(v) for v in stride)
    if len(s) != 2:
        raise ValueError(f"stride must be an int or a pair, got {stride!r}")
    return s  # type: ignore[return-value]


def _norm_padding(padding: PaddingLike) -> str | tuple[tuple[int, int], tuple[int, int]]:
    """int p -> ((p, p), (p, p)); 'SAME'/'VALID'; (ph, pw) or ((lo, hi), (lo, hi)) -> hashable tuple."""
    if isinstance(padding, str):
        p = padding.upper()
        if p not in ("SAME", "VALID"):
            raise ValueError(f"padding string must be 'SAME' or 'VALID', got {padding!r}")
        return p
    if isinstance(padding, (int, np.integer)):
        return (int(padding), int(padding)), (int(padding), int(padding))
    items = list(padding)
    if len(items) != 2:
        raise ValueError(f"padding must be an int, a string or two entries (h, w), got {padding!r}")
    out = []
    for it in items:
        if isinstance(it, (int, np.integer)):
            out.append((int(it), int(it)))
        else:
            lo, hi = it
            out.append((int(lo), int(hi)))
    return tuple(out)  # type: ignore[return-value]


def _conv(x: Array, w: Array, stride: tuple[int, int], padding: Any, precision: Any) -> Array:
    return lax.conv_general_dilated(
        x, w, window_strides=stride, padding=padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=precision,
    )


def _sq_mean(d: Array, weights: Array | None) -> Array:
    """Element mean of d**2, or the per-sample weighted mean sum_i w_i ||d_i||^2 / (sum_i w_i * h*w*c)."""
    if weights is None:
        return jnp.mean(jnp.square(d))
    per = jnp.sum(jnp.square(d), axis=(1, 2, 3))
    weights = weights.astype(d.dtype)
    return jnp.sum(weights * per) / (jnp.sum(weights) * (d.size // d.shape[0]))


def _terms(w, w_t, xs, xt, weights, stride, padding, precision):
    lc = _sq_mean(_conv(xt, w - w_t, stride, padding, precision), weights)
    li = _sq_mean(_conv(xs, w_t - w, stride, padding, precision), weights)
    return lc, li


_terms_jit = jax.jit(_terms, static_argnames=("stride", "padding", "precision"))


def _check_layer_inputs(w: Array, w_t: Array, xs: Array, xt: Array, weights: Array | None) -> None:
    if np.ndim(w) != 4 or np.shape(w) != np.shape(w_t):
        raise ValueError(f"w and w_t must be HWIO kernels of one shape, got {np.shape(w)} and {np.shape(w_t)}")
    if np.ndim(xs) != 4 or np.shape(xs) != np.shape(xt):
        raise ValueError(f"xs and xt must be NHWC arrays of one shape, got {np.shape(xs)} and {np.shape(xt)}")
    if np.shape(xs)[-1] != np.shape(w)[2]:
        raise ValueError(f"input channels {np.shape(xs)[-1]} != kernel input channels {np.shape(w)[2]}")
    if weights is not None and np.shape(weights) != (np.shape(xs)[0],):
        raise ValueError(f"weights must have shape ({np.shape(xs)[0]},), got {np.shape(weights)}")


@dataclasses.dataclass(frozen=True, eq=False)
class LayerProblem:
    """One conv's CD problem, everything but the kernel being fitted.

    ``w_t``: the teacher's HWIO kernel; ``xs``/``xt``: the conv's NHWC inputs in the student/teacher; ``stride``,
    ``padding``: the conv's; ``weights``: optional per-sample weights [n] (None = plain element means).  Compared
    by identity, since its fields are arrays.
    """

    w_t: Array
    xs: Array
    xt: Array
    stride: int | Sequence[int] = 1
    padding: PaddingLike = 1
    weights: Array | None = None


def cd_layer_terms(w: Array, problem: LayerProblem, *,
                   precision: Any = lax.Precision.HIGHEST) -> tuple[Array, Array]:
    """CD's two layer terms ``(Lc, Li)`` (correction, imitation) of kernel ``w``; see the module docstring."""
    pb = problem
    _check_layer_inputs(w, pb.w_t, pb.xs, pb.xt, pb.weights)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    return _terms_jit(f32(w), f32(pb.w_t), f32(pb.xs), f32(pb.xt), None if pb.weights is None else f32(pb.weights),
                      _norm_stride(pb.stride), _norm_padding(pb.padding), precision)


def cd_layer_loss(w: Array, problem: LayerProblem, *, mu: float, precision: Any = lax.Precision.HIGHEST) -> Array:
    """CD layer loss ``mu * Lc + (1 - mu) * Li`` (scalar) of kernel ``w``; ``mu`` may be traced."""
    lc, li = cd_layer_terms(w, problem, precision=precision)
    return mu * lc + (1.0 - mu) * li


# ---------------------------------------------------------------------- schedule
def cd_schedule(
    c_in: int, keep: int, iters: int, *, fix_lr_offbyone: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-step (target k [int32], projection flag [bool], lr factor [float32]) arrays of length ``iters``.

    ``k[i]`` is the official ``int((C_in - keep) * float((iters/3 - i) / (iters/3))) + keep`` for
    ``i <= iters//3`` (float64, as in Python), forced to ``keep`` at ``i = iters//3``; ``keep`` afterwards.  A
    projection happens at step i when ``k[i]`` is below the previous target (initially ``C_in``).  The lr factor
    is 1 up to ``iters//3 + 1`` (official off-by-one) or ``iters//3`` (fixed), then 0.1.
    """
    c_in, keep, iters = int(c_in), int(keep), int(iters)
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if not 1 <= keep <= c_in:
        raise ValueError(f"keep must be in [1, C_in={c_in}], got {keep}")
    third = iters // 3
    ks = np.full(iters, keep, np.int32)
    proj = np.zeros(iters, bool)
    prev = c_in
    for i in range(third + 1):
        k = int((c_in - keep) * float((iters / 3 - i) / (iters / 3))) + keep
        if i == third:
            k = keep  # [fix] the official formula can stop above keep when iters % 3 != 0
        ks[i] = k
        if k < prev:
            proj[i] = True
            prev = k
    last_full = third if fix_lr_offbyone else third + 1
    lr_factor = np.where(np.arange(iters) <= last_full, 1.0, LATE_LR_FACTOR).astype(np.float32)
    return ks, proj, lr_factor


# ---------------------------------------------------------------------- solver
class AdamState(NamedTuple):
    """Hand-written Adam state: first/second moments (shape of w) and the step count."""

    m: Array
    v: Array
    count: Array


class CDLayerResult(NamedTuple):
    """Result of :func:`cd_solve_layer`.

    ``w``: the re-fitted kernel (pruned input channels exactly 0); ``in_mask``: float32 [C_in], 1 = kept;
    ``loss_init`` / ``loss_final``: the layer loss at ``w_init`` and at ``w``; ``adam``: the final Adam state
    (only with ``CDSolveConfig.return_state``, else None).
    """

    w: Array
    in_mask: Array
    loss_init: Array
    loss_final: Array
    adam: AdamState | None


_GRADIENTS = ("gram", "conv")


@dataclasses.dataclass(frozen=True)
class CDSolveConfig:
    """Settings of :func:`cd_solve_layer`, the same for every conv of a network.

    ``iters``: Adam steps; ``lr``: Adam's learning rate (``0.1 * lr`` after the first third); ``mu``: weight of the
    correction term; ``fix_lr_offbyone``: every step after the first third at ``0.1 * lr`` (default: the official
    off-by-one, see the module docstring); ``precision``: of the convs and matmuls; ``gradient``: "gram" (the
    quadratic form, default) or "conv" (autodiff through the convs, the slow reference); ``return_state``: keep
    the final Adam state in the result.
    """

    iters: int
    lr: float
    mu: float
    fix_lr_offbyone: bool = False
    precision: Any = lax.Precision.HIGHEST
    gradient: str = "gram"
    return_state: bool = False

    def __post_init__(self) -> None:
        if self.gradient not in _GRADIENTS:
            raise ValueError(f"gradient must be 'gram' or 'conv', got {self.gradient!r}")


class _LayerArrays(NamedTuple):
    """The traced float32 inputs of one layer's solve (a pytree, so one argument of the jitted solver)."""

    w_t: Array
    xs: Array
    xt: Array
    weights: Array


def _select_top(w: Array, mask: Array, k: Array) -> Array:
    """0/1 mask of exactly k input channels: kept-before first, then by L2 norm over (kh, kw, out), then index."""
    norms = jnp.sqrt(jnp.sum(jnp.square(w), axis=(0, 1, 3)))
    score = jnp.where(mask > 0, norms, -1.0)  # norms >= 0, so previously pruned channels rank last
    order = jnp.argsort(-score, stable=True)
    c_in = w.shape[2]
    rank = jnp.zeros((c_in,), jnp.int32).at[order].set(jnp.arange(c_in, dtype=jnp.int32))
    return (rank < k).astype(w.dtype)


def _patches(x: Array, window: tuple[int, int], stride: tuple[int, int], padding: Any, precision: Any) -> Array:
    """im2col of NHWC ``x``: [n, h', w', C_in*kh*kw], features ordered (C_in, kh, kw)."""
    return lax.conv_general_dilated_patches(x, window, stride, padding, dimension_numbers=("NHWC", "OIHW", "NHWC"),
                                            precision=precision)


def _gram(xs, xt, weights, mu, window, stride, padding, precision):
    """``sum_i w_i (mu Pt_i^T Pt_i + (1 - mu) Ps_i^T Ps_i)`` over samples (one at a time: memory of one image's
    patches), the quadratic form of CD's layer loss in the kernel difference."""

    def one(acc, inp):
        s, t, wi = inp
        ps = _patches(s[None], window, stride, padding, precision)
        pt = _patches(t[None], window, stride, padding, precision)
        ps = ps.reshape(-1, ps.shape[-1])
        pt = pt.reshape(-1, pt.shape[-1])
        g = mu * jnp.matmul(pt.T, pt, precision=precision) + (1.0 - mu) * jnp.matmul(ps.T, ps, precision=precision)
        return acc + wi * g, None

    k = xs.shape[-1] * window[0] * window[1]
    acc, _ = lax.scan(one, jnp.zeros((k, k), xs.dtype), (xs, xt, weights.astype(xs.dtype)))
    return acc


def _norm(xs, w, weights, stride, padding):
    """``sum_i w_i * h'*w'*C_out``: the denominator of both weighted layer terms."""
    out = jax.eval_shape(lambda x: _conv(x, w, stride, padding, None), xs[:1])
    return jnp.sum(weights.astype(xs.dtype)) * (out.size // out.shape[0])


@partial(jax.jit, static_argnames=("stride", "padding", "precision", "gradient"))
def _solve(w_init, layer, schedule, mu, *, stride, padding, precision, gradient):
    """``schedule``: the per-step (target k, projection flag, lr) arrays of :func:`_adam_topk`."""
    w_t, xs, xt, weights = layer

    def loss_fn(w):
        lc, li = _terms(w, w_t, xs, xt, weights, stride, padding, precision)
        return mu * lc + (1.0 - mu) * li

    if gradient == "conv":  # autodiff through the four convs (reference; slow on CPUs)
        return _adam_topk(w_init, jax.grad(loss_fn), *schedule) + (loss_fn(w_init),)
    kh, kw, c_in, c_out = w_init.shape
    a = _gram(xs, xt, weights, mu, (kh, kw), stride, padding, precision) / _norm(xs, w_init, weights, stride,
                                                                              padding)

    def grad_fn(w):  # the loss is tr(D^T A D) in D = w - w_t (im2col layout), so its gradient is 2 A D
        d = jnp.transpose(w - w_t, (2, 0, 1, 3)).reshape(c_in * kh * kw, c_out)
        g = 2.0 * jnp.matmul(a, d, precision=precision)
        return jnp.transpose(g.reshape(c_in, kh, kw, c_out), (1, 2, 0, 3))

    return _adam_topk(w_init, grad_fn, *schedule) + (loss_fn(w_init),)


def _adam_topk(w_init, grad_fn, ks, proj, lrs):
    """The official loop (module docstring) from ``w_init`` with gradient ``grad_fn``: (w, mask, adam state)."""
    col = lambda mask: mask[None, None, :, None]

    def step(carry, inp):
        w, m, v, mask, t = carry
        k, do_proj, lr = inp
        # gradient step with the gradient and both moments masked (official mask_grad before opt.step)
        mk = col(mask)
        g = grad_fn(w) * mk
        m = m * mk
        v = v * mk
        t = t + 1.0
        m = ADAM_B1 * m + (1.0 - ADAM_B1) * g
        v = ADAM_B2 * v + (1.0 - ADAM_B2) * jnp.square(g)
        bc1 = 1.0 - ADAM_B1**t
        bc2 = 1.0 - ADAM_B2**t
        denom = jnp.sqrt(v) / jnp.sqrt(bc2) + ADAM_EPS  # torch.optim.Adam's formula
        w = w - (lr / bc1) * m / denom
        # hard top-k projection on the input-channel group norms
        new_mask = jnp.where(do_proj, _select_top(w, mask, k), mask)
        nk = col(new_mask)
        w = jnp.where(do_proj, w * nk, w)
        m = m * nk
        v = v * nk
        return (w, m, v, new_mask, t), None

    c_in = w_init.shape[2]
    carry0 = (w_init, jnp.zeros_like(w_init), jnp.zeros_like(w_init), jnp.ones((c_in,), w_init.dtype),
              jnp.zeros((), w_init.dtype))
    (w, m, v, mask, t), _ = lax.scan(step, carry0, (ks, proj, lrs))
    return w, mask, AdamState(m, v, t)


def cd_solve_layer(w_init: Array, problem: LayerProblem, *, keep: int, config: CDSolveConfig) -> CDLayerResult:
    """Re-fit one conv with CD's masked Adam + shrinking hard top-k input-channel projection.

    ``w_init``: the student's HWIO kernel, the start; ``problem``: the teacher's kernel and the conv's inputs;
    ``keep``: input channels left at the end (``keep == C_in``: no pruning, the layer is only re-fitted).  One
    compile per (kernel shape, input shape, stride, padding, iters); ``keep``, ``lr``, ``mu`` and ``weights``
    values do not recompile.  See the module docstring for the exact iteration and the deviations from the
    official code.
    """
    pb, cfg = problem, config
    _check_layer_inputs(w_init, pb.w_t, pb.xs, pb.xt, pb.weights)
    c_in = int(np.shape(w_init)[2])
    ks, proj, lr_factor = cd_schedule(c_in, keep, cfg.iters, fix_lr_offbyone=cfg.fix_lr_offbyone)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    n = int(np.shape(pb.xs)[0])
    wts = jnp.ones((n,), jnp.float32) if pb.weights is None else f32(pb.weights)
    st, pd = _norm_stride(pb.stride), _norm_padding(pb.padding)
    w, mask, adam, l0 = _solve(
        f32(w_init), _LayerArrays(f32(pb.w_t), f32(pb.xs), f32(pb.xt), wts),
        (jnp.asarray(ks), jnp.asarray(proj), jnp.asarray(lr_factor) * jnp.float32(cfg.lr)), jnp.float32(cfg.mu),
        stride=st, padding=pd, precision=cfg.precision, gradient=cfg.gradient,
    )
    lc, li = _terms_jit(w, f32(pb.w_t), f32(pb.xs), f32(pb.xt), wts, st, pd, cfg.precision)
    l1 = jnp.float32(cfg.mu) * lc + (1.0 - jnp.float32(cfg.mu)) * li
    return CDLayerResult(w, mask, l0, l1, adam if cfg.return_state else None)


# ---------------------------------------------------------------------- which convs, how many inputs
def cd_keep_count(c_in: int, ratio: float, plus_one: bool) -> int:
    """Input channels CD keeps: ``int(ratio * C) + 1`` (CIFAR ResNets) or ``int(ratio * C)`` (VGG, ResNet-34).

    Raises if the count is outside ``[1, C]`` (the official code asserts the same upper bound).
    """
    k = int(float(ratio) * int(c_in)) + (1 if plus_one else 0)
    if not 1 <= k <= c_in:
        raise ValueError(f"CD keep count {k} (ratio {ratio}, C_in {c_in}, plus_one={plus_one}) is outside [1, {c_in}]")
    return k


@dataclasses.dataclass(frozen=True)
class CDLayer:
    """One conv that CD visits, in forward order.

    ``path``: module path of the conv in the params tree, e.g. ``("s1b2", "conv2")``; ``width_key``: the
    ``(stage, block, j)`` of :func:`oefsmc_jax.models.surgery.width_links` whose mask the conv's input pruning
    sets (None: the conv is only re-fitted, ``keep == c_in``); ``keep``: input channels kept; ``c_in``: input
    channels; ``stride``: the conv's stride (all visited convs are 3x3 with padding 1).
    """

    path: tuple[str, ...]
    width_key: tuple[int, int, int] | None
    keep: int
    c_in: int
    stride: int


def _is_resnet34(spec: ArchSpec) -> bool:
    return spec.family == "imagenet_resnet" and spec.block == "basic" and tuple(map(len, spec.kept)) == (3, 4, 6, 3)


def cd_default_skip(spec: ArchSpec) -> frozenset[tuple[int, int]]:
    """Official skip list (blocks whose conv2 input is not pruned) for ``spec``, empty if none is known.

    CIFAR ResNet-56 (3 x 9 blocks): :data:`RESNET56_SKIP`.  ImageNet ResNet-34: :data:`RESNET34_SKIP`.
    [choice] Other CIFAR depths: no skip list is known, so every block is pruned.
    """
    if spec.family == "cifar_resnet" and tuple(map(len, spec.kept)) == (9, 9, 9):
        return RESNET56_SKIP
    if _is_resnet34(spec):
        return RESNET34_SKIP
    return frozenset()


def cd_plan(spec: ArchSpec, ratio: float, *, skip: Iterable[tuple[int, int]] | None = None) -> list[CDLayer]:
    """Which convs CD visits, in forward order, and how many input channels each keeps (baselines.md §4.1).

    * CIFAR ResNets: ``conv1`` and ``conv2`` of every kept block (the stem and 1x1 projections are not visited);
      each block's ``conv2`` input (the internal width ``(s, b, 0)``) keeps ``int(r*C) + 1`` unless the block is
      in ``skip`` (default :func:`cd_default_skip`: the official ResNet-56 list; [choice] for other depths no
      list is known and every block is pruned); ``conv1`` is only re-fitted.
    * ImageNet ResNet-34 (basic, 3-4-6-3): the same with ``int(r*C)`` (no +1) and :data:`RESNET34_SKIP`.  Other
      ImageNet ResNets: no official rule, ValueError.
    * VGG: every conv except the first keeps ``int(r*C_in)`` inputs (the previous conv's width ``(s', b', 0)``);
      the first conv is not visited; the last conv's output (the classifier input) is not pruned.
    """
    r = float(ratio)
    if not 0.0 < r <= 1.0:
        raise ValueError(f"CD ratio must be in (0, 1], got {ratio}")
    plan: list[CDLayer] = []
    if spec.family == "vgg":
        prev: tuple[int, int] | None = None
        for s, b in spec.blocks():
            if prev is not None:
                c_in = spec.block_in_width(s, b)
                plan.append(CDLayer((spec.block_name(s, b), "conv"), (*prev, 0), cd_keep_count(c_in, r, False),
                                    c_in, 1))
            prev = (s, b)
        return plan
    if spec.family == "imagenet_resnet" and not _is_resnet34(spec):
        raise ValueError("CD's official code has a channel rule only for CIFAR ResNets, ImageNet ResNet-34 and VGG")
    plus_one = spec.family == "cifar_resnet"
    skip_set = cd_default_skip(spec) if skip is None else frozenset(tuple(x) for x in skip)
    for s, b in spec.blocks():
        name = spec.block_name(s, b)
        c1 = spec.block_in_width(s, b)
        plan.append(CDLayer((name, "conv1"), None, c1, c1, spec.block_stride(s, b)))
        c2 = spec.inner_widths[s][b][0]
        if (s, b) in skip_set:
            plan.append(CDLayer((name, "conv2"), None, c2, c2, 1))
        else:
            plan.append(CDLayer((name, "conv2"), (s, b, 0), cd_keep_count(c2, r, plus_one), c2, 1))
    return plan


__all__ = [
    "RESNET34_SKIP",
    "RESNET56_SKIP",
    "AdamState",
    "CDLayer",
    "CDLayerResult",
    "CDSolveConfig",
    "LayerProblem",
    "cd_default_skip",
    "cd_keep_count",
    "cd_layer_loss",
    "cd_layer_terms",
    "cd_plan",
    "cd_schedule",
    "cd_solve_layer",
]
