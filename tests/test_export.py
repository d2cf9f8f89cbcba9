"""Export of a run's student (masked -> physically smaller), load_compressed, the export CLI, and the cost helpers."""

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import run_cli, tiny_spec

import oefsmc_jax
from oefsmc_jax.data.augment import normalize
from oefsmc_jax.export import export_student, load_compressed
from oefsmc_jax.models import build_model, count_flops, count_params, drop_blocks, l1_prune
from oefsmc_jax.models.latency import latency_cost, measure_latency, traced_macs, xla_flops
from oefsmc_jax.training.checkpoint import load_model, save_model

K, SIZE = 10, 8
SPEC = tiny_spec(8, K)  # one block per stage; only s0b0 has an identity shortcut
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
REPO = pathlib.Path(__file__).resolve().parents[1]


def _random_variables(spec, rng):
    """Variables of ``build_model(spec)`` filled with numpy draws (no init compile): He-normal kernels, BN scale
    and bias and running statistics far from the identity, masks and gates one."""
    x = jnp.zeros((1, SIZE, SIZE, 3))
    shapes = jax.eval_shape(lambda: build_model(spec).init(jax.random.PRNGKey(0), x, train=False))

    def fill(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if path[0].key == "masks":
            return np.ones(shape, np.float32)
        if name == "kernel":
            return rng.normal(0, np.sqrt(2.0 / (np.prod(shape[:-2], dtype=int) * shape[-1])), shape).astype(np.float32)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 2.0, shape).astype(np.float32)
        return rng.normal(0, 0.5, shape).astype(np.float32)  # BN bias, running mean, dense bias

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A fake finished run: config.json, the teacher in teacher/model, arm 'oe' with a MASKED student (l1_prune +
    one dropped block), arm 'base' started but unfinished."""
    root = tmp_path_factory.mktemp("export")
    wd = root / "myrun"
    (wd / "base" / "compressed").mkdir(parents=True)
    rng = np.random.default_rng(0)
    v = _random_variables(SPEC, rng)
    spec, masked = l1_prune(SPEC, v, 0.5)
    spec, masked = drop_blocks(spec, masked, [(0, 0)])
    cfg = {"arms": "base,oe", "data": {"mean": list(MEAN), "std": list(STD), "image_size": SIZE},
           "method": {"name": "kd"}, "teacher": {"checkpoint": ""}}
    (wd / "config.json").write_text(json.dumps(cfg))
    save_model(wd / "teacher" / "model", SPEC, v)
    save_model(wd / "oe" / "student", spec, masked, {"arm": "oe", "method": "kd"})
    return wd, spec, jax.device_get(masked)


def test_export_shrinks_and_logits_match_the_masked_model(run_dir, tmp_path):
    wd, spec, masked = run_dir
    out = tmp_path / "small"
    meta = export_student(wd, "oe", out)
    small, variables, saved = load_model(out)
    assert saved == json.loads(json.dumps(meta))  # what export returns is what it wrote
    assert meta["preprocessing"] == {"scale": 1 / 255, "mean": list(MEAN), "std": list(STD), "image_size": SIZE,
                                     "in_channels": 3}
    assert (meta["arm"], meta["method"], meta["source"]) == ("oe", "kd", {"workdir": "myrun", "arm": "oe"})
    assert str(tmp_path) not in json.dumps(meta) and str(wd.parent) not in json.dumps(meta)  # no machine paths
    # physically smaller: the kept blocks' inner widths halved (8 -> 4), s0b0 removed (its spec widths are moot)
    assert small.inner_widths[1:] == (((4,),), ((4,),)) and small.kept == ((False,), (True,), (True,))
    assert "s0b0" not in variables["params"] and variables["params"]["s1b0"]["conv1"]["kernel"].shape == (3, 3, 4, 4)
    assert meta["params"] == count_params(small) < meta["params_before_shrink"] == count_params(SPEC)
    assert meta["macs"] == count_flops(small, SIZE) < count_flops(SPEC, SIZE)
    assert meta["teacher"] == {"name": "model", "params": count_params(SPEC), "macs": count_flops(SPEC, SIZE)}

    predict = load_compressed(out, batch_size=4)
    assert oefsmc_jax.load_compressed is load_compressed
    x = np.random.default_rng(1).integers(0, 256, (10, SIZE, SIZE, 3), dtype=np.uint8)
    want = np.asarray(build_model(spec).apply(masked, normalize(x, MEAN, STD), train=False)["logits"])
    got = predict(x)
    assert got.dtype == np.float32 and got.shape == (10, K)
    assert np.abs(want).max() > 0.1 and np.abs(got - want).max() <= 1e-4
    np.testing.assert_allclose(predict(x[:3]), want[:3], atol=1e-4)  # another N: padded, same executable
    assert predict.traces == 1
    assert predict(x[:0]).shape == (0, K)
    with pytest.raises(ValueError, match=r"^expected uint8 images of shape \[N, 8, 8, 3\], got uint8 array of "
                                         r"shape \[2, 8, 8, 1\]$"):
        predict(x[:2, :, :, :1])
    with pytest.raises(ValueError, match=r"expected uint8 images of shape \[N, 8, 8, 3\], got float32"):
        predict(x.astype(np.float32))
    # OUT now exists: refused without overwrite
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        export_student(wd, "oe", out)


def test_export_errors_name_what_is_missing(run_dir, tmp_path):
    wd, _, _ = run_dir
    with pytest.raises(ValueError, match=r"arm 'nope' does not exist in .*myrun; its arms: base, oe "
                                         r"\(finished: oe\)"):
        export_student(wd, "nope", tmp_path / "o")
    with pytest.raises(FileNotFoundError, match=r"arm 'base' has not finished: .*base/student does not exist "
                                                r"\(finished arms: oe\)"):
        export_student(wd, "base", tmp_path / "o")
    bare = tmp_path / "bare"
    (bare / "oe").mkdir(parents=True)
    (bare / "notes.txt").write_text("")
    with pytest.raises(FileNotFoundError, match=r"bare has no config.json, so it is not a run directory "
                                                r"\(it holds: notes.txt, oe\)$"):
        export_student(bare, "oe", tmp_path / "o")
    with pytest.raises(FileNotFoundError, match=r"run directory .*missing does not exist"):
        export_student(tmp_path / "missing", "oe", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_cli_export_end_to_end(run_dir, tmp_path):
    wd, _, _ = run_dir
    out = tmp_path / "cli_out"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    env.pop("XLA_FLAGS", None)
    r = run_cli(["export", "--workdir", str(wd), "--arm", "oe", "--out", str(out)], env=env, timeout=300,
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (out / "0").is_dir() and load_model(out)[2]["arm"] == "oe"
    small = load_model(out)[0]
    p, m, tp, tm = count_params(small), count_flops(small, SIZE), count_params(SPEC), count_flops(SPEC, SIZE)
    assert f"teacher: {tp:,} params, {tm / 1e6:,.2f}M MACs  [model]" in r.stdout
    assert f"student: {p:,} params, {m / 1e6:,.2f}M MACs ({p / tp:.1%} / {m / tm:.1%} of the teacher)" in r.stdout
    assert r.stderr.count("\n") <= 1  # nothing but (at most) one warning line


def test_latency_cost_and_flop_counts(run_dir):
    assert latency_cost(SPEC, None, SIZE, "macs") == float(count_flops(SPEC, SIZE)) == 43856.0
    with pytest.raises(ValueError, match=r"^latency mode must be one of measure, macs; got 'fast'$"):
        latency_cost(SPEC, None, SIZE, "fast")
    ms = latency_cost(SPEC, run_dir[2], SIZE, "measure", batch=2)  # median ms of 10 timed passes
    assert isinstance(ms, float) and 0 < ms < 5000
    with pytest.raises(ValueError, match="need repeats >= 1"):
        measure_latency(SPEC, run_dir[2], SIZE, repeats=0)
    # the traced program's conv + dense MACs equal the analytic count (which counts taps over the zero padding)
    assert traced_macs(SPEC, SIZE) == count_flops(SPEC, SIZE)
    # without the padding taps, by hand: a 3x3/1 conv on 8x8 has 22 in-image taps per axis (6*3 + 2*2), a 3x3/2
    # on 8 -> 4 has 11, 3x3/1 on 4x4: 10, 3x3/2 on 4 -> 2: 5, 3x3/1 on 2x2: 4
    by_hand = 22**2 * 3 * 4 + 2 * 22**2 * 4 * 4 + 11**2 * 4 * 8 + 10**2 * 8 * 8 + 5**2 * 8 * 8 + 4**2 * 8 * 8 + 80
    assert traced_macs(SPEC, SIZE, count_padding=False) == by_hand == 34272
    # XLA: 2 FLOPs per in-image MAC plus the elementwise ops (BN, ReLU, masks, residual adds, pooling)
    flops = xla_flops(SPEC, run_dir[2], SIZE)  # masked, so the full spec's shapes
    assert 2 * by_hand < flops < 1.2 * 2 * by_hand


@pytest.mark.slow
def test_save_model_replaces_a_model_left_by_a_killed_run(tmp_path):
    """A run killed after saving its student but before writing its result saves the student again on resume."""
    from oefsmc_jax.models import init_variables

    spec = tiny_spec()
    a = init_variables(spec, 8, 0)
    b = init_variables(spec, 8, 1)
    save_model(tmp_path / "student", spec, a, {"arm": "oe"})
    save_model(tmp_path / "student", spec, b, {"arm": "oe", "again": True})
    spec2, got, meta = load_model(tmp_path / "student")
    assert spec2 == spec and meta["again"] is True
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]  # no temporary folder left behind
