"""Two local CPU processes (coordinator on 127.0.0.1, 2 simulated devices each) run the tiny demo end to end
(compress, fine-tune with OE-FSMC, evaluate) and match one process with 4 devices."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
import tiny_demo  # noqa: E402
from helpers import xla_flags

from oefsmc_jax.training.checkpoint import load_model

REPO = tiny_demo.REPO
OVERRIDES = {**tiny_demo.OVERRIDES, "teacher.steps": 10, "train.steps": 8, "train.log_every": 4,
             "train.ckpt_every": 4, "oe.eval_every": 4}


def _config():
    return tiny_demo.config(OVERRIDES)


def _flags():
    return tiny_demo.flags(OVERRIDES)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process_with_four_devices(tmp_path):
    from oefsmc_jax.run import run

    assert jax.device_count() == 4  # conftest: 4 simulated devices in this process
    ref = run(_config(), tmp_path / "one")
    work = tmp_path / "two"
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": xla_flags(2)}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "oefsmc_jax", "--config", f"{REPO / 'configs' / 'demo.py'}:per_class=5",
         "--workdir", str(work), "--multihost", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
         f"--process_id={i}", *_flags()], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for i in range(2)]
    outs = [p.communicate(timeout=900)[0].decode() for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert "run: 4 device(s)" in outs[0] and "run: 4 device(s)" in outs[1]
    for arm in ("base", "oe"):
        got = json.loads((work / arm / "result.json").read_text())
        assert got["metrics"]["top1"] == ref["arms"][arm]["metrics"]["top1"], arm
        assert got["metrics"]["per_class"] == ref["arms"][arm]["metrics"]["per_class"], arm
        _, a, _ = load_model(tmp_path / "one" / arm / "student")
        _, b, _ = load_model(work / arm / "student")
        # the same program; only the order of the cross-process float sums (gloo) differs
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
    # only process 0 writes: one metrics stream, one report
    lines = (work / "oe" / "metrics.jsonl").read_text().splitlines()
    assert len([ln for ln in lines if json.loads(ln)["split"] == "train"]) == 2
    assert (work / "report.md").exists()
