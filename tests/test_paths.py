"""The path layer (oefsmc_jax/paths.py): local semantics kept, and a gs:// workdir served through etils.epath.

The object store is simulated with ``etils.epath.testing.mock_epath``: every epath backend call on
``gs://oefsmc-test/...`` is redirected into a local folder. Anything that bypassed the layer (``open``, ``os.replace``,
``np.save`` on the path string) would write a local ``gs:`` folder in the working directory instead, which the
tests check for. Orbax checkpoints are not part of this simulation (tensorstore talks to GCS on its own); they go
through the same ``epath`` paths and are tested on local paths by the rest of the suite.
"""

from __future__ import annotations

import contextlib
import json
import os

import numpy as np
import pytest
from etils.epath import testing as epath_testing
from helpers import tiny_spec

from oefsmc_jax import paths

BUCKET = "gs://oefsmc-test"


@contextlib.contextmanager
def fake_bucket(root):
    """Serve ``gs://oefsmc-test/...`` from ``root`` for every epath call."""

    def remap(p):
        s = os.fspath(p) if isinstance(p, (str, os.PathLike)) else p
        return str(root) + s[len(BUCKET):] if isinstance(s, str) and s.startswith(BUCKET) else p

    def redirect(orig, path, *args, **kwargs):
        return orig(remap(path), *[remap(a) for a in args], **kwargs)

    names = ("copy", "exists", "glob", "isdir", "listdir", "makedirs", "mkdir", "open", "remove", "rename",
             "replace", "rmtree", "stat", "walk")
    root.mkdir(parents=True, exist_ok=True)
    with epath_testing.mock_epath(**dict.fromkeys(names, redirect)):
        yield


def test_local_helpers_keep_os_semantics(tmp_path):
    p = paths.as_path(tmp_path / "a" / "b.txt")
    assert paths.is_local(p) and str(p) == str(tmp_path / "a" / "b.txt")
    paths.write_text_atomic(p, "one\n")
    paths.append_text(p, "two\n")
    assert (tmp_path / "a" / "b.txt").read_text() == "one\ntwo\n"
    assert sorted(f.name for f in (tmp_path / "a").iterdir()) == ["b.txt"]  # no temporary left behind
    paths.save_npy(tmp_path / "x.npy", np.arange(6).reshape(2, 3))
    m = paths.load_npy(tmp_path / "x.npy", mmap=True)
    assert isinstance(m, np.memmap) and m.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert paths.local_file(tmp_path / "x.npy") == str(tmp_path / "x.npy")
    paths.rmtree(tmp_path / "a")
    paths.rmtree(tmp_path / "a")  # missing: no error
    assert not (tmp_path / "a").exists()
    assert str(paths.as_path("rel/dir")) == os.path.abspath("rel/dir")
    assert not paths.is_local("gs://b/x") and str(paths.as_path("gs://b/x/y")) == "gs://b/x/y"


def test_unreachable_object_store_fails_early_in_one_line(tmp_path, monkeypatch):
    import ml_collections

    from oefsmc_jax.run import run

    def broken(orig, path, *a, **k):
        raise ConnectionError("no route to storage.googleapis.com\nmore detail")

    with epath_testing.mock_epath(exists=broken):
        with pytest.raises(ValueError) as e:
            paths.check_reachable("gs://nowhere/run", "--workdir")
        with pytest.raises(ValueError, match=r"^--workdir gs://nowhere/x: cannot reach it \(ConnectionError"):
            run(ml_collections.ConfigDict({}), "gs://nowhere/x")  # before any config field is read
    msg = str(e.value)
    assert msg.startswith("--workdir gs://nowhere/run: cannot reach it (ConnectionError: no route to "
                          "storage.googleapis.com); gs:// paths need the gcsfs package") and "\n" not in msg
    paths.check_reachable(tmp_path, "--workdir")  # local: nothing to check


def test_a_gs_workdir_goes_through_the_layer(tmp_path, monkeypatch):
    from oefsmc_jax.evaluation import write_report
    from oefsmc_jax.experiments.runner import _append, read_results
    from oefsmc_jax.training.metric_writer import MetricWriter

    monkeypatch.chdir(tmp_path)  # a write that bypassed the layer would create ./gs:/...
    root = tmp_path / "bucket"
    with fake_bucket(root):
        run = paths.as_path(f"{BUCKET}/runs/r1")
        paths.write_text_atomic(run / "config.json", json.dumps({"a": 1}))
        paths.append_text(run / "log.txt", "one\n")
        paths.append_text(run / "log.txt", "two\n")  # no append on an object store: read, extend, rewrite
        paths.save_npy(run / "cache" / "p.npy", np.eye(2, dtype=np.float32))
        loaded = paths.load_npy(run / "cache" / "p.npy", mmap=True)  # remote: read into memory, not mapped
        _append(run / "results.jsonl", [{"cell": "c0", "arm": "base"}])
        _append(run / "results.jsonl", [{"cell": "c0", "arm": "oe"}])
        records = read_results(run / "results.jsonl")
        w = MetricWriter(run / "base")
        w.write(1, "train", {"loss": 2.5})
        w.write(2, "train", {"loss": 1.5})
        w.close()
        report = write_report(run, {"title": "t", "class_names": ["a", "b"], "train_counts": [3, 1],
                                    "arms": {"base": {"top1": 50.0, "per_class": [60.0, 40.0], "n": 10}}})
        local = paths.local_file(run / "cache" / "p.npy")
    assert not (tmp_path / "gs:").exists()
    base = root / "runs" / "r1"
    assert json.loads((base / "config.json").read_text()) == {"a": 1}
    assert (base / "log.txt").read_text() == "one\ntwo\n"
    assert not isinstance(loaded, np.memmap) and loaded.tolist() == [[1, 0], [0, 1]]
    assert [r["arm"] for r in records] == ["base", "oe"]
    assert [json.loads(x)["loss"] for x in (base / "base" / "metrics.jsonl").read_text().splitlines()] == [2.5, 1.5]
    assert list((base / "base" / "tensorboard").glob("events.out.tfevents.*"))
    assert str(report) == f"{BUCKET}/runs/r1/report.md" and (base / "report.md").read_text().startswith("# t")
    assert (base / "per_class_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert local != str(base / "cache" / "p.npy") and np.load(local).tolist() == [[1, 0], [0, 1]]


@pytest.mark.slow
def test_teacher_pool_cache_on_a_gs_workdir(tmp_path, monkeypatch):
    import ml_collections

    from oefsmc_jax.data import ImageSet
    from oefsmc_jax.models import init_variables
    from oefsmc_jax.teacher import teacher_pool_probs
    from oefsmc_jax.training.parallel import make_mesh

    monkeypatch.chdir(tmp_path)
    c = ml_collections.ConfigDict({"oe": {"cache_dir": ""}, "eval": {"batch_size": 64},
                                   "data": {"mean": (0.5,) * 3, "std": (0.25,) * 3},
                                   "cpu_fusion": "", "cpu_wgrad": ""})
    spec = tiny_spec()
    pool = ImageSet(np.random.default_rng(0).integers(0, 256, (70, 16, 16, 3), dtype=np.uint8),
                    np.full(70, -1, np.int32), "pool")
    t = (spec, init_variables(spec, 16, 0))
    local = teacher_pool_probs(c, tmp_path / "local", make_mesh(1), t, pool)
    with fake_bucket(tmp_path / "bucket"):
        remote = teacher_pool_probs(c, paths.as_path(f"{BUCKET}/w"), make_mesh(1), t, pool)
        again = teacher_pool_probs(c, paths.as_path(f"{BUCKET}/w"), make_mesh(1), t, pool)
    assert not (tmp_path / "gs:").exists()
    files = list((tmp_path / "bucket" / "w" / "cache").iterdir())
    assert [f.name for f in files] == [next((tmp_path / "local" / "cache").glob("pool_probs_*.npy")).name]
    np.testing.assert_array_equal(np.asarray(remote), np.asarray(local))
    np.testing.assert_array_equal(np.asarray(again), np.asarray(local))
