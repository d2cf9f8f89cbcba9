"""Activations at named points and edits there (models/probe.py): exact relations between points."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_spec

from oefsmc_jax.models import build_model, init_variables
from oefsmc_jax.models.probe import apply_conv, conv_geometry, forward, points

SPEC = tiny_spec(14)  # two blocks per stage
MODEL = build_model(SPEC)


@pytest.fixture(scope="module")
def variables():
    v = init_variables(SPEC, 8, 0)
    rng = np.random.default_rng(1)
    # non-trivial running statistics so eval and train mode differ
    v["batch_stats"] = jax.tree.map(lambda a: np.asarray(a) + rng.uniform(0.1, 0.5, np.shape(a)).astype(np.float32),
                                    v["batch_stats"])
    return v


@pytest.fixture(scope="module")
def x():
    return jax.random.normal(jax.random.PRNGKey(0), (6, 8, 8, 3))


def test_points_relate_exactly(variables, x):
    want = ["s0b0:out", "s0b1/conv1:in", "s0b1/conv1:out", "s0b1/bn1:out", "s1b0/conv1:in", "s1b0/conv1:out",
            "features", "logits"]
    out, cap = forward(MODEL, variables, x, capture=want)
    chex.assert_shape(cap["s0b1/conv1:in"], (6, 8, 8, 4))
    chex.assert_shape(cap["s1b0/conv1:out"], (6, 4, 4, 8))
    np.testing.assert_array_equal(cap["s0b0:out"], cap["s0b1/conv1:in"])  # a block's output feeds the next block
    np.testing.assert_array_equal(cap["features"], out["features"])
    np.testing.assert_array_equal(cap["logits"], out["logits"])
    g = conv_geometry(variables, "s0b1/conv1")
    np.testing.assert_allclose(cap["s0b1/conv1:out"], apply_conv(cap["s0b1/conv1:in"], g["kernel"], 1, g["padding"]),
                               atol=1e-5)
    g = conv_geometry(variables, "s1b0/conv1")  # stride 2
    np.testing.assert_allclose(cap["s1b0/conv1:out"], apply_conv(cap["s1b0/conv1:in"], g["kernel"], 2, g["padding"]),
                               atol=1e-5)
    bn, st = variables["params"]["s0b1"]["bn1"], variables["batch_stats"]["s0b1"]["bn1"]
    manual = (cap["s0b1/conv1:out"] - st["mean"]) / np.sqrt(st["var"] + 1e-5) * bn["scale"] + bn["bias"]
    np.testing.assert_allclose(cap["s0b1/bn1:out"], manual, atol=1e-5)


def test_train_mode_uses_batch_statistics(variables, x):
    _, ev = forward(MODEL, variables, x, capture=["stem_bn:out", "stem_conv:out"])
    _, tr = forward(MODEL, variables, x, train=True, capture=["stem_bn:out", "stem_conv:out"])
    np.testing.assert_array_equal(ev["stem_conv:out"], tr["stem_conv:out"])  # same input up to the first BN
    z = tr["stem_conv:out"]
    bn = variables["params"]["stem_bn"]
    manual = (z - z.mean((0, 1, 2))) / np.sqrt(z.var((0, 1, 2)) + 1e-5) * bn["scale"] + bn["bias"]
    np.testing.assert_allclose(tr["stem_bn:out"], manual, atol=1e-4)
    assert not np.allclose(ev["stem_bn:out"], tr["stem_bn:out"], atol=1e-3)


def test_edit_on_conv_input_equals_absorbed_kernel(variables, x):
    """A 1x1 matrix P on a conv's input is the conv with kernel P @ W (the adaptor-absorb identity)."""
    p = jax.random.normal(jax.random.PRNGKey(2), (8, 8))
    out_edit, _ = forward(MODEL, variables, x, edits={"s2b0/conv1:in": lambda a: a @ p})
    w = variables["params"]["s2b0"]["conv1"]["kernel"]
    absorbed = jax.tree.map(lambda a: a, variables)
    absorbed["params"] = {**variables["params"], "s2b0": {**variables["params"]["s2b0"],
                                                          "conv1": {"kernel": jnp.einsum("io,hwok->hwik", p, w)}}}
    np.testing.assert_allclose(out_edit["logits"], MODEL.apply(absorbed, x)["logits"], atol=1e-4)
    same, _ = forward(MODEL, variables, x, edits={"s2b0/conv1:in": lambda a: a})
    np.testing.assert_array_equal(same["logits"], MODEL.apply(variables, x)["logits"])
    assert not np.allclose(out_edit["logits"], same["logits"], atol=1e-3)


def test_forward_is_jittable_and_differentiable(variables, x):
    def loss(p):
        out, cap = forward(MODEL, variables, x, capture=["s1b0:out"], edits={"s1b0/conv2:out": lambda a: a @ p})
        return jnp.mean(out["features"] ** 2) + 0 * jnp.sum(cap["s1b0:out"])

    g = jax.jit(jax.grad(loss))(jnp.eye(8))
    chex.assert_shape(g, (8, 8))
    chex.assert_tree_all_finite(g)
    assert float(jnp.abs(g).sum()) > 0


def test_unknown_point_names_the_paths(variables, x):
    with pytest.raises(ValueError, match=r"unknown point\(s\) \['s9b0/conv1:in'\]; .*s0b0/conv1"):
        forward(MODEL, variables, x, capture=["s9b0/conv1:in"])
    with pytest.raises(ValueError, match="expected 'PATH:in'"):
        forward(MODEL, variables, x, capture=["s0b0/conv1"])


def test_points_lists_shapes(variables, x):
    shapes = points(MODEL, variables, x)
    assert shapes["s2b0/conv1:out"] == (6, 2, 2, 8)
    assert shapes["features"] == (6, 2, 2, 8) and shapes["logits"] == (6, 10)
    assert "s0b0/bn1:out" in shapes and "head:in" in shapes
