"""Is the compressed student really smaller and faster? Params, MACs, XLA's FLOPs and measured latency against the
teacher, in one run on one device.

* teacher: the akamaster CIFAR-10 ResNet-56 ``.npz`` from the shared data folder (``$OEFSMC_DATA`` or
  ``../shared/data``), read with :func:`oefsmc_jax.convert.load_akamaster_npz`; ``--teacher`` takes another
  akamaster ``.npz`` or an Orbax model directory.
* student: ``--student OUT``, a model written by ``python -m oefsmc_jax export``; without it the benchmark makes
  one: ``l1_prune`` of every block's internal width by ``--prune-ratio`` (default 0.5), ``drop_blocks`` of the last
  ``--drop-blocks`` droppable blocks (default 0), then ``shrink``; it checks that the shrunk model computes the
  masked model's logits.
* costs: parameters, analytic MACs (``count_flops``: every kernel tap, zero padding included), MACs of the traced
  program without the taps over the zero padding (``traced_macs(..., count_padding=False)``), and XLA's own
  ``cost_analysis()`` FLOPs / 2 of the compiled forward (batch 1). XLA counts 2 FLOPs per kernel tap inside the
  image (exactly, for a lone conv) plus the elementwise work of BN / masks / ReLU / residual adds, so its FLOPs/2
  sit between the two MAC counts; a model whose XLA FLOPs/2 are more than 5 % from the analytic MACs is flagged,
  with the two effects quantified.
* latency: median (min, max) ms of one jitted eval forward (``block_until_ready``) at each ``--batches`` size,
  compiled ahead, ``--warmup`` untimed passes, then ``--repeats`` passes alternating teacher and student (the
  order flips every repeat) so both see the same load.

    python -m benchmarks.compressed_latency                      # ~1 minute on a 2-core CPU
    python -m benchmarks.compressed_latency --drop-blocks 6 --prune-ratio 0.3
    python -m benchmarks.compressed_latency --student OUT        # an exported student
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import jax
import numpy as np

from oefsmc_jax.models import (  # noqa: E402
    build_model,
    count_flops,
    count_params,
    drop_blocks,
    droppable_blocks,
    l1_prune,
    shrink,
)
from oefsmc_jax.models.latency import forward_timer, traced_macs, xla_flops  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = pathlib.Path(os.environ.get("OEFSMC_DATA", REPO.parent / "shared" / "data"))
DEFAULT_TEACHER = DATA / "teachers" / "akamaster_cifar10_resnet" / "resnet56-4bfd9763.npz"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--teacher", default=str(DEFAULT_TEACHER),
                   help="akamaster .npz or Orbax model directory (default: shared ResNet-56 .npz)")
    p.add_argument("--student", default=None, metavar="OUT", help="exported student (python -m oefsmc_jax export)")
    p.add_argument("--prune-ratio", type=float, default=0.5, help="without --student: L1 prune ratio (default 0.5)")
    p.add_argument("--drop-blocks", type=int, default=0, help="without --student: drop the last N droppable blocks")
    p.add_argument("--image-size", type=int, default=None, help="input size (default: the student's, else 32)")
    p.add_argument("--batches", default="1,128", help="comma-separated batch sizes to time (default 1,128)")
    p.add_argument("--repeats", type=int, default=20, help="timed passes per model and batch size (default 20)")
    p.add_argument("--warmup", type=int, default=2, help="untimed passes after compiling (default 2)")
    return p


def load_teacher(path: str) -> tuple:
    """(spec, variables) of an akamaster .npz or an Orbax model directory."""
    p = pathlib.Path(path)
    if not p.exists():
        sys.exit(f"error: teacher {p} does not exist (set OEFSMC_DATA or pass --teacher)")
    if p.suffix == ".npz":
        from oefsmc_jax.convert import load_akamaster_npz

        return load_akamaster_npz(p)
    if p.is_dir():
        from oefsmc_jax.training.checkpoint import load_model

        spec, variables, _ = load_model(p)
        return spec, variables
    sys.exit(f"error: teacher {p} is neither an .npz export nor an Orbax model directory")


def make_student(spec, variables, ratio: float, n_drop: int, image_size: int) -> tuple:
    """L1-prune, drop the last ``n_drop`` droppable blocks, shrink; checks the shrunk logits against the masked."""
    m_spec, masked = l1_prune(spec, variables, ratio)
    droppable = droppable_blocks(m_spec)
    if n_drop > len(droppable):
        sys.exit(f"error: --drop-blocks {n_drop}: the model has only {len(droppable)} droppable blocks")
    if n_drop:
        m_spec, masked = drop_blocks(m_spec, masked, droppable[-n_drop:])
    s_spec, s_vars = shrink(m_spec, masked)
    x = np.random.default_rng(0).standard_normal((16, image_size, image_size, spec.in_channels)).astype(np.float32)
    fwd = lambda sp, v: np.asarray(jax.jit(lambda v, x: build_model(sp).apply(v, x, train=False)["logits"])(v, x))
    with jax.default_matmul_precision("highest"):
        diff = float(np.abs(fwd(m_spec, masked) - fwd(s_spec, s_vars)).max())
    dropped = [m_spec.block_name(*b) for b in droppable[len(droppable) - n_drop:]] if n_drop else []
    desc = f"l1_prune {ratio:g}" + (f" + drop_blocks {', '.join(dropped)}" if dropped else "") + " + shrink"
    return s_spec, s_vars, f"{desc} (shrunk vs masked logits on 16 images: max |diff| {diff:.1e})"


def time_pair(timers: tuple, repeats: int, warmup: int) -> tuple[list[float], list[float]]:
    """Run two timers alternately (order flipped every repeat); returns their ms lists."""
    for _ in range(warmup):
        for t in timers:
            t()
    out: tuple[list[float], list[float]] = ([], [])
    for r in range(repeats):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        for i in order:
            out[i].append(timers[i]())
    return out


def _mmm(ms: list[float]) -> str:
    return f"{np.median(ms):.2f} ({np.min(ms):.2f}-{np.max(ms):.2f})"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    args = _parser().parse_args(argv)
    t_start = time.time()
    load0 = os.getloadavg()
    t_spec, t_vars = load_teacher(args.teacher)
    if args.student:
        from oefsmc_jax.training.checkpoint import load_model

        s_spec, s_vars, meta = load_model(args.student)
        image_size = args.image_size or int((meta.get("preprocessing") or {}).get("image_size", 32))
        s_desc = f"{args.student} (arm {meta.get('arm')}, method {meta.get('method')})"
    else:
        image_size = args.image_size or 32
        s_spec, s_vars, s_desc = make_student(t_spec, t_vars, args.prune_ratio, args.drop_blocks, image_size)
    batches = [int(b) for b in args.batches.split(",") if b.strip()]

    dev = jax.devices()[0]
    print(f"device: {dev.platform} ({dev.device_kind}), {jax.device_count()} device(s), {os.cpu_count()} host CPUs; "
          f"jax {jax.__version__}")
    print(f"load average at start: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} (1/5/15 min)")
    print(f"teacher: {args.teacher}")
    print(f"student: {s_desc}")
    print(f"input: {image_size}x{image_size}x{t_spec.in_channels}; latency: {args.repeats} alternated repeats after "
          f"{args.warmup} warm-up passes; ms median (min-max)")

    rows: list[tuple[str, str, str, str]] = []
    cost = {}
    for name, spec, v in (("teacher", t_spec, t_vars), ("student", s_spec, s_vars)):
        cost[name] = {"params": count_params(spec), "macs": count_flops(spec, image_size),
                      "macs_nopad": traced_macs(spec, image_size, count_padding=False),
                      "xla": xla_flops(spec, v, image_size) / 2}
    t, s = cost["teacher"], cost["student"]
    rows.append(("params", f"{t['params']:,}", f"{s['params']:,}", f"{t['params'] / s['params']:.2f}x"))
    rows.append(("MACs / image (analytic)", f"{t['macs'] / 1e6:.2f}M", f"{s['macs'] / 1e6:.2f}M",
                 f"{t['macs'] / s['macs']:.2f}x"))
    rows.append(("MACs / image, no padding taps", f"{t['macs_nopad'] / 1e6:.2f}M", f"{s['macs_nopad'] / 1e6:.2f}M",
                 f"{t['macs_nopad'] / s['macs_nopad']:.2f}x"))
    rows.append(("XLA FLOPs/2 / image", f"{t['xla'] / 1e6:.2f}M", f"{s['xla'] / 1e6:.2f}M",
                 f"{t['xla'] / s['xla']:.2f}x"))
    flags = []
    for label, key in (("XLA/2 : analytic MACs", "macs"), ("XLA/2 : no-padding MACs", "macs_nopad")):
        rows.append((label, f"{t['xla'] / t[key]:.3f}", f"{s['xla'] / s[key]:.3f}", ""))
    for name, c in cost.items():
        r = c["xla"] / c["macs"]
        if abs(r - 1) > 0.05:
            flags.append(f"{name}: XLA's FLOPs/2 = {r:.3f} x the analytic MACs (more than 5 % apart). The analytic "
                         f"count includes the kernel taps over the zero padding ({1 - c['macs_nopad'] / c['macs']:.1%}"
                         " of them), which XLA skips; XLA adds the elementwise work (BN, masks, ReLU, residual adds: "
                         f"+{c['xla'] / c['macs_nopad'] - 1:.1%} over the padding-free MACs).")

    for b in batches:
        timers = (forward_timer(t_spec, t_vars, image_size, b), forward_timer(s_spec, s_vars, image_size, b))
        tt, ts = time_pair(timers, args.repeats, args.warmup)
        rows.append((f"latency ms, batch {b}", _mmm(tt), _mmm(ts), f"{np.median(tt) / np.median(ts):.2f}x"))
        rows.append((f"images/s, batch {b} (median)", f"{b / np.median(tt) * 1e3:,.0f}",
                     f"{b / np.median(ts) * 1e3:,.0f}", ""))

    w = [max(len(r[i]) for r in rows + [("", "teacher", "student", "teacher/student")]) for i in range(4)]
    line = lambda r: f"| {r[0]:<{w[0]}} | {r[1]:>{w[1]}} | {r[2]:>{w[2]}} | {r[3]:>{w[3]}} |"
    print()
    print(line(("", "teacher", "student", "teacher/student")))
    print(f"|{'-' * (w[0] + 2)}|{'-' * (w[1] + 1)}:|{'-' * (w[2] + 1)}:|{'-' * (w[3] + 1)}:|")
    for r in rows:
        print(line(r))
    print()
    for f in flags:
        print(f"FLAG: {f}")
    load1 = os.getloadavg()
    print(f"load average at end: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}; wall {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
