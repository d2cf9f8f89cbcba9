"""Tests for oefsmc_jax.models: specs, Flax models, pruning surgery, analytic counts."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_spec

from oefsmc_jax.models import (
    ArchSpec,
    ResidualBlock,
    ResNetStages,
    build_model,
    cifar_resnet_spec,
    count_flops,
    count_params,
    drop_blocks,
    droppable_blocks,
    imagenet_resnet_spec,
    l1_prune,
    mask_multipliers,
    prunable_widths,
    resnet_spec,
    set_masks,
    shrink,
    vgg16_spec,
    vgg_spec,
)


def n_params(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def init_shapes(spec: ArchSpec, size: int = 32):
    model = build_model(spec)
    x = jnp.zeros((2, size, size, spec.in_channels))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    out = jax.eval_shape(lambda v: model.apply(v, x), variables)
    return variables, out


def init_vars(spec: ArchSpec, x, seed: int = 0):
    """Real model init, jitted with an RBG key (threefry init graphs compile ~5x slower on CPU)."""
    model = build_model(spec)
    return jax.tree.map(np.asarray, jax.jit(model.init)(jax.random.key(seed, impl="rbg"), x))


def rand(*shape, seed: int = 0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def randomize_bn(variables, seed: int):
    """Non-trivial BN parameters and running stats, so that wrong channel bookkeeping changes outputs."""
    rng = np.random.default_rng(seed)
    out = jax.tree.map(np.array, variables)

    def visit(params, stats):
        for k, v in params.items():
            if isinstance(v, dict) and "scale" in v:
                v["scale"] = rng.uniform(0.5, 1.5, v["scale"].shape).astype(np.float32)
                v["bias"] = rng.normal(0.0, 0.2, v["bias"].shape).astype(np.float32)
                stats[k]["mean"] = rng.normal(0.0, 0.2, v["bias"].shape).astype(np.float32)
                stats[k]["var"] = rng.uniform(0.5, 1.5, v["bias"].shape).astype(np.float32)
            elif isinstance(v, dict):
                visit(v, stats.get(k, {}))

    visit(out["params"], out["batch_stats"])
    return out


def make_fn(spec: ArchSpec):
    """One compiled function returning (eval outputs, train-mode outputs with batch statistics)."""
    model = build_model(spec)

    @jax.jit
    def fn(variables, x):
        ev = model.apply(variables, x, train=False)
        tr, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
        return ev, tr

    return fn


def assert_equiv(fn_a, va, fn_b, vb, x, feature_keep=None, atol=1e-5):
    """Masked model (a) and shrunk model (b) agree in eval and train mode; ``feature_keep`` selects the
    surviving feature channels when the last layer itself was pruned (VGG)."""
    (ea, ta), (eb, tb) = fn_a(va, x), fn_b(vb, x)
    for a, b in ((ea, eb), (ta, tb)):
        np.testing.assert_allclose(a["logits"], b["logits"], atol=atol, rtol=1e-5)
        fa = np.asarray(a["features"])
        if feature_keep is not None:
            np.testing.assert_array_equal(fa[..., ~feature_keep], 0.0)
            fa = fa[..., feature_keep]
        np.testing.assert_allclose(fa, b["features"], atol=atol, rtol=1e-5)
    return ea


def assert_matches_init(spec: ArchSpec, variables, size: int):
    """``variables`` has exactly the tree structure and shapes that init of ``spec`` produces."""
    ref, _ = init_shapes(spec, size)
    assert jax.tree.structure(ref) == jax.tree.structure(variables)
    for r, v in zip(jax.tree.leaves(ref), jax.tree.leaves(variables)):
        assert r.shape == v.shape
    assert count_params(spec) == n_params(variables["params"])
    for m in jax.tree.leaves(variables["masks"]):
        np.testing.assert_array_equal(m, 1.0)


# ---------------------------------------------------------------------- fixtures
TINY = tiny_spec()


@pytest.fixture(scope="module")
def tiny():
    x = rand(4, 8, 8, 3, seed=1)
    raw = init_vars(TINY, x)
    variables = randomize_bn(raw, 0)
    return {"model": build_model(TINY), "x": x, "raw": raw, "variables": variables, "fn": make_fn(TINY)}


# ---------------------------------------------------------------------- full-size architectures
FULL = {
    "resnet20": (cifar_resnet_spec(20), 269_722, (8, 8, 64), 10),
    "resnet56": (cifar_resnet_spec(56), 853_018, (8, 8, 64), 10),
    "resnet18": (imagenet_resnet_spec(18), 11_689_512, (1, 1, 512), 1000),
    "resnet34": (imagenet_resnet_spec(34), 21_797_672, (1, 1, 512), 1000),
    "resnet50": (imagenet_resnet_spec(50), 25_557_032, (1, 1, 2048), 1000),
    "vgg16": (vgg16_spec(), 14_724_042, (1, 1, 512), 10),
}


@pytest.mark.parametrize("name", sorted(FULL))
def test_full_size_shapes_and_param_counts(name):
    spec, expected, feat_shape, k = FULL[name]
    variables, out = init_shapes(spec, 32)
    assert set(variables) == {"params", "batch_stats", "masks"}
    assert out["logits"].shape == (2, k) and out["logits"].dtype == jnp.float32
    assert out["features"].shape == (2, *feat_shape)
    assert n_params(variables["params"]) == expected == count_params(spec)


def test_full_size_layouts():
    v18, _ = init_shapes(imagenet_resnet_spec(18))
    p = v18["params"]
    assert p["stem_conv"]["kernel"].shape == (7, 7, 3, 64) and "bias" not in p["stem_conv"]
    assert "proj_conv" not in p["s0b0"] and p["s1b0"]["proj_conv"]["kernel"].shape == (1, 1, 64, 128)
    assert p["s1b0"]["conv1"]["kernel"].shape == (3, 3, 64, 128)
    assert p["head"]["kernel"].shape == (512, 1000)
    v50, _ = init_shapes(imagenet_resnet_spec(50))
    p, m = v50["params"], v50["masks"]
    assert p["s0b0"]["proj_conv"]["kernel"].shape == (1, 1, 64, 256)
    assert p["s1b0"]["conv2"]["kernel"].shape == (3, 3, 128, 128)  # v1.5: stride sits in the 3x3
    assert p["s1b0"]["conv3"]["kernel"].shape == (1, 1, 128, 512)
    assert m["s3b2"]["mask0"].shape == (512,) and m["s3b2"]["mask1"].shape == (512,)
    assert m["s3b2"]["gate"].shape == () and m["s3b2"]["gate"].dtype == jnp.float32
    vv, _ = init_shapes(vgg16_spec())
    assert vv["params"]["s4c2"]["conv"]["kernel"].shape == (3, 3, 512, 512)
    assert vv["masks"]["s2c2"]["mask0"].shape == (256,)
    convs = {f"s{s}c{i}" for s, n in enumerate((2, 2, 3, 3, 3)) for i in range(n)}
    assert set(vv["params"]) == convs | {"head"}
    # Classifier MLP and dtype handling.
    spec = vgg_spec((8, "M", 8, "M"), num_classes=3, classifier=(6, 5))
    v, out = init_shapes(spec, 8)
    assert v["params"]["fc0"]["kernel"].shape == (8, 6) and v["params"]["fc1"]["kernel"].shape == (6, 5)
    assert count_params(spec) == n_params(v["params"])
    bf = build_model(TINY, dtype=jnp.bfloat16)
    x = jnp.zeros((2, 8, 8, 3))
    vb = jax.eval_shape(lambda: bf.init(jax.random.key(0), x))
    ob = jax.eval_shape(lambda v: bf.apply(v, x), vb)
    assert ob["logits"].dtype == jnp.float32 and ob["features"].dtype == jnp.bfloat16
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(vb["params"]))


def test_flops_match_published_counts():
    # torchvision "GFLOPS" (MACs): 1.81, 3.66, 4.09; Li et al. 2017: ResNet-56 1.25e8, VGG-16 3.13e8.
    assert round(count_flops(imagenet_resnet_spec(18), 224) / 1e9, 2) == 1.81
    assert round(count_flops(imagenet_resnet_spec(34), 224) / 1e9, 2) == 3.66
    assert round(count_flops(imagenet_resnet_spec(50), 224) / 1e9, 2) == 4.09
    assert round(count_flops(cifar_resnet_spec(56), 32) / 1e8, 2) == 1.25
    assert round(count_flops(vgg16_spec(), 32) / 1e8, 2) == 3.13


def test_flops_hand_count_tiny():
    stem = 8 * 8 * 9 * 3 * 4
    s0 = 8 * 8 * 9 * 4 * 4 * 2
    s1 = 4 * 4 * 9 * 4 * 8 + 4 * 4 * 9 * 8 * 8
    s2 = 2 * 2 * 9 * 8 * 8 * 2
    total = stem + s0 + s1 + s2 + 8 * 10
    assert count_flops(TINY, 8) == total
    spec_b = dataclasses.replace(TINY, shortcut="B")
    assert count_flops(spec_b, 8) == total + 4 * 4 * 4 * 8 + 2 * 2 * 8 * 8  # plus the two 1x1 projections
    with pytest.raises(ValueError):
        count_flops(vgg16_spec(), 16)


# ---------------------------------------------------------------------- spec
def test_spec_json_roundtrip_and_validation():
    specs = [TINY, imagenet_resnet_spec(50, num_classes=7), vgg_spec((4, "M", 6), classifier=(5,))]
    pruned = TINY.with_inner_widths((((2,),), ((5,),), ((3,),))).with_kept(((False,), (True,), (True,)))
    for spec in [*specs, pruned]:
        s = spec.to_json()
        back = ArchSpec.from_json(s)
        assert back == spec and hash(back) == hash(spec) and back.to_json() == s
        assert ArchSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
        assert isinstance(back.inner_widths[0][0], tuple) and isinstance(back.kept[0], tuple)
    assert list(pruned.blocks()) == [(1, 0), (2, 0)]
    assert pruned.identity_shortcut(0, 0) and not pruned.identity_shortcut(1, 0)
    assert vgg_spec((4, "M", 6)).stage_strides == (2, 1)
    with pytest.raises(ValueError, match="6n\\+2"):
        cifar_resnet_spec(9)
    with pytest.raises(ValueError):
        imagenet_resnet_spec(101)
    with pytest.raises(ValueError, match="identity shortcut"):
        TINY.with_kept(((True,), (False,), (True,)))
    with pytest.raises(ValueError, match="unknown"):
        ArchSpec.from_dict({**TINY.to_dict(), "bogus": 1})
    with pytest.raises(ValueError):
        dataclasses.replace(TINY, inner_widths=(((4, 4),), ((8,),), ((8,),)))


# ---------------------------------------------------------------------- model behaviour
def test_tiny_forward(tiny):
    ev, tr = tiny["fn"](tiny["variables"], tiny["x"])
    assert ev["logits"].shape == (4, 10) and ev["features"].shape == (4, 2, 2, 8)
    assert np.all(np.asarray(ev["features"]) >= 0)  # post-ReLU map before pooling
    assert np.all(np.isfinite(ev["logits"])) and np.all(np.isfinite(tr["logits"]))
    assert not np.allclose(ev["logits"], tr["logits"])  # batch stats differ from running stats
    v = tiny["variables"]
    assert sorted(v["masks"]) == ["s0b0", "s1b0", "s2b0"]
    assert sorted(v["params"]["s1b0"]) == ["bn1", "bn2", "conv1", "conv2"]  # option A: no projection
    # Init: He-normal (fan_out) conv kernels, BN identity, masks/gates ones.
    raw = tiny["raw"]
    k = raw["params"]["s2b0"]["conv2"]["kernel"]
    assert k.shape == (3, 3, 8, 8) and abs(k.std() / np.sqrt(2.0 / (9 * 8)) - 1) < 0.15
    np.testing.assert_array_equal(raw["params"]["s1b0"]["bn1"]["scale"], 1.0)
    np.testing.assert_array_equal(raw["params"]["s1b0"]["bn1"]["bias"], 0.0)
    np.testing.assert_array_equal(raw["batch_stats"]["s1b0"]["bn1"]["var"], 1.0)
    for m in jax.tree.leaves(raw["masks"]):
        assert m.dtype == np.float32
        np.testing.assert_array_equal(m, 1.0)
    assert raw["masks"]["s1b0"]["mask0"].shape == (8,) and raw["masks"]["s1b0"]["gate"].shape == ()
    _, upd = tiny["model"].apply(v, tiny["x"], train=True, mutable=["batch_stats"])
    old, new = v["batch_stats"]["stem_bn"]["mean"], upd["batch_stats"]["stem_bn"]["mean"]
    assert not np.allclose(old, new)


def test_option_a_and_b_shortcuts():
    block = ResidualBlock(kind="basic", widths=(3,), in_width=4, out_width=8, stride=2, shortcut="A")
    x = jnp.abs(rand(1, 6, 6, 4, seed=2))
    v = jax.jit(block.init)(jax.random.key(0, impl="rbg"), x)
    v = {**v, "masks": {**v["masks"], "gate": jnp.zeros(())}}
    out = np.asarray(block.apply(v, x))
    assert out.shape == (1, 3, 3, 8)
    np.testing.assert_array_equal(out[..., :2], 0.0)
    np.testing.assert_array_equal(out[..., 6:], 0.0)
    np.testing.assert_allclose(out[..., 2:6], np.asarray(x)[:, ::2, ::2, :])
    # An identity block with gate 0 is the identity on its (non-negative, post-ReLU) input.
    ident = ResidualBlock(kind="bottleneck", widths=(2, 3), in_width=4, out_width=4, stride=1, shortcut="A")
    vi = jax.jit(ident.init)(jax.random.key(0, impl="rbg"), x)
    assert not np.allclose(ident.apply(vi, x), x)
    vi = {**vi, "masks": {**vi["masks"], "gate": jnp.zeros(())}}
    np.testing.assert_allclose(ident.apply(vi, x), x)
    # Option B has 1x1 projections exactly where the shape changes.
    vb, _ = init_shapes(dataclasses.replace(TINY, shortcut="B"), 8)
    p = vb["params"]
    assert "proj_conv" not in p["s0b0"]
    assert p["s1b0"]["proj_conv"]["kernel"].shape == (1, 1, 4, 8) and "proj_bn" in p["s1b0"]
    assert p["s2b0"]["proj_conv"]["kernel"].shape == (1, 1, 8, 8)
    assert n_params(p) == count_params(dataclasses.replace(TINY, shortcut="B"))


# ---------------------------------------------------------------------- surgery
def test_l1_prune_keeps_largest_filters(tiny):
    v = jax.tree.map(np.array, tiny["variables"])
    k = v["params"]["s0b0"]["conv1"]["kernel"]
    k[...] = np.array([3.0, 1.0, 3.0, 3.0]) * np.sign(np.random.default_rng(0).normal(size=k.shape))
    before = jax.tree.map(np.array, v)
    assert prunable_widths(TINY) == [(0, 0, 0, 4), (1, 0, 0, 8), (2, 0, 0, 8)]

    spec2, p = l1_prune(TINY, v, (0.5, 0.25, 0.0))
    assert spec2 == TINY
    jax.tree.map(np.testing.assert_array_equal, v, before)  # inputs untouched
    keep = np.array([True, False, True, False])  # L1 ties 3,3,3: lower indices win
    np.testing.assert_array_equal(p["masks"]["s0b0"]["mask0"], keep.astype(np.float32))
    mask = p["masks"]["s0b0"]["mask0"]
    assert mask.dtype == jnp.float32 and isinstance(mask, jax.Array)
    blk, ref = p["params"]["s0b0"], v["params"]["s0b0"]
    np.testing.assert_array_equal(blk["conv1"]["kernel"][..., ~keep], 0.0)
    np.testing.assert_array_equal(blk["conv1"]["kernel"][..., keep], ref["conv1"]["kernel"][..., keep])
    for name in ("scale", "bias"):
        np.testing.assert_array_equal(blk["bn1"][name][~keep], 0.0)
        np.testing.assert_array_equal(blk["bn1"][name][keep], ref["bn1"][name][keep])
    np.testing.assert_array_equal(p["batch_stats"]["s0b0"]["bn1"]["mean"][~keep], 0.0)
    np.testing.assert_array_equal(p["batch_stats"]["s0b0"]["bn1"]["var"][~keep], 1.0)
    np.testing.assert_array_equal(blk["conv2"]["kernel"][:, :, ~keep, :], 0.0)
    np.testing.assert_array_equal(blk["conv2"]["kernel"][:, :, keep], ref["conv2"]["kernel"][:, :, keep])
    np.testing.assert_array_equal(blk["bn2"]["scale"], ref["bn2"]["scale"])  # output BN is not pruned
    # Stage 1: round(8 * 0.75) = 6 largest-L1 filters; stage 2: ratio 0 keeps all.
    l1 = np.abs(v["params"]["s1b0"]["conv1"]["kernel"]).sum(axis=(0, 1, 2))
    expect = np.zeros(8, bool)
    expect[np.argsort(-l1, kind="stable")[:6]] = True
    np.testing.assert_array_equal(p["masks"]["s1b0"]["mask0"], expect.astype(np.float32))
    np.testing.assert_array_equal(p["masks"]["s2b0"]["mask0"], 1.0)
    # min_keep: round(4 * 0.1) == 0 -> 1 channel survives.
    _, p9 = l1_prune(TINY, v, 0.9)
    assert float(p9["masks"]["s0b0"]["mask0"].sum()) == 1.0
    _, p9 = l1_prune(TINY, v, 0.9, min_keep=2)
    assert float(p9["masks"]["s0b0"]["mask0"].sum()) == 2.0
    for bad in (1.0, -0.1, (0.5, 1.2, 0.0)):
        with pytest.raises(ValueError, match=r"prune_ratio must be in \[0, 1\)"):
            l1_prune(TINY, v, bad)
    with pytest.raises(ValueError, match="prune_ratio"):
        l1_prune(TINY, v, (0.5, 0.5))
    with pytest.raises(ValueError, match="shape"):
        set_masks(TINY, v, {(0, 0, 0): np.ones(3, bool)})
    with pytest.raises(ValueError, match="prunable"):
        set_masks(TINY, v, {(0, 0, 1): np.ones(4, bool)})


def test_mask_multipliers_zero_exactly_masked_slices(tiny):
    v = tiny["variables"]
    _, p = l1_prune(TINY, v, 0.5)
    mult = jax.jit(mask_multipliers, static_argnums=0)(TINY, p)
    assert jax.tree.structure(mult) == jax.tree.structure(p["params"])
    full = jax.tree.map(lambda m, a: np.broadcast_to(np.asarray(m), a.shape), mult, p["params"])
    np.testing.assert_array_equal(full["stem_conv"]["kernel"], 1.0)
    np.testing.assert_array_equal(full["head"]["kernel"], 1.0)
    np.testing.assert_array_equal(full["s1b0"]["bn2"]["scale"], 1.0)
    expected_zeros = 0
    for s, b, _, w in prunable_widths(TINY):
        keep = np.asarray(p["masks"][f"s{s}b{b}"]["mask0"]) > 0
        blk = full[f"s{s}b{b}"]
        k1, k2 = blk["conv1"]["kernel"], blk["conv2"]["kernel"].transpose(0, 1, 3, 2)
        np.testing.assert_array_equal(k1, np.broadcast_to(keep, k1.shape))
        np.testing.assert_array_equal(k2, np.broadcast_to(keep, k2.shape))
        np.testing.assert_array_equal(blk["bn1"]["scale"], keep)
        np.testing.assert_array_equal(blk["bn1"]["bias"], keep)
        cin, cout = TINY.block_in_width(s, b), TINY.block_out_width(s, b)
        expected_zeros += (w - keep.sum()) * (9 * cin + 2 + 9 * cout)
    assert sum(int((a == 0).sum()) for a in jax.tree.leaves(full)) == expected_zeros
    # The pruned params are fixed points of the multipliers; original params lose exactly the masked slices.
    jax.tree.map(lambda a, m: np.testing.assert_array_equal(a * m, a), p["params"], mult)
    reapplied = jax.tree.map(lambda a, m: a * m, v["params"], mult)
    for path in (("s0b0", "conv1", "kernel"), ("s1b0", "conv2", "kernel"), ("s2b0", "bn1", "scale")):
        a, b = reapplied, p["params"]
        for key in path:
            a, b = a[key], b[key]
        np.testing.assert_array_equal(a, b)


def mask_only(variables, block: str, name: str, keep):
    """Variables with only the mask changed (weights untouched)."""
    out = jax.tree.map(np.array, variables)
    out["masks"][block][name] = np.asarray(keep, np.float32)
    return out


def test_masks_act_on_bn_outputs(tiny):
    """A mask alone (weights untouched) computes the same function as set_masks' zeroed weights."""
    v, x, fn = tiny["variables"], tiny["x"], tiny["fn"]
    keep = np.array([1, 0, 1, 1, 0, 1, 1, 0], bool)
    _, zeroed = set_masks(TINY, v, {(1, 0, 0): keep})
    ev_mask, tr_mask = fn(mask_only(v, "s1b0", "mask0", keep), x)
    ev_zero, tr_zero = fn(zeroed, x)
    ev_full, _ = fn(v, x)
    np.testing.assert_allclose(ev_mask["logits"], ev_zero["logits"], atol=1e-5)
    np.testing.assert_allclose(tr_mask["logits"], tr_zero["logits"], atol=1e-5)
    assert not np.allclose(ev_mask["logits"], ev_full["logits"], atol=1e-4)


def test_drop_blocks(tiny):
    v = tiny["variables"]
    assert droppable_blocks(TINY) == [(0, 0)]
    assert droppable_blocks(tiny_spec(14)) == [(0, 0), (0, 1), (1, 1), (2, 1)]
    assert droppable_blocks(vgg16_spec()) == []
    with pytest.raises(ValueError, match=r"\(1,0\).*identity"):
        drop_blocks(TINY, v, [(1, 0)])
    with pytest.raises(ValueError, match=r"\(5,0\)"):
        drop_blocks(TINY, v, [(5, 0)])
    with pytest.raises(ValueError, match="identity"):
        drop_blocks(vgg16_spec(), v, [(0, 0)])
    _, d = drop_blocks(TINY, v, [(0, 0)])
    assert float(d["masks"]["s0b0"]["gate"]) == 0.0 and float(v["masks"]["s0b0"]["gate"]) == 1.0
    # A dropped block is the identity: the whole net equals the net with the block physically removed.
    small, sv = shrink(TINY, d)
    assert small.kept == ((False,), (True,), (True,)) and "s0b0" not in sv["params"]
    # counted on the real parameter trees, not with count_params itself
    assert count_params(small) == n_params(v["params"]) - n_params(v["params"]["s0b0"]) == n_params(sv["params"])


def test_shrink_basic_equivalence(tiny):
    _, p = l1_prune(TINY, tiny["variables"], 0.5)
    _, p = drop_blocks(TINY, p, [(0, 0)])
    small, sv = shrink(TINY, p)
    assert small.kept == ((False,), (True,), (True,))
    assert small.inner_widths == (((4,),), ((4,),), ((4,),))  # removed block keeps its recorded widths
    assert_matches_init(small, sv, 8)
    ev = assert_equiv(tiny["fn"], p, make_fn(small), sv, tiny["x"])
    full_ev, _ = tiny["fn"](tiny["variables"], tiny["x"])
    assert not np.allclose(ev["logits"], full_ev["logits"])  # pruning did change the function
    stem = 8 * 8 * 9 * 3 * 4
    s1 = 4 * 4 * 9 * 4 * 4 + 4 * 4 * 9 * 4 * 8
    s2 = 2 * 2 * 9 * 8 * 4 + 2 * 2 * 9 * 4 * 8
    assert count_flops(small, 8) == stem + s1 + s2 + 8 * 10
    assert count_params(small) < count_params(TINY)


@pytest.mark.slow
def test_shrink_bottleneck_equivalence_with_folding():
    spec = resnet_spec(
        family="imagenet_resnet", block="bottleneck", stages=ResNetStages(blocks=(2, 1), planes=(4, 6), strides=(1, 2)),
        stem_width=4, shortcut="B", num_classes=5,
    )
    assert droppable_blocks(spec) == [(0, 1)]
    x = rand(4, 16, 16, 3, seed=3)
    v = randomize_bn(init_vars(spec, x), 1)
    _, p = l1_prune(spec, v, (0.5, 1 / 3))
    _, p = drop_blocks(spec, p, [(0, 1)])
    p = jax.tree.map(np.array, p)
    p["masks"]["s0b0"]["gate"] = np.float32(0.7)  # non-binary gate and mask values get folded into BN
    m = p["masks"]["s1b0"]["mask1"]
    m[np.flatnonzero(m)[0]] = 0.5
    fn = make_fn(spec)
    small, sv = shrink(spec, p)
    assert small.kept == ((True, False), (True,))
    assert small.inner_widths == (((2, 2), (4, 4)), ((4, 4),))
    assert_matches_init(small, sv, 16)
    assert sv["params"]["s0b0"]["conv2"]["kernel"].shape == (3, 3, 2, 2)
    assert sv["params"]["s1b0"]["conv3"]["kernel"].shape == (1, 1, 4, 24)
    assert_equiv(fn, p, make_fn(small), sv, x)
    assert count_flops(small, 16) < count_flops(spec, 16)


def test_shrink_vgg_equivalence():
    spec = vgg_spec((4, "M", 6, 6, "M"), num_classes=5, classifier=(7,))
    x = rand(4, 8, 8, 3, seed=4)
    v = randomize_bn(init_vars(spec, x), 2)
    _, p = l1_prune(spec, v, 0.5)
    small, sv = shrink(spec, p)
    assert small.inner_widths == (((2,),), ((3,), (3,))) and small.stage_widths == (2, 3)
    assert sv["params"]["fc0"]["kernel"].shape == (3, 7)
    assert_matches_init(small, sv, 8)
    keep = np.asarray(p["masks"]["s1c1"]["mask0"]) > 0
    assert keep.sum() == 3
    fn = make_fn(spec)
    assert_equiv(fn, p, make_fn(small), sv, x, feature_keep=keep)
    # The VGG mask alone (weights untouched) already removes the channels.
    k0 = np.asarray(p["masks"]["s0c0"]["mask0"]) > 0
    ev_mask, _ = fn(mask_only(v, "s0c0", "mask0", k0), x)
    ev_zero, _ = fn(set_masks(spec, v, {(0, 0, 0): k0})[1], x)
    ev_full, _ = fn(v, x)
    np.testing.assert_allclose(ev_mask["logits"], ev_zero["logits"], atol=1e-5)
    assert not np.allclose(ev_mask["logits"], ev_full["logits"], atol=1e-4)
    macs = 8 * 8 * 9 * 3 * 2 + 4 * 4 * 9 * 2 * 3 + 4 * 4 * 9 * 3 * 3 + 3 * 7 + 7 * 5
    assert count_flops(small, 8) == macs
    with pytest.raises(ValueError, match="every channel masked"):
        shrink(spec, set_masks(spec, p, {(0, 0, 0): np.zeros(4, bool)})[1])


def test_bn_axis_name_syncs_batch_stats(tiny):
    model = build_model(TINY, bn_axis_name="shard")
    v, x = tiny["variables"], tiny["x"]

    def train_logits(xs):
        return model.apply(v, xs, train=True, mutable=["batch_stats"])[0]["logits"]

    sharded = jax.jit(jax.vmap(train_logits, axis_name="shard"))(x.reshape(2, 2, *x.shape[1:]))
    _, tr = tiny["fn"](v, x)
    np.testing.assert_allclose(sharded.reshape(4, -1), tr["logits"], atol=1e-5, rtol=1e-5)
