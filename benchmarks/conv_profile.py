"""The convolutions of one train step, op by op: XLA:CPU under each fusion mode against PyTorch, same process.

The step of ``step_throughput.py`` (ResNet-56 teacher in eval mode, its half-width student in train mode, 128
images of 32x32) runs these convolutions (3x3, padding 1, NHWC): the teacher's forward, and the student's forward,
input gradient and filter gradient, for each distinct shape, times how often the network has it. Each op is jitted
alone (``jax.jit(..., compiler_options=...)`` with the XLA:CPU fusion modes of ``oefsmc_jax.training.xla_cpu``) and
timed as the median of ``--reps`` calls; PyTorch runs ``F.conv2d``, ``torch.nn.grad.conv2d_input`` and
``conv2d_weight`` on channels-last tensors. The table gives milliseconds per step (time per call x count) and the
sum per column, the figure to hold against the whole step's time from ``step_throughput.py``.

    python -m benchmarks.conv_profile                 # about 2 minutes on 2 cores
    python -m benchmarks.conv_profile --modes exact,off,fast --reps 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - the message is the point
    sys.exit("this benchmark needs PyTorch: pip install -r benchmarks/requirements.txt")


from benchmarks.step_throughput import split_variant  # noqa: E402  (this folder: the same FUSION[+kernel] variants)
from oefsmc_jax.kernels import cpu_conv  # noqa: E402
from oefsmc_jax.training import xla_cpu  # noqa: E402

DN = ("NHWC", "HWIO", "NHWC")


def conv_ops(batch: int, depth: int, widths: tuple[int, ...], student_frac: float) -> list[dict[str, Any]]:
    """Distinct conv ops of the CIFAR ResNet step with their counts: teacher forward; student forward, input grad
    (not for the first conv, whose input is the image) and filter grad. Option-A shortcuts have no convs."""
    n = (depth - 2) // 6
    ops: dict[tuple, dict[str, Any]] = {}

    def add(who: str, kind: str, hw: int, c_in: int, c_out: int, stride: int) -> None:
        key = (who, kind, hw, c_in, c_out, stride)
        ops.setdefault(key, {"who": who, "kind": kind, "hw": hw, "c_in": c_in, "c_out": c_out, "stride": stride,
                             "count": 0})["count"] += 1

    for who, frac in (("teacher", 1.0), ("student", student_frac)):
        kinds = ("fwd",) if who == "teacher" else ("fwd", "dgrad", "wgrad")
        for k in kinds:
            if k != "dgrad":
                add(who, k, 32, 3, widths[0], 1)  # the stem
        hw, c = 32, widths[0]
        for s, w in enumerate(widths):
            inner = max(1, int(round(w * frac)))
            for b in range(n):
                stride = 2 if (s > 0 and b == 0) else 1
                for k in kinds:
                    add(who, k, hw, c, inner, stride)
                    add(who, k, hw // stride, inner, w, 1)
                hw, c = hw // stride, w
    return list(ops.values())


def _time(fn: Callable[[], Any], sync: Callable[[Any], Any], reps: int) -> float:
    sync(fn())  # compile / warm up
    sync(fn())
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sync(fn())
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def jax_op(op: dict[str, Any], batch: int, mode: str) -> Callable[[], Any]:
    """A no-argument function running the op once under the fusion ``mode`` (``FUSION`` or ``FUSION+kernel``: the
    filter gradient from the CPU kernel of ``oefsmc_jax.kernels.cpu_conv``; other ops are XLA's either way)."""
    mode, wgrad = split_variant(mode)
    rng = np.random.default_rng(0)
    s, pad = op["stride"], ((1, 1), (1, 1))
    x = jax.device_put(rng.normal(size=(batch, op["hw"], op["hw"], op["c_in"])).astype(np.float32))
    w = jax.device_put((0.1 * rng.normal(size=(3, 3, op["c_in"], op["c_out"]))).astype(np.float32))
    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (s, s), pad, dimension_numbers=DN)
    y = jax.eval_shape(conv, x, w)
    g = jax.device_put(rng.normal(size=y.shape).astype(np.float32))
    opts = xla_cpu.compiler_options("cpu", mode)
    if op["kind"] == "fwd":
        f = jax.jit(conv, compiler_options=opts)
        return lambda: f(x, w)
    if op["kind"] == "dgrad":
        f = jax.jit(lambda w, g: jax.vjp(lambda x_: conv(x_, w), x)[1](g)[0], compiler_options=opts)
        return lambda: f(w, g)
    if wgrad == "kernel":
        cpu_conv.register("--modes")
        f = jax.jit(lambda x, g: cpu_conv.wgrad3x3(x, g, s), compiler_options=opts)
    else:
        f = jax.jit(lambda x, g: jax.vjp(lambda w_: conv(x, w_), w)[1](g)[0], compiler_options=opts)
    return lambda: f(x, g)


def torch_op(op: dict[str, Any], batch: int) -> Callable[[], Any]:
    """The same op in PyTorch (channels-last, CPU)."""
    s = op["stride"]
    cl = torch.channels_last
    x = torch.randn(batch, op["c_in"], op["hw"], op["hw"]).contiguous(memory_format=cl)
    w = (0.1 * torch.randn(op["c_out"], op["c_in"], 3, 3)).contiguous(memory_format=cl)
    y = F.conv2d(x, w, stride=s, padding=1)
    g = torch.randn_like(y).contiguous(memory_format=cl)
    if op["kind"] == "fwd":
        return lambda: F.conv2d(x, w, stride=s, padding=1)
    if op["kind"] == "dgrad":
        return lambda: torch.nn.grad.conv2d_input(x.shape, w, g, stride=s, padding=1)
    return lambda: torch.nn.grad.conv2d_weight(x, w.shape, g, stride=s, padding=1)


def main(argv: list[str] | None = None) -> None:
    """Time every op and print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128, help="images per step (ID + OOD)")
    p.add_argument("--depth", type=int, default=56, help="CIFAR ResNet depth (6n+2)")
    p.add_argument("--student-frac", type=float, default=0.5, help="student inner width / teacher inner width")
    p.add_argument("--modes", default="exact,off", help="XLA:CPU fusion modes, comma-separated; FUSION+kernel "
                   "takes the filter gradients from oefsmc_jax.kernels.cpu_conv (e.g. exact,exact+kernel)")
    p.add_argument("--reps", type=int, default=5, help="timed calls per op (median)")
    a = p.parse_args(argv)
    try:
        modes = ["+".join(split_variant(m.strip().lower(), "--modes")).removesuffix("+xla")
                 for m in a.modes.split(",") if m.strip()]
    except ValueError as e:
        p.error(str(e))
    print(f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads); host CPUs "
          f"{os.cpu_count()}, load average at start {os.getloadavg()}; allocator "
          f"{os.path.basename(os.environ['LD_PRELOAD']) if os.environ.get('LD_PRELOAD') else 'system malloc'}")
    ops = conv_ops(a.batch, a.depth, (16, 32, 64), a.student_frac)
    cols = [f"XLA {m}" for m in modes] + ["PyTorch"]
    header = f"{'network':<8} {'op':<6} {'HxW':>5} {'C_in':>5} {'C_out':>5} {'s':>2} {'count':>5} " + " ".join(
        f"{c:>12}" for c in cols)
    print(f"\nms per step (per-call median x count), batch {a.batch}")
    print(header)
    print("-" * len(header))
    totals: dict[tuple[str, str, str], float] = {}
    for op in ops:
        row = []
        for m in modes:
            t = _time(jax_op(op, a.batch, m), jax.block_until_ready, a.reps) * op["count"]
            row.append(t)
        row.append(_time(torch_op(op, a.batch), lambda r: r, a.reps) * op["count"])
        for c, t in zip(cols, row):
            key = (op["who"], op["kind"], c)
            totals[key] = totals.get(key, 0.0) + t
        print(f"{op['who']:<8} {op['kind']:<6} {op['hw']:>5} {op['c_in']:>5} {op['c_out']:>5} {op['stride']:>2} "
              f"{op['count']:>5} " + " ".join(f"{1000 * t:>12.1f}" for t in row))
    print("\ntotals, ms per step")
    for who, kind in dict.fromkeys((o["who"], o["kind"]) for o in ops):
        print(f"{who:<8} {kind:<6} " + " ".join(f"{c}: {1000 * totals[(who, kind, c)]:.1f}" for c in cols))
    print("all convs " + " ".join(f"{c}: {1000 * sum(v for k, v in totals.items() if k[2] == c):.1f}" for c in cols))
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
