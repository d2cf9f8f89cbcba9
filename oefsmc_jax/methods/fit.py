"""The inner fitting loop of compression stages: a few hundred optimizer steps on a small set of parameters.

``fit(loss_fn, params, data, config=FitConfig(tx, steps, batch_size, mesh), key=...)`` trains only ``params``
(everything else is closed over in ``loss_fn`` or passed as ``consts``) on mini-batches drawn from ``data``, a
dict of arrays that share their leading axis (the calibration set: images, weights, ...).

How it runs (modelled on ``oefsmc_jax.training.step.make_train_step``):

* The whole loop is one ``lax.scan`` inside one ``jax.jit`` of a ``jax.shard_map`` over the mesh axis ``data``:
  compiled once per (loss, optimizer, steps, batch size, mesh) and input shapes, dispatched once, and it returns
  the per-step losses. A Python loop around a compiled step would pay a dispatch and a host round-trip per step,
  which dominates steps this small (PRACTISE's adaptor fits are 64-image steps, a few thousand of them per run);
  the scan body is traced once, so compiling the loop costs what compiling one step costs.
* Every device draws the *global* batch of step ``t`` from ``fold_in(key, t)`` (rows without replacement when
  ``batch_size <= n``, otherwise whole permutations of the set, concatenated, so every row appears
  ``floor(batch_size / n)`` or one more times) and one key per row, and keeps its own slice; the loss is computed
  on the slice and the gradients are averaged with ``lax.pmean``. The result does not depend on the device count
  (up to float rounding).
* ``consts`` (optional) is a pytree passed to ``loss_fn`` as a traced input rather than a closure constant, so
  fits that differ only in its values (another candidate's student, another teacher) reuse the compiled loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from oefsmc_jax.training import xla_cpu
from oefsmc_jax.training.parallel import AXIS, make_mesh, num_devices, replicate

LossFn = Callable[..., Any]
_RUNNERS: dict[tuple, Callable] = {}
_MAX_RUNNERS = 16


def batch_indices(key: jax.Array, n: int, batch_size: int) -> jax.Array:
    """``batch_size`` row indices into a set of ``n``: without replacement when ``batch_size <= n``, otherwise
    ``ceil(batch_size / n)`` independent permutations concatenated and cut (as balanced as drawing can be)."""
    if n < 1 or batch_size < 1:
        raise ValueError(f"batch_indices: need n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    reps = -(-batch_size // n)
    perms = jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(key, reps))
    return perms.reshape(-1)[:batch_size]


def _runner(loss_fn: LossFn, tx: optax.GradientTransformation, steps: int, batch_size: int, mesh: Mesh,
            with_consts: bool, cpu_fusion: str) -> Callable:
    ndev = num_devices(mesh)
    b_loc = batch_size // ndev

    def per_device(params, data, key, consts):
        n = jax.tree.leaves(data)[0].shape[0]
        dev = lax.axis_index(AXIS)

        def objective(p, batch, keys):
            out = loss_fn(p, batch, keys, consts) if with_consts else loss_fn(p, batch, keys)
            if isinstance(out, tuple):  # (total, norm): the global loss is psum(total) / psum(norm)
                total, norm = out
                norm = lax.psum(lax.stop_gradient(norm), AXIS)
                return ndev * total / norm, lax.psum(lax.stop_gradient(total), AXIS) / norm
            return out, lax.pmean(lax.stop_gradient(out), AXIS)

        def body(carry, step):
            p, opt_state = carry
            k_idx, k_ex = jax.random.split(jax.random.fold_in(key, step))
            idx = lax.dynamic_slice_in_dim(batch_indices(k_idx, n, batch_size), dev * b_loc, b_loc)
            keys = lax.dynamic_slice_in_dim(jax.random.split(k_ex, batch_size), dev * b_loc, b_loc)
            batch = {name: a[idx] for name, a in data.items()}
            grads, loss = jax.grad(objective, has_aux=True)(p, batch, keys)
            grads = lax.pmean(grads, AXIS)
            updates, opt_state = tx.update(grads, opt_state, p)
            return (optax.apply_updates(p, updates), opt_state), loss

        (params, _), losses = lax.scan(body, (params, tx.init(params)), jnp.arange(steps, dtype=jnp.int32))
        return params, losses

    rep = P()
    return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(rep, rep, rep, rep), out_specs=(rep, rep),
                                 check_vma=False),
                   compiler_options=xla_cpu.compiler_options(xla_cpu.mesh_platform(mesh), cpu_fusion))


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """How :func:`fit` runs: ``steps`` steps of the optimizer ``tx`` on global batches of ``batch_size`` rows over
    ``mesh`` (None: one device), compiled under the XLA:CPU fusion mode ``cpu_fusion`` (``training/xla_cpu.py``).
    Hashable: the compiled loop is cached on it."""

    tx: optax.GradientTransformation
    steps: int
    batch_size: int
    mesh: Mesh | None = None
    cpu_fusion: str = xla_cpu.DEFAULT


def fit(loss_fn: LossFn, params: Any, data: Mapping[str, np.ndarray], *, config: FitConfig, key: jax.Array,
        consts: Any = None) -> tuple[Any, np.ndarray]:
    """Run ``config.steps`` optimizer steps of ``config.tx`` on ``params``; returns ``(params, losses)``
    (``losses[t]``: the global batch loss at step ``t``, before its update).

    ``loss_fn(params, batch, keys)`` (``loss_fn(params, batch, keys, consts)`` when ``consts`` is given) sees this
    device's slice of the batch: ``batch[name]`` holds its rows of ``data[name]`` and ``keys`` one PRNG key per
    row (derived from the row's position in the global batch, e.g. for ``augment_batch``). It returns either a
    scalar mean over its rows (the global loss is the mean over devices) or a pair ``(total, norm)`` (the global
    loss is ``sum(total) / sum(norm)`` over devices, e.g. a weighted mean ``sum w_i l_i / sum w_i``; ``norm``
    must not depend on ``params``). ``config.batch_size`` must be divisible by the mesh's device count.
    """
    tx = config.tx
    mesh = make_mesh(1) if config.mesh is None else config.mesh
    ndev = num_devices(mesh)
    steps, batch_size = int(config.steps), int(config.batch_size)
    if batch_size < 1 or batch_size % ndev:
        raise ValueError(f"fit: batch_size={batch_size} must be a positive multiple of the device count {ndev}")
    if steps < 1:
        raise ValueError(f"fit: steps must be >= 1, got {steps}")
    if not data:
        raise ValueError("fit: data needs at least one array")
    sizes = {name: np.shape(a)[0] if np.ndim(a) else -1 for name, a in data.items()}
    if len(set(sizes.values())) != 1 or min(sizes.values()) < 1:
        raise ValueError(f"fit: every data array needs the same non-zero leading size, got {sizes}")
    key = jnp.asarray(key)
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    cpu_fusion = xla_cpu.check_mode(config.cpu_fusion)
    cache_key = (loss_fn, tx, steps, batch_size, mesh, consts is not None, cpu_fusion)
    run = _RUNNERS.get(cache_key)
    if run is None:
        if len(_RUNNERS) >= _MAX_RUNNERS:
            _RUNNERS.pop(next(iter(_RUNNERS)))
        run = _RUNNERS[cache_key] = _runner(loss_fn, tx, steps, batch_size, mesh, consts is not None,
                                            cpu_fusion)
    params, losses = run(*replicate((params, dict(data), key, consts), mesh))
    return params, np.asarray(jax.device_get(losses))


__all__ = ["FitConfig", "batch_indices", "fit"]
