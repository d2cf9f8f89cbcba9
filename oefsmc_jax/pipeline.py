"""One compression run from a config: data -> teacher -> subsets -> (compress, fine-tune, evaluate) per arm -> report.

An *arm* is one way of compressing the same teacher on the same few-sample set: ``base`` (the method alone) or
``oe`` (the method with OE-FSMC). All arms of a run share the ID subset, the OOD pool, the held-out OOD slice and
the test split, so their comparison is paired. Every finished piece (teacher, compressed student, fine-tuning
checkpoints, exported student, per-arm result) is written to the workdir and reused when the run is started again.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from oefsmc_jax import __version__, paths, workdir_lock
from oefsmc_jax.config_validation import validate
from oefsmc_jax.data import (
    ImageSet,
    Source,
    check_disjoint,
    class_counts,
    class_order_permutation,
    default_ood_size,
    few_sample_indices,
    load_source,
    ood_split,
    open_source,
    source_hashes,
    tfds_labels,
)
from oefsmc_jax.errors import ConfigError
from oefsmc_jax.evaluation import agreement, classification_metrics, side_by_side, write_report
from oefsmc_jax.kernels import cpu_conv
from oefsmc_jax.methods import CompressionContext, Method, OESettings, Supervised, build_method, resolve_oe
from oefsmc_jax.methods.fskd_solver import fold_corrections
from oefsmc_jax.models import ArchSpec, build_arch, build_model, count_flops, count_params, shrink
from oefsmc_jax.models.latency import measure_latency
from oefsmc_jax.oe import complementary
from oefsmc_jax.oe.arms import (
    ARMS,
    Arm,
    arm_names,
    arm_selection,
    arms_of,
    check_arms,
    needs_teacher_probs,
    uses_ood,
)
from oefsmc_jax.oe.calibration import Calibration
from oefsmc_jax.oe.calibration import calibration_set as build_calibration
from oefsmc_jax.oe.selection import select as select_ood
from oefsmc_jax.training import cell, compile_cache, preemption, xla_cpu
from oefsmc_jax.training.checkpoint import load_model, save_model
from oefsmc_jax.training.feed import pool_bytes
from oefsmc_jax.training.loop import finetune
from oefsmc_jax.training.parallel import make_mesh, replicate
from oefsmc_jax.training.step import StepConfig, StepData, make_predict
from oefsmc_jax.training.train import LoopConfig, RunJob
from oefsmc_jax.training.xla_cpu import mesh_platform

__all__ = ["ARMS", "RunData", "arm_names", "arm_selection", "calibration_set", "prepare_data", "run", "run_arm",
           "uses_ood"]


def log(msg: str) -> None:
    """Progress output (stderr, flushed); inside a grouped grid's cell (:mod:`oefsmc_jax.training.cell`), prefixed
    with the cell's name."""
    current = cell.current()
    if current is not None:
        msg = f"[{current.name}] {msg}"
    print(msg, file=sys.stderr, flush=True)


def write_json(path: paths.Path, obj: Any) -> None:
    """Write JSON atomically (a crash never leaves a half-written result); only process 0 writes."""
    if jax.process_index() != 0:
        return
    paths.write_text_atomic(path, json.dumps(obj, indent=1, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    return str(o)


@dataclasses.dataclass
class RunData:
    """The data of a run: the few-sample set, the OOD subset and held-out slice, and the test split."""

    train: ImageSet  # few-sample ID set D
    counts: np.ndarray  # n_k
    ood: ImageSet | None  # D_o
    heldout: ImageSet | None  # held-out OOD slice for early stopping
    test: ImageSet
    full_train: ImageSet | None  # the whole ID training split (only for sources that are cheap to load)
    subset: dict | None = None  # counts and chosen indices (also in subset.json and in every checkpoint)
    candidates: Source | None = None  # the OOD pool minus the held-out slice: what teacher-guided selection sees
    candidate_hashes: np.ndarray | None = None  # their content hashes (uint64), from the overlap check


def _labels_and_loader(cfg: Any, cache: paths.Path) -> tuple[np.ndarray, Callable[[np.ndarray], ImageSet],
                                                                ImageSet | None]:
    if cfg.kind == "tfds" and cfg.get("lazy", False):
        labels = tfds_labels(cfg, cache)
        return labels, lambda idx: load_source(cfg, idx), None
    full = load_source(cfg)
    return full.y, full.take, full


def prepare_data(config: Any, workdir: paths.Path) -> RunData:
    """Load the sources, draw the few-sample set and the OOD subset (seeded), check they are disjoint from each
    other and from the test split, and write the chosen indices to ``workdir/subset.json``."""
    k = config.data.num_classes
    s = config.subset
    labels, load_train, full_train = _labels_and_loader(config.data.id, workdir / "cache" / "id_labels.npz")
    order = class_order_permutation(k, s.seed) if s.class_order == "random" else None
    counts = class_counts(k, s.mode, s.per_class, s.rho, s.equal_total, order)
    idx = few_sample_indices(jax.random.PRNGKey(s.seed), labels, counts)
    train = load_train(idx)
    if config.eval.split == "val":
        # a balanced validation split carved from the ID training images outside the few-sample set: for tuning,
        # so that no choice is ever made on the test split
        rest = np.asarray(labels).copy()
        rest[np.asarray(idx)] = -1
        val_idx = few_sample_indices(jax.random.PRNGKey(s.seed + 5), rest,
                                     np.full(k, config.eval.val_per_class, np.int64))
        test = load_train(val_idx)
        test = ImageSet(test.x, test.y, f"{test.name}[val]")
    else:
        test = load_source(config.data.test)
    y_test = np.asarray(test.y)
    if len(y_test) and (y_test.min() < 0 or y_test.max() >= k):
        bad = y_test[(y_test < 0) | (y_test >= k)]
        raise ValueError(f"evaluation split {test.name}: {len(bad)} labels outside [0, {k}) (e.g. {int(bad[0])}); "
                         f"check data.test / data.num_classes")
    log(f"data: few-sample set {len(train)} images, counts per class {counts.tolist()}; test {len(test)} images")

    ood = heldout = candidates = cand_hashes = None
    ood_idx = held_idx = np.zeros(0, np.int64)
    if uses_ood(config) or (config.oe.early_stopping and config.oe.early_stopping_arms == "all"):
        pool = open_source(config.data.ood)  # nothing is read yet: only the chosen images, or chunks
        m = config.oe.size if config.oe.size >= 0 else default_ood_size(counts, config.oe.size_cap or None)
        held_n = config.oe.heldout if config.oe.early_stopping else 0
        if m + held_n > len(pool):
            raise ValueError(f"oe.size + oe.heldout = {m} + {held_n} exceeds the OOD pool's {len(pool)} images "
                             f"({pool.name}); lower oe.size / oe.heldout or use a larger pool")
        ood_idx, held_idx = ood_split(jax.random.PRNGKey(s.seed + 1), len(pool), m, held_n)
        ood, heldout = pool.take(ood_idx), pool.take(held_idx)
        used = ImageSet(np.concatenate([ood.x, heldout.x]), np.concatenate([ood.y, heldout.y]), pool.name)
        if needs_teacher_probs(config):
            candidates = pool.subset(np.setdiff1d(np.arange(len(pool)), held_idx))
            cand_hashes = source_hashes(candidates)  # one streamed pass over the pool
            check_disjoint(candidates, train, "the OOD pool overlaps the in-distribution few-sample set",
                           cand_hashes)
            check_disjoint(candidates, test, "the OOD pool overlaps the evaluation split (it must never be used "
                                             "to train)", cand_hashes)
        check_disjoint(used, train, "the OOD images overlap the in-distribution few-sample set")
        check_disjoint(used, test, "the OOD images overlap the evaluation split (it must never be used to train)")
        log(f"data: OOD subset {len(ood)} images, held-out OOD slice {len(heldout)} from {pool.name}")
    check_disjoint(train, test, "the few-sample training set overlaps the evaluation split")
    subset = {"counts": counts.tolist(), "id_indices": np.asarray(idx).tolist(), "ood_indices": ood_idx.tolist(),
              "heldout_indices": held_idx.tolist(), "id_source": train.name, "test_source": test.name}
    previous = workdir / "subset.json"
    if previous.exists():
        old = paths.read_json(previous)  # a damaged file is named in one line
        if any(old.get(k) != subset[k] for k in ("counts", "id_indices", "id_source")) or (
                uses_ood(config) and old.get("ood_indices") and old["ood_indices"] != subset["ood_indices"]):
            raise ConfigError(f"workdir {workdir} holds a run on a different few-sample or OOD subset (the data, "
                              "subset or seed settings changed); use a new --workdir, or delete this one")
    write_json(previous, subset)
    return RunData(train, counts, ood, heldout, test, full_train, subset, candidates, cand_hashes)


def init_variables(spec: ArchSpec, image_size: int, seed: int) -> dict:
    """Randomly initialised variables of the model for ``spec``."""
    model = build_model(spec)
    x = jnp.zeros((1, image_size, image_size, spec.in_channels), jnp.float32)
    return jax.device_get(jax.jit(lambda k: model.init(k, x, train=False))(jax.random.PRNGKey(seed)))


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
                f"config.arch {config.arch.get('name', '?')!r}; the checkpoint's architecture is what runs")
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


def calibration_set(config: Any, data: RunData, oe_on: bool, gamma: np.ndarray, ood: ImageSet | None = None,
                    ood_labels: np.ndarray | None = None, settings: OESettings | None = None) -> Calibration:
    """Calibration set of the compression stage (method.md §3) for one arm: ``D``, plus with OE (and
    ``oe.in_compression``) the OOD subset (``ood``, by default ``data.ood``) carrying ``ood_labels`` (by default
    labels drawn once from Gamma), weighted by ``1 / count(label)`` or with the OOD rows at the share
    ``settings.calibration_ood_share`` of the total (``settings``: the method's, :func:`resolve_oe`; by default
    the base method's)."""
    ood = data.ood if ood is None else ood
    with_ood = oe_on and config.oe.in_compression and ood is not None and len(ood)
    share = (settings or resolve_oe(config, Method)).calibration_ood_share
    return build_calibration(data.train.x, data.train.y, config.data.num_classes,
                             ood_x=ood.x if with_ood else None, ood_labels=ood_labels if with_ood else None,
                             gamma=gamma, seed=config.seed + 2, ood_share=share)

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


def compile_modes(config: Any, mesh: Any = None) -> dict[str, str]:
    """``{'cpu_fusion': ..., 'cpu_wgrad': ...}``: the compile modes ``config`` asks for, its empty fields resolved
    from ``$OEFSMC_CPU_FUSION`` / ``$OEFSMC_CPU_WGRAD`` or the defaults (``training/xla_cpu.py``,
    ``kernels/cpu_conv.py``); the filter-gradient kernel is a CPU kernel, so ``cpu_wgrad`` is ``xla`` when ``mesh``
    (None: JAX's default backend) is not a CPU. The pipeline passes them to what it compiles (``StepConfig``,
    :func:`predict_fn`, ``CompressionContext``); nothing reads them from a process-wide setting."""
    platform = mesh_platform(mesh) if mesh is not None else jax.default_backend()
    return {"cpu_fusion": xla_cpu.resolve_mode(config.get("cpu_fusion", "")),
            "cpu_wgrad": cpu_conv.resolve_mode(config.get("cpu_wgrad", "")) if platform == "cpu" else "xla"}


@functools.lru_cache(maxsize=64)
def predict_fn(mesh: Any, spec: ArchSpec, mean: tuple, std: tuple, batch_size: int,
               cpu_fusion: str = xla_cpu.DEFAULT) -> Callable:
    """A cached sharded eval forward for ``spec`` (compiled once per architecture, image shape and XLA:CPU fusion
    mode ``cpu_fusion``)."""
    return make_predict(mesh, build_model(spec), mean, std, batch_size, cpu_fusion=cpu_fusion)


def finished_result(path: paths.Path) -> dict | None:
    """The result in an arm's ``result.json``, or None when the arm is not finished: no file, or one that is empty,
    torn or not a JSON object with ``metrics`` (then a one-line note names it; the rerun overwrites it atomically)."""
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError):
        result = None
    if isinstance(result, dict) and "metrics" in result:
        return result
    log(f"note: {path} is empty, torn or not a result; the arm counts as not finished and runs again")
    return None


def _trained_commit(path: paths.Path) -> dict:
    """The commit (and dirty flag) of the code that started training an arm, written to ``path`` on the first
    start; a resumed arm keeps the first start's, so a record can tell the training code from the recording code."""
    from oefsmc_jax.provenance import code_version

    if path.exists():
        try:
            return dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError, ValueError):
            pass  # a torn file: the commit is unknown, and the current one would be a guess
        return {"git_commit": None, "git_dirty": None}
    # an arm folder without the file was started by code that did not write it: its commit is unknown
    code = code_version() if not path.parent.exists() else {"git_commit": None, "git_dirty": None}
    write_json(path, code)
    return code


def run_arm(config: Any, arm: str, workdir: paths.Path, mesh: Any, data: RunData, method: Method,
            teacher: tuple[ArchSpec, dict], teacher_test_pred: np.ndarray, heldout_pred: np.ndarray | None,
            pool_probs: np.ndarray | None = None) -> dict:
    """Compress, fine-tune and evaluate one arm; reuses every finished piece in ``workdir/arm``."""
    adir = workdir / arm
    if (done := finished_result(adir / "result.json")) is not None:
        log(f"[{arm}] finished earlier; reusing {adir / 'result.json'}")
        return done
    t0 = time.time()
    trained = _trained_commit(adir / "trained_commit.json")
    spec_arm: Arm = ARMS[arm]
    oe_on = spec_arm.uses_ood
    rule = spec_arm.selection(config)
    k = config.data.num_classes
    settings = resolve_oe(config, method)  # lambda_jd, eta, bn_mode, calibration share: the method's defaults
    ood_set, ood_labels, eta = data.ood, None, spec_arm.eta(config, settings.eta)
    if oe_on and rule != "random":
        sel = select_ood(rule, pool_probs, data.counts, config.oe.selection_factor)
        if sel.short:
            log(f"[{arm}] warning: {sel.shortfall_message()}")
        ood_set = data.candidates.take(sel.indices)
        ood_labels = sel.classes.astype(np.int32)
        log(f"[{arm}] {rule}: selected {len(ood_set)} OOD images (c = {config.oe.selection_factor:g}), "
            f"per class {np.bincount(sel.classes, minlength=k).tolist()}")
    elif oe_on and spec_arm.count == "teacher_complement":
        # random images, as many as the teacher complement would pick: separates the count from the choice
        n = len(select_ood("teacher_complement", pool_probs, data.counts, config.oe.selection_factor).indices)
        idx = np.sort(np.random.default_rng(config.seed + 11).choice(len(data.candidates), n, replace=False))
        ood_set = data.candidates.take(idx)
        log(f"[{arm}] random: {n} OOD images, the teacher complement's count (c = {config.oe.selection_factor:g})")
    recipe = spec_arm.wrap(method.recipe(), data.counts)
    alpha = config.oe.alpha if config.oe.alpha >= 0 else None
    gamma = np.asarray(complementary.complementary_distribution(jnp.asarray(data.counts), alpha))
    t_spec, t_vars = teacher
    if (adir / "compressed").exists():
        spec, variables, _ = load_model(adir / "compressed")
        log(f"[{arm}] reusing the compressed student in {adir / 'compressed'}")
    else:
        calib = calibration_set(config, data, oe_on, gamma, ood_set, ood_labels, settings)
        ctx = CompressionContext(teacher_spec=t_spec, teacher_variables=t_vars, calibration=calib,
                                 mean=tuple(config.data.mean), std=tuple(config.data.std),
                                 key=jax.random.PRNGKey(config.seed + 3), mesh=mesh, workdir=adir,
                                 latency=config.method.latency, batch_size=config.eval.batch_size,
                                 cpu_fusion=compile_modes(config, mesh)["cpu_fusion"],
                                 log=lambda s, a=arm: log(f"[{a}] {s}"))
        if method.uses_calibration:
            log(f"[{arm}] compressing with a calibration set of {len(calib)} images "
                f"({int(calib.is_ood.sum())} OOD)")
        with preemption.stage(f"[{arm}]", "compression", "rerun the same command to restart this arm's compression"):
            spec, variables = method.compress(ctx)  # nothing is written before it returns
        if config.student.export_before_finetune:
            spec, variables = shrink(spec, variables)
        save_model(adir / "compressed", spec, variables)
    use_ood = oe_on and ood_set is not None and len(ood_set) > 0
    if recipe.finetunes:
        es_on = oe_on or config.oe.early_stopping_arms == "all"
        res = _finetune_arm(config, arm, adir, mesh, data, recipe, spec, variables, teacher, spec_arm, gamma, eta,
                            ood_set if use_ood else None, heldout_pred if es_on else None,
                            ood_labels if use_ood and spec_arm.fixed_labels else None, settings)
        final_vars, steps_run = res.variables, res.steps_run
        es = {"best_step": res.best_step, "best_heldout_agreement": res.best_agreement,
              "stopped_early": res.stopped_early}
    else:
        log(f"[{arm}] {method.name} does not fine-tune; evaluating the compressed student")
        final_vars, steps_run, es = variables, 0, {"best_step": 0, "best_heldout_agreement": None,
                                                   "stopped_early": False}
    spec_x, vars_x = shrink(*fold_corrections(spec, final_vars))  # FSKD's Q layers folded at export
    save_model(adir / "student", spec_x, vars_x, {"arm": arm, "method": method.name})
    predict = predict_fn(mesh, spec_x, tuple(config.data.mean), tuple(config.data.std), config.eval.batch_size,
                         compile_modes(config, mesh)["cpu_fusion"])
    pred = np.argmax(predict(vars_x, data.test.x)["logits"], -1)
    metrics = classification_metrics(pred, data.test.y, k, data.counts)
    metrics["agreement"] = agreement(pred, teacher_test_pred)
    result = {"arm": arm, "method": method.describe(), "metrics": metrics, "steps": steps_run,
              "ood_selection": rule if oe_on else None, "ood_images": len(ood_set) if use_ood else 0,
              "eta": eta if use_ood else None, "oe_settings": settings.describe() if oe_on else None, **es,
              "spec": spec_x.to_dict(),
              "params": count_params(spec_x), "flops": count_flops(spec_x, config.data.image_size),
              "wall_s": time.time() - t0, "version": __version__, "trained_commit": trained.get("git_commit"),
              "trained_dirty": trained.get("git_dirty")}
    if config.eval.latency:
        result["latency_ms"] = measure_latency(spec_x, vars_x, config.data.image_size)
    write_json(adir / "result.json", result)
    log(f"[{arm}] test top-1 {metrics['top1']:.2f}%  balanced {metrics['balanced']:.2f}%  "
        f"few-shot {metrics['few'] if metrics.get('few') is not None else float('nan'):.2f}%")
    return result


def _finetune_arm(config: Any, arm: str, adir: paths.Path, mesh: Any, data: RunData, recipe: Any,
                  spec: ArchSpec, variables: dict, teacher: tuple[ArchSpec, dict], spec_arm: Arm,
                  gamma: np.ndarray, eta: float, ood_set: ImageSet | None, heldout_pred: np.ndarray | None,
                  ood_labels: np.ndarray | None = None, settings: OESettings | None = None) -> Any:
    """The fine-tuning stage of one arm (method.md §4): the recipe's loss on ID images, plus OE-FSMC's terms when
    the arm has OOD images (weights from ``settings``, the method's :func:`resolve_oe`); early stopping on held-out
    OOD agreement for OE arms. A recipe with its own ``schedule`` (CD's official fine-tuning) replaces the steps,
    ID batch, optimizer, augmentation and early stopping of ``train.*``/``optim.*``."""
    settings = settings or OESettings()
    k = config.data.num_classes
    t_spec, t_vars = teacher
    id_probs = spec_arm.id_probs(data.train.y, k)
    reg_w = np.asarray(complementary.class_weights(jnp.asarray(gamma)), np.float32)
    host_data = StepData(
        x_id=data.train.x, y_id=data.train.y.astype(np.int32), x_ood=ood_set.x if ood_set is not None else None,
        id_probs=id_probs, gamma=gamma.astype(np.float32), reg_weights=reg_w,
        y_ood=ood_labels.astype(np.int32) if ood_labels is not None else None)
    mode = str(config.train.host_batches)
    host_batches = mode == "on" or (mode == "auto" and
                                    pool_bytes(host_data) > config.train.device_pool_mb * 2**20)
    # host batches: the arrays stay on the host (training/feed.py gathers each step's images); else on every device
    step_data = host_data if host_batches else jax.tree.map(lambda a: replicate(a, mesh), host_data)
    tr = config.train
    own = recipe.schedule
    steps, batch_id, optim_cfg = tr.steps, tr.batch_id, config.optim.to_dict()
    pad, flip = config.data.pad, config.data.flip
    if own is not None:
        steps, batch_id, optim_cfg = own.steps, own.batch(len(data.train), len(mesh.devices.flat)), own.optim(optim_cfg)
        pad, flip = (pad, flip) if own.augment else (0, False)
        log(f"[{arm}] the method's own fine-tuning: {steps} steps of {batch_id} ID images, lr {own.lr:g}, "
            f"augmentation {'on' if own.augment else 'off'}")
    step_cfg = StepConfig(batch_id=batch_id, batch_ood=tr.batch_ood if ood_set is not None else 0,
                          pad=pad, flip=flip, mean=tuple(config.data.mean),
                          std=tuple(config.data.std), lambda_jd=settings.lambda_jd, eta=eta, tau=config.method.tau,
                          bn_mode=settings.bn_mode, host_batches=host_batches, **compile_modes(config, mesh))
    # early stopping on held-out OOD agreement: OE arms (the default), or every arm (oe.early_stopping_arms=all)
    early = (config.oe.early_stopping and data.heldout is not None and len(data.heldout) > 0
             and heldout_pred is not None and (own is None or own.early_stopping))
    loop = LoopConfig(steps=steps, log_every=tr.log_every, eval_every=config.oe.eval_every if early else 0,
                      patience=config.oe.patience, ckpt_every=tr.ckpt_every,
                      max_nonfinite=tr.max_nonfinite)
    heldout = (data.heldout.x, heldout_pred) if early else None
    return finetune(RunJob(name=arm, workdir=adir, mesh=mesh, spec=spec, variables=variables, recipe=recipe,
                           teacher_spec=t_spec, teacher_variables=t_vars, data=step_data, step_cfg=step_cfg,
                           optim_cfg=optim_cfg, loop=loop, seed=config.seed, heldout=heldout,
                           meta={"arm": arm, "spec": spec.to_dict(), "subset": data.subset}))


#: Config fields that do not change a run's results (how often to log or checkpoint, where caches live, how many
#: devices share the work: results are the same on 1 or N devices); a workdir may be resumed with other values.
RESUMABLE_FIELDS = ("train.log_every", "train.ckpt_every", "train.max_nonfinite", "eval.batch_size",
                    "oe.cache_dir", "num_devices", "title", "compile_cache")


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def check_same_config(path: paths.Path, new: dict) -> None:
    """Refuse a workdir whose ``config.json`` holds another config (fields present in both, except
    :data:`RESUMABLE_FIELDS`): its finished arms would otherwise be reported under the new config."""
    if not path.exists():
        return
    try:
        old = _flat(json.loads(path.read_text()))
    except (OSError, ValueError):
        return  # unreadable: the subset check still guards the data
    cur = _flat(json.loads(json.dumps(new, default=_json_default)))
    diff = [k for k in sorted(set(old) & set(cur)) if old[k] != cur[k]
            and not any(k == f or k.startswith(f + ".") for f in RESUMABLE_FIELDS)]
    if diff:
        shown = ", ".join(f"{k} ({old[k]!r} -> {cur[k]!r})" for k in diff[:4]) + (" ..." if len(diff) > 4 else "")
        raise ConfigError(f"workdir {path.parent} holds a run of another config: {shown}; use a new --workdir, "
                          "delete this one, or rerun with the config it was made with")


@workdir_lock.scope
def run(config: Any, workdir: str | os.PathLike) -> dict:
    """Run every arm of ``config`` in ``workdir`` and write ``report.md`` and the per-class plot; returns results."""
    paths.check_reachable(workdir, "--workdir")
    workdir = paths.as_path(workdir)
    cache = compile_cache.enable(config.get("compile_cache", ""))
    xla_cpu.resolve_mode(config.get("cpu_fusion", ""))  # a bad mode (or $OEFSMC_CPU_FUSION) fails first
    if config.num_devices < 0 or config.num_devices > jax.device_count():
        raise ConfigError(f"config.num_devices: {config.num_devices} is not allowed; 0 (all) to "
                          f"{jax.device_count()} devices are visible")
    mesh = make_mesh(config.num_devices or None)
    validate(config, num_devices=mesh.shape["data"])
    modes = compile_modes(config, mesh)
    # the filter-gradient kernel is a CPU kernel: built (or found in its cache) here, before any data loads
    if modes["cpu_wgrad"] == "kernel":
        cpu_conv.register()
    workdir_lock.take(workdir)  # one process per workdir, before anything is written there; released on return
    check_same_config(workdir / "config.json", config.to_dict())
    write_json(workdir / "config.json", config.to_dict())
    log(f"run: {len(mesh.devices.flat)} device(s) ({jax.default_backend()}), workdir {workdir}, compilation "
        f"cache {cache or 'off'}, {xla_cpu.describe(mesh_platform(mesh), modes['cpu_fusion'])}, "
        f"{cpu_conv.describe(modes['cpu_wgrad'])}")
    data = prepare_data(config, workdir)
    t_spec, t_vars = get_teacher(config, workdir, mesh, data)
    k = config.data.num_classes
    t_predict = predict_fn(mesh, t_spec, tuple(config.data.mean), tuple(config.data.std), config.eval.batch_size,
                           modes["cpu_fusion"])
    t_test_pred = np.argmax(t_predict(t_vars, data.test.x)["logits"], -1)
    teacher_metrics = classification_metrics(t_test_pred, data.test.y, k, data.counts)
    held_pred = (np.argmax(t_predict(t_vars, data.heldout.x)["logits"], -1)
                 if data.heldout is not None and len(data.heldout) else None)
    log(f"teacher: test top-1 {teacher_metrics['top1']:.2f}%")
    method = build_method(config.method, t_spec)
    check_arms(arms_of(config), method)
    pool_probs = None
    if data.candidates is not None:
        pool_probs = teacher_pool_probs(config, workdir, mesh, (t_spec, t_vars), data.candidates,
                                        hashes=data.candidate_hashes)
    results = {}
    for arm in arm_names(config):
        results[arm] = run_arm(config, arm, workdir, mesh, data, method, (t_spec, t_vars), t_test_pred,
                               held_pred, pool_probs)
    arms = {ARMS[a].label.format(M=method.name.upper()): {**r["metrics"], "steps": r["steps"], "wall_s": r["wall_s"]}
            for a, r in results.items()}
    first = next(iter(results.values()))
    model = {"teacher_params": count_params(t_spec), "teacher_flops": count_flops(t_spec, config.data.image_size),
             "student_params": first["params"], "student_flops": first["flops"]}
    if config.eval.latency and "latency_ms" in first:
        model["teacher_latency_ms"] = measure_latency(t_spec, t_vars, config.data.image_size)
        model["student_latency_ms"] = first["latency_ms"]
    names = list(config.data.class_names) if config.data.class_names else [str(i) for i in range(k)]
    report = workdir / "report.md"
    if jax.process_index() == 0:
        write_report(workdir, {"title": config.title, "class_names": names, "train_counts": data.counts.tolist(),
                               "arms": arms, "teacher": teacher_metrics, "model": model,
                               "config": config.to_dict()})
    table = side_by_side(arms, teacher_metrics)
    print(table, flush=True)
    log(f"report: {report}")
    return {"arms": results, "teacher": teacher_metrics, "table": table, "report": str(report)}
