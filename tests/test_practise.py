"""PRACTISE (methods/practise.py) and the inner fitting loop (methods/fit.py)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tiny_spec

from oefsmc_jax.errors import ConfigError
from oefsmc_jax.methods.base import CompressionContext
from oefsmc_jax.methods.fit import FitConfig, batch_indices, fit
from oefsmc_jax.methods.mir import MIR_RECIPE
from oefsmc_jax.methods.practise import (
    DEFAULT_LATENCY_TARGET,
    PRACTISE,
    PractiseParams,
    _optimizer,
    adapted_features,
    adaptor_points,
    candidates,
    identity_adaptors,
    weighted_feature_mse,
)
from oefsmc_jax.models import build_model, count_flops, drop_blocks, imagenet_resnet_spec, vgg_spec
from oefsmc_jax.oe.calibration import calibration_set
from oefsmc_jax.training.parallel import make_mesh

K, SIZE = 10, 8
SPEC = tiny_spec(14, K)  # two blocks per stage: candidates s0b1, s1b1, s2b1
SPEC_B = tiny_spec(14, K, shortcut="B")
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
STEPS = 30
# test-sized fit: no augmentation on 8x8 random images (pad 4 would black out half of an image) and no weight decay,
# so that a perfect fit stays exactly perfect (the decay pulls adaptors towards 0: at the official 1e-4 a
# zero-residual block scores ~2e-8 here); the option-B run and test_optimizer cover augmentation and decay
FIT = {"fit_steps": STEPS, "pad": 0, "flip": False, "weight_decay": 0.0}


def _teacher(spec, seed=0):
    """A random teacher: He-normal convs, random BN affine and running statistics, masks and gates at 1. Drawn
    with numpy on the variables' shapes (``pipeline.init_variables`` compiles the Flax initialisers, ~10 s per
    architecture on a busy 2-core machine)."""
    shapes = jax.eval_shape(lambda: build_model(spec).init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)),
                                                           train=False))
    rng = np.random.default_rng(seed)

    def draw(path, sd):
        coll, name, shape = path[0].key, path[-1].key, sd.shape
        if coll == "masks":
            return np.ones(shape, np.float32)
        if coll == "batch_stats":
            return (rng.uniform(0.5, 1.5, shape) if name == "var" else rng.normal(0, 0.2, shape)).astype(np.float32)
        if name == "kernel":
            std = np.sqrt(2.0 / (shape[0] * shape[1] * shape[-1])) if len(shape) == 4 else 0.1
            return (rng.normal(0, 1, shape) * std).astype(np.float32)
        if name == "scale":
            return rng.uniform(0.5, 1.5, shape).astype(np.float32)
        return rng.normal(0, 0.1, shape).astype(np.float32)  # BN and dense biases

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def teacher():
    return _teacher(SPEC)


@pytest.fixture(scope="module")
def calib():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(K), [6, 5, 4, 3, 3, 2, 2, 1, 1, 1]).astype(np.int32)  # 28 images, imbalanced
    x = rng.integers(0, 256, (len(y), SIZE, SIZE, 3), dtype=np.uint8)
    cal = calibration_set(x, y, K)
    assert not np.allclose(cal.weights, 1.0)
    return cal


def _ctx(spec, variables, cal, workdir, latency="macs", batch_size=16):
    return CompressionContext(spec, variables, cal, MEAN, STD, jax.random.PRNGKey(0), workdir=workdir,
                              latency=latency, batch_size=batch_size)  # 28 images: batches of 16 + 12 (padded)


def _run(spec, variables, cal, workdir, latency="macs", **params):
    p = PractiseParams(**{**FIT, **params})
    out_spec, out = PRACTISE(p).compress(_ctx(spec, variables, cal, workdir, latency))
    rec = json.loads((workdir / "compression" / "practise.json").read_text())
    return out_spec, out, rec


def _zeroed(teacher, block):
    v = jax.tree.map(np.array, teacher)
    v["params"][block]["bn2"]["scale"][:] = 0.0
    v["params"][block]["bn2"]["bias"][:] = 0.0
    return v


@pytest.fixture(scope="module")
def zeroed_run(teacher, calib, tmp_path_factory):
    t = _zeroed(teacher, "s1b1")
    spec, out, rec = _run(SPEC, t, calib, tmp_path_factory.mktemp("zeroed"), k=1)
    return t, spec, out, rec


@pytest.fixture(scope="module")
def weighted_run(teacher, calib, tmp_path_factory):
    return _run(SPEC, teacher, calib, tmp_path_factory.mktemp("weighted"), k=1)[2]


# ---------------------------------------------------------------------- placement
def test_candidates_and_placement_option_a():
    assert candidates(SPEC) == [(0, 1), (1, 1), (2, 1)]
    assert adaptor_points(SPEC, 0, 1) == ("s0b0/conv2:out", "s1b0/conv1:in")
    assert adaptor_points(SPEC, 1, 1) == ("s1b0/conv2:out", "s2b0/conv1:in")
    assert adaptor_points(SPEC, 2, 1) == ("s2b0/conv2:out",)  # nothing after the last stage
    spec20 = tiny_spec(20, K)  # three blocks per stage
    assert adaptor_points(spec20, 0, 1) == ("s0b0/conv2:out", "s0b2/conv1:in", "s1b0/conv1:in")
    assert adaptor_points(spec20, 1, 2) == ("s1b0/conv2:out", "s1b1/conv2:out", "s2b0/conv1:in")
    with pytest.raises(ValueError, match=r"block \(1,0\) is not a PRACTISE candidate"):
        adaptor_points(SPEC, 1, 0)
    assert candidates(vgg_spec([4, "M", 8, "M"])) == []


def test_placement_option_b_and_bottleneck():
    assert adaptor_points(SPEC_B, 0, 1) == ("s0b0/conv2:out", "s1b0/conv1:in", "s1b0/proj_conv:in")
    assert adaptor_points(SPEC_B, 1, 1) == ("s1b0/conv2:out", "s1b0/proj_conv:out", "s2b0/conv1:in",
                                            "s2b0/proj_conv:in")
    assert adaptor_points(SPEC_B, 2, 1) == ("s2b0/conv2:out", "s2b0/proj_conv:out")
    r50 = imagenet_resnet_spec(50, 10, widths=(2, 2, 2, 2))  # bottleneck: the last conv is conv3
    assert adaptor_points(r50, 0, 2) == ("s0b0/conv3:out", "s0b0/proj_conv:out", "s0b1/conv3:out",
                                         "s1b0/conv1:in", "s1b0/proj_conv:in")


# ---------------------------------------------------------------------- adaptors
def test_identity_adaptors_change_nothing(teacher, calib, zeroed_run):
    ctx = _ctx(SPEC, teacher, calib, None)
    x = ctx.images(np.arange(16))  # one batch of the stage's shape: its compiled forward is reused
    _, s_vars = drop_blocks(SPEC, teacher, [(0, 1)])
    plain = ctx.activations(SPEC, s_vars, ["features"], x=x)["features"]
    edited = lambda v, x, a, u: adapted_features(SPEC, v, a, u, x, batch_size=16)
    union = tuple(dict.fromkeys(pt for c in candidates(SPEC) for pt in adaptor_points(SPEC, *c)))
    eye = identity_adaptors(SPEC, s_vars, SIZE, union)
    assert {p: a.shape for p, a in eye.items()} == {"s0b0/conv2:out": (4, 4), "s1b0/conv1:in": (4, 4),
                                                    "s1b0/conv2:out": (8, 8), "s2b0/conv1:in": (8, 8),
                                                    "s2b0/conv2:out": (8, 8)}
    pts = adaptor_points(SPEC, 0, 1)
    flags = lambda f: {p: jnp.asarray(f(p)) for p in union}
    for use in (flags(lambda p: True), flags(lambda p: p in pts)):
        np.testing.assert_array_equal(edited(s_vars, x, eye, use), plain)
    # a switched-off adaptor passes its input through even when it is not the identity; a switched-on one acts
    two = {p: 2.0 * a for p, a in eye.items()}
    np.testing.assert_array_equal(edited(s_vars, x, two, flags(lambda p: False)), plain)
    assert not np.allclose(edited(s_vars, x, two, flags(lambda p: p in pts)), plain, atol=1e-3)


def test_weighted_feature_mse_matches_hand_computation(teacher, calib):
    ctx = _ctx(SPEC, teacher, calib, None, batch_size=32)
    x = ctx.images()
    t = np.asarray(ctx.activations(SPEC, teacher, ["features"])["features"], np.float64)
    _, s_vars = drop_blocks(SPEC, teacher, [(1, 1)])
    s = np.asarray(ctx.activations(SPEC, s_vars, ["features"])["features"], np.float64)
    per = ((s - t) ** 2).reshape(len(x), -1).mean(-1)
    eye = identity_adaptors(SPEC, s_vars, SIZE, adaptor_points(SPEC, 1, 1))
    w = calib.weights
    got = weighted_feature_mse(SPEC, s_vars, eye, {}, x, jnp.asarray(t, jnp.float32), w, batch_size=16)
    assert got == pytest.approx(np.sum(w * per) / np.sum(w), rel=1e-5)
    assert got != pytest.approx(per.mean(), rel=1e-3)  # the weights matter


# ---------------------------------------------------------------------- the stage
def test_zeroed_block_is_recoverable_and_dropped_first(zeroed_run):
    t, spec, out, rec = zeroed_run
    rows = {r["block"]: r for r in rec["candidates"]}
    assert list(rows) == ["s0b1", "s1b1", "s2b1"]
    assert rows["s1b1"]["mse_identity"] == 0.0  # the branch adds exactly 0: removing it changes nothing
    assert rows["s1b1"]["recoverability"] < 1e-8
    assert rows["s1b1"]["recoverability"] == 0.0 and rows["s1b1"]["adaptor_max_change"] == 0.0  # zero gradient
    for b in ("s0b1", "s2b1"):
        assert rows[b]["recoverability"] > 1e-4
    assert rec["order"][0] == "s1b1" and rec["chosen"] == ["s1b1"] and rec["k"] == 1
    assert spec == SPEC
    assert float(out["masks"]["s1b1"]["gate"]) == 0.0


def test_only_adaptors_change_and_the_fit_lowers_the_mse(zeroed_run):
    t, spec, out, rec = zeroed_run
    # the student's weights are the teacher's, bit for bit; only the chosen gate differs
    for coll in ("params", "batch_stats"):
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, out[coll]), t[coll])
    masks_t = jax.tree.map(np.asarray, t["masks"])
    masks_t["s1b1"]["gate"] = np.zeros((), np.float32)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, out["masks"]), masks_t)
    for r in rec["candidates"]:
        if r["block"] == "s1b1":
            continue
        assert r["adaptor_max_change"] > 1e-3
        assert r["recoverability"] < 0.95 * r["mse_identity"]
        assert r["fit_loss_last"] < r["fit_loss_first"]


def test_record_holds_every_candidate_with_its_score(zeroed_run):
    _, _, _, rec = zeroed_run
    assert rec["latency_mode"] == "macs" and rec["fit_steps"] == STEPS and rec["images"] == 28
    assert rec["teacher_latency"] == count_flops(SPEC, SIZE)
    for r in rec["candidates"]:
        s, b = r["stage"], r["index"]
        assert r["adaptors"] == list(adaptor_points(SPEC, s, b))
        lat = count_flops(SPEC.with_kept([[not (i == s and j == b) for j in range(2)] for i in range(3)]), SIZE)
        assert r["latency"] == lat
        assert r["latency_reduction"] == pytest.approx((rec["teacher_latency"] - lat) / rec["teacher_latency"] * 100)
        assert r["score"] == pytest.approx(r["recoverability"] / r["latency_reduction"])
    assert rec["order"] == [r["block"] for r in sorted(rec["candidates"], key=lambda r: r["score"])]


def test_calibration_weights_change_the_scores(teacher, calib, weighted_run, tmp_path):
    weighted = weighted_run
    uniform_cal = dataclasses.replace(calib, weights=np.ones_like(calib.weights))
    _, _, uniform = _run(SPEC, teacher, uniform_cal, tmp_path / "u", k=1)
    assert not weighted["weights_uniform"] and uniform["weights_uniform"]
    for a, b in zip(weighted["candidates"], uniform["candidates"]):
        assert a["block"] == b["block"]
        assert abs(a["recoverability"] - b["recoverability"]) > 1e-3 * b["recoverability"]
        assert a["fit_loss_first"] != pytest.approx(b["fit_loss_first"], rel=1e-3)  # the fit's loss is weighted too
        assert a["score"] != pytest.approx(b["score"], rel=1e-3)


def test_latency_target_picks_the_smallest_k(teacher, calib, weighted_run, tmp_path):
    first = weighted_run
    red = {r["block"]: r["latency_reduction"] for r in first["candidates"]}
    target = red[first["order"][0]] + 0.01  # one block is not enough, two are
    _, out, rec = _run(SPEC, teacher, calib, tmp_path / "b", latency_target=target)
    assert rec["chosen"] == first["order"][:2] and rec["k"] == 2
    assert rec["chosen_latency_reduction"] >= target
    assert rec["chosen_latency_reduction"] == pytest.approx(sum(red[b] for b in rec["chosen"]))  # MACs add up
    assert sorted(n for n, m in out["masks"].items() if float(m["gate"]) == 0.0) == sorted(rec["chosen"])


@pytest.mark.slow
def test_option_b_fit_runs(calib, tmp_path):
    t = _teacher(SPEC_B, 2)
    _, out, rec = _run(SPEC_B, t, calib, tmp_path, k=1, pad=1, flip=True, weight_decay=1e-4)  # augmented
    rows = {r["block"]: r for r in rec["candidates"]}
    assert rows["s0b1"]["adaptors"] == ["s0b0/conv2:out", "s1b0/conv1:in", "s1b0/proj_conv:in"]
    assert rows["s1b1"]["adaptors"] == ["s1b0/conv2:out", "s1b0/proj_conv:out", "s2b0/conv1:in", "s2b0/proj_conv:in"]
    for r in rows.values():
        assert r["adaptor_max_change"] > 1e-3 and np.isfinite(r["recoverability"]) and r["score"] > 0
    assert len(rec["chosen"]) == 1 and float(out["masks"][rec["chosen"][0]]["gate"]) == 0.0


def test_optimizer_is_pytorch_sgd_with_steplr_twice():
    """Coupled weight decay, heavy-ball momentum, lr x0.1 at int(0.4 T) and int(0.8 T) (T = 10: steps 4 and 8)."""
    tx = _optimizer(0.02, 0.9, 1e-4, 10)
    p, state = jnp.array([1.0, -2.0]), None
    state = tx.init(p)
    ref_p, buf = np.array([1.0, -2.0]), np.zeros(2)
    for t in range(10):
        g = jnp.array([0.5, 0.25]) * (t + 1)
        updates, state = tx.update(g, state, p)
        p = optax.apply_updates(p, updates)
        d = np.asarray(g, np.float64) + 1e-4 * ref_p
        buf = 0.9 * buf + d
        ref_p = ref_p - 0.02 * 0.1 ** (t // 4) * buf
        np.testing.assert_allclose(p, ref_p, rtol=1e-6)


# ---------------------------------------------------------------------- config
def test_config_and_interface(teacher, calib):
    m = PRACTISE.from_config({"name": "practise", "practise": {"k": 2, "fit_steps": 50}}, SPEC)
    assert (m.params.k, m.params.latency_target, m.params.fit_steps) == (2, 0.0, 50)
    assert m.name == "practise" and m.uses_calibration and m.recipe() is MIR_RECIPE
    m = PRACTISE.from_config({"name": "practise", "practise": {"latency_target": 20}}, SPEC)
    assert m.params.latency_target == 20.0 and m.params.k == 0
    # neither set: the default latency target; k set: k alone (the committed grids set k)
    m = PRACTISE.from_config({"name": "practise", "practise": {}}, SPEC)
    assert (m.params.k, m.params.target) == (0, DEFAULT_LATENCY_TARGET)
    assert PractiseParams(k=2).target == 0.0 and PractiseParams(latency_target=30).target == 30.0

    def bad(sub, match, spec=SPEC, **cfg):
        with pytest.raises(ConfigError, match=match):
            PRACTISE.from_config({"name": "practise", "practise": sub, **cfg}, spec)

    bad({"k": 1, "latency_target": 10.0},
        r"^config.method.practise.k: set at most one of method.practise.k .* got both$")
    bad({"k": 4}, "4 blocks requested but the teacher has only 3 candidates")
    bad({"k": 1.5}, r"config.method.practise.k: must be an integer, got 1.5")
    bad({"latency_target": 99.0}, r"config.method.practise.latency_target: 99 % is out of reach")
    bad({"latency_target": 120.0}, r"config.method.practise.latency_target: must be a reduction in %")
    bad({"k": 1, "fit_steps": 0}, r"config.method.practise.fit_steps: must be >= 1, got 0")
    bad({"k": 1, "nope": 3}, r"config.method.practise.nope: unknown field")
    bad({"k": 1}, r"config.method.name: practise drops residual blocks", spec=vgg_spec([4, "M", 8, "M"]))
    with pytest.raises(ConfigError, match="got both"):
        PRACTISE(PractiseParams(k=1, latency_target=5.0))
    ctx = dataclasses.replace(_ctx(SPEC, teacher, calib, None), mesh=make_mesh(4))
    with pytest.raises(ConfigError, match=r"^config.method.practise.batch_size: 6 is not divisible by the device "
                                          r"count 4$"):
        PRACTISE(PractiseParams(k=1, batch_size=6)).compress(ctx)


# ---------------------------------------------------------------------- fit()
def _regression(n=20):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 3)).astype(np.float32)
    y = (x @ rng.standard_normal((3, 2)) + 0.1 * rng.standard_normal((n, 2))).astype(np.float32)
    w = rng.uniform(0.2, 3.0, n).astype(np.float32)
    return {"x": x, "y": y, "w": w}


def _loss(params, batch, keys, consts):
    """Weighted least squares on inputs jittered with the per-row keys (scale ``consts``), as ``(total, norm)``."""
    noise = jax.vmap(lambda k: jax.random.normal(k, (3,)))(keys)
    pred = (batch["x"] + consts * noise) @ params["W"] + params["b"]
    per = jnp.mean((pred - batch["y"]) ** 2, -1)
    return jnp.sum(batch["w"] * per), jnp.sum(batch["w"])


@pytest.mark.slow
def test_fit_same_result_on_1_and_4_devices_and_equals_full_batch_descent():
    data = _regression()
    p0 = {"W": jnp.ones((3, 2)), "b": jnp.zeros((2,))}
    tx = optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(0.05, momentum=0.9))
    run = lambda mesh, noise: fit(_loss, p0, data, config=FitConfig(tx=tx, steps=25, batch_size=20, mesh=mesh),
                                  key=jax.random.PRNGKey(1), consts=jnp.float32(noise))
    # jittered by keys that depend on each row's place in the global batch: the same on 1 and 4 devices
    p1, l1 = run(make_mesh(1), 0.1)
    p4, l4 = run(make_mesh(4), 0.1)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), p1, p4)
    np.testing.assert_allclose(l1, l4, rtol=2e-5)
    assert l1.shape == (25,) and l1[-1] < 0.2 * l1[0]
    # batch = the whole set (a permutation of it), no jitter: plain full-batch descent on sum w l / sum w
    p4, l4 = run(make_mesh(4), 0.0)
    full = {k: jnp.asarray(v) for k, v in data.items()}
    objective = lambda p: (lambda t, n: t / n)(*_loss(p, full, jnp.zeros((20, 2), jnp.uint32), 0.0))
    p, state, ref = p0, tx.init(p0), []
    for _ in range(25):
        loss, g = jax.value_and_grad(objective)(p)
        updates, state = tx.update(g, state, p)
        p, ref = optax.apply_updates(p, updates), ref + [float(loss)]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p4, p)
    np.testing.assert_allclose(l4, ref, rtol=1e-4)
    with pytest.raises(ValueError, match=r"^fit: batch_size=6 must be a positive multiple of the device count 4$"):
        fit(_loss, p0, data, config=FitConfig(tx=tx, steps=2, batch_size=6, mesh=make_mesh(4)),
            key=jax.random.PRNGKey(1), consts=jnp.float32(0))


def test_batch_indices():
    key = jax.random.PRNGKey(4)
    idx = np.asarray(batch_indices(key, 20, 8))
    assert len(set(idx.tolist())) == 8 and idx.max() < 20  # without replacement
    idx = np.asarray(batch_indices(key, 20, 50))  # two whole permutations and half of a third
    assert sorted(np.bincount(idx, minlength=20).tolist()) == [2] * 10 + [3] * 10
