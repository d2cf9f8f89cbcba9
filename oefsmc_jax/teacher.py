"""The teacher of a run and its pass over the OOD pool.

:func:`get_teacher` imports a pretrained checkpoint (a PyTorch file of a known family, or an Orbax model) and checks
that its classes and normalisation match the config, or trains one from scratch once and keeps it in the workdir.
:func:`teacher_pool_probs` computes the teacher's class probabilities on the OOD candidates in one streamed pass,
cached on disk by content, for the teacher-guided selection rules.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from oefsmc_jax import paths
from oefsmc_jax.data import ImageSet, Source, source_hashes
from oefsmc_jax.data.prepare import RunData
from oefsmc_jax.errors import ConfigError
from oefsmc_jax.methods import Supervised
from oefsmc_jax.models import ArchSpec, build_arch, count_params, init_variables
from oefsmc_jax.progress import log
from oefsmc_jax.training import preemption
from oefsmc_jax.training.checkpoint import load_model, save_model
from oefsmc_jax.training.from_config import compile_modes, predict_fn
from oefsmc_jax.training.loop import finetune
from oefsmc_jax.training.parallel import replicate
from oefsmc_jax.training.step import StepConfig, StepData
from oefsmc_jax.training.train import LoopConfig, RunJob


def get_teacher(config: Any, workdir: paths.Path, mesh: Any, data: RunData) -> tuple[ArchSpec, dict]:
    """Load the teacher from ``config.teacher.checkpoint``, or train it (once, cached in the workdir)."""
    path = config.teacher.checkpoint
    if path:
        from oefsmc_jax.convert import load_pretrained, teacher_preprocessing
        from oefsmc_jax.convert.readers import STATE_SUFFIXES

        if str(path).endswith(STATE_SUFFIXES):
            spec, variables = load_pretrained(path)  # akamaster, chenyaofo or torchvision, told apart by its keys
            log(f"teacher: imported {path} ({spec.family}, shortcut {spec.shortcut}, "
                f"{count_params(spec):,} parameters)")
            expected = teacher_preprocessing(path)
        else:
            spec, variables, meta = load_model(path)
            pre = meta.get("preprocessing") or {}
            expected = (tuple(pre["mean"]), tuple(pre["std"])) if "mean" in pre and "std" in pre else None
        if expected is not None and not np.allclose(np.asarray(expected, np.float64),
                                                    np.asarray([config.data.mean, config.data.std], np.float64)):
            raise ConfigError(f"config.data.mean/std: {tuple(config.data.mean)} / {tuple(config.data.std)} differ "
                              f"from the teacher's own normalisation {expected[0]} / {expected[1]}; set data.mean "
                              "and data.std to the teacher's")
        if spec.num_classes != config.data.num_classes:
            raise ValueError(f"teacher.checkpoint: the teacher has {spec.num_classes} classes but "
                             f"data.num_classes is {config.data.num_classes}")
        try:
            asked = build_arch(config.arch, config.data.num_classes)
        except (ValueError, KeyError):
            asked = None
        if asked is not None and (asked.family, asked.kept, asked.inner_widths) != (spec.family, spec.kept,
                                                                                     spec.inner_widths):
            log(f"teacher: note: the checkpoint is a {spec.family} with {sum(map(len, spec.kept))} blocks, not the "
                f"config.arch {config.arch.name!r}; the checkpoint's architecture is what runs")
        return spec, variables
    tdir = workdir / "teacher"
    if (tdir / "model").exists():
        spec, variables, _ = load_model(tdir / "model")
        log(f"teacher: reusing {tdir / 'model'}")
        return spec, variables
    if data.full_train is None:
        raise ValueError("teacher.checkpoint is empty and data.id is a lazy tfds source that is not loaded whole; "
                         "give teacher.checkpoint (an Orbax model, or an akamaster/chenyaofo .npz/.th/.pt file)")
    tc = config.teacher
    spec = build_arch(config.arch, config.data.num_classes)
    variables = init_variables(spec, config.data.image_size, config.seed)
    full = data.full_train
    step_data = StepData(x_id=replicate(full.x, mesh), y_id=replicate(full.y, mesh), x_ood=None, id_probs=None,
                         gamma=replicate(np.full(config.data.num_classes, 1 / config.data.num_classes,
                                                 np.float32), mesh),
                         reg_weights=replicate(np.ones(config.data.num_classes, np.float32), mesh))
    log(f"teacher: training {config.arch.name} from scratch on {len(full)} images for {tc.steps} steps")
    res = finetune(RunJob(name="teacher", workdir=tdir, mesh=mesh, spec=spec, variables=variables,
                          recipe=Supervised().recipe(), teacher_spec=None, teacher_variables=None, data=step_data,
                          step_cfg=StepConfig(batch_id=tc.batch_size, pad=config.data.pad, flip=config.data.flip,
                                              mean=tuple(config.data.mean), std=tuple(config.data.std),
                                              **compile_modes(config, mesh)),
                          optim_cfg=tc.optim.to_dict(),
                          loop=LoopConfig(steps=tc.steps, log_every=config.train.log_every,
                                          ckpt_every=config.train.ckpt_every),
                          seed=config.seed))
    save_model(tdir / "model", spec, res.variables)
    return spec, res.variables


def teacher_pool_probs(config: Any, workdir: paths.Path, mesh: Any, teacher: tuple[ArchSpec, dict],
                       pool: ImageSet | Source, chunk: int = 2048, hashes: np.ndarray | None = None) -> np.ndarray:
    """The teacher's class probabilities (float32 ``[N, K]``) on the OOD candidates: one batched, jitted pass
    with progress, reading the pool ``chunk`` images at a time and writing straight into the cache file
    ``oe.cache_dir`` (default ``workdir/cache``), keyed by the pool's images (``hashes``: their
    :func:`source_hashes`, computed when not given), the teacher's weights and the preprocessing, so a grid computes
    it once. Returned memory-mapped from that file, so host memory stays flat however large the pool."""
    t_spec, t_vars = teacher
    h = hashlib.sha1()
    h.update((source_hashes(pool) if hashes is None else hashes).tobytes())
    for leaf in jax.tree.leaves(t_vars):
        h.update(np.ascontiguousarray(leaf).tobytes())
    h.update(json.dumps([t_spec.to_dict(), list(config.data.mean), list(config.data.std)]).encode())
    cache = paths.as_path(config.oe.cache_dir or workdir / "cache") / f"pool_probs_{h.hexdigest()[:16]}.npy"
    if cache.exists():
        try:
            probs = paths.load_npy(cache, mmap=True)
            if probs.shape == (len(pool), t_spec.num_classes):
                log(f"teacher: reusing pool probabilities {cache}")
                return probs
            problem = f"shape {probs.shape}, expected {(len(pool), t_spec.num_classes)}"
        except (ValueError, OSError, EOFError) as e:  # a damaged file: this run wrote it, so it is redone
            problem = f"{type(e).__name__}: {str(e).strip()[:120]}"
        log(f"teacher: the cached pool probabilities {cache} are unreadable ({problem}); computing them again")
    predict = predict_fn(mesh, t_spec, tuple(config.data.mean), tuple(config.data.std), config.eval.batch_size,
                         compile_modes(config, mesh)["cpu_fusion"])
    # written into a local file as it is computed (the cache's sibling, or a temporary file when the cache is remote)
    if paths.is_local(cache):
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = paths.tmp_sibling(cache)
    else:
        tmp = paths.as_path(tempfile.mkdtemp(prefix="oefsmc_pool_probs_")) / cache.name
    out = np.lib.format.open_memmap(os.fspath(tmp), mode="w+", dtype=np.float32,
                                    shape=(len(pool), t_spec.num_classes))
    t0, done = time.time(), 0
    parts = pool.chunks(chunk) if isinstance(pool, Source) else (
        ImageSet(pool.x[i:i + chunk], pool.y[i:i + chunk], pool.name) for i in range(0, len(pool), chunk))
    for part in parts:
        preemption.check(f"the teacher's pool pass ({done} of {len(pool)} images done)")
        logits = predict(t_vars, part.x)["logits"]
        out[done:done + len(part)] = np.asarray(jax.nn.softmax(jnp.asarray(logits), -1))
        done += len(part)
        log(f"teacher: pool pass {done}/{len(pool)} images ({done / max(time.time() - t0, 1e-9):,.0f} img/s)")
    out.flush()
    del out
    if jax.process_index() == 0:  # other processes computed the same values; only process 0 keeps a cache file
        if paths.is_local(cache):
            with open(os.fspath(tmp), "rb+") as f:  # on the disk before the name points at it
                os.fsync(f.fileno())
            tmp.replace(cache)
            return paths.load_npy(cache, mmap=True)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp.copy(paths.tmp_sibling(cache), overwrite=True)
        paths.tmp_sibling(cache).replace(cache)
    probs = np.load(os.fspath(tmp), mmap_mode="r")
    os.unlink(os.fspath(tmp))  # the open memory map keeps the data readable (POSIX)
    return probs
