"""The data-parallel train step: 1 device == 4 devices, synced BatchNorm, masks stay exactly zero."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_spec

from oefsmc_jax.methods import KD
from oefsmc_jax.models import build_model, l1_prune, mask_multipliers, shrink
from oefsmc_jax.oe import complementary
from oefsmc_jax.training.optim import make_optimizer
from oefsmc_jax.training.parallel import make_mesh, replicate
from oefsmc_jax.training.step import StepConfig, StepData, apply_multipliers, init_state, make_predict, make_train_step
from oefsmc_jax.training.train import make_trainer

SIZE = 8
K = 10
STEPS = 3
OPTIM = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "schedule": "constant"}
CFG = StepConfig(batch_id=16, batch_ood=8, pad=1, flip=True, mean=(0.5,) * 3, std=(0.25,) * 3, lambda_jd=1.0,
                 eta=0.1, tau=4.0)


@pytest.fixture(scope="module")
def setup():
    spec = tiny_spec(8, K)
    model = build_model(spec)
    t_vars = jax.device_get(model.init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)), train=False))
    # make BN statistics non-trivial so eval mode differs from train mode
    t_vars = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.1 if "mean" in str(p[-1]) else x, t_vars)
    s_spec, s_vars = l1_prune(spec, t_vars, 0.5)
    rng = np.random.default_rng(0)
    counts = np.array([4, 4, 3, 3, 2, 2, 2, 1, 1, 1])
    y = np.repeat(np.arange(K), counts).astype(np.int32)
    x = rng.integers(0, 256, (len(y), SIZE, SIZE, 3), dtype=np.uint8)
    x_ood = rng.integers(0, 256, (12, SIZE, SIZE, 3), dtype=np.uint8)
    gamma = np.asarray(complementary.complementary_distribution(jnp.asarray(counts)))
    host_data = dict(x_id=x, y_id=y, x_ood=x_ood, gamma=gamma.astype(np.float32),
                     reg_weights=np.asarray(complementary.class_weights(jnp.asarray(gamma)), np.float32))
    return spec, t_vars, s_spec, jax.device_get(s_vars), host_data


def _run(setup, ndev, variables=None, spec=None, steps=STEPS):
    t_spec, t_vars, s_spec, s_vars, host = setup
    spec = spec or s_spec
    variables = variables if variables is not None else s_vars
    mesh = make_mesh(ndev)
    trainer = make_trainer(mesh, spec, t_spec, KD((0.5, 0.5, 0.5)).recipe(), CFG, OPTIM, steps)
    tx, step = trainer.tx, trainer.step
    data = StepData(x_id=replicate(host["x_id"], mesh), y_id=replicate(host["y_id"], mesh),
                    x_ood=replicate(host["x_ood"], mesh), id_probs=None, gamma=replicate(host["gamma"], mesh),
                    reg_weights=replicate(host["reg_weights"], mesh))
    state = replicate(init_state(variables, tx, seed=3), mesh)
    masks, mult, tv = replicate((variables["masks"], mask_multipliers(spec, variables), t_vars), mesh)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, data, tv, masks, mult)
        losses.append(float(metrics["loss"]))
    return state, losses, mesh


@pytest.fixture(scope="module")
def runs(setup):
    return {n: _run(setup, n) for n in (1, 4)}


def test_one_and_four_devices_agree(runs):
    s1, l1, _ = runs[1]
    s4, l4, _ = runs[4]
    np.testing.assert_allclose(l1, l4, rtol=2e-5)
    assert len(set(np.round(l1, 5))) == STEPS  # the loss really changes from step to step
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-6)
    for a, b in zip(jax.tree.leaves(s1.batch_stats), jax.tree.leaves(s4.batch_stats)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-6)


def test_batchnorm_statistics_identical_on_all_devices(runs):
    s4, _, mesh = runs[4]
    leaves = jax.tree.leaves(s4.batch_stats)
    assert leaves
    for leaf in leaves:
        shards = [np.asarray(s.data) for s in leaf.addressable_shards]
        assert len(shards) == 4
        for s in shards[1:]:
            np.testing.assert_array_equal(s, shards[0])


def test_params_change_and_masked_slices_stay_exactly_zero(setup, runs):
    _, _, s_spec, s_vars, _ = setup
    s1, _, _ = runs[1]
    mult = mask_multipliers(s_spec, s_vars)
    zeros_seen = 0
    for p, m in zip(jax.tree.leaves(s1.params), jax.tree.leaves(mult)):
        m = np.broadcast_to(np.asarray(m), np.shape(p))
        assert np.all(np.asarray(p)[m == 0] == 0.0)
        zeros_seen += int((m == 0).sum())
    assert zeros_seen > 0
    changed = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(s_vars["params"]), jax.tree.leaves(s1.params))]
    assert sum(changed) > len(changed) // 2
    # momentum buffers of masked entries are exactly zero, the others are not all zero
    masked_part = apply_multipliers(s1.opt_state, s1.params, jax.tree.map(lambda m: 1 - m, mult))
    traces = [(np.asarray(a), np.asarray(b)) for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(masked_part)[0], jax.tree.leaves(s1.opt_state))
        if "trace" in jax.tree_util.keystr(path)]
    assert len(traces) == len(jax.tree.leaves(s1.params))
    assert all(np.abs(full).sum() > 0 for _, full in traces)
    assert all(np.all(masked == 0) for masked, _ in traces)


def test_apply_multipliers_reaches_optimizer_moments():
    params = {"a": {"kernel": jnp.ones((2, 3))}, "b": {"bias": jnp.ones((3,))}}
    mult = {"a": {"kernel": jnp.array([1.0, 0.0, 1.0])}, "b": {"bias": jnp.ones(())}}
    tx, _ = make_optimizer({"name": "adam", "lr": 0.1, "schedule": "constant"}, 10)
    state = jax.tree.map(lambda x: x + 1.0, tx.init(params))
    out = apply_multipliers(state, params, mult)
    mu = out[1][0].mu
    np.testing.assert_array_equal(mu["a"]["kernel"], [[1, 0, 1], [1, 0, 1]])
    np.testing.assert_array_equal(mu["b"]["bias"], [1, 1, 1])
    assert int(out[1][0].count) == 1  # the step counter is not a parameter-shaped leaf: untouched


def test_masked_and_shrunk_training_compute_the_same_function(setup, runs):
    t_spec, t_vars, s_spec, s_vars, host = setup
    x_spec, x_vars = shrink(s_spec, s_vars)
    assert x_spec.inner_widths != s_spec.inner_widths
    sx, lx, mesh = _run(setup, 1, variables=jax.device_get(x_vars), spec=x_spec)
    s1, l1, _ = runs[1]
    np.testing.assert_allclose(lx, l1, rtol=1e-4)
    masked_trained = {"params": s1.params, "batch_stats": s1.batch_stats, "masks": s_vars["masks"]}
    shrunk_trained = {"params": sx.params, "batch_stats": sx.batch_stats, "masks": x_vars["masks"]}
    exported_spec, exported = shrink(s_spec, jax.device_get(masked_trained))
    x = host["x_id"]
    a = make_predict(mesh, build_model(exported_spec), CFG.mean, CFG.std, 16)(exported, x)["logits"]
    b = make_predict(mesh, build_model(x_spec), CFG.mean, CFG.std, 16)(shrunk_trained, x)["logits"]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_batch_not_divisible_by_devices_is_refused(setup):
    t_spec, t_vars, s_spec, s_vars, _ = setup
    tx, _ = make_optimizer(OPTIM, 1)
    with pytest.raises(ValueError, match="batch_id=6 must be divisible by the device count 4"):
        make_train_step(make_mesh(4), build_model(s_spec), build_model(t_spec), KD((0.5,) * 3).recipe(), tx,
                        StepConfig(batch_id=6, batch_ood=8))
