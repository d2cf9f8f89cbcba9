"""XLA:CPU compiler options the package's jitted functions are compiled with.

On a CPU, XLA can hand whole operations to the YNNPACK library instead of its own emitters
(``xla_cpu_experimental_ynn_fusion_type``). The package passes that option per function, through
``jax.jit(..., compiler_options=...)``, never through a global ``XLA_FLAGS``, so other JAX code in the same process
is not affected. Modes (``config.cpu_fusion``; when it is empty, ``$OEFSMC_CPU_FUSION``, else ``exact``, resolved once
by :func:`resolve_mode` where the config is read):

* ``exact`` (default): dots, convolutions, element-wise ops and reductions each as one YNNPACK call: a faster
  CPU train step with the same gradients (``benchmarks/README.md`` has the figures and the equivalence check).
* ``fast``: the same without ``individual_convolution`` (XLA fuses convolutions with their neighbours). Faster
  still, but it changes the gradients by far more than float32 rounding for a reason not understood: opt-in only.
* ``off``: XLA's own CPU emitters (the behaviour of jaxlib without the option).

The option is used only where the platform is ``cpu`` and the installed jaxlib accepts it (probed once per
process by compiling a one-line function); elsewhere :func:`compiler_options` returns ``None`` and ``jax.jit``
behaves as it always did. There is no process-wide mode: whoever builds a jitted function passes the mode to
:func:`compiler_options` (the train step reads it from its ``StepConfig``).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from oefsmc_jax.errors import ConfigError

FLAG = "xla_cpu_experimental_ynn_fusion_type"
_PREFIX = "LIBRARY_FUSION_TYPE_"
#: mode -> the YNNPACK fusion types it enables (empty: the option is not passed)
MODES: dict[str, tuple[str, ...]] = {
    "exact": ("INDIVIDUAL_DOT", "INDIVIDUAL_CONVOLUTION", "ELTWISE", "REDUCE"),
    "fast": ("INDIVIDUAL_DOT", "ELTWISE", "REDUCE"),
    "off": (),
}
ENV = "OEFSMC_CPU_FUSION"
#: the mode when neither the config nor ``$OEFSMC_CPU_FUSION`` names one
DEFAULT = "exact"


def check_mode(mode: str, field: str = "config.cpu_fusion") -> str:
    """``mode`` lower-cased if it is one of :data:`MODES`; otherwise a ConfigError that names ``field``."""
    m = str(mode).strip().lower()
    if m not in MODES:
        raise ConfigError(f"{field}: {mode!r} is not allowed; choose one of {', '.join(MODES)}")
    return m


def resolve_mode(mode: str | None, field: str = "config.cpu_fusion") -> str:
    """The mode a config value stands for: ``mode`` checked, or ('' or None) ``$OEFSMC_CPU_FUSION``, else
    :data:`DEFAULT`. A bad value is a ConfigError naming ``field`` (or the variable)."""
    if mode:
        return check_mode(mode, field)
    return check_mode(os.environ.get(ENV) or DEFAULT, field=f"${ENV}")


def option_value(mode: str) -> str:
    """The flag's value for ``mode`` (comma-separated enum names; empty for ``off``)."""
    return ",".join(_PREFIX + t for t in MODES[check_mode(mode)])


@functools.cache
def supported(value: str) -> bool:
    """Whether the installed jaxlib's CPU compiler accepts ``FLAG=value`` (compiles a one-line function once)."""
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:
        return False
    try:
        x = jax.device_put(jnp.zeros((2,), jnp.float32), cpu)
        jax.jit(lambda a: a + 1.0, compiler_options={FLAG: value}).lower(x).compile()
    except Exception:  # noqa: BLE001 - an older or newer jaxlib without the option or one of its values
        return False
    return True


def compiler_options(platform: str | None, mode: str) -> dict[str, str] | None:
    """``compiler_options`` for ``jax.jit`` of a function that runs on ``platform`` (None: JAX's default backend)
    under ``mode`` (one of :data:`MODES`): the YNNPACK option on a CPU that supports it, else None."""
    platform = platform or jax.default_backend()
    mode = check_mode(mode)
    if platform != "cpu" or not MODES[mode]:
        return None
    value = option_value(mode)
    return {FLAG: value} if supported(value) else None


def mesh_platform(mesh: jax.sharding.Mesh) -> str:
    """The platform of a mesh's devices (``cpu``, ``gpu``, ``tpu``)."""
    return mesh.devices.flat[0].platform


def describe(platform: str | None, mode: str) -> str:
    """One phrase for logs about ``mode`` on ``platform`` (None: JAX's default backend): ``cpu fusion exact
    (YNNPACK dot, conv, eltwise, reduce)`` or why it is off."""
    platform = platform or jax.default_backend()
    mode = check_mode(mode)
    if platform != "cpu":
        return f"cpu fusion n/a on {platform}"
    if not MODES[mode]:
        return "cpu fusion off (XLA's own emitters)"
    if compiler_options(platform, mode) is None:
        return f"cpu fusion {mode} requested, but this jaxlib does not know {FLAG}: XLA's own emitters"
    return f"cpu fusion {mode} (YNNPACK: {', '.join(t.lower() for t in MODES[mode])})"
