"""The XLA:CPU fusion modes: which compiler options each gives, and that the default keeps the gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oefsmc_jax import config_defaults
from oefsmc_jax.config_validation import validate
from oefsmc_jax.errors import ConfigError
from oefsmc_jax.training import xla_cpu


def test_options_per_mode_and_platform():
    exact = xla_cpu.compiler_options("cpu", "exact")
    # the pinned jaxlib knows the option: the package default is really in use on this CPU
    assert exact == {xla_cpu.FLAG: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,"
                     "LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE"}
    assert "INDIVIDUAL_CONVOLUTION" not in xla_cpu.compiler_options("cpu", "fast")[xla_cpu.FLAG]
    assert xla_cpu.compiler_options("cpu", "off") is None
    assert xla_cpu.compiler_options("gpu", "exact") is None
    assert xla_cpu.compiler_options("tpu", "fast") is None
    assert not xla_cpu.supported("LIBRARY_FUSION_TYPE_NO_SUCH_THING")


def test_mode_from_env_and_config(monkeypatch):
    monkeypatch.setenv(xla_cpu.ENV, "off")
    assert xla_cpu.resolve_mode("") == "off" and xla_cpu.compiler_options("cpu", "off") is None
    assert xla_cpu.resolve_mode("Fast") == "fast"  # the config wins over the environment
    assert xla_cpu.describe("cpu", "fast").startswith("cpu fusion fast (YNNPACK")
    assert xla_cpu.describe("gpu", "exact") == "cpu fusion n/a on gpu"
    monkeypatch.setenv(xla_cpu.ENV, "turbo")
    with pytest.raises(ConfigError, match=r"\$OEFSMC_CPU_FUSION: 'turbo' is not allowed; choose one of exact"):
        xla_cpu.resolve_mode(None)
    monkeypatch.delenv(xla_cpu.ENV)
    assert xla_cpu.resolve_mode(None) == xla_cpu.DEFAULT == "exact"


def test_no_process_wide_mode():
    """The modes are arguments of what is compiled: neither module keeps a mode of its own."""
    from oefsmc_jax.kernels import cpu_conv

    for mod in (xla_cpu, cpu_conv):
        assert not any(hasattr(mod, name) for name in ("set_mode", "get_mode", "using", "bind", "_mode"))


def test_bad_config_value_is_named():
    c = config_defaults.base_config()
    c.cpu_fusion = "turbo"
    with pytest.raises(ConfigError, match=r"^config.cpu_fusion: 'turbo' is not allowed; choose one of exact, "
                                          r"fast, off$"):
        validate(c)


def test_exact_mode_keeps_conv_net_gradients():
    """A conv + BN-like normalisation + ReLU + dense chain: the gradient under ``exact`` matches the one under
    ``off`` to float32 rounding and both match float64."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 12, 12, 3)).astype(np.float32)
    w1 = (0.3 * rng.normal(size=(3, 3, 3, 8))).astype(np.float32)
    w2 = (0.2 * rng.normal(size=(3, 3, 8, 8))).astype(np.float32)
    wd = (0.1 * rng.normal(size=(8, 5))).astype(np.float32)
    y = rng.integers(0, 5, 16)

    def loss(ws, x):
        h = x
        for w, stride in ((ws[0], 1), (ws[1], 2)):
            h = jax.lax.conv_general_dilated(h, w, (stride, stride), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            h = (h - h.mean((0, 1, 2))) / jnp.sqrt(h.var((0, 1, 2)) + 1e-5)
            h = jax.nn.relu(h)
        logits = h.mean((1, 2)) @ ws[2]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(y)[:, None], 1))

    ws = (w1, w2, wd)
    grads = {m: jax.jit(jax.grad(loss), compiler_options=xla_cpu.compiler_options("cpu", m))(ws, x)
             for m in ("exact", "off")}
    with jax.enable_x64(True):
        ref = jax.jit(jax.grad(loss))(tuple(np.float64(w) for w in ws), np.float64(x))
        assert ref[0].dtype == np.float64
    for a, b, r in zip(grads["exact"], grads["off"], ref):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-6)
