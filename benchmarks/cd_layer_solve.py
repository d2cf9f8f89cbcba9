"""Cross Distillation's layer solve: the im2col-Gram gradient (default) against autodiff through the convs.

Prints ms per Adam step of ``oefsmc_jax.methods.cd_solver.cd_solve_layer`` for the three ResNet-20 conv shapes
(stages 1-3, 128 calibration images), both gradients side by side in one run, and their ratio. The Gram is built
once per layer and is included in the gram figure (amortised over ``--iters`` steps).

    python -m benchmarks.cd_layer_solve              # ~1 minute on a 2-core CPU
    python -m benchmarks.cd_layer_solve --iters 300 --rounds 3
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    """Time both gradients on each shape and print a table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=30, help="Adam steps per timed solve")
    ap.add_argument("--rounds", type=int, default=2, help="timed solves per gradient (the minimum is printed)")
    ap.add_argument("--images", type=int, default=128)
    a = ap.parse_args()
    import jax

    from oefsmc_jax.methods.cd_solver import CDSolveConfig, LayerProblem, cd_solve_layer

    print(f"device: {jax.devices()[0].device_kind}, {a.images} images, {a.iters} Adam steps per solve")
    print("| input (h=w, C) | gram ms/step | conv ms/step | conv / gram |")
    print("| --- | --- | --- | --- |")
    rng = np.random.default_rng(0)
    for hw, c in [(32, 16), (16, 32), (8, 64)]:
        w_t = rng.normal(0, 0.1, (3, 3, c, c)).astype(np.float32)
        xt = rng.normal(0, 1, (a.images, hw, hw, c)).astype(np.float32)
        xs = (xt + rng.normal(0, 0.1, xt.shape)).astype(np.float32)
        w0 = (w_t + rng.normal(0, 0.05, w_t.shape)).astype(np.float32)
        ms = {}
        for g in ("gram", "conv"):
            def solve(w0=w0, w_t=w_t, xs=xs, xt=xt, keep=c // 2 + 1, g=g) -> None:
                cfg = CDSolveConfig(iters=a.iters, lr=1e-3, mu=0.9, gradient=g)
                cd_solve_layer(w0, LayerProblem(w_t, xs, xt), keep=keep, config=cfg).w.block_until_ready()
            solve()  # compile
            best = float("inf")
            for _ in range(a.rounds):
                t = time.perf_counter()
                solve()
                best = min(best, time.perf_counter() - t)
            ms[g] = 1e3 * best / a.iters
        print(f"| {hw}, {c} | {ms['gram']:.2f} | {ms['conv']:.1f} | {ms['conv'] / ms['gram']:.0f}x |")


if __name__ == "__main__":
    main()
