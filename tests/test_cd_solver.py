"""Cross Distillation's numerical core: layer loss, masked-Adam + top-k solver, schedule and conv plan."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oefsmc_jax.methods.cd_solver import (
    RESNET56_SKIP,
    CDLayer,
    CDSolveConfig,
    LayerProblem,
    cd_keep_count,
    cd_layer_loss,
    cd_layer_terms,
    cd_plan,
    cd_schedule,
    cd_solve_layer,
)
from oefsmc_jax.models import cifar_resnet_spec, imagenet_resnet_spec, vgg16_spec, width_links


# ---------------------------------------------------------------------- numpy references
def np_conv(x, w, stride, pad):
    """Plain NHWC x HWIO conv with symmetric zero padding, float64."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    w = np.asarray(w, np.float64)
    kh, kw, _, co = w.shape
    n, hp, wp, _ = x.shape
    ho, wo = (hp - kh) // stride + 1, (wp - kw) // stride + 1
    out = np.zeros((n, ho, wo, co))
    for i in range(ho):
        for j in range(wo):
            patch = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
            out[:, i, j, :] = np.einsum("nhwc,hwco->no", patch, w)
    return out


def np_term(a, b, weights=None):
    """sum_i w_i ||a_i - b_i||^2 / (sum_i w_i * h*w*c); plain element mean without weights."""
    d2 = ((a - b) ** 2).reshape(a.shape[0], -1)
    wts = np.ones(a.shape[0]) if weights is None else np.asarray(weights, np.float64)
    return float((wts * d2.sum(1)).sum() / (wts.sum() * d2.shape[1]))


def np_terms(w, w_t, xs, xt, stride, pad, weights=None):
    lc = np_term(np_conv(xt, w, stride, pad), np_conv(xt, w_t, stride, pad), weights)
    li = np_term(np_conv(xs, w_t, stride, pad), np_conv(xs, w, stride, pad), weights)
    return lc, li


def reference_solve(w_init, w_t, xs, xt, keep, iters, lr, mu, weights):
    """Straight transcription of the official ``__solve_lst_pgd`` loop (torch Adam, mask_grad, proximal_map),
    with gradients from jax; the final target is forced to ``keep`` and ties cannot occur with random data."""
    problem = LayerProblem(w_t, xs, xt, stride=1, padding=1, weights=weights)
    grad = jax.jit(jax.grad(lambda w: cd_layer_loss(w, problem, mu=mu)))
    w = np.asarray(w_init, np.float64).copy()
    ci = w.shape[2]
    m, v = np.zeros_like(w), np.zeros_like(w)
    mask = np.ones_like(w)
    cur_lr, prev = lr, ci
    for i in range(iters):
        g = np.asarray(grad(jnp.asarray(w, jnp.float32)), np.float64) * mask
        m *= mask
        v *= mask
        t = i + 1
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        denom = np.sqrt(v) / np.sqrt(1 - 0.999**t) + 1e-8
        w = w - cur_lr / (1 - 0.9**t) * m / denom
        if i <= iters // 3:
            k = int((ci - keep) * float((iters / 3 - i) / (iters / 3))) + keep
            k = keep if i == iters // 3 else k
            if k < prev:
                norms = np.sqrt((w**2).sum(axis=(0, 1, 3)))
                thresh = np.sort(norms)[::-1][k - 1]
                w[:, :, norms < thresh, :] = 0.0
                prev = k
            mask = np.zeros_like(w)
            mask[:, :, np.abs(w).sum(axis=(0, 1, 3)) > 0, :] = 1.0
        else:
            cur_lr = lr * 0.1
    return w, mask[0, 0, :, 0]


# ---------------------------------------------------------------------- fixtures
def make_layer(seed, n, hw, ci, co):
    rng = np.random.default_rng(seed)
    w_t = rng.normal(0, 0.3, (3, 3, ci, co)).astype(np.float32)
    xt = rng.normal(0, 1, (n, hw, hw, ci)).astype(np.float32)
    xs = (xt + rng.normal(0, 0.3, xt.shape)).astype(np.float32)
    weights = rng.uniform(0.2, 2.0, n).astype(np.float32)
    return w_t, xs, xt, weights


@pytest.fixture(scope="module")
def layer_a():
    return make_layer(0, 5, 6, 16, 4)  # C_in 16: the official last target would miss keep=3 at iters=10


@pytest.fixture(scope="module")
def layer_b():
    return make_layer(1, 6, 5, 6, 5)


@pytest.fixture(scope="module")
def solved_a(layer_a):
    w_t, xs, xt, weights = layer_a
    rng = np.random.default_rng(10)
    w_init = (w_t + rng.normal(0, 0.1, w_t.shape)).astype(np.float32)
    res = cd_solve_layer(w_init, LayerProblem(w_t, xs, xt, weights=weights), keep=3,
                         config=CDSolveConfig(iters=10, lr=0.01, mu=0.9, return_state=True))
    return w_init, res


# ---------------------------------------------------------------------- loss
@pytest.mark.parametrize("stride", [1, 2])
def test_loss_terms_match_numpy_and_mu_extremes(layer_b, stride):
    w_t, xs, xt, weights = layer_b
    w = w_t + np.random.default_rng(2).normal(0, 0.2, w_t.shape).astype(np.float32)
    problem = LayerProblem(w_t, xs, xt, stride=stride, padding=1)
    lc, li = cd_layer_terms(w, problem)
    ref_lc, ref_li = np_terms(w, w_t, xs, xt, stride, 1)
    assert float(lc) == pytest.approx(ref_lc, rel=1e-5) and float(li) == pytest.approx(ref_li, rel=1e-5)
    assert ref_lc != pytest.approx(ref_li, rel=1e-2)  # the two terms really see different inputs
    assert float(cd_layer_loss(w, problem, mu=1.0)) == float(lc)
    assert float(cd_layer_loss(w, problem, mu=0.0)) == float(li)
    assert float(cd_layer_loss(w, problem, mu=0.6)) == pytest.approx(0.6 * ref_lc + 0.4 * ref_li, rel=1e-5)
    # the stride really reaches the convs: the other stride gives other terms
    other_lc, other_li = cd_layer_terms(w, LayerProblem(w_t, xs, xt, stride=3 - stride, padding=1))
    assert float(other_lc) != pytest.approx(float(lc), rel=1e-3)
    assert float(other_li) != pytest.approx(float(li), rel=1e-3)


def test_loss_weights(layer_b):
    w_t, xs, xt, weights = layer_b
    w = w_t + np.random.default_rng(3).normal(0, 0.2, w_t.shape).astype(np.float32)
    plain = float(cd_layer_loss(w, LayerProblem(w_t, xs, xt), mu=0.7))
    equal = float(cd_layer_loss(w, LayerProblem(w_t, xs, xt, weights=np.full(6, 2.5, np.float32)), mu=0.7))
    assert equal == pytest.approx(plain, rel=1e-6)
    ref_lc, ref_li = np_terms(w, w_t, xs, xt, 1, 1, weights)
    lc, li = cd_layer_terms(w, LayerProblem(w_t, xs, xt, weights=weights))
    assert float(lc) == pytest.approx(ref_lc, rel=1e-5) and float(li) == pytest.approx(ref_li, rel=1e-5)
    weighted = float(cd_layer_loss(w, LayerProblem(w_t, xs, xt, weights=weights), mu=0.7))
    assert weighted == pytest.approx(0.7 * ref_lc + 0.3 * ref_li, rel=1e-5)
    assert abs(weighted - plain) > 1e-3 * plain
    # a one-hot weight vector is the loss of that sample alone
    one = np.zeros(6, np.float32)
    one[4] = 3.0
    alone = float(cd_layer_loss(w, LayerProblem(w_t, xs[4:5], xt[4:5]), mu=0.7))
    assert float(cd_layer_loss(w, LayerProblem(w_t, xs, xt, weights=one), mu=0.7)) == pytest.approx(alone, rel=1e-5)


# ---------------------------------------------------------------------- schedule
def test_schedule_official_and_fixes():
    ks, proj, lrf = cd_schedule(64, 33, 3000)
    official = [int(31 * float((1000 - i) / 1000)) + 33 for i in range(1001)]
    assert ks[:1001].tolist() == official and ks[1000] == 33 and ks[0] == 64
    assert not proj[0] and proj.sum() == 31 and not proj[1000:].any()  # one projection per unit drop of k
    assert ks[proj].tolist() == list(range(63, 32, -1))
    assert lrf[1001] == 1.0 and lrf[1002] == np.float32(0.1) and (lrf[:1002] == 1.0).all()
    assert cd_schedule(64, 33, 3000, fix_lr_offbyone=True)[2][1001] == np.float32(0.1)
    # iters=10, C_in 16, keep 3: the official target at i = 3 would be int(13*0.1)+3 = 4; forced to keep
    ks, proj, _ = cd_schedule(16, 3, 10)
    assert int(13 * float((10 / 3 - 3) / (10 / 3))) + 3 == 4 and ks[3] == 3 and proj[3]
    ks, proj, lrf = cd_schedule(8, 8, 9)  # keep == C_in: never projects
    assert not proj.any() and (ks == 8).all()
    for bad in [(8, 0, 9), (8, 9, 9), (8, 4, 0)]:
        with pytest.raises(ValueError):
            cd_schedule(*bad)


# ---------------------------------------------------------------------- solver
def test_solver_matches_official_loop(layer_a, solved_a):
    w_t, xs, xt, weights = layer_a
    w_init, res = solved_a
    ref_w, ref_mask = reference_solve(w_init, w_t, xs, xt, 3, 10, 0.01, 0.9, weights)
    np.testing.assert_array_equal(np.asarray(res.in_mask), ref_mask)
    np.testing.assert_allclose(np.asarray(res.w), ref_w, rtol=2e-4, atol=2e-6)


def test_solver_pruned_groups_exactly_zero(solved_a):
    w_init, res = solved_a
    mask = np.asarray(res.in_mask)
    assert set(np.unique(mask).tolist()) == {0.0, 1.0} and int(mask.sum()) == 3
    pruned = mask == 0
    for arr in (res.w, res.adam.m, res.adam.v):
        arr = np.asarray(arr)
        assert (arr[:, :, pruned, :] == 0.0).all()
        assert (np.abs(arr[:, :, ~pruned, :]).sum(axis=(0, 1, 3)) > 0).all()
    assert float(res.adam.count) == 10.0
    # kept channels are the ones with the largest norms at the end (top-k of the final, re-fitted kernel)
    norms = np.sqrt((np.asarray(res.w) ** 2).sum(axis=(0, 1, 3)))
    assert norms[~pruned].min() > norms[pruned].max()


@pytest.mark.parametrize("keep,iters", [(2, 9), (4, 7), (1, 2), (5, 1)])
def test_solver_kept_count_exact(layer_b, keep, iters):
    w_t, xs, xt, weights = layer_b
    res = cd_solve_layer(w_t, LayerProblem(w_t, xs, xt, weights=weights), keep=keep,
                         config=CDSolveConfig(iters=iters, lr=0.01, mu=0.6, return_state=True))
    mask = np.asarray(res.in_mask)
    assert int(mask.sum()) == keep
    assert (np.asarray(res.w)[:, :, mask == 0, :] == 0.0).all()
    assert (np.asarray(res.adam.m)[:, :, mask == 0, :] == 0.0).all()
    assert (np.asarray(res.adam.v)[:, :, mask == 0, :] == 0.0).all()


def test_solver_reduces_loss_and_beats_plain_masking(layer_b):
    w_t, xs, xt, weights = layer_b
    w_init = w_t + np.random.default_rng(4).normal(0, 0.3, w_t.shape).astype(np.float32)
    problem = LayerProblem(w_t, xs, xt, weights=weights)
    res = cd_solve_layer(w_init, problem, keep=3, config=CDSolveConfig(iters=120, lr=0.02, mu=0.6))
    assert res.adam is None
    start = float(cd_layer_loss(w_init, problem, mu=0.6))
    end = float(cd_layer_loss(res.w, problem, mu=0.6))
    assert float(res.loss_init) == pytest.approx(start, rel=1e-5)
    assert float(res.loss_final) == pytest.approx(end, rel=1e-5)
    assert end < start
    # re-fitting beats just zeroing the same input channels of the teacher kernel
    masked_teacher = w_t * np.asarray(res.in_mask)[None, None, :, None]
    assert end < 0.9 * float(cd_layer_loss(masked_teacher, problem, mu=0.6))


def test_solver_no_pruning_fixed_point_and_refit(layer_b):
    w_t, xs, xt, weights = layer_b
    res = cd_solve_layer(w_t, LayerProblem(w_t, xt, xt), keep=6,
                         config=CDSolveConfig(iters=9, lr=0.01, mu=0.6, return_state=True))
    np.testing.assert_array_equal(np.asarray(res.w), w_t)
    assert float(res.loss_final) == 0.0 and (np.asarray(res.in_mask) == 1.0).all()
    # keep == C_in still re-fits: from a perturbed start the loss falls and nothing is pruned
    w_init = w_t + np.random.default_rng(5).normal(0, 0.3, w_t.shape).astype(np.float32)
    res = cd_solve_layer(w_init, LayerProblem(w_t, xs, xt), keep=6, config=CDSolveConfig(iters=9, lr=0.01, mu=0.6))
    assert (np.asarray(res.in_mask) == 1.0).all() and float(res.loss_final) < float(res.loss_init)


def test_solver_weights_change_result_and_jittable(layer_b):
    w_t, xs, xt, weights = layer_b
    w_init = w_t + np.random.default_rng(6).normal(0, 0.3, w_t.shape).astype(np.float32)
    kw = dict(keep=2, config=CDSolveConfig(iters=9, lr=0.01, mu=0.6))
    a = cd_solve_layer(w_init, LayerProblem(w_t, xs, xt, weights=weights), **kw)
    b = cd_solve_layer(w_init, LayerProblem(w_t, xs, xt), **kw)
    assert not np.allclose(np.asarray(a.w), np.asarray(b.w))
    jitted = jax.jit(lambda w0, s, t, wt: cd_solve_layer(w0, LayerProblem(w_t, s, t, weights=wt), **kw).w)
    np.testing.assert_allclose(np.asarray(jitted(w_init, xs, xt, weights)), np.asarray(a.w), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError):
        cd_solve_layer(w_init, LayerProblem(w_t, xs[..., :5], xt[..., :5]), **kw)


# ---------------------------------------------------------------------- keep counts and plan
def test_keep_count():
    assert cd_keep_count(16, 0.5, True) == 9 and cd_keep_count(64, 0.5, True) == 33
    assert cd_keep_count(512, 0.5, False) == 256 and cd_keep_count(10, 0.7, False) == 7
    for args in [(16, 1.0, True), (4, 0.1, False)]:
        with pytest.raises(ValueError):
            cd_keep_count(*args)


def test_plan_resnet56():
    spec = cifar_resnet_spec(56)
    plan = cd_plan(spec, 0.5)
    assert all(isinstance(p, CDLayer) for p in plan) and len(plan) == 54
    assert plan[0] == CDLayer(("s0b0", "conv1"), None, 16, 16, 1)
    by_path = {p.path: p for p in plan}
    assert by_path[("s1b0", "conv1")] == CDLayer(("s1b0", "conv1"), None, 16, 16, 2)
    skipped = {(s, b) for s in range(3) for b in range(9) if by_path[(f"s{s}b{b}", "conv2")].width_key is None}
    assert skipped == set(RESNET56_SKIP) == {(0, 7), (1, 0), (2, 0), (2, 8)}
    assert by_path[("s0b7", "conv2")] == CDLayer(("s0b7", "conv2"), None, 16, 16, 1)
    links = {lk.key: lk for lk in width_links(spec)}
    for s, keep in enumerate((9, 17, 33)):
        for b in range(9):
            p = by_path[(f"s{s}b{b}", "conv2")]
            if (s, b) in RESNET56_SKIP:
                assert p.keep == p.c_in == (16, 32, 64)[s]
            else:
                assert p.keep == keep and p.width_key == (s, b, 0)
                assert links[p.width_key].consumer == p.path and links[p.width_key].width == p.c_in
    assert all(p.width_key is None and p.keep == p.c_in for p in plan if p.path[1] == "conv1")
    # other depths: no known skip list, every conv2 pruned; an explicit skip overrides
    p20 = cd_plan(cifar_resnet_spec(20), 0.5)
    assert all(p.width_key is not None for p in p20 if p.path[1] == "conv2")
    p20s = cd_plan(cifar_resnet_spec(20), 0.5, skip=[(1, 2)])
    assert [p.path for p in p20s if p.path[1] == "conv2" and p.width_key is None] == [("s1b2", "conv2")]


def test_plan_vgg16_and_resnet34():
    spec = vgg16_spec()
    plan = cd_plan(spec, 0.5)
    assert len(plan) == 12  # 13 convs, the first one not visited
    names = [spec.block_name(s, b) for s, b in spec.blocks()]
    assert [p.path for p in plan] == [(n, "conv") for n in names[1:]]
    c_ins = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512]  # official cfg_0 without the first conv
    assert [p.c_in for p in plan] == c_ins and [p.keep for p in plan] == [c // 2 for c in c_ins]
    links = {lk.key: lk for lk in width_links(spec)}
    for p in plan:  # the input pruning of each conv is the previous conv's output width
        assert links[p.width_key].consumer == p.path and links[p.width_key].width == p.c_in
    last = plan[-1]  # conv13 keeps 256 of the 512 outputs of conv12; conv13's own output is never pruned
    assert last.path == ("s4c2", "conv") and last.keep == 256 and last.width_key == (4, 1, 0)
    assert (4, 2, 0) not in {p.width_key for p in plan}
    # ImageNet ResNet-34: int(r*C) without +1, official skip (incl. layer3.5 and all of stage 4)
    p34 = cd_plan(imagenet_resnet_spec(34), 0.5)
    pruned = [p.path[0] for p in p34 if p.width_key is not None]
    assert pruned == ["s0b0", "s0b1", "s1b0", "s1b1", "s2b0", "s2b1", "s2b2", "s2b3"]
    assert [p.keep for p in p34 if p.width_key is not None] == [32, 32, 64, 64, 128, 128, 128, 128]
    with pytest.raises(ValueError):
        cd_plan(imagenet_resnet_spec(50), 0.5)


@pytest.mark.parametrize("stride", [1, 2])
def test_gram_gradient_equals_conv_autodiff(layer_a, stride):
    """The default solver (gradient 2 A D from the im2col Gram) follows the autodiff-through-convs reference."""
    w_t, xs, xt, weights = layer_a
    w_init = w_t + np.random.default_rng(7).normal(0, 0.1, w_t.shape).astype(np.float32)
    problem = LayerProblem(w_t, xs, xt, stride=stride, weights=weights)
    kw = dict(iters=12, lr=0.01, mu=0.7, return_state=True)
    a = cd_solve_layer(w_init, problem, keep=5, config=CDSolveConfig(**kw))
    b = cd_solve_layer(w_init, problem, keep=5, config=CDSolveConfig(gradient="conv", **kw))
    np.testing.assert_array_equal(np.asarray(a.in_mask), np.asarray(b.in_mask))
    np.testing.assert_allclose(np.asarray(a.w), np.asarray(b.w), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(a.adam.m), np.asarray(b.adam.m), rtol=1e-3, atol=1e-7)
    assert float(a.loss_final) == pytest.approx(float(b.loss_final), rel=1e-4)
    with pytest.raises(ValueError, match="gradient"):
        CDSolveConfig(gradient="adam", **kw)
