"""Fault injection: kill -9 a tiny run, a tiny grid and an export at seeded random moments (and at the moments a
checkpoint, an atomic JSON write or a record append is under way), rerun the same command, and check that the
finished result equals the uninterrupted one and that no record is missing or duplicated.

``$OEFSMC_FAULT_TRIALS`` sets the number of trials per test. By default each test runs one trial per kind of
interruption it injects (a random moment, a checkpoint, an atomic JSON write, a record append: the first trials cycle
through them), which keeps CI short and still covers every kind once; a soak run sets it to 20 or more. Every trial
prints one line; the summary line of each test gives trials, interruptions and equal results.
"""

import concurrent.futures
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tiny_demo
from helpers import config_import, tiny_spec

from oefsmc_jax.models import init_variables
from oefsmc_jax.training.checkpoint import load_model, save_model

pytestmark = pytest.mark.slow

REPO = tiny_demo.REPO
TRIALS = int(os.environ.get("OEFSMC_FAULT_TRIALS", "0"))  # 0: one trial per kind of interruption
PARALLEL = 2  # trials are independent processes in their own folders: two at a time use both cores
INJECT = str(REPO / "tests" / "fault_inject.py")
RUN_KINDS = ("time", "ckpt", "json")  # a run appends no record
GRID_KINDS = ("time", "ckpt", "json", "append")
FAST = {**tiny_demo.OVERRIDES, "train.steps": 40, "train.ckpt_every": 10, "train.log_every": 20,
        "oe.eval_every": 10}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved random teacher (so no trial trains one); no persistent compilation cache unless a test names one
    (:func:`_own_cache`)."""
    root = tmp_path_factory.mktemp("faults")
    spec = tiny_spec()
    save_model(root / "teacher", spec, init_variables(spec, 8, 0))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OEFSMC_COMPILE_CACHE": "off",
           "OEFSMC_TCMALLOC": "0"}
    return root, env


def _own_cache(env, tmp_path):
    """``env`` with a persistent compilation cache of this test's own: its uninterrupted reference run compiles
    and writes it, its trials read it (a user's reruns do the same), so that every trial need not compile again
    and the trials also check that executables read from the cache compute what freshly compiled ones did."""
    return {**env, "OEFSMC_COMPILE_CACHE": str(tmp_path / "xla")}


def _warm_wall(wall, stderr):
    """The reference run's wall time less the compile times it printed: about how long a rerun that reads every
    executable from the cache runs, the window in which a timed kill lands."""
    compiled = sum(float(x) for x in re.findall(r"compiled in (\d+(?:\.\d+)?) s", stderr))
    return max(wall - compiled, 0.25 * wall)


def _run_args(workdir, teacher):
    flags = tiny_demo.flags({**FAST, "teacher.checkpoint": str(teacher)})
    return ["--config", f"{REPO / 'configs' / 'demo.py'}:per_class=5", "--workdir", str(workdir), *flags]


def _grid_file(root, teacher):
    path = root / "grid_config.py"
    path.write_text(f"""
import ml_collections
{config_import("demo")}

def get_config():
    base = demo.get_config("per_class=5")
    overrides = {dict(FAST)!r}
    for key, value in overrides.items():
        node = base
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return ml_collections.ConfigDict({{
        "title": "faults", "rho": 4.0, "base": base, "teacher_for_arch": {{"resnet8": {str(teacher)!r}}},
        "groups": [{{"name": "g", "method": ["kd"], "arch": ["resnet8"], "per_class": [3], "mode": ["exp"],
                    "seed": [0, 1], "arms": "base,oe"}}]}})
""")
    return path


def _python(args, env, timeout=600):
    t0 = time.time()
    done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)
    return done, time.time() - t0


def _counts(stderr):
    m = re.search(r"fault_inject: ckpt=(\d+) json=(\d+) append=(\d+)", stderr)
    assert m, stderr[-3000:]
    return dict(zip(("ckpt", "json", "append"), map(int, m.groups())))


def _kill_after(args, env, delay):
    proc = subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
    proc.communicate()
    return proc.returncode


def _interrupt(t, rng, kinds, counts, args, module, env, wall):
    """Trial ``t``'s seeded interruption: ('time', seconds) or (point, n); returns (what, killed?). Trial ``t`` takes
    the kind ``t`` modulo their number, so the first trials cover every kind; the moment within it is random."""
    usable = [k for k in kinds if k == "time" or counts[k] > 0]
    kind = usable[t % len(usable)]
    if kind == "time":
        delay = rng.uniform(0.2 * wall, 0.95 * wall)
        rc = _kill_after(["-m", module, *args], env, delay)
        return f"time {delay:.1f}s", rc == -signal.SIGKILL
    n = rng.randint(1, counts[kind])
    done, _ = _python([INJECT, f"{kind}:{n}", module, *args], env)
    return f"{kind}:{n}", done.returncode == -signal.SIGKILL


def _trials(name, trial, kinds):
    """Run ``trial(t, rng)`` for every trial (``$OEFSMC_FAULT_TRIALS``, else one per kind of interruption: ``kinds``),
    two at a time, each with its own seeded generator; asserts that at least half of them interrupted the command
    (the rest finished before the kill) after printing one line per trial."""
    trials = TRIALS or kinds
    with concurrent.futures.ThreadPoolExecutor(PARALLEL) as pool:
        outcomes = list(pool.map(lambda t: trial(t, random.Random(f"{name}-{t}")), range(trials)))
    for t, (what, was_killed) in enumerate(outcomes):
        print(f"{name} trial {t}: killed at {what} ({'interrupted' if was_killed else 'finished first'}); "
              "rerun equal")
    killed = sum(k for _, k in outcomes)
    print(f"fault injection, {name}: {trials} trials, {killed} interruptions, {trials} results equal")
    assert killed >= trials // 2, f"{name}: only {killed} of {trials} trials interrupted the command"


def _metric_lines(path):
    """(split, step) -> values without the timing fields, asserting that no (split, step) repeats."""
    out = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        key = (rec.pop("split"), rec.pop("step"))
        assert key not in out, f"{path}: {key} twice"
        out[key] = {k: v for k, v in rec.items() if k not in ("images_per_s", "time_s", "wall_s")}
    return out


def _same_run(ref, got):
    for arm in ("base", "oe"):
        a = json.loads((ref / arm / "result.json").read_text())
        b = json.loads((got / arm / "result.json").read_text())
        assert b["metrics"] == a["metrics"], arm
        assert b["steps"] == a["steps"] and b["best_step"] == a["best_step"], arm
        _, va, _ = load_model(ref / arm / "student")
        _, vb, _ = load_model(got / arm / "student")
        for x, y in zip(jax.tree.leaves(va), jax.tree.leaves(vb)):
            np.testing.assert_array_equal(x, y)
        assert _metric_lines(got / arm / "metrics.jsonl") == _metric_lines(ref / arm / "metrics.jsonl"), arm


def test_killed_runs_resume_to_the_uninterrupted_result(setup, tmp_path):
    root, env = setup
    env = _own_cache(env, tmp_path)
    ref = tmp_path / "ref"
    done, wall = _python([INJECT, "count", "oefsmc_jax", *_run_args(ref, root / "teacher")], env)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = _counts(done.stderr)
    wall = _warm_wall(wall, done.stderr)

    def trial(t, rng):
        work = tmp_path / f"t{t}"
        args = _run_args(work, root / "teacher")
        what, was_killed = _interrupt(t, rng, RUN_KINDS, counts, args, "oefsmc_jax", env, wall)
        again, _ = _python(["-m", "oefsmc_jax", *args], env)
        assert again.returncode == 0, (what, again.stderr[-3000:])
        assert "Traceback" not in again.stderr, (what, again.stderr[-3000:])
        _same_run(ref, work)
        return what, was_killed

    _trials("run", trial, len(RUN_KINDS))


def _records(path):
    recs = [json.loads(x) for x in path.read_text().splitlines() if x.strip().startswith("{") and x.endswith("}")]
    keys = [(r["cell"], r["arm"]) for r in recs]
    assert len(keys) == len(set(keys)), f"duplicated records: {sorted(keys)}"
    return {(r["cell"], r["arm"]): r["metrics"] for r in recs}


def test_killed_grids_resume_with_every_record_once(setup, tmp_path):
    root, env = setup
    env = _own_cache(env, tmp_path)
    grid = _grid_file(root, root / "teacher")
    args = lambda w: ["--config", str(grid), "--workdir", str(w)]  # noqa: E731
    ref = tmp_path / "ref"
    done, wall = _python([INJECT, "count", "oefsmc_jax.experiments", *args(ref)], env)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = _counts(done.stderr)
    wall = _warm_wall(wall, done.stderr)
    assert counts["append"] >= 1
    expected = _records(ref / "results.jsonl")
    assert len(expected) == 4

    def trial(t, rng):
        work = tmp_path / f"t{t}"
        what, was_killed = _interrupt(t, rng, GRID_KINDS, counts, args(work),
                                      "oefsmc_jax.experiments", env, wall)
        again, _ = _python(["-m", "oefsmc_jax.experiments", *args(work)], env)
        assert again.returncode == 0, (what, again.stderr[-3000:])
        assert "Traceback" not in again.stderr, (what, again.stderr[-3000:])
        assert _records(work / "results.jsonl") == expected, what
        return what, was_killed

    _trials("grid", trial, len(GRID_KINDS))


def test_killed_exports_leave_the_run_and_rerun_to_the_same_model(setup, tmp_path):
    root, env = setup
    run = tmp_path / "run"
    done, _ = _python(["-m", "oefsmc_jax", *_run_args(run, root / "teacher")], env)
    assert done.returncode == 0, done.stderr[-3000:]
    student = {p.relative_to(run): p.read_bytes() for p in (run / "oe").rglob("*") if p.is_file()}
    ref = tmp_path / "ref_export"
    export = lambda out: ["-m", "oefsmc_jax", "export", "--workdir", str(run), "--arm", "oe",  # noqa: E731
                          "--out", str(out)]
    done, wall = _python(export(ref), env)
    assert done.returncode == 0, done.stderr[-3000:]
    _, ref_vars, ref_meta = load_model(ref)

    def trial(t, rng):
        out = tmp_path / f"e{t}"
        if t % 2:
            what = "ckpt:1"
            d, _ = _python([INJECT, what, "oefsmc_jax", *export(out)[2:]], env)
            was_killed = d.returncode == -signal.SIGKILL
        else:
            delay = rng.uniform(0.3 * wall, 1.0 * wall)
            what = f"time {delay:.1f}s"
            was_killed = _kill_after(export(out), env, delay) == -signal.SIGKILL
        again, _ = _python(export(out) + (["--overwrite"] if out.exists() else []), env)
        assert again.returncode == 0, (what, again.stderr[-3000:])
        _, got_vars, got_meta = load_model(out)
        for x, y in zip(jax.tree.leaves(ref_vars), jax.tree.leaves(got_vars)):
            np.testing.assert_array_equal(x, y)
        assert got_meta["params"] == ref_meta["params"]
        return what, was_killed

    _trials("export", trial, 2)  # alternately at its checkpoint write and at a random moment
    assert {p.relative_to(run): p.read_bytes() for p in (run / "oe").rglob("*") if p.is_file()} == student
