"""Provenance of records: git commit and dirty flag, versions, and paths made portable."""

import re

from oefsmc_jax.provenance import code_version, portable, versions


def test_portable_paths_name_their_root():
    cfg = {"data": {"id": {"path": "/mnt/d/shared/data/cifar10_train.npz"}, "names": ["/mnt/d/shared/data/x.npz"]},
           "teacher": "/mnt/d/shared/data/teachers/r20.npz", "oe": {"cache_dir": "/runs/g/cache"}, "n": 3,
           "other": "/elsewhere/file", "near": "/mnt/d/shared/database.npz"}
    out = portable(cfg, {"data": "/mnt/d/shared/data", "workdir": "/runs/g"})
    assert out == {"data": {"id": {"path": "<data>/cifar10_train.npz"}, "names": ["<data>/x.npz"]},
                   "teacher": "<data>/teachers/r20.npz", "oe": {"cache_dir": "<workdir>/cache"}, "n": 3,
                   "other": "/elsewhere/file", "near": "/mnt/d/shared/database.npz"}


def test_code_version_and_versions():
    code = code_version()
    assert set(code) == {"git_commit", "git_dirty"}
    assert code["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", code["git_commit"])
    v = versions()
    assert re.fullmatch(r"\d+\.\d+\.\d+", v["python"]) and v["jax"] and v["flax"]


def test_committed_results_hold_no_machine_paths():
    """Every committed record, summary and log under docs/results names paths relative to a root, never a path of
    the machine that ran it (a home, /tmp, /work, a mounted drive)."""
    import pathlib

    results = pathlib.Path(__file__).resolve().parent.parent / "docs" / "results"
    machine = re.compile(r"(?<![\w<>.])/(?:home|root|tmp|work|mnt|Users|opt|var/folders)/")
    files = [p for p in results.rglob("*") if p.suffix in {".jsonl", ".log", ".md", ".json"}]
    assert len(files) >= 10, files
    bad = {str(p.relative_to(results)): m.group(0) for p in files
           if (m := machine.search(p.read_text(encoding="utf-8", errors="replace")))}
    assert not bad, f"machine paths in committed results: {bad}"


def test_an_arm_keeps_the_commit_that_started_training_it(tmp_path):
    """The first start of an arm writes the commit of the training code; a resumed arm keeps it, and an arm folder
    begun by code that did not write it gets an unknown commit, never the current one."""
    import json

    from oefsmc_jax.workdir_guards import trained_commit

    path = tmp_path / "cell" / "oe" / "trained_commit.json"
    first = trained_commit(path)
    assert first == code_version() and json.loads(path.read_text()) == first
    path.write_text(json.dumps({"git_commit": "a" * 40, "git_dirty": False}))  # as if trained at another commit
    assert trained_commit(path) == {"git_commit": "a" * 40, "git_dirty": False}
    older = tmp_path / "cell" / "base"
    older.mkdir()
    (older / "checkpoints").mkdir()
    assert trained_commit(older / "trained_commit.json") == {"git_commit": None, "git_dirty": None}


def test_host_cpu_names_the_model_and_vector_extension(monkeypatch, tmp_path):
    from oefsmc_jax import provenance

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
                       "model name\t: AMD EPYC\nflags\t\t: fpu sse4_2 avx avx2 avx512f\n\nprocessor\t: 1\n"
                       "model name\t: ignored\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: real_open(cpuinfo if p == "/proc/cpuinfo" else p, *a, **k))
    provenance.host_cpu.cache_clear()
    try:
        assert provenance.host_cpu() == "AMD EPYC, family 25 model 17, avx512"
    finally:
        provenance.host_cpu.cache_clear()
