"""Run ``python -m oefsmc_jax`` (or ``oefsmc_jax.experiments``, or ``export``) and SIGKILL the process at a chosen
moment: the fault-injection tests' way to hit the few milliseconds in which a file is being written.

usage: python tests/fault_inject.py POINT[:N] MODULE ARGS...

MODULE is ``oefsmc_jax`` or ``oefsmc_jax.experiments``; ARGS are that command's arguments. POINT is one of

- ``count``: run to the end, then print how often each point below was reached (``fault_inject: ckpt=.. ...``);
- ``ckpt:N``: the N-th checkpoint save (training state or a model) was issued and is being written: die a random
  0-30 ms later, usually before Orbax has finalised it;
- ``json:N``: the N-th atomic write (``config.json``, ``subset.json``, ``result.json``, caches): half of the
  temporary file is written, it is not yet renamed;
- ``append:N``: the N-th append to a grid's ``results.jsonl``: half of the new lines are on disk.

Everything is patched at class or module level before the command starts, so the code under test is the real one.
"""

from __future__ import annotations

import atexit
import collections
import os
import random
import runpy
import signal
import sys

COUNTS: collections.Counter = collections.Counter()


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _hit(point: str, target: tuple[str, int]) -> bool:
    COUNTS[point] += 1
    return target[0] == point and COUNTS[point] == target[1]


def install(target: tuple[str, int]) -> None:
    """Wrap the write points; the ``target`` one kills the process."""
    from oefsmc_jax import paths
    from oefsmc_jax.experiments import runner
    from oefsmc_jax.training import checkpoint

    save = checkpoint.Checkpointer.save

    def save_and_maybe_die(self, *args, **kwargs):
        out = save(self, *args, **kwargs)
        if _hit("ckpt", target):
            import time

            time.sleep(random.Random(target[1]).uniform(0.0, 0.03))
            _die()
        return out

    checkpoint.Checkpointer.save = save_and_maybe_die

    write = paths.write_bytes_atomic

    def write_and_maybe_die(path, data):
        if _hit("json", target):
            tmp = paths.tmp_sibling(paths.as_path(path))
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data[: len(data) // 2])
            _die()
        return write(path, data)

    paths.write_bytes_atomic = write_and_maybe_die

    append = runner._append

    def append_and_maybe_die(path, records):
        if _hit("append", target):
            import json

            text = "".join(json.dumps(r, default=str) + "\n" for r in records)
            with open(os.fspath(path), "a") as f:
                f.write(text[: len(text) // 2])
                f.flush()
                os.fsync(f.fileno())
            _die()
        return append(path, records)

    runner._append = append_and_maybe_die


def main() -> None:
    point, module, *args = sys.argv[1:]
    name, _, n = point.partition(":")
    target = (name, int(n) if n else 0)
    install(target)
    if name == "count":
        atexit.register(lambda: print("fault_inject: " + " ".join(f"{k}={COUNTS[k]}" for k in
                                                                   ("ckpt", "json", "append")),
                                      file=sys.stderr, flush=True))
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
