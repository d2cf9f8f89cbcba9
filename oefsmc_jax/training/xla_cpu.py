"""XLA:CPU compiler options the package's jitted functions are compiled with.

On a CPU, XLA can hand whole operations to the YNNPACK library instead of its own emitters
(``xla_cpu_experimental_ynn_fusion_type``). The package passes that option per function, through
``jax.jit(..., compiler_options=...)``, never through a global ``XLA_FLAGS``, so other JAX code in the same process
is not affected. Modes (``config.cpu_fusion``, or ``$OEFSMC_CPU_FUSION`` before the config is read):

* ``exact`` (default): dots, convolutions, element-wise ops and reductions each as one YNNPACK call: a faster
  CPU train step with the same gradients (``benchmarks/README.md`` has the figures and the equivalence check).
* ``fast``: the same without ``individual_convolution`` (XLA fuses convolutions with their neighbours). Faster
  still, but it changes the gradients by far more than float32 rounding for a reason not understood: opt-in only.
* ``off``: XLA's own CPU emitters (the behaviour of jaxlib without the option).

The option is used only where the platform is ``cpu`` and the installed jaxlib accepts it (probed once per
process by compiling a one-line function); elsewhere :func:`compiler_options` returns ``None`` and ``jax.jit``
behaves as it always did.
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
_mode: str | None = None


def check_mode(mode: str, field: str = "config.cpu_fusion") -> str:
    """``mode`` lower-cased if it is one of :data:`MODES`; otherwise a ConfigError that names ``field``."""
    m = str(mode).strip().lower()
    if m not in MODES:
        raise ConfigError(f"{field}: {mode!r} is not allowed; choose one of {', '.join(MODES)}")
    return m


def set_mode(mode: str | None) -> str:
    """Set the process-wide mode ('' or None: ``$OEFSMC_CPU_FUSION``, else ``exact``); returns the mode in use.

    Functions compiled afterwards use it; already compiled ones keep theirs."""
    global _mode
    if mode:
        _mode = check_mode(mode)
    else:
        _mode = check_mode(os.environ.get(ENV) or "exact", field=f"${ENV}")
    return _mode


def get_mode() -> str:
    """The mode in use (``exact`` unless :func:`set_mode` or ``$OEFSMC_CPU_FUSION`` said otherwise)."""
    return _mode if _mode is not None else set_mode(None)


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


def compiler_options(platform: str | None = None, mode: str | None = None) -> dict[str, str] | None:
    """``compiler_options`` for ``jax.jit`` of a function that runs on ``platform`` (default: JAX's default
    backend) under ``mode`` (default: :func:`get_mode`): the YNNPACK option on a CPU that supports it, else None."""
    platform = platform or jax.default_backend()
    mode = check_mode(mode) if mode else get_mode()
    if platform != "cpu" or not MODES[mode]:
        return None
    value = option_value(mode)
    return {FLAG: value} if supported(value) else None


def mesh_platform(mesh: jax.sharding.Mesh) -> str:
    """The platform of a mesh's devices (``cpu``, ``gpu``, ``tpu``)."""
    return mesh.devices.flat[0].platform


def describe(platform: str | None = None) -> str:
    """One phrase for logs: ``cpu fusion exact (YNNPACK dot, conv, eltwise, reduce)`` or why it is off."""
    platform = platform or jax.default_backend()
    mode = get_mode()
    if platform != "cpu":
        return f"cpu fusion n/a on {platform}"
    if not MODES[mode]:
        return "cpu fusion off (XLA's own emitters)"
    if compiler_options(platform, mode) is None:
        return f"cpu fusion {mode} requested, but this jaxlib does not know {FLAG}: XLA's own emitters"
    return f"cpu fusion {mode} (YNNPACK: {', '.join(t.lower() for t in MODES[mode])})"
