"""End to end: the demo pipeline on a tiny model, exact report metrics, and resume after a SIGTERM (SIGKILL at
random moments: test_faults.py)."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tiny_demo  # noqa: E402

from oefsmc_jax.evaluation import classification_metrics
from oefsmc_jax.models import build_model
from oefsmc_jax.training.checkpoint import load_model
from oefsmc_jax.training.parallel import make_mesh
from oefsmc_jax.training.step import make_predict

pytestmark = pytest.mark.slow  # every test here is an end-to-end run

REPO = tiny_demo.REPO
OVERRIDES = tiny_demo.OVERRIDES
tiny_config = tiny_demo.config
_flags = tiny_demo.flags


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from oefsmc_jax.run import run

    workdir = tmp_path_factory.mktemp("run")
    return workdir, run(tiny_config(), workdir)


def test_run_writes_results_report_and_plot(finished_run):
    workdir, out = finished_run
    for arm in ("base", "oe"):
        res = json.loads((workdir / arm / "result.json").read_text())
        assert res["steps"] == 400
        assert res["metrics"]["top1"] == out["arms"][arm]["metrics"]["top1"]
    report = (workdir / "report.md").read_text()
    assert "| KD + OE-FSMC |" in report and "| Teacher " in report
    from oefsmc_jax.evaluation.report import format_percent
    row = next(line for line in report.splitlines() if line.startswith("| KD + OE-FSMC |"))
    assert row.split("|")[2].strip() == format_percent(out["arms"]["oe"]["metrics"]["top1"])
    assert (workdir / "per_class_accuracy.png").stat().st_size > 1000
    subset = json.loads((workdir / "subset.json").read_text())
    assert sum(subset["counts"]) == len(subset["id_indices"]) == 49
    assert len(subset["ood_indices"]) == 10 * max(subset["counts"]) - 49
    assert set(subset["ood_indices"]).isdisjoint(subset["heldout_indices"])
    lines = [json.loads(x) for x in (workdir / "oe" / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["split"] == "train"]
    assert [x["step"] for x in train] == [100, 200, 300, 400]
    assert all({"loss", "base", "jd", "lr", "images_per_s"} <= set(x) for x in train)
    assert not any("reg" in x for x in train)  # KD's own OE-FSMC settings have R off
    assert [x["step"] for x in lines if x["split"] == "eval"] == [50, 100, 150, 200, 250, 300, 350, 400]
    assert list((workdir / "oe" / "tensorboard").glob("events.out.tfevents.*"))


def test_reported_metrics_are_exactly_those_of_the_exported_student(finished_run):
    from oefsmc_jax.data import load_source

    workdir, out = finished_run
    cfg = tiny_config()
    test = load_source(cfg.data.test)
    counts = np.array(json.loads((workdir / "subset.json").read_text())["counts"])
    for arm in ("base", "oe"):
        spec, variables, meta = load_model(workdir / arm / "student")
        assert meta["arm"] == arm
        predict = make_predict(make_mesh(), build_model(spec), cfg.data.mean, cfg.data.std, 64)
        pred = np.argmax(predict(variables, test.x)["logits"], -1)
        expected = classification_metrics(pred, test.y, 10, counts)
        got = out["arms"][arm]["metrics"]
        for key in ("top1", "balanced", "many", "medium", "few", "per_class"):
            assert got[key] == pytest.approx(expected[key], abs=1e-9), key
    # the student is really smaller than the teacher
    t_spec, _, _ = load_model(workdir / "teacher" / "model")
    s_spec, _, _ = load_model(workdir / "oe" / "student")
    from oefsmc_jax.models import count_params

    assert count_params(s_spec) < 0.7 * count_params(t_spec)


def test_rerun_reuses_finished_arms(finished_run, capfd):
    from oefsmc_jax.run import run

    workdir, out = finished_run
    before = (workdir / "oe" / "result.json").read_text()
    again = run(tiny_config(), workdir)
    assert (workdir / "oe" / "result.json").read_text() == before
    assert again["arms"]["oe"]["metrics"] == out["arms"]["oe"]["metrics"]
    assert "finished earlier; reusing" in capfd.readouterr().err


def _demo_command(workdir):
    """The tiny demo as a command line (the same run as ``finished_run``) and its environment, with a compilation
    cache of the test's own: the interrupted run writes it and its rerun reads it, as a user's would."""
    return ([sys.executable, "-m", "oefsmc_jax", "--config", f"{REPO / 'configs' / 'demo.py'}:per_class=5",
             "--workdir", str(workdir), *_flags()],
            {**os.environ, "PYTHONPATH": str(REPO), "OEFSMC_COMPILE_CACHE": str(workdir.parent / "xla")})


def _start_until_first_checkpoint(cmd, env, cwd, ckpt_dir):
    """Start the run in a subprocess and return it once its first fine-tuning checkpoint exists."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpt_dir.exists() and any(p.name.isdigit() for p in ckpt_dir.iterdir()):
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    return proc


def _assert_same_students(ref_dir, got_dir):
    for arm in ("base", "oe"):
        _, ref, _ = load_model(ref_dir / arm / "student")
        _, got, _ = load_model(got_dir / arm / "student")
        for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_sigterm_checkpoints_exits_75_and_resumes_to_identical_parameters(finished_run, tmp_path):
    """What a preempted TPU VM or a cluster does: SIGTERM, then the same command again."""
    workdir_ref, _ = finished_run
    workdir = tmp_path / "preempted"
    cmd, env = _demo_command(workdir)
    proc = _start_until_first_checkpoint(cmd, env, tmp_path, workdir / "base" / "checkpoints")
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 75, out[-3000:]
    assert "SIGTERM received" in out and "preempted: checkpoint written at step" in out
    assert not (workdir / "base" / "result.json").exists()
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[base] resumed from step" in done.stderr
    _assert_same_students(workdir_ref, workdir)


def test_workdir_of_a_different_subset_is_refused(finished_run):
    from oefsmc_jax.errors import ConfigError
    from oefsmc_jax.run import run

    workdir, _ = finished_run
    c = tiny_config()
    c.subset.seed = 7
    before = (workdir / "subset.json").read_text()
    with pytest.raises(ConfigError, match=r"holds a run of another config: subset.seed \(0 -> 7\)"):
        run(c, workdir)
    # without its config.json (e.g. written by an older version) the subset check still refuses it
    cfg = (workdir / "config.json").read_text()
    (workdir / "config.json").unlink()
    try:
        with pytest.raises(ConfigError, match="holds a run on a different few-sample or OOD subset"):
            run(c, workdir)
    finally:
        (workdir / "config.json").write_text(cfg)
    assert (workdir / "subset.json").read_text() == before
