"""Pure pruning "surgery" on (spec, variables) pairs.

The masked representation: a pruned channel ``(stage, block, j)`` has ``mask{j} == 0`` and its producing
conv's output kernel slice, its BN scale/bias/running-mean (running var set to 1) and its consuming
layer's input kernel slice are all zero.  Dropped blocks have ``gate == 0``.  :func:`shrink` turns the
masked representation into a physically smaller model with identical outputs.

Links per internal width j of a block (names relative to the block module):

* basic ``s{s}b{b}``: j=0: conv1 -> bn1 -> mask0 -> conv2
* bottleneck: j=0: conv1 -> bn1 -> mask0 -> conv2;  j=1: conv2 -> bn2 -> mask1 -> conv3
* vgg ``s{s}c{i}``: conv -> bn -> mask0 -> next layer's conv, or the classifier (``fc0`` / ``head``)

All functions take numpy or jnp arrays and never mutate their inputs; they return new nested dicts of jnp
arrays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from oefsmc_jax.models.spec import ArchSpec

Variables = Mapping[str, Any]
Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class WidthLink:
    """Where one prunable internal width lives in the variable tree."""

    key: tuple[int, int, int]  # (stage, block, j)
    width: int
    block: str  # module name holding the mask
    mask: str  # mask variable name
    producer: Path  # module path whose 'kernel' produces the channels (last axis)
    bn: Path  # BatchNorm module path
    consumer: Path  # module path whose 'kernel' consumes the channels
    consumer_axis: int  # input-channel axis of the consumer kernel (-2 conv HWIO, 0 dense)


def width_links(spec: ArchSpec) -> list[WidthLink]:
    """All prunable widths of kept blocks with the variable paths they touch."""
    links = []
    for s, b in spec.blocks():
        name = spec.block_name(s, b)
        widths = spec.inner_widths[s][b]
        if spec.block == "basic":
            links.append(WidthLink((s, b, 0), widths[0], name, "mask0", (name, "conv1"), (name, "bn1"),
                                   (name, "conv2"), -2))
        elif spec.block == "bottleneck":
            links.append(WidthLink((s, b, 0), widths[0], name, "mask0", (name, "conv1"), (name, "bn1"),
                                   (name, "conv2"), -2))
            links.append(WidthLink((s, b, 1), widths[1], name, "mask1", (name, "conv2"), (name, "bn2"),
                                   (name, "conv3"), -2))
        else:
            if b + 1 < len(spec.inner_widths[s]):
                consumer, axis = (spec.block_name(s, b + 1), "conv"), -2
            elif s + 1 < spec.num_stages:
                consumer, axis = (spec.block_name(s + 1, 0), "conv"), -2
            else:
                consumer, axis = ("fc0" if spec.vgg_classifier else "head",), 0
            links.append(
                WidthLink((s, b, 0), widths[0], name, "mask0", (name, "conv"), (name, "bn"), consumer, axis)
            )
    return links


def prunable_widths(spec: ArchSpec) -> list[tuple[int, int, int, int]]:
    """(stage, block, j, width) for every internal width of every kept block."""
    return [(*lk.key, lk.width) for lk in width_links(spec)]


def droppable_blocks(spec: ArchSpec) -> list[tuple[int, int]]:
    """Kept blocks with an identity shortcut (the only ones :func:`drop_blocks` accepts)."""
    return [(s, b) for s, b in spec.blocks() if spec.identity_shortcut(s, b)]


# ---------------------------------------------------------------------- tree helpers
def _copy(tree: Any) -> Any:
    """Copy the dict structure (leaves shared, never mutated)."""
    if isinstance(tree, Mapping):
        return {k: _copy(v) for k, v in tree.items()}
    return tree


def _get(tree: Mapping[str, Any], path: Sequence[str]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def _has(tree: Mapping[str, Any], path: Sequence[str]) -> bool:
    for p in path:
        if not isinstance(tree, Mapping) or p not in tree:
            return False
        tree = tree[p]
    return True


def _set(tree: dict[str, Any], path: Sequence[str], value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _axis_vec(v: Any, ndim: int, axis: int) -> Any:
    """Reshape a 1-D vector to broadcast along ``axis`` of an ``ndim`` array."""
    shape = [1] * ndim
    shape[axis] = -1
    return jnp.reshape(v, shape)


def _to_jnp(tree: Any) -> Any:
    return jax.tree.map(jnp.asarray, tree)


def _check_link_keys(links: Mapping[tuple[int, int, int], WidthLink], keys: Any) -> None:
    for key in keys:
        if tuple(key) not in links:
            raise ValueError(
                f"{key} is not a prunable (stage, block, j) of a kept block; valid: {sorted(links)}"
            )


# ---------------------------------------------------------------------- masks
def set_masks(
    spec: ArchSpec, variables: Variables, keep: Mapping[tuple[int, int, int], Any]
) -> tuple[ArchSpec, dict[str, Any]]:
    """Set ``mask{j}`` of each listed (stage, block, j) to ``keep`` and zero the masked channels' weights.

    Zeroed: producing conv output slice, BN scale/bias/running-mean (running var -> 1), consuming kernel's
    input slice.  Widths not listed are untouched.  Works with traced ``keep`` arrays (static keys).
    """
    links = {lk.key: lk for lk in width_links(spec)}
    _check_link_keys(links, keep)
    out = _copy(variables)
    params = out["params"]
    stats = out.get("batch_stats")
    for key, k in keep.items():
        lk = links[tuple(key)]
        if np.shape(k) != (lk.width,):
            raise ValueError(f"keep[{key}] must have shape ({lk.width},), got {np.shape(k)}")
        k = jnp.asarray(k).astype(bool)
        _set(out, ("masks", lk.block, lk.mask), k.astype(jnp.float32))
        kern = _get(params, lk.producer)["kernel"]
        _set(params, (*lk.producer, "kernel"), kern * _axis_vec(k, kern.ndim, -1).astype(kern.dtype))
        bn = _get(params, lk.bn)
        for name in ("scale", "bias"):
            _set(params, (*lk.bn, name), bn[name] * k.astype(bn[name].dtype))
        if stats is not None and _has(stats, lk.bn):
            st = _get(stats, lk.bn)
            _set(stats, (*lk.bn, "mean"), st["mean"] * k.astype(st["mean"].dtype))
            _set(stats, (*lk.bn, "var"), jnp.where(k, st["var"], jnp.ones_like(st["var"])))
        kern = _get(params, lk.consumer)["kernel"]
        _set(params, (*lk.consumer, "kernel"),
             kern * _axis_vec(k, kern.ndim, lk.consumer_axis).astype(kern.dtype))
    return spec, _to_jnp(out)


def _stage_ratios(spec: ArchSpec, ratios: float | Sequence[float]) -> list[float]:
    if isinstance(ratios, (int, float, np.floating, np.integer)) and not isinstance(ratios, bool):
        vals = [float(ratios)] * spec.num_stages
    else:
        vals = [float(r) for r in ratios]
        if len(vals) != spec.num_stages:
            raise ValueError(f"prune_ratio needs one value per stage ({spec.num_stages}), got {len(vals)}")
    for r in vals:
        if not (0.0 <= r < 1.0):
            raise ValueError(f"prune_ratio must be in [0, 1), got {r}")
    return vals


def l1_prune(
    spec: ArchSpec, variables: Variables, ratios: float | Sequence[float], *, min_keep: int = 1,
    exclude: Sequence[tuple[int, int, int]] = (),
) -> tuple[ArchSpec, dict[str, Any]]:
    """Mask all but the ``max(min_keep, round(w * (1 - ratio)))`` largest-L1 filters of every internal width.

    The L1 norm is that of the producing conv's output filter (ties: lower index wins).  ``ratios`` is one
    float for all stages or one per stage, each in [0, 1).  Widths listed in ``exclude`` ((stage, block, j) keys)
    are left whole.  Returns the same spec and masked variables.
    """
    vals = _stage_ratios(spec, ratios)
    if int(min_keep) < 1:
        raise ValueError(f"min_keep must be >= 1, got {min_keep}")
    keep = {}
    skip = {tuple(k) for k in exclude}
    for lk in width_links(spec):
        if lk.key in skip:
            continue
        kern = np.asarray(_get(variables["params"], lk.producer)["kernel"], dtype=np.float64)
        l1 = np.abs(kern).reshape(-1, lk.width).sum(axis=0)
        n = min(lk.width, max(int(min_keep), round(lk.width * (1.0 - vals[lk.key[0]]))))
        order = np.argsort(-l1, kind="stable")
        k = np.zeros(lk.width, dtype=bool)
        k[order[:n]] = True
        keep[lk.key] = k
    return set_masks(spec, variables, keep)


def mask_multipliers(spec: ArchSpec, variables: Variables) -> dict[str, Any]:
    """Pytree like ``variables['params']``: 0 on masked slices, 1 elsewhere (scalar 1 for untouched params).

    Touched params (producer/consumer kernels and BN scale/bias of every prunable width) get full-shape
    arrays; which params are touched depends only on ``spec``, so the tree structure is stable under jit.
    """
    params = variables["params"]
    mult = jax.tree.map(lambda p: jnp.ones((), jnp.asarray(p).dtype), _copy(params))
    mult = _copy(mult)

    def full(path: Path, name: str) -> Any:
        m = _get(mult, path)[name]
        if jnp.ndim(m) == 0:
            m = jnp.ones(jnp.shape(_get(params, path)[name]), m.dtype)
        return m

    for lk in width_links(spec):
        k = jnp.asarray(_get(variables["masks"], (lk.block, lk.mask))) != 0
        m = full(lk.producer, "kernel")
        _set(mult, (*lk.producer, "kernel"), m * _axis_vec(k, m.ndim, -1).astype(m.dtype))
        for name in ("scale", "bias"):
            m = full(lk.bn, name)
            _set(mult, (*lk.bn, name), m * k.astype(m.dtype))
        m = full(lk.consumer, "kernel")
        _set(mult, (*lk.consumer, "kernel"), m * _axis_vec(k, m.ndim, lk.consumer_axis).astype(m.dtype))
    return mult


# ---------------------------------------------------------------------- blocks
def drop_blocks(
    spec: ArchSpec, variables: Variables, blocks: Sequence[tuple[int, int]]
) -> tuple[ArchSpec, dict[str, Any]]:
    """Set ``gate = 0`` for the given (stage, block)s; each must be a kept block with an identity shortcut."""
    kept = set(spec.blocks())
    out = _copy(variables)
    for s, b in blocks:
        if (s, b) not in kept:
            raise ValueError(f"block ({s},{b}) is not a kept block of this architecture")
        if not spec.identity_shortcut(s, b):
            raise ValueError(
                f"block ({s},{b}) ({spec.block_name(s, b)}) has no identity shortcut; cannot drop it"
            )
        _set(out, ("masks", spec.block_name(s, b), "gate"), jnp.zeros((), jnp.float32))
    return spec, _to_jnp(out)


# ---------------------------------------------------------------------- shrink
def shrink(spec: ArchSpec, variables: Variables) -> tuple[ArchSpec, dict[str, Any]]:
    """Export a physically smaller (spec, variables) computing the same function (eval and train mode).

    Removes channels whose mask is 0 and blocks whose gate is 0 (``kept=False``).  Non-binary mask values
    and non-zero gates are folded into the BN scale/bias (mask) or the branch's last BN (gate), so the
    returned masks and gates are all ones.  Requires concrete (non-traced) variables.
    """
    if spec.corrections and any(np.any(np.asarray(m) == 0) for m in jax.tree.leaves(variables["masks"])):
        raise ValueError("shrink: a model with unfolded 1x1 corrections (spec.corrections) cannot drop masked "
                         "channels or blocks; fold them first (methods.fskd_solver.fold_corrections)")
    out = _copy(variables)
    masks = out["masks"]
    kept = [list(st) for st in spec.kept]
    colls = [c for c in out if isinstance(out[c], Mapping)]

    def scale_bn(path: Path, factor: Any) -> None:
        bn = _get(out["params"], path)
        for name in ("scale", "bias"):
            _set(out["params"], (*path, name), jnp.asarray(bn[name]) * jnp.asarray(factor, bn[name].dtype))

    if spec.is_resnet:
        last_bn = "bn2" if spec.block == "basic" else "bn3"
        for s, b in spec.blocks():
            name = spec.block_name(s, b)
            gate = float(np.asarray(masks[name]["gate"]))
            if gate == 0.0:
                if not spec.identity_shortcut(s, b):
                    raise ValueError(f"block ({s},{b}) has gate 0 but no identity shortcut; cannot remove it")
                kept[s][b] = False
                for c in colls:
                    out[c].pop(name, None)
                continue
            if gate != 1.0:
                scale_bn((name, last_bn), gate)
            masks[name]["gate"] = jnp.ones((), jnp.float32)
    new_spec = spec.with_kept(kept)

    inner = [[list(w) for w in st] for st in spec.inner_widths]
    for lk in width_links(new_spec):
        m = np.asarray(masks[lk.block][lk.mask], dtype=np.float32)
        idx = np.nonzero(m)[0]
        if idx.size == 0:
            raise ValueError(f"width {lk.key} has every channel masked; keep at least one channel to shrink")
        if not np.all(m[idx] == 1.0):
            scale_bn(lk.bn, m)
        p = out["params"]
        _set(p, (*lk.producer, "kernel"), jnp.take(jnp.asarray(_get(p, lk.producer)["kernel"]), idx, axis=-1))
        bn = _get(p, lk.bn)
        for name in ("scale", "bias"):
            _set(p, (*lk.bn, name), jnp.asarray(bn[name])[idx])
        if "batch_stats" in out and _has(out["batch_stats"], lk.bn):
            st = _get(out["batch_stats"], lk.bn)
            for name in ("mean", "var"):
                _set(out["batch_stats"], (*lk.bn, name), jnp.asarray(st[name])[idx])
        ck = jnp.asarray(_get(p, lk.consumer)["kernel"])
        _set(p, (*lk.consumer, "kernel"), jnp.take(ck, idx, axis=lk.consumer_axis % ck.ndim))
        masks[lk.block][lk.mask] = jnp.ones((idx.size,), jnp.float32)
        s, b, j = lk.key
        inner[s][b][j] = int(idx.size)
    return new_spec.with_inner_widths(inner), _to_jnp(out)
