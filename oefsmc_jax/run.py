"""One compression run from a config: validate -> data -> teacher -> per arm (OOD images, compress, fine-tune,
evaluate) -> report.

An *arm* is one way of compressing the same teacher on the same few-sample set: ``base`` (the method alone),
``oe`` (the method with OE-FSMC), or another row of :data:`oefsmc_jax.oe.arms.ARMS`. All arms of a run share the
ID subset, the OOD pool, the held-out OOD slice and the test split, so their comparison is paired. Every finished
piece (teacher, compressed student, fine-tuning checkpoints, exported student, per-arm result) is written to the
workdir and reused when the run is started again (:mod:`oefsmc_jax.workdir_guards`).

Each step lives with what it is about: the data in :mod:`oefsmc_jax.data.prepare`, the teacher in
:mod:`oefsmc_jax.teacher`, an arm's OOD images in :mod:`oefsmc_jax.oe.arms` and its calibration set in
:mod:`oefsmc_jax.oe.calibration`, the fine-tuning settings in :mod:`oefsmc_jax.training.from_config` and the loop in
:mod:`oefsmc_jax.training.loop`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from oefsmc_jax import __version__, compression_cache, paths, seeds, workdir_lock
from oefsmc_jax.config_validation import validate
from oefsmc_jax.data.prepare import RunData, prepare_data
from oefsmc_jax.errors import ConfigError
from oefsmc_jax.evaluation import agreement, classification_metrics, side_by_side, write_report
from oefsmc_jax.kernels import cpu_conv
from oefsmc_jax.methods import CompressionContext, Method, OESettings, build_method, resolve_oe
from oefsmc_jax.methods.fskd_solver import fold_corrections
from oefsmc_jax.models import ArchSpec, count_flops, count_params, shrink
from oefsmc_jax.models.latency import measure_latency
from oefsmc_jax.oe import complementary
from oefsmc_jax.oe.arms import ARMS, Arm, ArmOOD, arm_names, arm_ood, arms_of, check_arms, data_needs
from oefsmc_jax.oe.calibration import arm_calibration
from oefsmc_jax.progress import log, write_json
from oefsmc_jax.provenance import code_version, device_description, versions
from oefsmc_jax.teacher import get_teacher, teacher_pool_probs
from oefsmc_jax.training import compile_cache, preemption, xla_cpu
from oefsmc_jax.training.checkpoint import load_model, save_model
from oefsmc_jax.training.from_config import compile_modes, finetune_settings, predict_fn, uses_host_batches
from oefsmc_jax.training.loop import finetune
from oefsmc_jax.training.parallel import make_mesh, replicate
from oefsmc_jax.training.recipe import Recipe
from oefsmc_jax.training.run_state import TrackedBest
from oefsmc_jax.training.step import StepData
from oefsmc_jax.training.train import RunJob
from oefsmc_jax.training.xla_cpu import mesh_platform
from oefsmc_jax.workdir_guards import check_same_config, check_same_subset, finished_result, trained_commit

__all__ = ["ArmPlan", "RunContext", "run", "run_arm"]


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What every arm of a run shares: the config, the workdir and mesh, the data, the method, the teacher with its
    predictions on the evaluation split and the held-out OOD slice, its probabilities on the OOD candidates (only
    for teacher-guided arms), and the compile modes."""

    config: Any
    workdir: paths.Path
    mesh: Any
    data: RunData
    method: Method
    teacher: tuple[ArchSpec, dict]
    teacher_test_pred: np.ndarray
    heldout_pred: np.ndarray | None
    pool_probs: np.ndarray | None
    modes: dict[str, str]

    def predict(self, spec: ArchSpec) -> Any:
        """The cached eval forward of ``spec`` under this run's normalisation, batch and fusion mode."""
        c = self.config
        return predict_fn(self.mesh, spec, tuple(c.data.mean), tuple(c.data.std), c.eval.batch_size,
                          self.modes["cpu_fusion"])


@dataclasses.dataclass(frozen=True)
class ArmPlan:
    """One arm as it runs: its row of the arms table, the method's OE-FSMC settings, its OOD images, the
    complementary distribution Gamma, the weight of R, and its fine-tuning recipe."""

    name: str
    arm: Arm
    settings: OESettings
    ood: ArmOOD
    gamma: np.ndarray
    eta: float
    recipe: Recipe

    @property
    def trains_on_ood(self) -> bool:
        """Whether the arm adds OOD images (it is an OE arm and has some)."""
        return self.arm.uses_ood and self.ood.images is not None and len(self.ood.images) > 0

    def log(self, msg: str) -> None:
        """A progress line of this arm."""
        log(f"[{self.name}] {msg}")


def plan_arm(run: RunContext, name: str) -> ArmPlan:
    """The plan of arm ``name``: its OOD images chosen, its settings resolved from the method's defaults and the
    config."""
    config, data = run.config, run.data
    arm = ARMS[name]
    settings = resolve_oe(config, run.method)  # lambda_jd, eta, bn_mode, calibration share: the method's defaults
    ood = arm_ood(config, arm, data, run.pool_probs)
    alpha = config.oe.alpha if config.oe.alpha >= 0 else None
    gamma = np.asarray(complementary.complementary_distribution(jnp.asarray(data.counts), alpha))
    plan = ArmPlan(name, arm, settings, ood, gamma, arm.eta(config, settings.eta),
                   arm.wrap(run.method.recipe(), data.counts))
    if ood.warning:
        plan.log(f"warning: {ood.warning}")
    if ood.note:
        plan.log(ood.note)
    return plan


def run_arm(run: RunContext, name: str) -> dict:
    """Compress, fine-tune and evaluate arm ``name``; reuses every finished piece in ``workdir/name``."""
    adir = run.workdir / name
    if (done := finished_result(adir / "result.json")) is not None:
        log(f"[{name}] finished earlier; reusing {adir / 'result.json'}")
        return done
    t0 = time.time()
    trained = trained_commit(adir / "trained_commit.json")
    plan = plan_arm(run, name)
    spec, variables = compress_arm(run, plan)
    tracked = None
    if plan.recipe.finetunes:
        res = finetune_arm(run, plan, spec, variables)
        tracked = res.tracked
        variables = res.variables
        training = {"steps": res.steps_run, "best_step": res.best_step, "best_heldout_agreement": res.best_agreement,
                    "stopped_early": res.stopped_early}
    else:
        plan.log(f"{run.method.name} does not fine-tune; evaluating the compressed student")
        training = {"steps": 0, "best_step": 0, "best_heldout_agreement": None, "stopped_early": False}
    spec_x, vars_x = shrink(*fold_corrections(spec, variables))  # FSKD's Q layers folded at export
    save_model(adir / "student", spec_x, vars_x, {"arm": name, "method": run.method.name})
    result = {**evaluate_arm(run, plan, spec_x, vars_x, training), "wall_s": time.time() - t0,
              "version": __version__, "trained_commit": trained.get("git_commit"),
              "trained_dirty": trained.get("git_dirty")}
    if tracked is not None:
        result["tracked_best"] = evaluate_tracked(run, spec, tracked)
    if run.config.eval.latency:
        result["latency_ms"] = measure_latency(spec_x, vars_x, run.config.data.image_size)
    write_json(adir / "result.json", result)
    m = result["metrics"]
    plan.log(f"test top-1 {m['top1']:.2f}%  balanced {m['balanced']:.2f}%  "
             f"few-shot {m['few'] if m.get('few') is not None else float('nan'):.2f}%")
    return result


def compress_arm(run: RunContext, plan: ArmPlan) -> tuple[ArchSpec, dict]:
    """The arm's compressed student: the method's compression stages on the arm's calibration set (reused from
    ``workdir/arm/compressed`` when an earlier run finished them)."""
    config, adir = run.config, run.workdir / plan.name
    if (adir / "compressed").exists():
        spec, variables, _ = load_model(adir / "compressed")
        plan.log(f"reusing the compressed student in {adir / 'compressed'}")
        return spec, variables
    calib = arm_calibration(config, run.data, plan.arm.uses_ood, plan.gamma, plan.ood.images, plan.ood.labels,
                            plan.settings.calibration_ood_share)
    cache_key = (compression_cache.key(config, run.method, run.teacher, calib, run.modes)
                 if config.method.cache_compression else None)
    cache_dir = paths.as_path(config.oe.cache_dir or run.workdir / "cache")
    if cache_key and (hit := compression_cache.load(cache_dir, cache_key, adir)) is not None:
        plan.log(f"reusing the compressed student of an equal compression stage ({cache_dir}, {cache_key})")
        save_model(adir / "compressed", *hit)
        return hit
    t_spec, t_vars = run.teacher
    ctx = CompressionContext(teacher_spec=t_spec, teacher_variables=t_vars, calibration=calib,
                             mean=tuple(config.data.mean), std=tuple(config.data.std),
                             key=seeds.key(config.seed, "compression"), mesh=run.mesh, workdir=adir,
                             latency=config.method.latency, batch_size=config.eval.batch_size,
                             cpu_fusion=run.modes["cpu_fusion"], log=plan.log)
    if run.method.uses_calibration:
        plan.log(f"compressing with a calibration set of {len(calib)} images ({int(calib.is_ood.sum())} OOD)")
    with preemption.stage(f"[{plan.name}]", "compression", "rerun the same command to restart this arm's compression"):
        spec, variables = run.method.compress(ctx)  # nothing is written before it returns
    if config.student.export_before_finetune:
        spec, variables = shrink(spec, variables)
    if cache_key:
        compression_cache.store(cache_dir, cache_key, spec, variables, adir)
    save_model(adir / "compressed", spec, variables)
    return spec, variables


def finetune_arm(run: RunContext, plan: ArmPlan, spec: ArchSpec, variables: dict) -> Any:
    """The fine-tuning stage of one arm (method.md §4): the recipe's loss on ID images, plus OE-FSMC's terms when
    the arm has OOD images (weights from the method's settings); early stopping on held-out OOD agreement for OE
    arms (or every arm with ``oe.early_stopping_arms=all``)."""
    config, data = run.config, run.data
    k = config.data.num_classes
    use_ood = plan.trains_on_ood
    ood_labels = plan.ood.labels if use_ood and plan.arm.fixed_labels else None
    host_data = StepData(
        x_id=data.train.x, y_id=data.train.y.astype(np.int32), x_ood=plan.ood.images.x if use_ood else None,
        id_probs=plan.arm.id_probs(data.train.y, k), gamma=plan.gamma.astype(np.float32),
        reg_weights=np.asarray(complementary.class_weights(jnp.asarray(plan.gamma)), np.float32),
        y_ood=ood_labels.astype(np.int32) if ood_labels is not None else None)
    host_batches = uses_host_batches(config, host_data)
    # host batches: the arrays stay on the host (training/feed.py gathers each step's images); else on every device
    step_data = host_data if host_batches else jax.tree.map(lambda a: replicate(a, run.mesh), host_data)
    heldout_pred = run.heldout_pred if plan.arm.uses_ood or config.oe.early_stopping_arms == "all" else None
    has_heldout = data.heldout is not None and len(data.heldout) > 0 and heldout_pred is not None
    early = bool(config.oe.early_stopping and has_heldout)
    track = bool(config.oe.get("track_best", False) and has_heldout)
    s = plan.settings
    fs = finetune_settings(config, run.mesh, plan.recipe.schedule,
                           {"ood": use_ood, "lambda_jd": s.lambda_jd, "eta": plan.eta, "bn_mode": s.bn_mode},
                           len(data.train), host_batches, early, track)
    if fs.note:
        plan.log(fs.note)
    t_spec, t_vars = run.teacher
    return finetune(RunJob(name=plan.name, workdir=run.workdir / plan.name, mesh=run.mesh, spec=spec,
                           variables=variables, recipe=plan.recipe, teacher_spec=t_spec, teacher_variables=t_vars,
                           data=step_data, step_cfg=fs.step, optim_cfg=fs.optim, loop=fs.loop, seed=config.seed,
                           heldout=(data.heldout.x, heldout_pred) if fs.loop.eval_every else None,
                           meta={"arm": plan.name, "spec": spec.to_dict(), "subset": data.subset}))


def evaluate_arm(run: RunContext, plan: ArmPlan, spec: ArchSpec, variables: dict, training: dict) -> dict:
    """The arm's result: the exported student (``spec``, ``variables``) evaluated on the evaluation split (metrics,
    agreement with the teacher), how it was trained (``training``: steps and early stopping), its size and cost."""
    config, data = run.config, run.data
    pred = np.argmax(run.predict(spec)(variables, data.test.x)["logits"], -1)
    metrics = classification_metrics(pred, data.test.y, config.data.num_classes, data.counts)
    metrics["agreement"] = agreement(pred, run.teacher_test_pred)
    use_ood, oe_on = plan.trains_on_ood, plan.arm.uses_ood
    return {"arm": plan.name, "method": run.method.describe(), "metrics": metrics, "steps": training["steps"],
            "ood_selection": plan.arm.selection(config) if oe_on else None,
            "ood_images": len(plan.ood.images) if use_ood else 0, "eta": plan.eta if use_ood else None,
            "oe_settings": plan.settings.describe() if oe_on else None,
            **{k: v for k, v in training.items() if k != "steps"},
            "spec": spec.to_dict(), "params": count_params(spec), "flops": count_flops(spec, config.data.image_size)}


def evaluate_tracked(run: RunContext, spec: ArchSpec, tracked: TrackedBest) -> dict:
    """What early stopping would have kept in a run that trained its whole budget (``oe.track_best``): the best
    held-out step before it would have stopped, the step it would have stopped at (None: never), and that
    student's metrics on the evaluation split. Recorded beside the run's result, which stays its last weights."""
    spec_b, vars_b = shrink(*fold_corrections(spec, tracked.variables))
    pred = np.argmax(run.predict(spec_b)(vars_b, run.data.test.x)["logits"], -1)
    metrics = classification_metrics(pred, run.data.test.y, run.config.data.num_classes, run.data.counts)
    metrics["agreement"] = agreement(pred, run.teacher_test_pred)
    return {"step": tracked.step, "stop_step": tracked.stop_step, "heldout_agreement": tracked.agreement,
            "metrics": metrics}


def _start(config: Any, workdir: paths.Path) -> tuple[Any, dict[str, str]]:
    """Resolve the devices and compile modes, validate the config, lock the workdir and record the config in it."""
    cache = compile_cache.enable(config.compile_cache)
    xla_cpu.resolve_mode(config.cpu_fusion)  # a bad mode (or $OEFSMC_CPU_FUSION) fails first
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
    return mesh, modes


def _report(run: RunContext, results: dict[str, dict], teacher_metrics: dict) -> dict:
    """Write ``report.md`` and the per-class plot (process 0) and print the side-by-side table."""
    config, (t_spec, t_vars) = run.config, run.teacher
    arms = {ARMS[a].label.format(M=run.method.name.upper()): {**r["metrics"], "steps": r["steps"],
                                                               "wall_s": r["wall_s"]}
            for a, r in results.items()}
    first = next(iter(results.values()))
    model = {"teacher_params": count_params(t_spec), "teacher_flops": count_flops(t_spec, config.data.image_size),
             "student_params": first["params"], "student_flops": first["flops"]}
    if config.eval.latency and "latency_ms" in first:
        model["teacher_latency_ms"] = measure_latency(t_spec, t_vars, config.data.image_size)
        model["student_latency_ms"] = first["latency_ms"]
    k = config.data.num_classes
    names = list(config.data.class_names) if config.data.class_names else [str(i) for i in range(k)]
    report = run.workdir / "report.md"
    if jax.process_index() == 0:
        provenance = {**code_version(), "trained_commit": {ARMS[a].label.format(M=run.method.name.upper()):
                                                           r.get("trained_commit") for a, r in results.items()},
                      "device": device_description(run.mesh), "versions": versions()}
        write_report(run.workdir, {"title": config.title, "class_names": names,
                                   "train_counts": run.data.counts.tolist(), "arms": arms, "teacher": teacher_metrics,
                                   "model": model, "provenance": provenance, "config": config.to_dict()})
    table = side_by_side(arms, teacher_metrics)
    print(table, flush=True)
    log(f"report: {report}")
    return {"arms": results, "teacher": teacher_metrics, "table": table, "report": str(report)}


@workdir_lock.scope
def run(config: Any, workdir: str | os.PathLike) -> dict:
    """Run every arm of ``config`` in ``workdir`` and write ``report.md`` and the per-class plot; returns results."""
    paths.check_reachable(workdir, "--workdir")
    workdir = paths.as_path(workdir)
    mesh, modes = _start(config, workdir)
    needs = data_needs(config)
    data = prepare_data(config, workdir, needs)
    check_same_subset(workdir / "subset.json", data.subset, needs.ood)
    write_json(workdir / "subset.json", data.subset)
    t_spec, t_vars = get_teacher(config, workdir, mesh, data)
    t_predict = predict_fn(mesh, t_spec, tuple(config.data.mean), tuple(config.data.std), config.eval.batch_size,
                           modes["cpu_fusion"])
    t_test_pred = np.argmax(t_predict(t_vars, data.test.x)["logits"], -1)
    teacher_metrics = classification_metrics(t_test_pred, data.test.y, config.data.num_classes, data.counts)
    held_pred = (np.argmax(t_predict(t_vars, data.heldout.x)["logits"], -1)
                 if data.heldout is not None and len(data.heldout) else None)
    log(f"teacher: test top-1 {teacher_metrics['top1']:.2f}%")
    method = build_method(config.method, t_spec)
    check_arms(arms_of(config), method)
    pool_probs = None
    if data.candidates is not None:
        pool_probs = teacher_pool_probs(config, workdir, mesh, (t_spec, t_vars), data.candidates,
                                        hashes=data.candidate_hashes)
    ctx = RunContext(config, workdir, mesh, data, method, (t_spec, t_vars), t_test_pred, held_pred, pool_probs, modes)
    results = {arm: run_arm(ctx, arm) for arm in arm_names(config)}
    return _report(ctx, results, teacher_metrics)
