"""Memory and step time as the OOD pool grows: host-fed batches (``train.host_batches``) against a pool on the device.

For each pool size and image size, a fresh process (so its peak memory is its own) builds an OOD pool file on disk
(``np.lib.format.open_memmap``; random bytes at 32x32, a sparse file of zeros at 224x224, which costs no disk), a
few-sample ID set and a ResNet student and teacher, and trains ``--steps`` OE-FSMC KD steps with
``oefsmc_jax.training.loop.finetune_one``, in one of two modes:

* ``host``: ``StepConfig.host_batches``: each step's images are drawn and gathered on the host from the memmap
  (``training/feed.py``) and only those reach the device;
* ``device``: the whole pool replicated on every device, the step drawing from it (the package's default for pools
  under ``train.device_pool_mb``).

* ``pipeline``: the command line's path before training (``data.prepare.prepare_data`` with the pool as an
  uncompressed ``.npz``, the real CIFAR-10 few-sample set of ``../shared/data``, then the teacher's pass over the
  candidates and the teacher-complement selection, ``--rule``): the pool stays on disk, memory-mapped, and is read
  in chunks (32x32 only: the npz is written in full, no sparse file).

It prints, per run: the peak resident host memory of the process (``VmHWM``), the bytes of live JAX arrays at
the end (on a GPU also the device's ``peak_bytes_in_use``), and the median step time. Needs no PyTorch.

    python -m benchmarks.ood_scaling                                  # 32x32: 10k, 100k, 1M; 224x224: 10k, 100k, 1M
    python -m benchmarks.ood_scaling --sizes 10000 100000 --res 32 --modes host,device
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def make_pool(path: pathlib.Path, n: int, res: int, seed: int = 0) -> None:
    """An ``[n, res, res, 3]`` uint8 .npy file: random bytes at 32x32, a sparse file of zeros otherwise."""
    import numpy as np

    if path.exists():
        return
    tmp = path.with_suffix(".tmp.npy")
    pool = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, res, res, 3))
    if res <= 32:
        rng = np.random.default_rng(seed)
        for i in range(0, n, 65536):
            pool[i:i + 65536] = rng.integers(0, 256, pool[i:i + 65536].shape, dtype=np.uint8)
    pool.flush()
    del pool
    os.replace(tmp, path)


def peak_rss_mib() -> float:
    """Peak resident memory of this process image: ``VmHWM`` (reset by ``exec``, unlike ``ru_maxrss``, which a
    child started from a big parent inherits), else ``ru_maxrss``."""
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_npz_pool(npy: pathlib.Path, path: pathlib.Path) -> None:
    """``path``: an uncompressed npz holding the ``.npy`` pool as ``x`` (streamed: never in memory whole)."""
    import zipfile

    import numpy as np

    if path.exists():
        return
    src = np.load(npy, mmap_mode="r")
    tmp = path.with_suffix(".tmp.npz")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z, \
            z.open("x.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(src[:0]) | {
            "shape": src.shape})
        for i in range(0, len(src), 65536):
            f.write(np.ascontiguousarray(src[i:i + 65536]).tobytes())
    os.replace(tmp, path)


def worker_pipeline(args: argparse.Namespace) -> dict:
    """The command line's data path on a pool of ``args.size`` images, in this process."""
    import jax
    import jax.numpy as jnp
    import ml_collections

    from oefsmc_jax.config_defaults import sibling

    cifar10 = sibling(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                                   "cifar10.py"), "cifar10")

    from oefsmc_jax.data.prepare import prepare_data
    from oefsmc_jax.models import build_model, cifar_resnet_spec
    from oefsmc_jax.oe.arms import data_needs
    from oefsmc_jax.oe.selection import select
    from oefsmc_jax.teacher import teacher_pool_probs
    from oefsmc_jax.training.parallel import make_mesh

    c = cifar10.get_config("method=kd,per_class=10,rho=10")
    c.arms = "oe" if args.rule == "random" else "oe_complement"  # random: no teacher pass, the chosen images only
    c.data.ood = ml_collections.ConfigDict({"kind": "npz", "path": args.pool, "image_size": 32})
    spec = cifar_resnet_spec(args.depth, 10)
    t_vars = jax.device_get(build_model(spec).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        data = prepare_data(c, pathlib.Path(tmp), data_needs(c))
        t1 = time.perf_counter()
        ood = data.ood
        if args.rule != "random":
            probs = teacher_pool_probs(c, pathlib.Path(tmp), make_mesh(None), (spec, t_vars), data.candidates,
                                       hashes=data.candidate_hashes)
            ood = data.candidates.take(select(args.rule, probs, data.counts, c.oe.selection_factor).indices)
        t2 = time.perf_counter()
    return {"mode": "pipeline", "res": 32, "size": args.size, "peak_rss_mib": peak_rss_mib(),
            "live_array_mib": sum(a.nbytes for a in jax.live_arrays()) / 2**20, "device_peak_mib": None,
            "prepare_s": t1 - t0, "teacher_s": t2 - t1, "selected": len(ood),
            "pool_gib": args.size * 32 * 32 * 3 / 2**30}


def worker(args: argparse.Namespace) -> dict:
    """One measurement in this process."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np

    from oefsmc_jax.methods import KD
    from oefsmc_jax.models import build_model, cifar_resnet_spec, l1_prune, shrink
    from oefsmc_jax.oe import complementary
    from oefsmc_jax.training.loop import finetune_one
    from oefsmc_jax.training.parallel import make_mesh, replicate
    from oefsmc_jax.training.step import StepConfig, StepData
    from oefsmc_jax.training.train import LoopConfig, RunJob

    res, n = args.res, args.size
    pool = np.load(args.pool, mmap_mode="r")
    assert pool.shape == (n, res, res, 3), pool.shape
    rng = np.random.default_rng(1)
    counts = np.array([50, 39, 30, 23, 18, 14, 11, 8, 6, 5]) // (1 if res <= 32 else 5) + 1
    y = np.repeat(np.arange(10), counts).astype(np.int32)
    x = rng.integers(0, 256, (len(y), res, res, 3), dtype=np.uint8)
    spec = cifar_resnet_spec(args.depth, 10)
    t_vars = jax.device_get(build_model(spec).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))
    s_spec, s_vars = shrink(*l1_prune(spec, t_vars, 0.5))
    gamma = np.asarray(complementary.complementary_distribution(jnp.asarray(counts)), np.float32)
    host = StepData(x_id=x, y_id=y, x_ood=pool, id_probs=None, gamma=gamma,
                    reg_weights=np.asarray(complementary.class_weights(jnp.asarray(gamma)), np.float32))
    mesh = make_mesh(None)
    host_mode = args.mode == "host"
    data = host if host_mode else jax.tree.map(lambda a: replicate(np.asarray(a), mesh), host)
    batch = args.batch if res <= 32 else max(2, args.batch // 8)  # 49x the pixels per image at 224x224
    cfg = StepConfig(batch_id=batch, batch_ood=batch, pad=4 if res <= 32 else 16,
                     mean=(0.5,) * 3, std=(0.25,) * 3, host_batches=host_mode)
    times: list[float] = []
    last = [time.perf_counter()]

    def log(line: str) -> None:
        if " step " in line and "/" in line:
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now

    with tempfile.TemporaryDirectory() as tmp:
        job = RunJob(name="scaling", workdir=pathlib.Path(tmp), mesh=mesh, spec=s_spec,
                     variables=jax.device_get(s_vars), recipe=KD((0.5,) * 3).recipe(), teacher_spec=spec,
                     teacher_variables=t_vars, data=data, step_cfg=cfg,
                     optim_cfg={"name": "sgd", "lr": 0.01, "momentum": 0.9, "schedule": "constant"},
                     loop=dataclasses.replace(LoopConfig(steps=args.steps), log_every=1, ckpt_every=10 ** 9),
                     seed=0)
        finetune_one(job, log)
    live = sum(a.nbytes for a in jax.live_arrays())
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    step_ms = 1000 * statistics.median(times[2:] or times)  # the first steps include the compile
    return {"mode": args.mode, "res": res, "size": n, "peak_rss_mib": peak_rss_mib(), "live_array_mib": live / 2**20,
            "device_peak_mib": (stats or {}).get("peak_bytes_in_use", 0) / 2**20 if stats else None,
            "step_ms": step_ms, "pool_gib": pool.nbytes / 2**30}


def main(argv: list[str] | None = None) -> None:
    """Run every (resolution, size, mode) in its own process and print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--res", type=int, nargs="+", default=[32, 224])
    p.add_argument("--modes", default="host,device",
                   help="host, device (skipped above --device-max), pipeline (32x32 only)")
    p.add_argument("--device-max", type=float, default=4.0, help="largest pool (GiB) tried in device mode")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=32, help="ID and OOD images per step (each; 1/8 of it at 224x224)")
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--pool-dir", default=None, help="where the pool files go (default: a temporary folder)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--pool", default=None, help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="host", help=argparse.SUPPRESS)
    p.add_argument("--rule", default="teacher_complement", choices=["teacher_complement", "random"],
                   help="pipeline mode: the selection rule (random: the paper's, no teacher pass)")
    a = p.parse_args(argv)
    if a.worker:
        a.res = a.res[0]
        print("RESULT " + json.dumps(worker_pipeline(a) if a.mode == "pipeline" else worker(a)), flush=True)
        return
    modes = [m for m in a.modes.split(",") if m]
    pool_dir = pathlib.Path(a.pool_dir or tempfile.mkdtemp(prefix="ood_scaling_"))
    pool_dir.mkdir(parents=True, exist_ok=True)
    print(f"host CPUs {os.cpu_count()}, load average {os.getloadavg()}; {a.steps} steps of {a.batch} + {a.batch} "
          f"images (1/8 at 224x224), ResNet-{a.depth} teacher and half-width student; pool files "
          f"{'in --pool-dir (kept)' if a.pool_dir else 'in a temporary folder (deleted at the end)'}")
    rows = []
    for res in a.res:
        for n in a.sizes:
            path = pool_dir / f"pool_{res}_{n}.npy"
            make_pool(path, n, res)
            for mode in modes:
                gib = n * res * res * 3 / 2**30
                if mode == "pipeline":
                    if res > 32:
                        print(f"{res}x{res} {n:,} pipeline: skipped (the npz would be written in full)")
                        continue
                    make_npz_pool(path, path.with_suffix(".npz"))
                if mode == "device" and gib > a.device_max:
                    print(f"{res}x{res} {n:,} {mode}: skipped ({gib:.1f} GiB pool > --device-max {a.device_max})")
                    continue
                pool_file = path.with_suffix(".npz") if mode == "pipeline" else path
                cmd = [sys.executable, __file__, "--worker", "--pool", str(pool_file), "--size", str(n), "--res",
                       str(res), "--mode", mode, "--steps", str(a.steps), "--batch", str(a.batch), "--depth",
                       str(a.depth), "--rule", a.rule]
                out = subprocess.run(cmd, capture_output=True, text=True)
                line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
                if out.returncode or not line:
                    print(f"{res}x{res} {n:,} {mode}: failed ({out.stderr.strip().splitlines()[-1:]})")
                    continue
                r = json.loads(line[0][7:])
                rows.append(r)
                if mode == "pipeline":
                    print(f"{res}x{res} pool {n:>9,} ({r['pool_gib']:.2f} GiB) pipeline: peak host RSS "
                          f"{r['peak_rss_mib']:,.0f} MiB, prepare_data {r['prepare_s']:.1f} s, teacher pass + "
                          f"selection {r['teacher_s']:.1f} s ({r['selected']} images chosen)", flush=True)
                    continue
                print(f"{res}x{res} pool {n:>9,} ({r['pool_gib']:.2f} GiB) {mode:<6}: peak host RSS "
                      f"{r['peak_rss_mib']:,.0f} MiB, live arrays {r['live_array_mib']:,.1f} MiB, step "
                      f"{r['step_ms']:.0f} ms" + (f", device peak {r['device_peak_mib']:,.0f} MiB"
                                                   if r["device_peak_mib"] else ""), flush=True)
    if not a.pool_dir:
        for f in [*pool_dir.glob("*.npy"), *pool_dir.glob("*.npz")]:
            f.unlink()
        pool_dir.rmdir()
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
