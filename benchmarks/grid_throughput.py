"""Images/s of R fine-tuning runs trained at once by the grouped step, against one run, side by side in one process.

The workload is one OE-FSMC KD fine-tuning step as in ``step_throughput.py`` (a CIFAR ResNet teacher in eval
mode, its L1-pruned and shrunk student in train mode, ``B_id`` ID + ``B_ood`` OOD images per run and step, the
paper's 64 + 64 by default), but trained by ``make_train_step(..., group=GroupStep(...))``: R students, each with
its own parameters, optimizer state, BatchNorm statistics, ID/OOD pools and keys, and one shared teacher, in one
program.

For each R it reports the images/s of all R runs together, the speed-up over one run (R x one run's time / the
group's time: above 1 means the group beats running its runs one after another), and the arithmetic rate achieved
(teacher forward + 3 x student forward per image, 2 FLOPs per multiply-accumulate) against the device's peak when
known (``--peak-tflops``). The one-run step is the grouped step with R = 1 and, as a check, the ungrouped step of
``train.make_trainer`` (the one a run outside a group uses). Rounds alternate between all Rs, so a slow phase of a
shared host hits them all; medians over rounds are reported. Needs no PyTorch.

    python -m benchmarks.grid_throughput                       # R = 1 2 4 8 16 32, about 10 minutes on 2 cores
    python -m benchmarks.grid_throughput --runs 1 2 4 --steps 3 --depth 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import jax
import numpy as np

from benchmarks.workload import Workload, make_host_data, make_teacher_and_student  # noqa: E402
from oefsmc_jax.kernels import cpu_conv  # noqa: E402
from oefsmc_jax.methods import KD  # noqa: E402
from oefsmc_jax.models import build_model, count_flops, mask_multipliers  # noqa: E402
from oefsmc_jax.training import xla_cpu  # noqa: E402
from oefsmc_jax.training.optim import make_optimizer  # noqa: E402
from oefsmc_jax.training.parallel import make_mesh, replicate  # noqa: E402
from oefsmc_jax.training.step import (  # noqa: E402
    GROUP_IMPLS,
    GroupStep,
    StepConfig,
    StepData,
    init_state,
    make_train_step,
    resolve_group_impl,
)
from oefsmc_jax.training.train import make_trainer  # noqa: E402

#: dense float32 (non-tensor-core) peaks in TFLOP/s of devices a user is likely to be lent; TF32 tensor-core
#: peaks are far higher, but XLA uses them for convolutions only at its default precision on those GPUs
KNOWN_PEAK_FP32 = {"NVIDIA H100 80GB HBM3": 66.9, "NVIDIA H200": 66.9, "NVIDIA A100-SXM4-80GB": 19.5,
                   "NVIDIA A100-SXM4-40GB": 19.5}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--runs", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32], help="group sizes R to time")
    p.add_argument("--steps", type=int, default=5, help="timed steps per round and group size")
    p.add_argument("--rounds", type=int, default=3, help="rounds alternating over the group sizes")
    p.add_argument("--batch-id", type=int, default=64, help="ID images per run and step")
    p.add_argument("--batch-ood", type=int, default=64, help="OOD images per run and step")
    p.add_argument("--depth", type=int, default=20, help="teacher CIFAR ResNet depth (6n+2)")
    p.add_argument("--prune-ratio", type=float, default=0.5, help="L1 pruning ratio of each internal width")
    p.add_argument("--devices", type=int, default=None, help="devices in the mesh (default: all)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak TFLOP/s for the fraction column (default: a table of known GPUs)")
    p.add_argument("--impl", default="auto", help="comma-separated grouped-step implementations to compare: "
                   "auto, vmap, map, unroll (oefsmc_jax.training.step.GROUP_IMPLS)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps < 1 or args.rounds < 1 or any(r < 1 for r in args.runs):
        p.error("--steps, --rounds and every --runs value must be >= 1")
    args.runs = sorted(set(args.runs))
    args.impl = [i.strip() for i in args.impl.split(",") if i.strip()]
    bad = [i for i in args.impl if i not in GROUP_IMPLS]
    if bad or not args.impl:
        p.error(f"--impl: {bad or args.impl} not among {', '.join(GROUP_IMPLS)}")
    return args


def main(argv: list[str] | None = None) -> dict[tuple[str, int], dict[str, float]]:
    """Time every group size and print the table; returns, per R, the median images/s and speed-up."""
    args = parse_args(argv)
    wl = Workload(batch_id=args.batch_id, batch_ood=args.batch_ood)
    mesh = make_mesh(args.devices)
    dev = mesh.devices.flat[0]
    # the compile modes of the environment ($OEFSMC_CPU_FUSION, $OEFSMC_CPU_WGRAD, else the defaults), passed to
    # the step through its config
    fusion, wgrad = xla_cpu.resolve_mode(""), cpu_conv.resolve_mode("")
    print(f"jax {jax.__version__}: {mesh.devices.size} x {dev.platform} ({dev.device_kind}); "
          f"{xla_cpu.describe(dev.platform, fusion)}, {cpu_conv.describe(wgrad)}; host CPUs {os.cpu_count()}, "
          f"load average {os.getloadavg()}")
    host = make_host_data(50, 10.0, 1000, args.seed)
    t_spec, t_vars, s_spec, s_vars = make_teacher_and_student(args.depth, args.prune_ratio, host["x_id"][:128], wl,
                                                              args.seed)
    macs_t, macs_s = count_flops(t_spec, 32), count_flops(s_spec, 32)
    flops_per_image = 2.0 * (macs_t + 3.0 * macs_s)
    print(f"teacher ResNet-{args.depth} ({macs_t / 1e6:.1f} MMACs/image), student {macs_s / 1e6:.1f} MMACs/image; "
          f"{wl.batch_id} + {wl.batch_ood} images per run and step; {flops_per_image / 1e6:.0f} MFLOP per image")

    recipe = KD((0.5, 0.5, 0.5), gamma=wl.kd_gamma, tau=wl.tau).recipe()
    cfg = StepConfig(batch_id=wl.batch_id, batch_ood=wl.batch_ood, pad=wl.pad, flip=True, mean=wl.mean, std=wl.std,
                     lambda_jd=wl.lambda_jd, eta=wl.eta, tau=wl.tau, cpu_fusion=fusion, cpu_wgrad=wgrad)
    optim = {"name": "sgd", "lr": wl.lr, "momentum": wl.momentum, "weight_decay": wl.weight_decay,
             "schedule": "constant"}
    tx, _ = make_optimizer(optim, 1000)
    student, teacher = build_model(s_spec, bn_axis_name="data"), build_model(t_spec)
    impls = list(dict.fromkeys(resolve_group_impl(i, dev.platform) for i in args.impl))
    grouped = {i: make_train_step(mesh, student, teacher, recipe, tx, cfg, GroupStep(shared_teacher=True, impl=i))
               for i in impls}
    tv = replicate(t_vars, mesh)
    data1 = StepData(x_id=host["x_id"], y_id=host["y_id"], x_ood=host["x_ood"], id_probs=None, gamma=host["gamma"],
                     reg_weights=host["reg_weights"])
    mult1 = mask_multipliers(s_spec, s_vars)

    def stacked(n: int) -> Any:
        rng = np.random.default_rng(n)
        states = [init_state(s_vars, tx, args.seed + r) for r in range(n)]
        datas = [data1.replace(x_id=rng.permutation(host["x_id"]), x_ood=rng.permutation(host["x_ood"]))
                 for _ in range(n)]
        stack = lambda trees: jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)
        return (replicate(stack(jax.device_get(states)), mesh), replicate(stack(datas), mesh),
                replicate(stack([s_vars["masks"]] * n), mesh), replicate(stack([mult1] * n), mesh),
                replicate(np.ones(n, bool), mesh))

    runners: dict[Any, Any] = {}
    for impl in impls:
        for n in args.runs:
            box = {"args": stacked(n)}

            def run(box=box, fn=grouped[impl]):
                state, data, masks, mult, active = box["args"]
                state, metrics = fn(state, data, tv, masks, mult, active)
                box["args"] = (state, data, masks, mult, active)
                return metrics

            t0 = time.perf_counter()
            jax.block_until_ready(run())
            print(f"{impl} R = {n}: first step (compile + run) {time.perf_counter() - t0:.1f} s")
            runners[(impl, n)] = run
    # the ungrouped step a single run uses, as a check on the R = 1 figure
    single = make_trainer(mesh, s_spec, t_spec, recipe, cfg, optim, 1000).step
    sbox = {"state": replicate(init_state(s_vars, tx, args.seed), mesh)}
    sargs = replicate((data1, s_vars["masks"], mult1), mesh)

    def run_single():
        sbox["state"], metrics = single(sbox["state"], sargs[0], tv, sargs[1], sargs[2])
        return metrics

    jax.block_until_ready(run_single())
    runners["single"] = run_single
    for run in runners.values():  # warm-up
        jax.block_until_ready(run())

    secs: dict[Any, list[float]] = {k: [] for k in runners}
    for r in range(args.rounds):
        for k, run in runners.items():
            t0 = time.perf_counter()
            out = None
            for _ in range(args.steps):
                out = run()
            jax.block_until_ready(out)
            secs[k].append(time.perf_counter() - t0)
        name = lambda k: k if isinstance(k, str) else f"{k[0]} R={k[1]}"
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{name(k)}: {v[-1]:.2f}s" for k, v in secs.items()))

    imgs = wl.images_per_step
    peak = args.peak_tflops or KNOWN_PEAK_FP32.get(dev.device_kind)
    # one run's step: the ungrouped step of train.make_trainer (what a run outside a group uses)
    ref = statistics.median(secs["single"]) / args.steps
    print()
    print(f"{'impl':>6} {'runs R':>6} {'step ms':>9} {'images/s':>10} {'x one run':>10} {'TFLOP/s':>8}"
          + (f" {'of peak':>8}" if peak else ""))
    out = {}
    for impl in impls:
        for n in args.runs:
            step_s = statistics.median(secs[(impl, n)]) / args.steps
            ips = n * imgs / step_s
            speedup = n * ref / step_s
            tflops = ips * flops_per_image / 1e12
            out[(impl, n)] = {"images_per_s": ips, "speedup": speedup, "tflops": tflops}
            print(f"{impl:>6} {n:>6} {1000 * step_s:>9.1f} {ips:>10.0f} {speedup:>10.2f} {tflops:>8.3f}"
                  + (f" {100 * tflops / peak:>7.1f}%" if peak else ""))
    single_s = statistics.median(secs["single"]) / args.steps
    print(f"ungrouped one-run step (train.make_trainer): {1000 * single_s:.1f} ms, {imgs / single_s:.0f} images/s")
    print("x one run = R x (one run's step time) / (the group's step time): above 1, the group is faster than its "
          "runs one after another")
    if peak:
        print(f"peak: {peak:g} TFLOP/s (dense float32{' from --peak-tflops' if args.peak_tflops else ''})")
    print(f"load average at end: {os.getloadavg()}")
    return out


if __name__ == "__main__":
    main()
