"""Host-fed batches (StepConfig.host_batches): the same images, keys and parameters as a run with its data on the
device, from a pool on disk that is never loaded whole."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_spec

from oefsmc_jax.methods import KD
from oefsmc_jax.models import build_model, l1_prune
from oefsmc_jax.oe import complementary
from oefsmc_jax.training.feed import HostFeeder, pool_bytes
from oefsmc_jax.training.loop import finetune_one
from oefsmc_jax.training.parallel import make_mesh, replicate
from oefsmc_jax.training.step import StepConfig, StepData, host_draw
from oefsmc_jax.training.train import LoopConfig, RunJob

SIZE, K = 8, 10
CFG = StepConfig(batch_id=8, batch_ood=8, pad=1, flip=True, mean=(0.5,) * 3, std=(0.25,) * 3)
OPTIM = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "schedule": "cosine"}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    spec = tiny_spec(8, K)
    t_vars = jax.device_get(build_model(spec).init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)),
                                                   train=False))
    s_spec, s_vars = l1_prune(spec, t_vars, 0.5)
    rng = np.random.default_rng(0)
    counts = np.array([4, 4, 3, 3, 2, 2, 2, 1, 1, 1])
    y = np.repeat(np.arange(K), counts).astype(np.int32)
    x = rng.integers(0, 256, (len(y), SIZE, SIZE, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("pool") / "pool.u8"
    pool = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(500, SIZE, SIZE, 3))
    pool[:] = rng.integers(0, 256, pool.shape, dtype=np.uint8)
    pool.flush()
    gamma = np.asarray(complementary.complementary_distribution(jnp.asarray(counts)), np.float32)
    host = StepData(x_id=x, y_id=y, x_ood=np.load(path, mmap_mode="r"), id_probs=None, gamma=gamma,
                    reg_weights=np.asarray(complementary.class_weights(jnp.asarray(gamma)), np.float32))
    return spec, t_vars, s_spec, jax.device_get(s_vars), host


def _run(parts, tmp, ndev, host_batches, **data_changes):
    t_spec, t_vars, s_spec, s_vars, host = parts
    mesh = make_mesh(ndev)
    data = dataclasses.replace(host, **data_changes)
    if not host_batches:
        data = jax.tree.map(lambda a: replicate(np.asarray(a), mesh), data)
    job = RunJob(name="r", workdir=tmp, mesh=mesh, spec=s_spec, variables=s_vars, recipe=KD((0.5,) * 3).recipe(),
                 teacher_spec=t_spec, teacher_variables=t_vars, data=data,
                 step_cfg=dataclasses.replace(CFG, host_batches=host_batches), optim_cfg=OPTIM,
                 loop=LoopConfig(steps=4, log_every=2, ckpt_every=2), seed=5)
    return finetune_one(job)


@pytest.mark.parametrize("ndev,weighted", [(1, False), (4, False), (1, True)])
@pytest.mark.slow
def test_host_batches_train_exactly_like_device_data(parts, tmp_path, ndev, weighted):
    extra = {}
    if weighted:  # the resample arm's class-balanced ID sampling is drawn on the host the same way
        y = parts[4].y_id
        p = (1.0 / np.bincount(y))[y]
        extra["id_probs"] = (p / p.sum()).astype(np.float32)
    a = _run(parts, tmp_path / "dev", ndev, False, **extra)
    b = _run(parts, tmp_path / "host", ndev, True, **extra)
    for x, y in zip(jax.tree.leaves(a.variables), jax.tree.leaves(b.variables)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)
    changed = [not np.allclose(u, v) for u, v in zip(jax.tree.leaves(parts[3]["params"]),
                                                     jax.tree.leaves(a.variables["params"]))]
    assert sum(changed) > len(changed) // 2


def test_host_draw_and_feeder_batches(parts):
    *_, host = parts
    cfg = dataclasses.replace(CFG, host_batches=True)
    rng = np.asarray(jax.random.PRNGKey(5))
    n = len(host.y_id)
    idx, idx_ood = host_draw(cfg, rng, 3, n, 500)
    assert idx.shape == (8,) and len(set(idx.tolist())) == 8 and idx_ood.shape == (8,) and idx_ood.max() < 500
    again = host_draw(cfg, rng, 3, n, 500)
    assert np.array_equal(again[0], idx) and not np.array_equal(host_draw(cfg, rng, 4, n, 500)[0], idx)
    feeder = HostFeeder(cfg, host, rng, start=3, mesh=make_mesh(1))
    try:
        b3 = feeder.get(3)
        np.testing.assert_array_equal(np.asarray(b3.x_ood), np.asarray(host.x_ood)[idx_ood])
        np.testing.assert_array_equal(np.asarray(b3.y_id), host.y_id[idx])
        assert b3.x_ood.shape == (8, SIZE, SIZE, 3)  # only the step's images reach the device
        feeder.get(4)
        with pytest.raises(RuntimeError, match="asked for step 9, the next prepared batch is for step 5"):
            feeder.get(9)
    finally:
        feeder.close()
    assert pool_bytes(host) == host.x_id.nbytes + 500 * SIZE * SIZE * 3


@pytest.mark.slow
def test_pipeline_streams_when_the_pool_exceeds_the_device_budget(tmp_path, capfd):
    """``train.device_pool_mb = 0`` (auto mode): every fine-tuning is host-fed, and ends where the device-data run
    ends; a bad ``train.host_batches`` value is named."""

    import tiny_demo

    from oefsmc_jax.config_validation import validate
    from oefsmc_jax.errors import ConfigError
    from oefsmc_jax.run import run

    small = {**tiny_demo.OVERRIDES, "teacher.steps": 10, "train.steps": 6, "train.log_every": 3, "oe.eval_every": 3,
             "arms": "oe"}
    dev = run(tiny_demo.config(small), tmp_path / "dev")
    assert "host batches" not in capfd.readouterr().err
    host = run(tiny_demo.config({**small, "train.device_pool_mb": 0}), tmp_path / "host")
    assert "[oe] host batches: each step's 16 + 16 images are gathered on the host" in capfd.readouterr().err
    a, b = dev["arms"]["oe"], host["arms"]["oe"]
    assert a["steps"] == b["steps"] == 6
    assert abs(a["metrics"]["top1"] - b["metrics"]["top1"]) <= 0.5
    bad = tiny_demo.config({**small, "train.host_batches": "yes"})
    with pytest.raises(ConfigError, match=r"^config.train.host_batches: 'yes' is not allowed; choose auto, on or off"):
        validate(bad)


def test_draw_indices_rules():
    from oefsmc_jax.training.step import LARGE_SET, draw_indices

    key = jax.random.PRNGKey(1)
    small = np.asarray(draw_indices(key, 100, 32))
    assert len(set(small.tolist())) == 32 and small.max() < 100  # without replacement below LARGE_SET
    big = np.asarray(draw_indices(key, 4 * LARGE_SET, 32))  # O(batch): uniform with replacement
    np.testing.assert_array_equal(big, np.asarray(jax.random.randint(key, (32,), 0, 4 * LARGE_SET)))
    p = np.zeros(10, np.float32)
    p[3] = 1.0
    assert set(np.asarray(draw_indices(key, 10, 16, jnp.asarray(p))).tolist()) == {3}  # by probs, with replacement
    assert np.asarray(draw_indices(key, 5, 8)).max() < 5  # more than the set holds: with replacement
