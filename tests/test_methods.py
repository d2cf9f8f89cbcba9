"""BP and KD: compression stage, losses, the calibration set, switchable OE terms and early stopping."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from helpers import tiny_spec

from oefsmc_jax.data import ImageSet
from oefsmc_jax.data.prepare import RunData
from oefsmc_jax.evaluation import agreement
from oefsmc_jax.methods import BP, KD, CompressionContext, build_method
from oefsmc_jax.models import build_model, init_variables
from oefsmc_jax.oe import complementary
from oefsmc_jax.oe.calibration import arm_calibration
from oefsmc_jax.training.loop import finetune
from oefsmc_jax.training.parallel import make_mesh, replicate
from oefsmc_jax.training.step import StepConfig, StepData, init_state, make_predict
from oefsmc_jax.training.train import LoopConfig, RunJob, make_trainer

K, SIZE = 10, 8
SPEC = tiny_spec(8, K)


@pytest.fixture(scope="module")
def teacher():
    return init_variables(SPEC, SIZE, 0)


@pytest.fixture(scope="module")
def tiny_data():
    rng = np.random.default_rng(0)
    counts = np.array([6, 5, 4, 3, 3, 2, 2, 1, 1, 1])
    y = np.repeat(np.arange(K), counts).astype(np.int32)
    train = ImageSet(rng.integers(0, 256, (len(y), SIZE, SIZE, 3), dtype=np.uint8), y, "train")
    ood = ImageSet(rng.integers(0, 256, (40, SIZE, SIZE, 3), dtype=np.uint8), np.full(40, -1, np.int32), "ood")
    held = ImageSet(rng.integers(0, 256, (32, SIZE, SIZE, 3), dtype=np.uint8), np.full(32, -1, np.int32), "held")
    return RunData(train, counts, ood, held, train, None)


def test_build_method_and_prune_ratio_validation():
    m = build_method({"name": "kd", "prune_ratio": [0.25, 0.5, 0.75], "kd_gamma": 0.5, "tau": 2.0}, SPEC)
    assert isinstance(m, KD) and m.prune_ratio == (0.25, 0.5, 0.75) and (m.gamma, m.tau) == (0.5, 2.0)
    assert isinstance(build_method({"name": "bp", "prune_ratio": 0.5}, SPEC), BP)
    with pytest.raises(ValueError, match="config.method.name: unknown method 'nope'; allowed: bp, "):
        build_method({"name": "nope", "prune_ratio": 0.5}, SPEC)
    with pytest.raises(ValueError, match=r"config.method.prune_ratio: 1.0 is outside the allowed range \[0, 1\)"):
        build_method({"name": "kd", "prune_ratio": 1.0}, SPEC)
    with pytest.raises(ValueError, match="expected 1 or 3 values"):
        build_method({"name": "kd", "prune_ratio": [0.5, 0.5]}, SPEC)
    with pytest.raises(ValueError, match=r"config.method.kd_gamma: must be in \[0, 1\], got 1.5"):
        build_method({"name": "kd", "prune_ratio": 0.5, "kd_gamma": 1.5}, SPEC)


def test_base_losses():
    s = {"logits": jnp.array([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])}
    t = {"logits": jnp.array([[1.0, 1.0, 0.0], [0.0, 2.0, 0.0]])}
    y = jnp.array([0, 1])

    def log_softmax(z):  # plain numpy reference, float64
        z = np.asarray(z, np.float64)
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    ce = -np.mean(log_softmax(s["logits"])[np.arange(2), np.asarray(y)])
    assert float(BP((0.5,)).recipe().base_loss(s, None, y)) == pytest.approx(ce, rel=1e-5)
    tau = 3.0
    lt, ls = log_softmax(np.asarray(t["logits"]) / tau), log_softmax(np.asarray(s["logits"]) / tau)
    kl = tau**2 * np.mean(np.sum(np.exp(lt) * (lt - ls), -1))  # Hinton: tau^2 * KL(teacher || student)
    kd = KD((0.5,), gamma=0.7, tau=tau)
    assert float(kd.recipe().base_loss(s, t, y)) == pytest.approx(0.3 * ce + 0.7 * kl, rel=1e-5)


def test_kd_compression_prunes_each_stage_at_its_ratio(teacher, tiny_data):
    ctx = CompressionContext(SPEC, teacher, arm_calibration(_cfg(), tiny_data, False, np.ones(K) / K),
                             (0.5,) * 3, (0.25,) * 3, jax.random.PRNGKey(0))
    spec, variables = KD((0.25, 0.5, 0.75)).compress(ctx)
    kept = {name: int(np.sum(m["mask0"])) for name, m in variables["masks"].items() if "mask0" in m}
    assert kept == {"s0b0": 3, "s1b0": 4, "s2b0": 2}
    # the kept filters are the ones with the largest L1 norm
    k = np.asarray(teacher["params"]["s1b0"]["conv1"]["kernel"])
    l1 = np.abs(k).sum(axis=(0, 1, 2))
    np.testing.assert_array_equal(np.asarray(variables["masks"]["s1b0"]["mask0"]) > 0, l1 >= np.sort(l1)[-4])


def _cfg(**oe):
    c = ml_collections.ConfigDict({"seed": 0, "data": {"num_classes": K},
                                   "oe": {"in_compression": True, **oe}})
    return c


def test_calibration_set_with_and_without_oe(tiny_data):
    gamma = np.asarray(complementary.complementary_distribution(jnp.asarray(tiny_data.counts), alpha=0.2))
    assert gamma[0] == 0.0  # class 0 is the most frequent: alpha = max(beta) gives it no OOD labels
    base = arm_calibration(_cfg(), tiny_data, False, gamma)
    assert len(base.y) == 28 and not base.is_ood.any()
    with_oe = arm_calibration(_cfg(), tiny_data, True, gamma)
    assert len(with_oe.y) == 28 + 40 and with_oe.is_ood.sum() == 40
    assert not np.any(with_oe.y[with_oe.is_ood] == 0)
    totals = np.bincount(with_oe.y, weights=with_oe.weights, minlength=K)
    present = np.bincount(with_oe.y, minlength=K) > 0
    np.testing.assert_allclose(totals[present], totals[present][0], rtol=1e-5)  # every class weighs the same
    off = arm_calibration(_cfg(in_compression=False), tiny_data, True, gamma)
    assert len(off.y) == 28


def test_calibration_set_takes_the_selected_ood_images_with_their_teacher_classes(tiny_data):
    """Teacher-guided arms: the compression stage sees the chosen images, labelled by the chosen class."""
    gamma = np.asarray(complementary.complementary_distribution(jnp.asarray(tiny_data.counts), alpha=0.2))
    chosen = tiny_data.ood.take(np.array([7, 3, 11]))
    cal = arm_calibration(_cfg(), tiny_data, True, gamma, chosen, np.array([2, 2, 1]))
    assert len(cal.y) == 28 + 3
    np.testing.assert_array_equal(cal.x[cal.is_ood], tiny_data.ood.x[[7, 3, 11]])
    np.testing.assert_array_equal(cal.y[cal.is_ood], [2, 2, 1])
    totals = np.bincount(cal.y, weights=cal.weights, minlength=K)
    np.testing.assert_allclose(totals[totals > 0], totals[totals > 0][0], rtol=1e-5)


@pytest.mark.parametrize("lambda_jd,eta,expected", [(0.0, 0.1, {"base", "reg"}),
                                                     pytest.param(1.0, 0.0, {"base", "jd"}, marks=pytest.mark.slow),
                                                     pytest.param(0.0, 0.0, {"base"}, marks=pytest.mark.slow)])
def test_each_oe_loss_term_switches_off(teacher, tiny_data, lambda_jd, eta, expected):
    mesh = make_mesh(1)
    cfg = StepConfig(batch_id=8, batch_ood=8, pad=1, lambda_jd=lambda_jd, eta=eta)
    trainer = make_trainer(mesh, SPEC, SPEC, KD((0.5,) * 3).recipe(), cfg,
                           {"name": "sgd", "lr": 0.01, "schedule": "constant"}, 1)
    tx, step = trainer.tx, trainer.step
    d = tiny_data
    data = replicate(StepData(d.train.x, d.train.y, d.ood.x, None, np.full(K, 0.1, np.float32),
                              np.ones(K, np.float32)), mesh)
    state = replicate(init_state(teacher, tx, 0), mesh)
    _, metrics = step(state, data, replicate(teacher, mesh), replicate(teacher["masks"], mesh), None)
    assert {"base", "jd", "reg"} & set(metrics) == expected
    total = sum(float(metrics[k]) * w for k, w in (("base", 1.0), ("jd", lambda_jd), ("reg", eta)) if k in metrics)
    assert float(metrics["loss"]) == pytest.approx(total, rel=1e-5)


def _es_run(teacher, d, workdir, loop: LoopConfig, heldout: bool):
    """A 60-step BP run at a high learning rate, so that early stopping on the held-out slice stops it early."""
    mesh = make_mesh(1)
    predict = make_predict(mesh, build_model(SPEC), (0.5,) * 3, (0.25,) * 3)
    t_pred = np.argmax(predict(teacher, d.heldout.x)["logits"], -1)
    data = replicate(StepData(d.train.x, d.train.y, d.ood.x, None, np.full(K, 0.1, np.float32),
                              np.ones(K, np.float32)), mesh)
    res = finetune(RunJob(name="es", workdir=workdir, mesh=mesh, spec=SPEC, variables=teacher,
                          recipe=BP((0.5,) * 3).recipe(), teacher_spec=SPEC, teacher_variables=teacher, data=data,
                          step_cfg=StepConfig(batch_id=8, batch_ood=8, pad=1, mean=(0.5,) * 3, std=(0.25,) * 3),
                          optim_cfg={"name": "sgd", "lr": 0.5, "schedule": "constant"}, loop=loop, seed=0,
                          heldout=(d.heldout.x, t_pred) if heldout else None))
    return res, predict, t_pred


ES_LOOP = LoopConfig(steps=60, log_every=60, eval_every=2, patience=2, ckpt_every=100)


@pytest.mark.slow
def test_early_stopping_keeps_the_best_weights(teacher, tiny_data, tmp_path):
    d = tiny_data
    res, predict, t_pred = _es_run(teacher, d, tmp_path, ES_LOOP, heldout=True)
    # stops `patience` evaluations after the best one, long before the 60-step budget
    assert res.stopped_early and res.steps_run == res.best_step + 2 * 2 < 60
    pred = np.argmax(predict(res.variables, d.heldout.x)["logits"], -1)
    assert agreement(pred, t_pred) == pytest.approx(res.best_agreement)
    evals = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["split"] == "eval"]
    assert [e["step"] for e in evals] == list(range(2, res.steps_run + 1, 2))
    best = max(e["heldout_agreement"] for e in evals)
    assert best == pytest.approx(res.best_agreement)
    assert min(e["step"] for e in evals if e["heldout_agreement"] == best) == res.best_step


@pytest.mark.slow
def test_tracking_records_what_early_stopping_would_keep_and_trains_unchanged(teacher, tiny_data, tmp_path):
    """``stop_early = False``: the run trains its whole budget to exactly the weights of a run without held-out
    evaluation, and records exactly what early stopping would have kept (its step, agreement, stop and weights)."""
    import dataclasses

    stop, _, _ = _es_run(teacher, tiny_data, tmp_path / "stop", ES_LOOP, heldout=True)
    track, _, _ = _es_run(teacher, tiny_data, tmp_path / "track", dataclasses.replace(ES_LOOP, stop_early=False),
                          heldout=True)
    fixed, _, _ = _es_run(teacher, tiny_data, tmp_path / "fixed", dataclasses.replace(ES_LOOP, eval_every=0),
                          heldout=False)
    assert stop.stopped_early and stop.tracked is None and fixed.tracked is None
    assert (track.steps_run, track.best_step, track.stopped_early) == (60, 60, False)
    jax.tree.map(np.testing.assert_array_equal, track.variables, fixed.variables)
    t = track.tracked
    assert (t.step, t.stop_step, t.agreement) == (stop.best_step, stop.steps_run, stop.best_agreement)
    jax.tree.map(np.testing.assert_array_equal, t.variables, stop.variables)
    evals = [json.loads(x) for x in (tmp_path / "track" / "metrics.jsonl").read_text().splitlines()]
    assert max(e["step"] for e in evals if e["split"] == "eval") == stop.steps_run  # no evaluation after the stop


@pytest.mark.slow
def test_fixed_ood_labels_replace_the_gamma_draw(teacher, tiny_data):
    """R with labels fixed per OOD image (the teacher-complement arm with R on): with Gamma all on class 0, fixed
    labels 0 give exactly the step of dynamic labels; fixed labels 3 change R and only R."""
    mesh = make_mesh(1)
    cfg = StepConfig(batch_id=8, batch_ood=8, pad=1, lambda_jd=1.0, eta=0.5)
    trainer = make_trainer(mesh, SPEC, SPEC, KD((0.5,) * 3).recipe(), cfg,
                           {"name": "sgd", "lr": 0.01, "schedule": "constant"}, 1)
    d = tiny_data
    gamma = np.eye(K, dtype=np.float32)[0]

    def step(y_ood):
        data = replicate(StepData(d.train.x, d.train.y, d.ood.x, None, gamma, np.arange(1, K + 1, dtype=np.float32),
                                  y_ood), mesh)
        state = replicate(init_state(teacher, trainer.tx, 0), mesh)
        return trainer.step(state, data, replicate(teacher, mesh), replicate(teacher["masks"], mesh), None)[1]

    dynamic, zeros, threes = step(None), step(np.zeros(40, np.int32)), step(np.full(40, 3, np.int32))
    for k in ("base", "jd", "reg", "loss"):
        assert float(dynamic[k]) == float(zeros[k]), k
    assert float(threes["base"]) == float(zeros["base"]) and float(threes["jd"]) == float(zeros["jd"])
    assert float(threes["reg"]) != float(zeros["reg"])


@pytest.mark.slow
def test_the_steps_own_ood_labels_follow_gamma(teacher, tiny_data):
    """The labels the train step itself draws for OOD images follow Gamma (method.md §2), read through R: with a
    zero classifier every CE is log K, so with class weights one-hot on class c, R / log K is the share of the
    batch's OOD labels equal to c. 200 steps x 32 labels per class at lr 1e-30 (the weights do not move)."""
    mesh = make_mesh(1)
    steps, b = 200, 32
    cfg = StepConfig(batch_id=8, batch_ood=b, pad=1, lambda_jd=0.0, eta=1.0)
    trainer = make_trainer(mesh, SPEC, SPEC, KD((0.5,) * 3).recipe(), cfg,
                           {"name": "sgd", "lr": 1e-30, "momentum": 0.0, "schedule": "constant"}, steps)
    d = tiny_data
    gamma = np.asarray(complementary.complementary_distribution(jnp.asarray(d.counts)), np.float32)
    student = jax.tree.map(np.asarray, teacher)
    student["params"] = {**student["params"], "head": jax.tree.map(np.zeros_like, student["params"]["head"])}
    for c in (0, 4, 9):  # Gamma_c = 1/42 (the largest class), 4/42, 6/42 (the rarest)
        data = replicate(StepData(d.train.x, d.train.y, d.ood.x, None, gamma, np.eye(K, dtype=np.float32)[c]), mesh)
        state = replicate(init_state(student, trainer.tx, seed=c), mesh)
        shares = []
        for _ in range(steps):
            state, m = trainer.step(state, data, replicate(teacher, mesh), replicate(teacher["masks"], mesh), None)
            shares.append(float(m["reg"]) / np.log(K))
        n = steps * b
        sd = np.sqrt(gamma[c] * (1 - gamma[c]) / n)
        assert abs(np.mean(shares) - gamma[c]) < 4 * sd + 1e-6, (c, np.mean(shares), gamma[c])


# ------------------------------------------------------------ non-finite steps, preemption, corrupt checkpoints
def _robust_run(teacher, tiny_data, workdir, steps, *, nan=False, **loop):
    mesh = make_mesh(1)
    d = tiny_data
    reg = np.full(K, np.nan if nan else 1.0, np.float32)  # NaN class weights make R, the loss and the grads NaN
    data = replicate(StepData(d.train.x, d.train.y, d.ood.x, None, np.full(K, 0.1, np.float32), reg), mesh)
    return finetune(RunJob(name="r", workdir=workdir, mesh=mesh, spec=SPEC, variables=teacher,
                           recipe=BP((0.5,) * 3).recipe(), teacher_spec=SPEC, teacher_variables=teacher, data=data,
                           step_cfg=StepConfig(batch_id=8, batch_ood=8, pad=1, mean=(0.5,) * 3, std=(0.25,) * 3),
                           optim_cfg={"name": "sgd", "lr": 0.05, "momentum": 0.9, "schedule": "constant"},
                           loop=LoopConfig(steps=steps, log_every=100, **loop), seed=0))


def test_nonfinite_step_skips_the_update_everywhere(teacher, tiny_data):
    mesh = make_mesh(1)
    cfg = StepConfig(batch_id=8, batch_ood=8, pad=1)
    trainer = make_trainer(mesh, SPEC, SPEC, BP((0.5,) * 3).recipe(), cfg,
                           {"name": "sgd", "lr": 0.05, "momentum": 0.9, "schedule": "constant"}, 2)
    d = tiny_data
    good, bad = (replicate(StepData(d.train.x, d.train.y, d.ood.x, None, np.full(K, 0.1, np.float32),
                                    np.full(K, w, np.float32)), mesh) for w in (1.0, np.nan))
    tv, masks = replicate(teacher, mesh), replicate(teacher["masks"], mesh)
    state0 = jax.device_get(init_state(teacher, trainer.tx, 0))
    state1, m1 = trainer.step(replicate(state0, mesh), bad, tv, masks, None)
    state1 = jax.device_get(state1)
    assert not np.isfinite(float(m1["loss"])) and float(m1["nonfinite"]) == 1.0
    for name in ("params", "batch_stats", "opt_state"):
        for a, b in zip(jax.tree.leaves(getattr(state0, name)), jax.tree.leaves(getattr(state1, name))):
            np.testing.assert_array_equal(a, b)
    assert int(state1.step) == 1 and int(state1.nonfinite) == 1 and int(state1.skipped) == 1
    state2, m2 = trainer.step(replicate(state1, mesh), good, tv, masks, None)
    state2 = jax.device_get(state2)
    assert np.isfinite(float(m2["loss"])) and float(m2["nonfinite"]) == 0.0
    assert int(state2.nonfinite) == 0 and int(state2.skipped) == 1
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state1.params),
                                                         jax.tree.leaves(state2.params)))


@pytest.mark.slow
def test_preemption_then_nan_streak_keep_the_last_good_checkpoint(teacher, tiny_data, tmp_path):
    from oefsmc_jax.training import preemption

    ref = _robust_run(teacher, tiny_data, tmp_path / "ref", 4)
    work = tmp_path / "run"
    preemption.request()  # what the SIGTERM handler does: the run stops after its first step
    try:
        with pytest.raises(preemption.Preempted, match="checkpoint written at step 1"):
            _robust_run(teacher, tiny_data, work, 4)
    finally:
        preemption.clear()
    with pytest.raises(preemption.NonFiniteError, match="newest checkpoint is step 1 .*untouched"):
        _robust_run(teacher, tiny_data, work, 4, nan=True, ckpt_every=1, max_nonfinite=2)
    assert sorted(p.name for p in (work / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]
    res = _robust_run(teacher, tiny_data, work, 4)  # resumes from step 1 with good data
    assert res.steps_run == 4 and res.skipped_steps == 0
    for a, b in zip(jax.tree.leaves(ref.variables), jax.tree.leaves(res.variables)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_truncated_latest_checkpoint_falls_back_to_the_previous(teacher, tiny_data, tmp_path, capfd):
    ref = _robust_run(teacher, tiny_data, tmp_path / "ref", 4)
    work = tmp_path / "run"
    _robust_run(teacher, tiny_data, work, 3, ckpt_every=1)  # checkpoints 2 and 3 (keep 2)
    ckpts = work / "checkpoints"
    files = [p for p in (ckpts / "3").rglob("*") if p.is_file() and p.stat().st_size > 0 and "state" in p.parts]
    assert files
    for p in files:  # truncate every array file of the newest checkpoint
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])
    capfd.readouterr()
    res = _robust_run(teacher, tiny_data, work, 4, ckpt_every=1)
    err = capfd.readouterr().err
    assert "checkpoint step 3" in err and "unreadable" in err and "resumed from step 2" in err
    assert (ckpts / "3.corrupt").is_dir()
    for a, b in zip(jax.tree.leaves(ref.variables), jax.tree.leaves(res.variables)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_recipes_compare_by_value_so_equal_methods_share_a_compiled_step():
    from oefsmc_jax.methods import CD, FSKD, MiR

    a, b = KD((0.5,), 0.5, 4.0).recipe(), KD((0.5,), 0.5, 4.0).recipe()
    assert a == b and hash(a) == hash(b) and a is not b
    # another hyper-parameter of the loss: another recipe; of the compression only: the same recipe
    assert a != KD((0.5,), 0.25, 4.0).recipe() and a != KD((0.5,), 0.5, 2.0).recipe()
    assert a == KD((0.25,), 0.5, 4.0).recipe() and BP((0.5,)).recipe() == BP((0.25,)).recipe()
    assert FSKD().recipe() == FSKD().recipe() and MiR().recipe() == MiR().recipe()
    assert len({CD.from_config({"prune_ratio": 0.5}, tiny_spec()).recipe() for _ in range(3)}) == 1
