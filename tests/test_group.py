"""Grouped runs: R students trained by one vmapped program end where each would end trained alone."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_spec

from oefsmc_jax import cell
from oefsmc_jax.kernels import cpu_conv
from oefsmc_jax.methods import KD
from oefsmc_jax.models import build_model, l1_prune
from oefsmc_jax.oe import complementary
from oefsmc_jax.training import preemption
from oefsmc_jax.training.loop import finetune, finetune_group, finetune_one
from oefsmc_jax.training.parallel import make_mesh, replicate
from oefsmc_jax.training.scheduler import GroupScheduler
from oefsmc_jax.training.step import StepConfig, StepData
from oefsmc_jax.training.train import LoopConfig, RunJob

SIZE, K, STEPS = 8, 10, 4
OPTIM = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "schedule": "cosine"}
CFG = StepConfig(batch_id=8, batch_ood=8, pad=1, flip=True, mean=(0.5,) * 3, std=(0.25,) * 3, lambda_jd=1.0,
                 eta=0.1, tau=4.0)
LOOP = LoopConfig(steps=STEPS, log_every=2, eval_every=1, patience=2, ckpt_every=2)


@pytest.fixture(scope="module")
def parts():
    spec = tiny_spec(8, K)
    t_vars = jax.device_get(build_model(spec).init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)),
                                                   train=False))
    t_vars = jax.tree_util.tree_map_with_path(lambda p, x: x + 0.1 if "mean" in str(p[-1]) else x, t_vars)
    s_spec, s_vars = l1_prune(spec, t_vars, 0.5)
    rng = np.random.default_rng(0)
    counts = np.array([4, 4, 3, 3, 2, 2, 2, 1, 1, 1])
    gamma = np.asarray(complementary.complementary_distribution(jnp.asarray(counts)), np.float32)
    runs = []
    for r in range(3):  # each run: its own labels order, images, OOD pool, seed and student perturbation
        y = rng.permutation(np.repeat(np.arange(K), counts)).astype(np.int32)
        host = {"x_id": rng.integers(0, 256, (len(y), SIZE, SIZE, 3), dtype=np.uint8), "y_id": y,
                "x_ood": rng.integers(0, 256, (12, SIZE, SIZE, 3), dtype=np.uint8), "gamma": gamma,
                "reg_weights": np.asarray(complementary.class_weights(jnp.asarray(gamma)), np.float32)}
        v = jax.device_get(s_vars)
        v = {**v, "params": jax.tree.map(lambda a, r=r: a * (1.0 + 0.05 * r), v["params"])}
        runs.append((host, v, 10 + r))
    heldout_x = rng.integers(0, 256, (16, SIZE, SIZE, 3), dtype=np.uint8)
    return spec, t_vars, s_spec, runs, heldout_x


def _jobs(parts, ndev, root, heldout_run=None, step_cfg=CFG):
    t_spec, t_vars, s_spec, runs, heldout_x = parts
    mesh = make_mesh(ndev)
    jobs = []
    for r, (host, v, seed) in enumerate(runs):
        data = StepData(x_id=host["x_id"], y_id=host["y_id"], x_ood=host["x_ood"], id_probs=None,
                        gamma=host["gamma"], reg_weights=host["reg_weights"])
        # labels no prediction can match: agreement stays 0, so this run stops after `patience` evaluations
        held = (heldout_x, np.full(len(heldout_x), -1)) if r == heldout_run else None
        jobs.append(RunJob(name=f"run{r}", workdir=root / f"run{r}", mesh=mesh, spec=s_spec, variables=v,
                           recipe=KD((0.5, 0.5, 0.5)).recipe(), teacher_spec=t_spec, teacher_variables=t_vars,
                           data=replicate(data, mesh), step_cfg=step_cfg, optim_cfg=OPTIM, loop=LOOP, seed=seed,
                           heldout=held))
    return jobs


def _assert_same(a, b):
    assert a.steps_run == b.steps_run and a.best_step == b.best_step and a.stopped_early == b.stopped_early
    for x, y in zip(jax.tree.leaves(a.variables), jax.tree.leaves(b.variables)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=2e-6)


@pytest.fixture(scope="module")
def solo(parts, tmp_path_factory):
    """Each run trained alone (the reference), on 1 and on 4 devices."""
    return {n: [finetune_one(j) for j in _jobs(parts, n, tmp_path_factory.mktemp(f"solo{n}"), heldout_run=1)]
            for n in (1, 4)}


@pytest.mark.parametrize("ndev,impl", [(4, "unroll")])
@pytest.mark.slow
def test_group_with_the_cpu_filter_gradient_kernel(parts, solo, tmp_path, monkeypatch, ndev, impl):
    """``cpu_wgrad=kernel``: the group's runs end where each run trained alone under XLA's gradient ends."""
    traced = []
    real = cpu_conv.wgrad3x3
    monkeypatch.setattr(cpu_conv, "wgrad3x3", lambda x, dy, s: traced.append(x.shape) or real(x, dy, s))
    kernel = dataclasses.replace(CFG, cpu_wgrad="kernel")  # the mode is a field of the step's config
    group = finetune_group(_jobs(parts, ndev, tmp_path, heldout_run=1, step_cfg=kernel), impl=impl)
    assert traced  # the step really took its filter gradients from the kernel
    assert [r.steps_run for r in group] == [STEPS, 3, STEPS]
    for a, b in zip(solo[ndev], group):
        _assert_same(a, b)


@pytest.mark.parametrize("ndev,impl", [(1, "vmap"), (4, "vmap"), (1, "map"), (4, "map"), (1, "unroll")])
@pytest.mark.slow
def test_group_of_three_equals_each_run_alone(parts, solo, tmp_path, ndev, impl):
    group = finetune_group(_jobs(parts, ndev, tmp_path, heldout_run=1), impl=impl)
    # run 1 stops early (its held-out agreement never improves); runs 0 and 2 train on, undisturbed
    assert [r.steps_run for r in group] == [STEPS, 3, STEPS]
    assert group[1].stopped_early and group[1].best_step == 1
    for a, b in zip(solo[ndev], group):
        _assert_same(a, b)
    # the runs really differ from one another (no run got another's data or parameters)
    p0, p2 = (np.asarray(jax.tree.leaves(group[i].variables["params"])[0]) for i in (0, 2))
    assert not np.allclose(p0, p2, atol=1e-3)


@pytest.mark.slow
def test_killed_group_resumes_alone_or_grouped(parts, tmp_path):
    full = finetune_group(_jobs(parts, 1, tmp_path / "full"))
    preemption.request()
    try:
        with pytest.raises(preemption.Preempted, match="checkpoints written for run0, run1, run2"):
            finetune_group(_jobs(parts, 1, tmp_path / "cut"))
    finally:
        preemption.clear()
    jobs = _jobs(parts, 1, tmp_path / "cut")
    for j in jobs:
        assert (j.workdir / "checkpoints" / "1").exists()  # every run checkpointed at the step it reached
    resumed = [finetune_one(jobs[0])] + finetune_group(jobs[1:], impl="vmap")  # resume in another grouping
    for a, b in zip(full, resumed):
        _assert_same(a, b)


@pytest.mark.slow
def test_stop_at_a_regular_checkpoint_step_saves_it_once(parts, tmp_path):
    """A stop requested during the step that ends on ``ckpt_every`` (e.g. the signal arrives while that save is
    being written) keeps that save: no second save of the same step, which Orbax refuses."""
    loop = dataclasses.replace(LOOP, ckpt_every=1)
    jobs = [dataclasses.replace(j, loop=loop) for j in _jobs(parts, 1, tmp_path)]
    preemption.request()
    try:
        with pytest.raises(preemption.Preempted, match="checkpoints written for run0, run1, run2"):
            finetune_group(jobs)
    finally:
        preemption.clear()
    for j in jobs:
        assert sorted(p.name for p in (j.workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]


@pytest.mark.slow
def test_nonfinite_run_stops_alone(parts, tmp_path):
    loop = dataclasses.replace(LOOP, max_nonfinite=2)
    jobs = [dataclasses.replace(j, loop=loop) for j in _jobs(parts, 1, tmp_path)]
    bad = jobs[2].variables
    jobs[2] = dataclasses.replace(jobs[2], variables={**bad, "params": jax.tree.map(lambda a: a * np.nan,
                                                                                      bad["params"])})
    out = finetune_group(jobs)
    assert isinstance(out[2], preemption.NonFiniteError) and "[run2] 2 consecutive steps" in str(out[2])
    solo = finetune_one(dataclasses.replace(_jobs(parts, 1, tmp_path / "solo")[0], loop=loop))
    _assert_same(solo, out[0])


@pytest.mark.slow
def test_scheduler_groups_runs_of_equal_shapes(parts, tmp_path):
    jobs = _jobs(parts, 1, tmp_path / "sched")
    odd = dataclasses.replace(jobs[2], step_cfg=dataclasses.replace(CFG, batch_id=4))  # another shape: own group

    def cell(job):
        def fn():
            if job.name == "run1":
                raise RuntimeError("data of run1 is broken")
            return finetune(job)
        return fn

    extra = dataclasses.replace(jobs[0], name="run3", workdir=tmp_path / "sched" / "run3", seed=99)
    sched = GroupScheduler(max_group=8)
    out = sched.run([cell(j) for j in (jobs[0], jobs[1], odd, extra)], names=["a", "b", "c", "d"])
    assert sorted(map(sorted, sched.groups_run)) == [["a/run0", "d/run3"], ["c/run2"]]
    assert isinstance(out[1], RuntimeError)
    _assert_same(out[0], finetune_one(_jobs(parts, 1, tmp_path / "solo2")[0]))
    assert out[2].steps_run == STEPS and out[3].steps_run == STEPS
    with pytest.raises(ValueError, match="group size must be >= 1"):
        GroupScheduler(0)
    with pytest.raises(ValueError, match="group_impl must be one of auto, vmap, map, unroll, got 'pmap'"):
        GroupScheduler(2, impl="pmap")


def test_a_cell_names_its_lines_and_hands_its_runs_to_its_scheduler(parts, tmp_path, capsys):
    """Inside a cell (``oefsmc_jax/cell``, what ``GroupScheduler.run`` enters in each cell's thread) progress
    lines carry the cell's name and ``finetune`` hands the run, named ``{cell}/{run}``, to the cell's scheduler;
    outside it, and in threads the cell did not enter, neither happens."""
    import threading

    from oefsmc_jax import progress

    job = _jobs(parts, 1, tmp_path)[0]
    submitted, seen = [], []
    with cell.entered(cell.Cell("c1", lambda j: submitted.append(j) or "trained")):
        progress.log("hello")
        assert finetune(job) == "trained"
        other = threading.Thread(target=lambda: seen.append(cell.current()))
        other.start()
        other.join()
    progress.log("bye")
    assert capsys.readouterr().err == "[c1] hello\nbye\n"
    assert [j.name for j in submitted] == ["c1/run0"] and job.name == "run0"
    assert seen == [None] and cell.current() is None
