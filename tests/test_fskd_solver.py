"""FSKD numerical core: weighted least squares, exact eval-mode BN folding, correction positions."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_spec

from oefsmc_jax.methods.fskd_solver import (
    BN_EPSILON,
    CorrectionPoint,
    correction_points,
    fold_bn_correction,
    weighted_lstsq,
)
from oefsmc_jax.models import (
    build_model,
    imagenet_resnet_spec,
    init_variables,
    l1_prune,
    shrink,
    vgg16_spec,
    vgg_spec,
)

K, SIZE = 10, 8
SPEC = tiny_spec(8, K)
TOL = 1e-5


def _perturb_bn(variables, seed):
    """Non-trivial BN: random gamma/beta/running mean/var at every BN."""
    rng = np.random.default_rng(seed)
    v = jax.tree.map(np.array, variables)

    def walk(p, st):
        for k in p:
            if "scale" in p[k] and k in st and "mean" in st[k]:
                c = p[k]["scale"].shape[0]
                p[k]["scale"] = (rng.uniform(0.5, 1.5, c) * rng.choice([-1, 1], c)).astype(np.float32)
                p[k]["bias"] = rng.normal(0, 0.5, c).astype(np.float32)
                st[k]["mean"] = rng.normal(0, 0.5, c).astype(np.float32)
                st[k]["var"] = rng.uniform(0.3, 2.0, c).astype(np.float32)
            elif isinstance(p[k], dict) and k in st:
                walk(p[k], st[k])

    walk(v["params"], v["batch_stats"])
    return v


@pytest.fixture(scope="module")
def model_vars():
    return _perturb_bn(init_variables(SPEC, SIZE, 0), 1)


@pytest.fixture(scope="module")
def images():
    return jnp.asarray(np.random.default_rng(2).normal(size=(4, SIZE, SIZE, 3)).astype(np.float32))


def _apply(spec, variables, x, qs=None):
    """Eval-mode forward; ``qs`` maps a BN path to a Q applied to that BN's output (the unfolded reference)."""
    qs = qs or {}

    def interceptor(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        path = tuple(context.module.path)
        if context.method_name == "__call__" and isinstance(context.module, nn.BatchNorm) and path in qs:
            y = jnp.einsum("...c,cd->...d", y, jnp.asarray(qs[path]), precision="highest")
        return y

    with nn.intercept_methods(interceptor):
        out = build_model(spec).apply(variables, x, train=False)
    return np.asarray(out["logits"]), np.asarray(out["features"])


def _close(a, b, tol=TOL):
    err = float(np.max(np.abs(a - b)))
    assert err <= tol, err
    return err


def _random_q(rng, c):
    return (np.eye(c) + 0.4 * rng.normal(size=(c, c))).astype(np.float32)


# ---------------------------------------------------------------------- least squares
def test_lstsq_recovers_exact_solution_with_and_without_weights():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(6, 3, 3, 5)).astype(np.float32)
    q_star = _random_q(rng, 5)
    assert abs(np.linalg.det(q_star)) > 0.1
    t = np.einsum("nhwc,cd->nhwd", z.astype(np.float64), q_star).astype(np.float32)
    for w in (None, rng.uniform(0.1, 5.0, 6)):
        q = weighted_lstsq(z, t, w)
        assert q.dtype == np.float32 and q.shape == (5, 5)
        np.testing.assert_allclose(q, q_star, atol=1e-5)
        np.testing.assert_allclose(z @ q, t, atol=1e-5)
    # 2-D rows with per-row weights, and a non-square (C_in != C_out) problem
    q_rect = rng.normal(size=(5, 3))
    zr = z.reshape(-1, 5)
    q = weighted_lstsq(zr, zr.astype(np.float64) @ q_rect, rng.uniform(0.5, 2.0, zr.shape[0]))
    assert q.shape == (5, 3)
    np.testing.assert_allclose(q, q_rect, atol=1e-5)


def test_lstsq_weights_match_normal_equations_reference():
    rng = np.random.default_rng(1)
    n, h, w, c = 7, 2, 3, 4
    z = rng.normal(size=(n, h, w, c))
    t = z @ _random_q(rng, c) + 0.5 * rng.normal(size=(n, h, w, c))  # not exactly solvable
    unweighted = weighted_lstsq(z, t)
    np.testing.assert_allclose(weighted_lstsq(z, t, np.full(n, 3.0)), unweighted, atol=1e-6)
    weights = np.array([5.0, 0.2, 1.0, 3.0, 0.5, 2.0, 1.0])
    q = weighted_lstsq(z, t, weights)
    assert np.max(np.abs(q - unweighted)) > 1e-2  # weighting changes the solution
    # independent reference: (Z^T W Z)^-1 Z^T W T, each sample's weight on all of its H*W rows
    zr, tr, wr = z.reshape(-1, c), t.reshape(-1, c), np.repeat(weights, h * w)
    ref = np.linalg.solve(zr.T @ (wr[:, None] * zr), zr.T @ (wr[:, None] * tr))
    np.testing.assert_allclose(q, ref, atol=1e-5)
    np.testing.assert_allclose(unweighted, np.linalg.solve(zr.T @ zr, zr.T @ tr), atol=1e-5)
    # a zero weight drops the sample
    w0 = np.ones(n)
    w0[2] = 0.0
    keep = np.arange(n) != 2
    np.testing.assert_allclose(weighted_lstsq(z, t, w0), weighted_lstsq(z[keep], t[keep]), atol=1e-6)


def test_lstsq_validates_inputs():
    z = np.ones((3, 2, 2, 4))
    with pytest.raises(ValueError, match="agree on every axis"):
        weighted_lstsq(z, np.ones((3, 2, 1, 4)))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        weighted_lstsq(z, z, np.ones(12))
    with pytest.raises(ValueError, match=">= 0"):
        weighted_lstsq(z, z, np.array([1.0, -1.0, 1.0]))


# ---------------------------------------------------------------------- positions
def test_correction_points():
    def b(s):
        return (f"s{s}b0", "conv1"), (f"s{s}b0", "bn1")

    assert correction_points(SPEC) == [CorrectionPoint(*b(0), 4), CorrectionPoint(*b(1), 8),
                                       CorrectionPoint(*b(2), 8)]
    pts = correction_points(SPEC, block_output=True)
    assert [(p.bn, p.width) for p in pts] == [
        (("s0b0", "bn1"), 4), (("s0b0", "bn2"), 4), (("s1b0", "bn1"), 8), (("s1b0", "bn2"), 8),
        (("s2b0", "bn1"), 8), (("s2b0", "bn2"), 8)]
    assert pts[1].conv == ("s0b0", "conv2")
    # dropped blocks are skipped, pruned widths reported
    spec = tiny_spec(14, K)
    spec = spec.with_kept(((True, False), (True, True), (True, True))).with_inner_widths(
        (((2,), (4,)), ((8,), (3,)), ((8,), (8,))))
    assert [(p.bn[0], p.width) for p in correction_points(spec)] == [
        ("s0b0", 2), ("s1b0", 8), ("s1b1", 3), ("s2b0", 8), ("s2b1", 8)]
    vgg = correction_points(vgg16_spec(), block_output=True)
    assert len(vgg) == 13 and vgg[0] == CorrectionPoint(("s0c0", "conv"), ("s0c0", "bn"), 64)
    assert [p.width for p in vgg] == [64, 64, 128, 128, 256, 256, 256] + [512] * 6
    assert vgg[-1].bn == ("s4c2", "bn")
    r50 = imagenet_resnet_spec(50, widths=(2, 2, 2, 2))
    assert len(correction_points(r50)) == 32
    pts = correction_points(r50, block_output=True)
    assert len(pts) == 48 and [(p.bn[1], p.width) for p in pts[:3]] == [("bn1", 2), ("bn2", 2), ("bn3", 8)]


# ---------------------------------------------------------------------- folding
def test_identity_bn_is_exact_in_float32():
    v = np.float32(1.0 - BN_EPSILON)
    assert np.float32(v + np.float32(BN_EPSILON)) == np.float32(1.0)
    assert float(jax.jit(lambda a: jax.lax.rsqrt(a + BN_EPSILON))(jnp.full((3,), v))[0]) == 1.0


def test_fold_is_exact_in_eval_mode(model_vars, images):
    rng = np.random.default_rng(3)
    base = _apply(SPEC, model_vars, images)
    before = jax.tree.map(lambda a: np.array(a, copy=True), model_vars)
    # one Q after bn1 of the stride-2 block (internal width)
    q = _random_q(rng, 8)
    _, folded = fold_bn_correction(SPEC, model_vars, ("s1b0", "conv1"), ("s1b0", "bn1"), q)
    ref = _apply(SPEC, model_vars, images, {("s1b0", "bn1"): q})
    assert np.max(np.abs(ref[0] - base[0])) > 1e-2  # the correction matters
    err = max(_close(_apply(SPEC, folded, images)[i], ref[i]) for i in range(2))
    bn = folded["params"]["s1b0"]["bn1"]
    st = folded["batch_stats"]["s1b0"]["bn1"]
    np.testing.assert_array_equal(bn["scale"], 1.0)
    np.testing.assert_array_equal(st["mean"], 0.0)
    np.testing.assert_array_equal(st["var"] + np.float32(BN_EPSILON), 1.0)
    # the input was not mutated
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, model_vars))
    # every correction point (block outputs included) at once, folded in network order
    qs = {p.bn: _random_q(rng, p.width) for p in correction_points(SPEC, block_output=True)}
    v = model_vars
    for p in correction_points(SPEC, block_output=True):
        _, v = fold_bn_correction(SPEC, v, p.conv, p.bn, qs[p.bn])
    ref = _apply(SPEC, model_vars, images, qs)
    err = max(err, *(_close(_apply(SPEC, v, images)[i], ref[i]) for i in range(2)))
    # Q = identity leaves the eval-mode function unchanged
    _, same = fold_bn_correction(SPEC, model_vars, ("s0b0", "conv2"), ("s0b0", "bn2"), np.eye(4))
    _close(_apply(SPEC, same, images)[0], base[0])
    print(f"max fold error {err:.2e}")


@pytest.mark.slow
def test_fold_on_vgg(images):
    spec = vgg_spec([4, "M", 6], num_classes=3)
    variables = _perturb_bn(init_variables(spec, SIZE, 4), 5)
    rng = np.random.default_rng(6)
    q = _random_q(rng, 6)
    _, folded = fold_bn_correction(spec, variables, ("s1c0", "conv"), ("s1c0", "bn"), q)
    ref = _apply(spec, variables, images, {("s1c0", "bn"): q})
    _close(_apply(spec, folded, images)[0], ref[0])


def test_fold_after_pruning_works_on_kept_width(model_vars, images):
    spec, masked = l1_prune(SPEC, model_vars, 0.5)
    with pytest.raises(ValueError, match="shrink"):
        fold_bn_correction(spec, masked, ("s1b0", "conv1"), ("s1b0", "bn1"), np.eye(8))
    small_spec, small = shrink(spec, masked)
    pts = correction_points(small_spec)
    assert [p.width for p in pts] == [2, 4, 4]
    with pytest.raises(ValueError, match=r"square \[4, 4\]"):
        fold_bn_correction(small_spec, small, pts[1].conv, pts[1].bn, np.eye(8))
    rng = np.random.default_rng(7)
    qs = {p.bn: _random_q(rng, p.width) for p in pts}
    v = small
    for p in pts:
        _, v = fold_bn_correction(small_spec, v, p.conv, p.bn, qs[p.bn])
    assert v["params"]["s1b0"]["conv1"]["kernel"].shape == (3, 3, 4, 4)
    ref = _apply(small_spec, small, images, qs)
    for i in range(2):
        _close(_apply(small_spec, v, images)[i], ref[i])
