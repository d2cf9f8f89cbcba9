"""SIGTERM and SIGINT as a scheduler or a user sends them: the flag and its exit codes, the compression stages and
the teacher's pool pass stopping at their next unit boundary, and (slow) the command line under real signals."""

import os
import signal
import subprocess
import sys
import threading
import time
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tiny_demo
from helpers import tiny_spec

from oefsmc_jax.data import ImageSet
from oefsmc_jax.methods import CD, FSKD, CompressionContext, MiR
from oefsmc_jax.methods import cd as cd_module
from oefsmc_jax.methods import fskd as fskd_module
from oefsmc_jax.methods import practise as practise_module
from oefsmc_jax.methods.base import Method
from oefsmc_jax.models import build_model
from oefsmc_jax.oe.calibration import calibration_set
from oefsmc_jax.training import preemption

K, SIZE = 10, 8
SPEC = tiny_spec(8, K)
SPEC14 = tiny_spec(14, K)  # PRACTISE needs droppable blocks: s0b1, s1b1, s2b1
MEAN, STD = (0.5,) * 3, (0.25,) * 3


@pytest.fixture(autouse=True)
def _clean_flag():
    preemption.clear()
    yield
    preemption.clear()


def _variables(spec, seed=0):
    """Random variables of ``spec``'s shapes, drawn with numpy (no compile)."""
    shapes = jax.eval_shape(lambda: build_model(spec).init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)),
                                                           train=False))
    rng = np.random.default_rng(seed)

    def draw(path, sd):
        if path[0].key == "masks" or path[-1].key in ("scale", "var"):
            return np.ones(sd.shape, np.float32)
        return rng.normal(0, 0.1, sd.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _ctx(spec, variables):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(K), 2).astype(np.int32)
    cal = calibration_set(rng.integers(0, 256, (len(y), SIZE, SIZE, 3), dtype=np.uint8), y, K)
    return CompressionContext(spec, variables, cal, MEAN, STD, jax.random.PRNGKey(0), batch_size=16,
                              log=lambda s: None)


def _no_forward(monkeypatch):
    """Activations without a compiled forward: zeros, as wide as the BatchNorm a point names (CD's conv inputs are
    not read by its stand-in solver)."""
    def activations(self, spec, variables, points, *, x=None, train=False, edits=None, keep=None):
        out = {}
        for point in keep or points:
            node = variables["params"]
            for name in point.split(":")[0].split("/"):
                node = node[name]
            width = node["scale"].shape[0] if "scale" in node else 1
            out[point] = np.zeros((len(self.calibration), 1, 1, width), np.float32)
        return out

    monkeypatch.setattr(CompressionContext, "activations", activations)


def _requesting(calls, result):
    """A stand-in for one unit of work: records the call, asks the process to stop, returns ``result(*args)``."""
    def unit(*args, **kwargs):
        calls.append(1)
        preemption.request()
        return result(*args, **kwargs)

    return unit


# ------------------------------------------------------------------------------------------------ the flag itself
def test_check_raises_only_after_request_and_names_the_stage():
    preemption.check("anything")  # no request: nothing happens
    preemption.request()
    with pytest.raises(preemption.Preempted, match=r"^preempted during cd, 3 of 9 layers done; rerun the same"):
        preemption.check("cd, 3 of 9 layers done")
    with preemption.stage("[oe]", "compression", "rerun the same command to restart this arm's compression"):
        with pytest.raises(preemption.Preempted) as e:
            preemption.check("cd, 6 of 19 layers done")
    assert str(e.value) == ("[oe] preempted during compression (cd, 6 of 19 layers done); rerun the same command "
                            "to restart this arm's compression")
    # the stage is per thread: another thread's check does not carry this thread's label
    out = []
    with preemption.stage("[oe]", "compression", "hint"):
        t = threading.Thread(target=lambda: out.append(pytest.raises(preemption.Preempted, preemption.check, "x")))
        t.start()
        t.join()
    assert str(out[0].value).startswith("preempted during x")


def _deliver(sig):
    os.kill(os.getpid(), sig)
    deadline = time.time() + 5
    while not preemption.requested() and time.time() < deadline:  # the handler runs at the next bytecode
        time.sleep(0.001)


def test_sigint_then_sigterm_set_the_flag_once_and_exit_130(capfd):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with preemption.handle_signals():
        _deliver(signal.SIGINT)
        assert preemption.requested() and preemption.exit_code() == preemption.EXIT_INTERRUPTED == 130
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert preemption.exit_code() == 130  # the first signal decides
    err = capfd.readouterr().err.splitlines()
    assert err == ["preemption: SIGINT received; stopping after the current step or unit of work",
                   "preemption: SIGTERM received; already stopping; finishing the checkpoint"]
    # left normally: the previous handlers are back
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_stopping_process_keeps_its_handlers_and_exit_75(capfd):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(preemption.Preempted):
            with preemption.handle_signals():
                _deliver(signal.SIGTERM)
                preemption.check("a unit")
        assert preemption.exit_code() == preemption.EXIT_PREEMPTED == 75
        # left by the exception after a signal: a later signal is only reported, never the default action
        assert signal.getsignal(signal.SIGTERM) is preemption._on_signal
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert preemption.exit_code() == 75
        assert "SIGINT received; already stopping" in capfd.readouterr().err
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])


# ------------------------------------------------------------------------------ compression stops at a boundary
def test_cd_stops_at_the_first_layer_boundary(monkeypatch):
    _no_forward(monkeypatch)
    calls = []
    monkeypatch.setattr(cd_module, "cd_solve_layer", _requesting(calls, lambda w_s, problem, keep, config:
                        types.SimpleNamespace(w=w_s, in_mask=np.ones(w_s.shape[2]), loss_init=0.0, loss_final=0.0)))
    method = CD(0.5, CD.from_config({"prune_ratio": 0.5, "cd": {"iters": 2}}, SPEC).params)
    n = len(cd_module.cd_plan(SPEC, 0.5))
    with pytest.raises(preemption.Preempted, match=f"cd, 1 of {n} layers done"):
        method.compress(_ctx(SPEC, _variables(SPEC)))
    assert len(calls) == 1


def test_fskd_stops_at_the_first_correction_boundary(monkeypatch):
    _no_forward(monkeypatch)
    calls = []
    monkeypatch.setattr(fskd_module, "weighted_lstsq", _requesting(
        calls, lambda z, t, w: np.zeros((z.shape[-1], t.shape[-1]), np.float32)))
    monkeypatch.setattr(fskd_module, "fold_bn_correction", lambda spec, variables, conv, bn, q: (spec, variables))
    with pytest.raises(preemption.Preempted, match=r"fskd, 1 of \d+ corrections done"):
        FSKD((0.5,) * 3).compress(_ctx(SPEC, _variables(SPEC)))
    assert len(calls) == 1


def test_practise_stops_at_the_first_candidate_boundary(monkeypatch):
    calls = []
    monkeypatch.setattr(practise_module, "adapted_features", lambda *a, **k: None)
    monkeypatch.setattr(practise_module, "weighted_feature_mse", lambda *a, **k: 1.0)
    monkeypatch.setattr(practise_module, "fit", _requesting(calls, lambda loss_fn, params, data, **kw:
                                                            (params, np.ones(2, np.float32))))
    p = practise_module.PractiseParams(k=1, fit_steps=2, pad=0, flip=False)
    with pytest.raises(preemption.Preempted, match="practise, 1 of 3 candidate blocks scored"):
        practise_module.PRACTISE(p).compress(_ctx(SPEC14, _variables(SPEC14)))
    assert len(calls) == 1


def test_compress_checks_between_stages(monkeypatch):
    ran = []

    def stage(name, request=False):
        def run(spec, variables, ctx):
            ran.append(name)
            if request:
                preemption.request()
            return spec, variables
        return run

    class TwoStages(Method):
        name = "two"

        def stages(self, spec):
            return (stage("first", request=True), stage("second"))

    with pytest.raises(preemption.Preempted, match="two, 1 of 2 stages done"):
        TwoStages().compress(_ctx(SPEC, _variables(SPEC)))
    assert ran == ["first"]
    # MiR (L1 pruning only) asked to stop before it starts: no stage runs
    from oefsmc_jax.methods import mir as mir_module

    monkeypatch.setattr(mir_module, "l1_prune_stage", lambda *a, **k: stage("l1"))
    ran.clear()
    preemption.request()
    with pytest.raises(preemption.Preempted, match="mir, 0 of 1 stages done"):
        MiR().compress(_ctx(SPEC, _variables(SPEC)))
    assert ran == []


def test_teacher_pool_pass_stops_at_a_chunk_and_the_rerun_redoes_it(monkeypatch, tmp_path):
    from oefsmc_jax import teacher as teacher_mod

    calls = []

    def predict_fn(*args):
        def predict(variables, x):
            calls.append(len(x))
            if len(calls) == 1:
                preemption.request()
            return {"logits": np.zeros((len(x), K), np.float32)}
        return predict

    monkeypatch.setattr(teacher_mod, "predict_fn", predict_fn)
    cfg = ml_collections.ConfigDict({"data": {"mean": MEAN, "std": STD}, "eval": {"batch_size": 16},
                                     "oe": {"cache_dir": str(tmp_path / "cache")},
                                     "cpu_fusion": "", "cpu_wgrad": ""})
    rng = np.random.default_rng(0)
    pool = ImageSet(rng.integers(0, 256, (10, SIZE, SIZE, 3), dtype=np.uint8), np.full(10, -1, np.int32), "pool")
    teacher = (SPEC, _variables(SPEC))
    with pytest.raises(preemption.Preempted, match=r"the teacher's pool pass \(4 of 10 images done\)"):
        teacher_mod.teacher_pool_probs(cfg, tmp_path, None, teacher, pool, chunk=4)
    assert calls == [4] and not list((tmp_path / "cache").glob("pool_probs_*.npy"))
    preemption.clear()
    calls.clear()
    calls.append(0)  # the rerun's predict does not ask to stop
    probs = teacher_mod.teacher_pool_probs(cfg, tmp_path, None, teacher, pool, chunk=4)
    assert calls == [0, 4, 4, 2]  # every chunk computed again: nothing of the stopped pass is reused
    np.testing.assert_allclose(np.asarray(probs), 1.0 / K)


# ------------------------------------------------------------------------------ the command line, real signals
def _demo(workdir):
    cmd = [sys.executable, "-m", "oefsmc_jax", "--config", f"{tiny_demo.REPO / 'configs' / 'demo.py'}:per_class=5",
           "--workdir", str(workdir), *tiny_demo.flags()]
    # a compilation cache of the test's own: the interrupted run writes it, its rerun reads it, as a user's would
    return cmd, {**os.environ, "PYTHONPATH": str(tiny_demo.REPO), "OEFSMC_COMPILE_CACHE": str(workdir.parent / "xla")}


class _Run:
    """The tiny demo in a subprocess, its combined output collected by a thread."""

    def __init__(self, workdir, cwd):
        cmd, env = _demo(workdir)
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")),
                                        daemon=True)
        self._reader.start()

    def wait_for(self, cond, what):
        deadline = time.time() + 300
        while time.time() < deadline and self.proc.poll() is None and not cond():
            time.sleep(0.02)
        assert self.proc.poll() is None, f"ended before {what}:\n" + "".join(self.lines)[-3000:]

    def finish(self):
        self.proc.wait(timeout=300)
        self._reader.join(timeout=10)
        return self.proc.returncode, "".join(self.lines)


def _first_checkpoint(workdir):
    ck = workdir / "base" / "checkpoints"
    return lambda: ck.exists() and any(p.name.isdigit() for p in ck.iterdir())


@pytest.mark.slow
def test_second_sigterm_during_the_save_keeps_exit_75(tmp_path):
    run = _Run(tmp_path / "w", tmp_path)
    run.wait_for(_first_checkpoint(tmp_path / "w"), "the first checkpoint")
    run.proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    run.proc.send_signal(signal.SIGTERM)
    rc, out = run.finish()
    assert rc == 75, out[-3000:]
    assert "preemption: SIGTERM received; already stopping; finishing the checkpoint" in out
    assert "Traceback" not in out and out.rstrip().endswith("(exit code 75)")


@pytest.mark.slow
def test_sigint_exits_130_in_one_line_and_the_rerun_resumes_from_its_checkpoint(tmp_path):
    run = _Run(tmp_path / "w", tmp_path)
    run.wait_for(_first_checkpoint(tmp_path / "w"), "the first checkpoint")
    run.proc.send_signal(signal.SIGINT)
    rc, out = run.finish()
    assert rc == 130, out[-3000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out
    tail = out.rstrip().splitlines()
    assert tail[-1].startswith("[base] preempted: checkpoint written at step ") and tail[-1].endswith("(exit code 130)")
    step = int(tail[-1].split("at step ")[1].split()[0])
    again = _Run(tmp_path / "w", tmp_path)
    again.wait_for(lambda: any("[base] resumed from step" in ln for ln in again.lines), "resuming")
    again.proc.send_signal(signal.SIGTERM)  # resuming is what this test checks; the rest of the run is not needed
    rc, out = again.finish()
    assert f"[base] resumed from step {step}" in out and rc == 75, out[-3000:]
