"""Per-step batches gathered on the host, for ID sets and OOD pools too large to replicate on every device.

With ``StepConfig.host_batches`` the train step does not receive the whole ID set and OOD pool: a background
thread of :class:`HostFeeder` draws each step's global indices with :func:`oefsmc_jax.training.step.host_draw` (the
same keys and calls as the step's own draw, so the images are exactly those of a run with the data on the device),
gathers those images from host arrays (``np.memmap`` files, or any array that supports fancy indexing on its first
axis, read only where indexed), and places them on the mesh ``prefetch`` steps ahead of the step that uses them.
Device memory then holds ``B_id + B_ood`` images per step whatever the pool size, and host memory ``prefetch``
batches: rows of a memory map are read with ``pread`` (``data.sources.gather_rows``), not through the mapping.

Why stream rather than shard the pool over the devices: a sharded pool still has to fit in the devices' memory
together (150 GB for a million 224x224 images), and gathering a random batch from it needs an all-to-all in every
step; streaming needs neither, and a few-sample run draws only ``steps x B_ood`` pool images in all.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import numpy as np
from jax.sharding import Mesh

from oefsmc_jax.data.sources import gather_rows
from oefsmc_jax.training.parallel import replicate
from oefsmc_jax.training.step import StepConfig, StepData, host_draw


def pool_bytes(data: StepData) -> int:
    """Bytes of the ID images and OOD pool of ``data`` (what replicating them costs per device)."""
    return sum(int(np.prod(np.shape(a))) * np.dtype(getattr(a, "dtype", np.uint8)).itemsize
               for a in (data.x_id, data.x_ood) if a is not None)


def _gather(a: Any, idx: np.ndarray) -> np.ndarray:
    if isinstance(a, np.memmap):  # plain reads: mapped pages would pull their neighbours into the process
        return gather_rows(a, np.asarray(idx, np.int64))
    order = np.argsort(idx, kind="stable")
    out = np.empty((len(idx),) + tuple(np.shape(a)[1:]), dtype=np.dtype(getattr(a, "dtype", np.uint8)))
    out[order] = np.asarray(a[idx[order]])
    return out


class HostFeeder:
    """Yields, for steps ``start, start + 1, ...``, the step's :class:`StepData` batch on the mesh."""

    def __init__(self, cfg: StepConfig, data: StepData, rng: np.ndarray, start: int, mesh: Mesh,
                 prefetch: int = 2):
        if not cfg.host_batches:
            raise ValueError("HostFeeder needs a StepConfig with host_batches=True")
        self.cfg, self.data, self.rng, self.mesh = cfg, data, np.asarray(rng, np.uint32), mesh
        self.n = int(np.shape(data.x_id)[0])
        self.m = int(np.shape(data.x_ood)[0]) if data.x_ood is not None and cfg.batch_ood > 0 else 0
        self.id_probs = None if data.id_probs is None else np.asarray(data.id_probs, np.float32)
        # constants of the run: placed once, reused by every batch
        self.consts = replicate({"gamma": np.asarray(data.gamma), "reg_weights": np.asarray(data.reg_weights)}, mesh)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._next, self._stop = start, threading.Event()
        self._thread = threading.Thread(target=self._work, name="host-feeder", daemon=True)
        self._thread.start()

    def batch(self, step: int) -> StepData:
        """The host-side batch of ``step`` (placed on the mesh)."""
        d = self.data
        idx, idx_ood = host_draw(self.cfg, self.rng, step, self.n, self.m, self.id_probs)
        host = {"x_id": _gather(d.x_id, idx), "y_id": np.asarray(d.y_id)[idx].astype(np.int32)}
        if self.m:
            host["x_ood"] = _gather(d.x_ood, idx_ood)
            if d.y_ood is not None:
                host["y_ood"] = np.asarray(d.y_ood)[idx_ood].astype(np.int32)
        placed = replicate(host, self.mesh)
        return StepData(x_id=placed["x_id"], y_id=placed["y_id"], x_ood=placed.get("x_ood"), id_probs=None,
                        gamma=self.consts["gamma"], reg_weights=self.consts["reg_weights"], y_ood=placed.get("y_ood"))

    def _work(self) -> None:
        step = self._next
        while not self._stop.is_set():
            try:
                item: Any = (step, self.batch(step))
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                item = (step, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item[1], BaseException):
                return
            step += 1

    def get(self, step: int) -> StepData:
        """The batch of ``step``; steps must be asked for in order from ``start``."""
        got, item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        if got != step:
            raise RuntimeError(f"HostFeeder: asked for step {step}, the next prepared batch is for step {got}")
        return item

    def close(self) -> None:
        """Stop the background thread."""
        self._stop.set()
        self._thread.join(timeout=5)
