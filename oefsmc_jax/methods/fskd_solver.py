"""Numerical core of FSKD (Li et al., CVPR 2020): closed-form 1x1 corrections and their exact BN folding.

FSKD (official code ``LTH14/FSKD``, see ``shared/baselines.md`` §3) prunes filters by L1 norm, then walks
the conv layers in network order.  For each one it fits a 1x1 conv ``Q`` by plain least squares so that the
student's pre-activation output, mapped by ``Q``, matches the teacher's pre-activation output at the kept
channels, and folds ``Q`` into the conv.  The official net has no BN; for this project's BN networks ``Q``
sits after the BN (pre-ReLU) and is folded exactly into the conv + BN pair (§3.5).  No labels, no SGD.

This module holds the pure pieces; the layer-by-layer loop over real activations lives in the FSKD method:

* :func:`weighted_lstsq` -- ``Q = argmin ||sqrt(W) (Z Q - T)||_F^2`` (per-sample weights, no ridge/bias);
* :func:`fold_bn_correction` -- rewrite ``conv -> BN -> Q`` as ``conv' -> identity BN`` (eval mode);
* :func:`correction_points` -- the (conv, bn, width) positions where FSKD puts a ``Q``, in network order;
* :func:`fold_corrections` -- fold every unfolded ``Q`` layer of a model (``spec.corrections``) at export.

Orientation: activations are NHWC rows, the corrected activation is ``z @ Q`` with ``Q`` of shape
``[C_in, C_out]`` (the transpose of the official PyTorch 1x1 weight ``Xᵀ``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from oefsmc_jax.models.spec import ArchSpec
from oefsmc_jax.models.surgery import _copy, _get, _has, _set

Path = tuple[str, ...]

#: BatchNorm epsilon of every model in :mod:`oefsmc_jax.models` (``resnet.batch_norm``, PyTorch default).
BN_EPSILON = 1e-5


# ---------------------------------------------------------------------- least squares
def weighted_lstsq(z: Any, t: Any, weights: Any = None) -> np.ndarray:
    """Solve ``Q = argmin_X ||sqrt(W) (Z X - T)||_F^2`` and return it as a float32 ``[C_in, C_out]`` matrix.

    ``z``: student activations ``[N, ..., C_in]`` (typically ``[N, H, W, C_in]``, or rows ``[R, C_in]``);
    ``t``: teacher targets ``[N, ..., C_out]`` with the same leading shape; ``weights``: optional per-sample
    weights ``[N]`` (>= 0): every one of the ``H*W`` rows of sample ``i`` is multiplied by ``sqrt(w_i)``, so
    sample ``i``'s squared error counts ``w_i`` times.  ``weights=None`` is the plain (official) problem;
    equal weights give the same solution; a zero weight removes the sample.

    No ridge, no bias (as ``vggprune_pruning.py`` L240-248).  The solve runs on the host with
    ``np.linalg.lstsq(rcond=None)`` (SVD based; the minimum-norm solution if ``Z`` is rank deficient) on float64
    inputs.  The official code passes float32 arrays to the same NumPy call, which computes in float64 as well
    (NumPy's LAPACK wrappers solve real float32 problems in double precision and round the result back), so the
    solves agree up to the rounding of the inputs and of the result.  The corrected activation is ``z @ Q``.
    """
    z = np.asarray(z, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    if z.ndim < 2 or t.ndim < 2:
        raise ValueError(f"z and t need shape [N, ..., C]; got {z.shape} and {t.shape}")
    if z.shape[:-1] != t.shape[:-1]:
        raise ValueError(f"z {z.shape} and t {t.shape} must agree on every axis but the last")
    n, c_in, c_out = z.shape[0], z.shape[-1], t.shape[-1]
    zr = z.reshape(n, -1, c_in)
    tr = t.reshape(n, -1, c_out)
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (n,):
            raise ValueError(f"weights must have shape ({n},) (one per sample), got {w.shape}")
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError("weights must be finite and >= 0")
        sw = np.sqrt(w)[:, None, None]
        zr, tr = zr * sw, tr * sw
    if not (np.all(np.isfinite(zr)) and np.all(np.isfinite(tr))):
        raise ValueError("z and t must be finite")
    q, *_ = np.linalg.lstsq(zr.reshape(-1, c_in), tr.reshape(-1, c_out), rcond=None)
    return q.astype(np.float32)


# ---------------------------------------------------------------------- folding
def _identity_bn_var(eps: float) -> np.float32:
    """A float32 ``v`` with ``v + float32(eps) == 1`` exactly (then ``rsqrt(v + eps) == 1`` exactly).

    For eps = 1e-5 this is ``float32(1 - eps)`` itself; the neighbour search only guards other eps values.
    """
    e = np.float32(eps)
    v = np.float32(1.0 - eps)
    for cand in (v, np.nextafter(v, np.float32(2)), np.nextafter(v, np.float32(0))):
        if np.float32(cand + e) == np.float32(1.0):
            return np.float32(cand)
    raise ValueError(f"no float32 variance v with v + {eps} == 1 exactly")  # pragma: no cover


def _mask_of_bn(path_bn: Path) -> Path | None:
    """The mask multiplying this BN's output: ``bn`` -> ``mask0`` (VGG), ``bn{k}`` -> ``mask{k-1}`` (ResNet)."""
    if len(path_bn) < 2:
        return None
    m = re.fullmatch(r"bn(\d*)", path_bn[-1])
    if m is None:
        return None
    k = int(m.group(1)) if m.group(1) else 1
    return (*path_bn[:-1], f"mask{k - 1}") if k >= 1 else None


def fold_bn_correction(
    spec: ArchSpec, variables: Mapping[str, Any], path_conv: Path, path_bn: Path, q: Any, *,
    eps: float = BN_EPSILON,
) -> tuple[ArchSpec, dict[str, Any]]:
    """Fold a 1x1 correction ``Q`` applied to the output of ``path_bn`` (pre-ReLU) into the conv + BN pair.

    Eval-mode BN is affine per channel: with ``s = gamma / sqrt(var + eps)`` and ``b = beta - s * mean``,
    ``BN(W x) @ Q = ((W * s) @ Q) x + b @ Q`` (HWIO kernel, ``W * s`` scales the out axis, ``@ Q`` contracts
    it).  The new kernel is written to ``path_conv`` and the BN becomes an identity BN carrying the bias:
    ``scale = 1, mean = 0, bias = b @ Q`` and ``var = float32(1 - eps)``, chosen because
    ``float32(1 - eps) + float32(eps) == 1.0`` exactly in float32 (checked), so ``rsqrt(var + eps) == 1`` and
    the BN is exactly ``y + bias``.  The arithmetic is done in float64 and rounded once to the kernel dtype.

    The fold is exact in EVAL mode only.  In train mode BN normalises with batch statistics, which
    re-standardise the new conv output and discard ``b @ Q`` and any mixing-induced shift/scale, so the
    folded net is not the corrected net there; this is why FSKD keeps ``Q`` as its own layer through fine-tuning
    by default (``method.fskd.fold=export``, :func:`fold_corrections` at export).

    ``Q`` must be square ``[C, C]`` with ``C`` the BN's current width (on a pruned model: ``shrink`` first,
    the fold then works on the kept width only).  A BN whose channels are masked to 0 is refused, because
    mixing would break the masked representation's zero slices (see :mod:`oefsmc_jax.models.surgery`).
    Pure: ``variables`` is never mutated; returns ``(spec, new_variables)`` with jnp leaves.
    """
    path_conv, path_bn = tuple(path_conv), tuple(path_bn)
    params = variables["params"]
    if not _has(params, (*path_conv, "kernel")) or not _has(params, (*path_bn, "scale")):
        raise ValueError(f"no conv kernel at {path_conv} or BN at {path_bn} in variables['params']")
    if not _has(variables.get("batch_stats", {}), (*path_bn, "mean")):
        raise ValueError(f"no BN running statistics at {path_bn} in variables['batch_stats']")
    kern = np.asarray(_get(params, path_conv)["kernel"])
    width = kern.shape[-1]
    q64 = np.asarray(q, dtype=np.float64)
    if q64.shape != (width, width):
        raise ValueError(f"q must be square [{width}, {width}] (the width of {path_bn}), got {q64.shape}")
    if not np.all(np.isfinite(q64)):
        raise ValueError("q must be finite")
    bn = _get(params, path_bn)
    st = _get(variables["batch_stats"], path_bn)
    gamma, beta, mean, var = (np.asarray(a, dtype=np.float64) for a in (bn["scale"], bn["bias"], st["mean"],
                                                                        st["var"]))
    if gamma.shape != (width,):
        raise ValueError(f"BN {path_bn} has width {gamma.shape[0]}, conv {path_conv} has {width}")
    mask_path = _mask_of_bn(path_bn)
    if mask_path is not None and _has(variables.get("masks", {}), mask_path):
        if np.any(np.asarray(_get(variables["masks"], mask_path)) == 0):
            raise ValueError(f"{path_bn}: {mask_path[-1]} has masked channels; call surgery.shrink before folding")
    s = gamma / np.sqrt(var + eps)
    b = beta - s * mean
    new_kern = np.einsum("...c,cd->...d", kern.astype(np.float64) * s, q64)
    out = _copy(variables)  # new leaves only; numpy arrays below keep the input dtypes, jnp.asarray at the end
    _set(out["params"], (*path_conv, "kernel"), new_kern.astype(kern.dtype))
    _set(out["params"], (*path_bn, "scale"), np.ones(width, np.asarray(bn["scale"]).dtype))
    _set(out["params"], (*path_bn, "bias"), (b @ q64).astype(np.asarray(bn["bias"]).dtype))
    _set(out["batch_stats"], (*path_bn, "mean"), np.zeros(width, np.asarray(st["mean"]).dtype))
    _set(out["batch_stats"], (*path_bn, "var"), np.full(width, _identity_bn_var(eps), np.float32))
    return spec, jax.tree.map(jnp.asarray, out)


# ---------------------------------------------------------------------- positions
class CorrectionPoint(NamedTuple):
    """Where FSKD puts one ``Q``: after BN ``bn`` (fed by conv ``conv``) on ``width`` channels."""

    conv: Path
    bn: Path
    width: int


def correction_points(spec: ArchSpec, block_output: bool = False) -> list[CorrectionPoint]:
    """The (conv path, BN path, width) of every FSKD correction, in network order.

    ResNet basic blocks: after ``bn1`` of every kept block (the internal, prunable width); with
    ``block_output`` also after ``bn2`` (full stage width, before the residual add: the paper's block-level
    output).  Bottleneck: ``bn1`` and ``bn2``, plus ``bn3`` with ``block_output``.  VGG: after ``bn`` of every
    conv layer (13 for VGG-16; ``block_output`` changes nothing, that BN is the layer output).  The stem and
    projection shortcuts get no correction.
    """
    points = []
    for s, b in spec.blocks():
        name = spec.block_name(s, b)
        inner = spec.inner_widths[s][b]
        if spec.block == "conv":
            points.append(CorrectionPoint((name, "conv"), (name, "bn"), inner[0]))
            continue
        for j, w in enumerate(inner):
            points.append(CorrectionPoint((name, f"conv{j + 1}"), (name, f"bn{j + 1}"), w))
        if block_output:
            k = len(inner) + 1
            points.append(CorrectionPoint((name, f"conv{k}"), (name, f"bn{k}"), spec.stage_widths[s]))
    return points


def correction_param(pt: CorrectionPoint) -> Path:
    """The parameter path of the unfolded ``Q`` after ``pt.bn`` (``spec.corrections`` models)."""
    return (*pt.bn[:-1], f"q_{pt.bn[-1]}")


def fold_corrections(spec: ArchSpec, variables: Mapping[str, Any]) -> tuple[ArchSpec, dict[str, Any]]:
    """Fold every unfolded 1x1 correction ``q_<bn>`` of a ``spec.corrections`` model into its conv + BN pair
    (:func:`fold_bn_correction`: exact in eval mode) and drop it; a ``Q`` that is exactly the identity is dropped
    without folding. Returns the model unchanged when ``spec.corrections`` is empty."""
    if not spec.corrections:
        return spec, dict(variables)
    out = _copy(variables)
    plain = dataclasses.replace(spec, corrections=())
    for pt in correction_points(spec, block_output=True):
        if pt.bn[-1] not in spec.corrections:
            continue
        path = correction_param(pt)
        block = _get(out["params"], path[:-1])
        q = np.asarray(block.pop(path[-1]))
        if not np.array_equal(q, np.eye(q.shape[0], dtype=q.dtype)):
            _, out = fold_bn_correction(plain, out, pt.conv, pt.bn, q)
            out = _copy(out)
    return plain, jax.tree.map(jnp.asarray, out)


__all__ = ["BN_EPSILON", "CorrectionPoint", "correction_param", "correction_points", "fold_bn_correction",
           "fold_corrections", "weighted_lstsq"]
