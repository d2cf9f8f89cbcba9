"""Device mesh and array placement for data parallelism with pmap semantics.

The train step is a per-device function with explicit collectives over the named axis ``data`` (``lax.pmean`` of
gradients, losses and BatchNorm statistics), run with ``jax.shard_map`` over a 1-D mesh of all devices under
``jax.jit``. ``jax.shard_map`` is the supported successor of ``jax.pmap`` (in maintenance mode since JAX 0.8); the
same code runs on 1 CPU, N simulated CPU devices, a GPU, a TPU VM and several hosts.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"


def make_mesh(num_devices: int | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named ``data`` over ``devices`` (default: all devices, or the first ``num_devices``).

    The same arguments give the same (cached) mesh object, so compiled functions keyed on it are reused.
    """
    if devices is None:
        return _cached_mesh(num_devices or 0)
    return Mesh(np.asarray(devices), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


@functools.cache
def _cached_mesh(num_devices: int) -> Mesh:
    devices = jax.devices()
    if num_devices:
        if num_devices > len(devices):
            raise ValueError(f"num_devices={num_devices} but only {len(devices)} devices are visible")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that puts a full copy on every device of ``mesh``."""
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Sharding that splits the leading (batch) axis over the mesh."""
    return NamedSharding(mesh, P(AXIS))


def replicate(tree, mesh: Mesh):
    """Place a pytree of host arrays (identical on every host) on all devices of ``mesh``.

    Works for several hosts too: each process fills its addressable devices from its own (identical) copy.
    """
    sharding = replicated(mesh)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(put, tree)


def shard_batch(x: np.ndarray, mesh: Mesh) -> jax.Array:
    """Place a host batch, split along its leading axis, on the mesh (single- or multi-host)."""
    x = np.asarray(x)
    sharding = batch_sharded(mesh)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def num_devices(mesh: Mesh) -> int:
    """Number of devices along the data axis."""
    return mesh.shape[AXIS]
