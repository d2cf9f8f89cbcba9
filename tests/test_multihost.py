"""Two local CPU processes (coordinator on 127.0.0.1, 2 simulated devices each) run the tiny demo end to end
(compress, fine-tune with OE-FSMC, evaluate) and match one process with 4 devices."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from oefsmc_jax.training.checkpoint import load_model

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))
import demo  # noqa: E402

OVERRIDES = {
    "data.image_size": 8, "data.id.image_size": 8, "data.test.image_size": 8, "data.ood.image_size": 8,
    "data.ood.num_images": 600, "data.pad": 1, "arch.widths": (4, 8, 8), "teacher.steps": 10,
    "teacher.batch_size": 64, "train.steps": 8, "train.batch_id": 16, "train.batch_ood": 16,
    "train.log_every": 4, "train.ckpt_every": 4, "oe.heldout": 100, "oe.eval_every": 4, "oe.patience": 100,
    "eval.latency": False,
}


def _config():
    c = demo.get_config("per_class=5")
    for key, value in OVERRIDES.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def _flags():
    return [f"--config.{k}=({','.join(map(str, v))},)" if isinstance(v, tuple) else f"--config.{k}={v}"
            for k, v in OVERRIDES.items()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process_with_four_devices(tmp_path):
    from oefsmc_jax.pipeline import run

    assert jax.device_count() == 4  # conftest: 4 simulated devices in this process
    ref = run(_config(), tmp_path / "one")
    work = tmp_path / "two"
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
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
