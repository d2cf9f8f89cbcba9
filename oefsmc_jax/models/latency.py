"""Inference cost of a model: measured latency, the analytic MAC proxy, and XLA's own FLOP count.

* :func:`measure_latency`: median milliseconds of one jitted, compiled eval forward pass (``block_until_ready``),
  timed after warm-up on the default device. Noisy on a shared CPU.
* :func:`latency_cost`: the latency objective of methods that drop blocks by latency reduction (PRACTISE):
  ``'measure'`` times the model, ``'macs'`` returns :func:`~oefsmc_jax.models.count_flops` (deterministic, so
  rankings do not depend on the load of the machine).
* :func:`xla_flops`: XLA's cost analysis of the compiled forward. It counts 2 FLOPs per multiply-accumulate
  but only for kernel taps that fall inside the image (taps over the zero padding are skipped), plus the
  elementwise work of BatchNorm, masks, ReLU, residual additions and pooling (a few FLOPs per element of every
  conv output; fusion can duplicate some). :func:`traced_macs` counts
  the MACs of the traced program's convolutions and dense layers, with or without the padding taps, so the two
  can be compared like for like.

All functions take the physical ``(spec, variables)``: a masked model costs what its full spec costs, so
``shrink`` it first.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from oefsmc_jax.models import build_model
from oefsmc_jax.models.flops import count_flops
from oefsmc_jax.models.spec import ArchSpec

LATENCY_MODES = ("measure", "macs")

__all__ = [
    "LATENCY_MODES",
    "forward_timer",
    "latency_cost",
    "measure_latency",
    "traced_macs",
    "xla_flops",
]


def _eval_forward(spec: ArchSpec) -> Callable[[Any, jax.Array], jax.Array]:
    model = build_model(spec)
    return lambda v, x: model.apply(v, x, train=False)["logits"]


def _input(spec: ArchSpec, image_size: int, batch: int) -> jax.ShapeDtypeStruct:
    if int(batch) < 1 or int(image_size) < 1:
        raise ValueError(f"batch and image_size must be >= 1, got batch={batch}, image_size={image_size}")
    return jax.ShapeDtypeStruct((int(batch), int(image_size), int(image_size), spec.in_channels), jnp.float32)


def forward_timer(spec: ArchSpec, variables: Any, image_size: int, batch: int = 128) -> Callable[[], float]:
    """Compile the eval forward for ``batch`` images now; the returned function runs it once and returns ms.

    Variables and a fixed input live on the default device, so a call times the computation only (dispatch +
    run + ``block_until_ready``). Use two timers alternately to compare two models under the same load.
    """
    fwd = jax.jit(_eval_forward(spec))
    x_abs = _input(spec, image_size, batch)
    v = jax.device_put(variables)
    x = jax.device_put(jnp.asarray(np.random.default_rng(0).standard_normal(x_abs.shape), jnp.float32))
    compiled = fwd.lower(v, x).compile()

    def run() -> float:
        t = time.perf_counter()
        compiled(v, x).block_until_ready()
        return (time.perf_counter() - t) * 1e3

    return run


def measure_latency(spec: ArchSpec, variables: Any, image_size: int, batch: int = 128, repeats: int = 10,
                    warmup: int = 2) -> float:
    """Median milliseconds of one jitted eval forward pass on ``batch`` images (default device).

    Compiles first (not timed), runs ``warmup`` untimed passes, then times ``repeats`` passes.
    """
    if int(repeats) < 1 or int(warmup) < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    run = forward_timer(spec, variables, image_size, batch)
    for _ in range(int(warmup)):
        run()
    return float(np.median([run() for _ in range(int(repeats))]))


def latency_cost(spec: ArchSpec, variables: Any, image_size: int, mode: str, batch: int = 128) -> float:
    """Latency objective: ``'measure'`` gives :func:`measure_latency` in ms (``batch`` images), ``'macs'`` the
    analytic MACs of one image (:func:`~oefsmc_jax.models.count_flops`; ``variables`` and ``batch`` unused)."""
    if mode not in LATENCY_MODES:
        raise ValueError(f"latency mode must be one of {', '.join(LATENCY_MODES)}; got {mode!r}")
    if mode == "macs":
        return float(count_flops(spec, image_size))
    return measure_latency(spec, variables, image_size, batch=batch)


def xla_flops(spec: ArchSpec, variables: Any, image_size: int, batch: int = 1) -> float:
    """FLOPs of the compiled eval forward on ``batch`` images, from XLA's ``cost_analysis()``.

    ``variables`` may be arrays or ``jax.ShapeDtypeStruct`` leaves (only shapes and dtypes are used). Raises
    RuntimeError when the backend reports no FLOP count.
    """
    def shape_dtype(a: Any) -> jax.ShapeDtypeStruct:
        if not (hasattr(a, "shape") and hasattr(a, "dtype")):
            a = np.asarray(a)
        return jax.ShapeDtypeStruct(tuple(a.shape), a.dtype)

    abstract = jax.tree.map(shape_dtype, variables)
    cost = jax.jit(_eval_forward(spec)).lower(abstract, _input(spec, image_size, batch)).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        raise RuntimeError(f"XLA reported no FLOP count on backend {jax.default_backend()!r} (got {cost!r})")
    return float(cost["flops"])


def _sub_jaxprs(params: dict) -> Iterator[Any]:
    for p in params.values():
        for q in p if isinstance(p, (list, tuple)) else (p,):
            if hasattr(q, "eqns"):
                yield q
            elif hasattr(q, "jaxpr") and hasattr(q.jaxpr, "eqns"):
                yield q.jaxpr


def _valid_taps(size_in: int, size_out: int, k: int, stride: int, pad_lo: int, dilation: int) -> int:
    """(output position, kernel tap) pairs along one axis whose input index is inside the image."""
    n = 0
    for o in range(size_out):
        for t in range(k):
            i = o * stride + t * dilation - pad_lo
            n += 0 <= i < size_in
    return n


def _conv_macs(eqn: Any, count_padding: bool) -> int:
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    out = eqn.outvars[0].aval.shape
    dn = eqn.params["dimension_numbers"]
    if any(d != 1 for d in eqn.params["lhs_dilation"]) or eqn.params.get("batch_group_count", 1) != 1:
        raise NotImplementedError("traced_macs handles convolutions without input dilation or batch groups")
    groups = eqn.params["feature_group_count"]
    batch, cin, cout = lhs[dn.lhs_spec[0]], lhs[dn.lhs_spec[1]], rhs[dn.rhs_spec[0]]
    taps = 1
    for d, (ls, rs, os_) in enumerate(zip(dn.lhs_spec[2:], dn.rhs_spec[2:], dn.out_spec[2:])):
        k, o = rhs[rs], out[os_]
        if count_padding:
            taps *= o * k
        else:
            taps *= _valid_taps(lhs[ls], o, k, eqn.params["window_strides"][d], eqn.params["padding"][d][0],
                                eqn.params["rhs_dilation"][d])
    return batch * taps * (cin // groups) * cout


def _jaxpr_macs(jaxpr: Any, count_padding: bool) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            total += _conv_macs(eqn, count_padding)
        elif name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[a] for a in lhs_contract)
        for sub in _sub_jaxprs(eqn.params):
            total += _jaxpr_macs(sub, count_padding)
    return total


def traced_macs(spec: ArchSpec, image_size: int, batch: int = 1, count_padding: bool = True) -> int:
    """MACs of every convolution and dense layer in the traced eval forward of ``build_model(spec)``.

    With ``count_padding`` (the convention of :func:`~oefsmc_jax.models.count_flops`) every kernel tap of every
    output position counts; without it, taps that read the zero padding are left out, as XLA's cost analysis
    does. Traces abstractly (no compile, no arrays).
    """
    model = build_model(spec)
    x = _input(spec, image_size, batch)
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(x.shape, x.dtype), train=False))
    closed = jax.make_jaxpr(_eval_forward(spec))(abstract, x)
    return _jaxpr_macs(closed.jaxpr, count_padding)
