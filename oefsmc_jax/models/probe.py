"""Activations at named points of a model, and edits there: the service data-dependent compression stages use.

A *point* names the input or output of one submodule call: ``"PATH:in"`` or ``"PATH:out"``, where ``PATH`` is the
module path joined by ``/`` (``"s1b2/conv1"``, ``"s1b2/bn1"``, ``"stem_conv"``, ``"s2b0/proj_conv"``, VGG
``"s3c1/conv"``). So ``"s1b2/conv1:in"`` is a conv's input, ``"s1b2/conv1:out"`` its raw output before BatchNorm,
``"s1b2/bn1:out"`` the BN output (before the mask and ReLU) and ``"s1b2:out"`` a whole block's output.
``"features"`` (the map before global average pooling) and ``"logits"`` are the model's own outputs.

An *edit* replaces the activation at a point by ``fn(activation)`` before the rest of the network sees it: this is
how PRACTISE inserts its 1x1 adaptors (a matrix on a conv's input or output channels) and how a 1x1 correction is
tried before it is folded. Edits are plain functions, so they may close over arrays that are being fitted and the
whole forward stays differentiable and jittable.

Both are built on :func:`flax.linen.intercept_methods`, so the models need no hooks of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = Any
OUTPUT_POINTS = ("features", "logits")


def _split(point: str) -> tuple[str, str]:
    if point in OUTPUT_POINTS:
        return point, ""
    path, sep, side = point.rpartition(":")
    if not sep or side not in ("in", "out") or not path:
        raise ValueError(f"point {point!r}: expected 'PATH:in', 'PATH:out', 'features' or 'logits'")
    return path, side


def forward(model: nn.Module, variables: Mapping[str, Any], x: Array, *, train: bool = False,
            capture: Sequence[str] = (), edits: Mapping[str, Callable[[Array], Array]] | None = None
            ) -> tuple[dict[str, Array], dict[str, Array]]:
    """Run ``model`` on the normalised batch ``x``; returns ``(outputs, captured)``.

    ``captured[point]`` is the activation at each point of ``capture`` (after any edit at that point). ``train``
    selects BatchNorm's mode: batch statistics (``True``; the running statistics are not updated) or running
    statistics. An unknown point raises a ``ValueError`` that lists the module paths the model has.
    """
    edits = dict(edits or {})
    for p in list(capture) + list(edits):
        _split(p)
    wanted = set(capture)
    captured: dict[str, Array] = {}
    seen: list[str] = []

    def interceptor(next_fun, args, kwargs, context):
        path = "/".join(context.module.path)
        if context.method_name != "__call__" or not path:
            return next_fun(*args, **kwargs)
        seen.append(path)
        key_in, key_out = f"{path}:in", f"{path}:out"
        if key_in in edits:
            args = (edits[key_in](args[0]), *args[1:])
        if key_in in wanted:
            captured[key_in] = args[0]
        out = next_fun(*args, **kwargs)
        if key_out in edits:
            out = edits[key_out](out)
        if key_out in wanted:
            captured[key_out] = out
        return out

    with nn.intercept_methods(interceptor):
        if train:
            outputs, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
        else:
            outputs = model.apply(variables, x, train=False)
    for p in OUTPUT_POINTS:
        if p in wanted:
            captured[p] = outputs[p]
    missing = sorted((wanted | set(edits)) - set(captured) - {f"{s}:{side}" for s in seen for side in ("in", "out")})
    if missing:
        raise ValueError(f"unknown point(s) {missing}; this model's module paths are: {', '.join(dict.fromkeys(seen))}")
    return outputs, captured


def points(model: nn.Module, variables: Mapping[str, Any], x: Array) -> dict[str, tuple[int, ...]]:
    """Every point of ``model`` with the shape its activation has for a batch like ``x`` (abstract, no compute)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def run(v, x):
        order: list[str] = []

        def interceptor(next_fun, args, kwargs, context):
            path = "/".join(context.module.path)
            if context.method_name != "__call__" or not path:
                return next_fun(*args, **kwargs)
            out = next_fun(*args, **kwargs)
            order.append(path)
            shapes[f"{path}:in"] = tuple(args[0].shape)
            shapes[f"{path}:out"] = tuple(out.shape) if hasattr(out, "shape") else ()
            return out

        with nn.intercept_methods(interceptor):
            out = model.apply(v, x, train=False)
        for p in OUTPUT_POINTS:
            shapes[p] = tuple(out[p].shape)
        return out

    jax.eval_shape(run, variables, jnp.asarray(x) if not isinstance(x, jax.ShapeDtypeStruct) else x)
    return shapes


def conv_geometry(variables: Mapping[str, Any], path: str) -> dict[str, Any]:
    """Kernel of the conv at ``path`` (``"s1b2/conv1"``) with the stride and padding the models use.

    The models' convs are bias-free with symmetric padding ``k // 2``; the stride is read from the shapes of the
    point's input and output by the caller when it matters, so only the kernel is stored in the variables.
    """
    node = variables["params"]
    for part in path.split("/"):
        if part not in node:
            raise ValueError(f"conv path {path!r}: no module {part!r}; have {sorted(node)}")
        node = node[part]
    kernel = node["kernel"]
    k = int(kernel.shape[0])
    return {"kernel": kernel, "padding": ((k // 2, k // 2), (k // 2, k // 2))}


def apply_conv(x: Array, kernel: Array, stride: int, padding: Any) -> Array:
    """The models' conv as a function: NHWC input, HWIO kernel, no bias."""
    return jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), (stride, stride), padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
