"""A hand-written CPU kernel for the filter gradient of 3x3 convolutions, called from JAX through XLA's FFI.

XLA:CPU runs the filter-gradient convolutions of a pruned CIFAR ResNet (8-64 channels) well below PyTorch's
oneDNN (``benchmarks/README.md`` has the figures); they are the largest part of the CPU train step that the YNNPACK
fusion modes of :mod:`oefsmc_jax.training.xla_cpu` do not speed up. ``wgrad3x3.cc`` computes that
gradient directly (register-tiled outer products over the output positions, one chunk of images per thread of
XLA's intra-op pool). It is compiled on first use with the system C++ compiler (``$CXX``, else ``g++``,
``c++`` or ``clang++``; ``-O3 -march=native``) into a cache keyed by the source, jaxlib, compiler and CPU
(``$OEFSMC_KERNEL_CACHE``, default ``~/.cache/oefsmc_jax/kernels``), then registered as an FFI target.

Modes (``config.cpu_wgrad``; when it is empty, ``$OEFSMC_CPU_WGRAD``, else ``xla``, resolved once by
:func:`resolve_mode` where the config is read):

* ``xla`` (default): the models call ``lax.conv_general_dilated`` with XLA's own gradient (the program every
  committed result ran);
* ``kernel``: every float32 3x3 convolution with padding 1, equal strides and no dilation or groups gets a custom
  VJP whose filter gradient is the kernel's on the CPU (``lax.platform_dependent``: XLA's own gradient on a GPU
  or TPU); the forward pass and the input gradient stay XLA's. Sums run in another order, so results differ
  from ``xla`` by float32 rounding.

There is no process-wide mode. The models take the convolution they call as an argument
(``build_model(spec, conv_general_dilated=...)``, default ``lax.conv_general_dilated``); the train step builds its
models with :func:`conv_general_dilated` of this module when its ``StepConfig.cpu_wgrad`` is ``kernel`` on a CPU
mesh (after :func:`register`), so the mode is part of what the step is built from and of its cache key.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
import pathlib
import platform
import shutil
import subprocess
import threading
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from oefsmc_jax.errors import ConfigError

MODES = ("xla", "kernel")
ENV = "OEFSMC_CPU_WGRAD"
TARGET = "oefsmc_wgrad3x3"
SOURCE = pathlib.Path(__file__).with_name("wgrad3x3.cc")
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c++17", "-w")
NHWC = ("NHWC", "HWIO", "NHWC")
#: the mode when neither the config nor ``$OEFSMC_CPU_WGRAD`` names one
DEFAULT = "xla"

_lock = threading.Lock()
_library: str | None = None  # path of the registered shared library, once registered


def check_mode(mode: str, field: str = "config.cpu_wgrad") -> str:
    """``mode`` lower-cased if it is one of :data:`MODES`; otherwise a ConfigError that names ``field``."""
    m = str(mode).strip().lower()
    if m not in MODES:
        raise ConfigError(f"{field}: {mode!r} is not allowed; choose one of {', '.join(MODES)}")
    return m


def resolve_mode(mode: str | None, field: str = "config.cpu_wgrad") -> str:
    """The mode a config value stands for: ``mode`` checked, or ('' or None) ``$OEFSMC_CPU_WGRAD``, else
    :data:`DEFAULT`. A bad value is a ConfigError naming ``field`` (or the variable). It builds nothing: a run on a
    CPU calls :func:`register` itself, so it fails before it loads anything rather than at its first gradient."""
    return check_mode(mode, field) if mode else check_mode(os.environ.get(ENV) or DEFAULT, field=f"${ENV}")


# ----------------------------------------------------------------------------------------------- build + register
def cache_dir() -> pathlib.Path:
    """``$OEFSMC_KERNEL_CACHE`` or ``$XDG_CACHE_HOME/oefsmc_jax/kernels`` (``~/.cache/oefsmc_jax/kernels``)."""
    env = os.environ.get("OEFSMC_KERNEL_CACHE")
    if env:
        return pathlib.Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(pathlib.Path.home() / ".cache")
    return pathlib.Path(base) / "oefsmc_jax" / "kernels"


def find_compiler() -> str | None:
    """``$CXX`` if set (even if it is missing: the error then names it), else the first of g++, c++, clang++."""
    if os.environ.get("CXX"):
        return os.environ["CXX"]
    for name in ("g++", "c++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the machine and, on Linux, the CPU model and flags."""
    parts = [platform.machine(), platform.system()]
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
        parts += sorted({ln for ln in text.splitlines() if ln.split(":")[0].strip() in ("model name", "flags",
                                                                                         "Features")})
    except OSError:
        parts.append(platform.processor())
    return "\n".join(parts)


def build(field: str = "config.cpu_wgrad") -> pathlib.Path:
    """Compile ``wgrad3x3.cc`` (once per source, jaxlib, compiler and CPU) and return the shared library's path.

    Raises a ConfigError naming ``field`` when there is no working C++ compiler or the build fails."""
    import jaxlib

    cxx = find_compiler()
    hint = f"or set {field}=xla"
    if cxx is None:
        raise ConfigError(f"{field}: 'kernel' needs a C++17 compiler to build the CPU filter-gradient kernel and none "
                          f"was found (set $CXX, or install g++, e.g. apt-get install g++), {hint}")
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise ConfigError(f"{field}: 'kernel' needs a C++ compiler; {cxx!r} does not run ({e}), {hint}") from None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, jaxlib.__version__.encode(), version.encode(), " ".join(FLAGS).encode(),
                                     _cpu_id().encode()])).hexdigest()[:16]
    out = cache_dir() / f"wgrad3x3-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    cmd = [cxx, *FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", str(tmp)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as e:
        raise ConfigError(f"{field}: building the CPU filter-gradient kernel failed ({e}), {hint}") from None
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        last = (res.stderr.strip().splitlines() or ["no output"])[-1][:200]
        raise ConfigError(f"{field}: building the CPU filter-gradient kernel with {cxx} failed: {last}; {hint}")
    os.replace(tmp, out)  # atomic: a concurrent build of the same key writes the same bytes
    return out


def register(field: str = "config.cpu_wgrad") -> str:
    """Build the kernel if needed and register it as the CPU FFI target :data:`TARGET` (once per process)."""
    global _library
    with _lock:
        if _library is None:
            import ctypes

            path = build(field)
            lib = ctypes.cdll.LoadLibrary(str(path))
            jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.OefsmcWgrad3x3), platform="cpu")
            _library = str(path)
    return _library


def describe(mode: str) -> str:
    """One phrase for logs about ``mode``: ``cpu wgrad xla`` or ``cpu wgrad kernel (wgrad3x3-<key>.so)``."""
    m = check_mode(mode)
    return f"cpu wgrad {m}" + (f" ({pathlib.Path(_library).name})" if m == "kernel" and _library else "")


# ----------------------------------------------------------------------------------------------- the op
def _conv(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
    return lax.conv_general_dilated(x, w, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=NHWC)


def _wgrad_xla(x: jax.Array, dy: jax.Array, w_shape: tuple[int, ...], stride: int) -> jax.Array:
    _, vjp = jax.vjp(lambda w: _conv(x, w, stride), jnp.zeros(w_shape, x.dtype))
    return vjp(dy)[0]


def wgrad3x3(x: jax.Array, dy: jax.Array, stride: int = 1) -> jax.Array:
    """Filter gradient ``[3, 3, Cin, Cout]`` of a 3x3, padding-1 NHWC convolution of float32 ``x`` ``[N, H, W,
    Cin]`` whose output gradient is ``dy`` ``[N, Ho, Wo, Cout]``: the kernel on a CPU (:func:`register` must have
    run), XLA's own gradient elsewhere."""
    w_shape = (3, 3, x.shape[-1], dy.shape[-1])
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(w_shape, jnp.float32), vmap_method="sequential")
    return lax.platform_dependent(x, dy, cpu=lambda a, b: call(a, b, stride=np.int64(stride)),
                                  default=lambda a, b: _wgrad_xla(a, b, w_shape, stride))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3x3(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
    """``lax.conv_general_dilated`` of a 3x3, padding-1 NHWC/HWIO convolution whose filter gradient is
    :func:`wgrad3x3` (the input gradient is XLA's)."""
    return _conv(x, w, stride)


def _conv3x3_fwd(x: jax.Array, w: jax.Array, stride: int) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _conv(x, w, stride), (x, w)


def _conv3x3_bwd(stride: int, res: tuple[jax.Array, jax.Array], dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = res
    _, vjp_x = jax.vjp(lambda a: _conv(a, w, stride), x)
    return vjp_x(dy)[0], wgrad3x3(x, dy, stride)


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)


#: the drop-in binds its arguments against ``lax.conv_general_dilated``'s own signature, so it takes every call that
#: ``lax`` takes (positional or keyword, arguments added in later jax versions included)
_LAX_SIGNATURE = inspect.signature(lax.conv_general_dilated)
#: the arguments :func:`_eligible` checks; any other one (precision, preferred_element_type, ...) must be None
_CHECKED = frozenset({"lhs", "rhs", "window_strides", "padding", "lhs_dilation", "rhs_dilation", "dimension_numbers",
                      "feature_group_count", "batch_group_count"})


def _eligible(args: Mapping[str, Any]) -> bool:
    """Whether the call ``args`` (``lax.conv_general_dilated``'s arguments by name, defaults filled in) is a float32
    3x3 padding-1 NHWC convolution with equal strides and no dilation or groups."""
    lhs, rhs, padding = args["lhs"], args["rhs"], args["padding"]
    if any(v is not None for name, v in args.items() if name not in _CHECKED):
        return False
    if lhs.ndim != 4 or rhs.ndim != 4 or lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32:
        return False
    if isinstance(padding, str) or tuple(map(tuple, padding)) != ((1, 1), (1, 1)):
        return False
    strides = tuple(args["window_strides"])
    if (len(strides) != 2 or strides[0] != strides[1] or args["feature_group_count"] != 1
            or args["batch_group_count"] != 1):
        return False
    if any(d is not None and tuple(d) != (1, 1) for d in (args["lhs_dilation"], args["rhs_dilation"])):
        return False
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, args["dimension_numbers"])
    if dn != lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC):
        return False
    return rhs.shape[:2] == (3, 3)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
    """Drop-in for ``lax.conv_general_dilated``, with its arguments (what the models' ``nn.Conv`` call when built
    with it): once the kernel is registered (:func:`register`), a float32 3x3 padding-1 NHWC convolution becomes
    :func:`conv3x3`; anything else is ``lax``'s, unchanged."""
    if _library is not None:
        bound = _LAX_SIGNATURE.bind(lhs, rhs, *args, **kwargs)
        bound.apply_defaults()
        if _eligible(bound.arguments):
            return conv3x3(lhs, rhs, int(bound.arguments["window_strides"][0]))
    return lax.conv_general_dilated(lhs, rhs, *args, **kwargs)
