"""The CPU filter-gradient kernel: equal to the float64 gradient, used only where asked, and errors that name the
field."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_spec
from jax.sharding import PartitionSpec as P

from oefsmc_jax import config_defaults
from oefsmc_jax.config_validation import validate
from oefsmc_jax.errors import ConfigError
from oefsmc_jax.kernels import cpu_conv
from oefsmc_jax.models import build_model
from oefsmc_jax.training.parallel import make_mesh


def _wgrad64(x: np.ndarray, dy: np.ndarray, stride: int) -> np.ndarray:
    """The filter gradient of a 3x3, padding-1 NHWC convolution, summed in float64 by numpy."""
    x = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    ho, wo = dy.shape[1:3]
    out = np.zeros((3, 3, x.shape[-1], dy.shape[-1]))
    for i in range(3):
        for j in range(3):
            patch = x[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
            out[i, j] = np.einsum("nhwc,nhwd->cd", patch, dy.astype(np.float64))
    return out


# batch, size, in, out, stride: odd channel counts (tiles of 4 x 8 with remainders), strides 1-3, a 1x1 image
SHAPES = [(3, 7, 3, 5, 1), (2, 9, 11, 13, 2), (4, 8, 16, 8, 2), (1, 1, 2, 3, 1), (5, 6, 17, 9, 3), (2, 10, 8, 24, 1)]


@pytest.mark.parametrize("n,hw,ci,co,s", SHAPES)
def test_kernel_equals_float64_gradient(n, hw, ci, co, s):
    cpu_conv.register()
    rng = np.random.default_rng(n * 100 + ci)
    ho = (hw - 1) // s + 1
    x = rng.normal(size=(n, hw, hw, ci)).astype(np.float32)
    dy = rng.normal(size=(n, ho, ho, co)).astype(np.float32)
    got = np.asarray(jax.jit(cpu_conv.wgrad3x3, static_argnums=2)(x, dy, s))
    ref = _wgrad64(x, dy, s)
    assert got.shape == (3, 3, ci, co)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # and XLA's own filter gradient (the default) agrees with both
    xla = np.asarray(cpu_conv._wgrad_xla(jnp.asarray(x), jnp.asarray(dy), (3, 3, ci, co), s))
    np.testing.assert_allclose(xla, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def _loss_and_grad(**model_kw):
    spec = tiny_spec()
    model = build_model(spec, **model_kw)
    v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)), train=False)
    x = jax.random.normal(jax.random.PRNGKey(1), (6, 8, 8, 3))

    def loss(params):
        out, _ = model.apply({**v, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(out["logits"]))

    return jax.value_and_grad(loss), v["params"]


@pytest.mark.slow
def test_model_gradients_under_each_mode():
    f, params = _loss_and_grad()  # the default: lax.conv_general_dilated
    hlo_xla = jax.jit(f).lower(params).as_text()
    l_xla, g_xla = jax.jit(f)(params)
    cpu_conv.register()
    f_kernel = jax.jit(_loss_and_grad(conv_general_dilated=cpu_conv.conv_general_dilated)[0])
    hlo_kernel = f_kernel.lower(params).as_text()
    l_k, g_k = f_kernel(params)
    assert cpu_conv.TARGET not in hlo_xla and "custom_vjp" not in jax.make_jaxpr(f)(params).pretty_print()
    # every 3x3 conv of the ResNet-8 (stem + 3 blocks x 2) gets the kernel for its filter gradient
    assert hlo_kernel.count(f"@{cpu_conv.TARGET}(") == 7
    assert float(l_k) == float(l_xla)  # the forward pass is XLA's in both modes
    for a, b in zip(jax.tree.leaves(g_k), jax.tree.leaves(g_xla)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)


def test_kernel_under_vmap_and_shard_map():
    cpu_conv.register()
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 2, 6, 6, 5)).astype(np.float32)  # 4 runs (or shards) of 2 images
    dy = rng.normal(size=(4, 2, 6, 6, 7)).astype(np.float32)
    ref = np.stack([_wgrad64(x[r], dy[r], 1) for r in range(4)])
    got = jax.jit(jax.vmap(lambda a, b: cpu_conv.wgrad3x3(a, b, 1)))(x, dy)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)
    mesh = make_mesh(4)
    per = jax.shard_map(lambda a, b: jax.lax.psum(cpu_conv.wgrad3x3(a[0], b[0], 1), "data")[None], mesh=mesh,
                        in_specs=(P("data"), P("data")), out_specs=P("data"))
    summed = np.asarray(jax.jit(per)(x, dy))
    np.testing.assert_allclose(summed[0], ref.sum(0), rtol=1e-5, atol=1e-4)


def test_drop_in_takes_every_call_lax_takes():
    """The drop-in binds its arguments as ``lax.conv_general_dilated`` does: positional or keyword, the kernel for
    an eligible convolution, ``lax`` unchanged for any other (here an argument the kernel does not handle)."""
    cpu_conv.register()
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(2, 6, 6, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
    pad = ((1, 1), (1, 1))
    ref = jax.lax.conv_general_dilated(x, w, (1, 1), pad, dimension_numbers=cpu_conv.NHWC)
    calls = [lambda a, b: cpu_conv.conv_general_dilated(a, b, (1, 1), pad, None, None, cpu_conv.NHWC),
             lambda a, b: cpu_conv.conv_general_dilated(lhs=a, rhs=b, window_strides=(1, 1), padding=pad,
                                                        dimension_numbers=cpu_conv.NHWC)]
    for conv in calls:
        np.testing.assert_array_equal(np.asarray(conv(x, w)), np.asarray(ref))
        assert "custom_vjp" in jax.make_jaxpr(conv)(x, w).pretty_print()
    other = lambda a, b: cpu_conv.conv_general_dilated(a, b, (1, 1), pad, dimension_numbers=cpu_conv.NHWC,
                                                       precision=jax.lax.Precision.HIGHEST)
    assert "custom_vjp" not in jax.make_jaxpr(other)(x, w).pretty_print()
    with pytest.raises(TypeError):
        cpu_conv.conv_general_dilated(x, w, (1, 1), pad, no_such_argument=1)


def test_bad_mode_is_named(monkeypatch):
    c = config_defaults.base_config()
    c.cpu_wgrad = "fastest"
    with pytest.raises(ConfigError, match=r"^config.cpu_wgrad: 'fastest' is not allowed; choose one of xla, kernel$"):
        validate(c)
    monkeypatch.setenv(cpu_conv.ENV, "oneDNN")
    with pytest.raises(ConfigError, match=r"\$OEFSMC_CPU_WGRAD: 'oneDNN' is not allowed"):
        cpu_conv.resolve_mode(None)
    assert cpu_conv.resolve_mode("XLA") == "xla"  # the config wins over the environment
    monkeypatch.setenv(cpu_conv.ENV, "xla")
    assert cpu_conv.resolve_mode("") == "xla" and cpu_conv.describe("xla") == "cpu wgrad xla"
    monkeypatch.delenv(cpu_conv.ENV)
    assert cpu_conv.resolve_mode(None) == cpu_conv.DEFAULT == "xla"


@pytest.mark.parametrize("cxx,says", [("/no/such/compiler", "does not run"), ("false", "failed")])
def test_missing_or_broken_compiler_is_named(monkeypatch, tmp_path, cxx, says):
    monkeypatch.setenv("CXX", cxx)
    monkeypatch.setenv("OEFSMC_KERNEL_CACHE", str(tmp_path))
    with pytest.raises(ConfigError, match=rf"^config.cpu_wgrad: .*{says}.*set config.cpu_wgrad=xla"):
        cpu_conv.build()
    assert not list(tmp_path.iterdir())  # nothing half-written left in the cache


def test_build_is_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("OEFSMC_KERNEL_CACHE", str(tmp_path))
    first = cpu_conv.build()
    stamp = first.stat().st_mtime_ns
    assert cpu_conv.build() == first and first.stat().st_mtime_ns == stamp  # the second call compiles nothing
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


def test_trainer_cache_builds_a_new_step_when_a_mode_changes():
    """``make_trainer`` is cached; a step built under one filter-gradient or fusion mode is not handed out under
    another (the benchmark builds one per mode in one process): the modes are fields of its ``StepConfig``."""
    import dataclasses

    from oefsmc_jax.methods import KD
    from oefsmc_jax.training import train
    from oefsmc_jax.training.step import StepConfig

    spec = tiny_spec()
    cfg = StepConfig(batch_id=8, batch_ood=8, pad=1, flip=True, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert (cfg.cpu_fusion, cfg.cpu_wgrad) == ("exact", "xla")
    rest = (spec, spec, KD((0.5, 0.5, 0.5)).recipe())
    trainer = lambda c: train.make_trainer(make_mesh(1), *rest, c, {"name": "sgd", "lr": 0.1}, 10)
    a = trainer(cfg)
    assert trainer(cfg) is a
    b = trainer(dataclasses.replace(cfg, cpu_wgrad="kernel"))
    c = trainer(dataclasses.replace(cfg, cpu_wgrad="kernel", cpu_fusion="off"))
    assert b is not a and c is not b and c is not a
    assert trainer(dataclasses.replace(cfg)) is a


def test_models_call_the_convolution_they_are_given():
    """The conv implementation is an argument of the model: the default is ``lax.conv_general_dilated`` (no custom
    VJP in the program), the kernel's conv puts the kernel in the gradient's program; the step builder injects it
    only under ``cpu_wgrad=kernel``."""
    from oefsmc_jax.training.step import kernel_models

    f, params = _loss_and_grad()
    assert "custom_vjp" not in jax.make_jaxpr(f)(params).pretty_print()
    spec = tiny_spec()
    student, teacher = kernel_models(build_model(spec), None)
    assert teacher is None and student.conv_general_dilated is cpu_conv.conv_general_dilated
    assert build_model(spec).conv_general_dilated is jax.lax.conv_general_dilated
