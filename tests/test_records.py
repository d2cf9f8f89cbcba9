"""Grid records that survive torn writes, arm results that may be empty or torn, and nonsense on the grid command
line: each refused in one line, or skipped with one line and redone."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from helpers import config_import, run_cli
from test_paths import BUCKET, fake_bucket  # a test module beside this one

from oefsmc_jax import paths
from oefsmc_jax.experiments import read_results, summarize
from oefsmc_jax.experiments.runner import _append
from oefsmc_jax.workdir_guards import finished_result

A = {"cell": "a", "arm": "base", "metrics": {"top1": 50.0}}
B_BASE = {"cell": "b", "arm": "base", "metrics": {"top1": 41.5}}
B_OE = {"cell": "b", "arm": "oe", "metrics": {"top1": 43.25}}
TORN = '{"cell": "b", "arm": "base", "metr'


def _line(r: dict) -> str:
    return json.dumps(r) + "\n"


def test_torn_last_line_is_named_kept_and_the_next_append_stays_readable(tmp_path, capfd):
    p = tmp_path / "results.jsonl"
    p.write_text(_line(A) + TORN)
    assert read_results(p) == [A]
    assert capfd.readouterr().err == f"{p} line 2 is torn or not JSON; skipped (its cell will be rerun)\n"
    # the resumed grid appends the cell's records: they start on a line of their own, the torn bytes stay
    _append(paths.as_path(p), [B_BASE, B_OE])
    assert p.read_text() == _line(A) + TORN + "\n" + _line(B_BASE) + _line(B_OE)
    assert read_results(p) == [A, B_BASE, B_OE]
    assert capfd.readouterr().err == f"{p} line 2 is torn or not JSON; skipped (its cell will be rerun)\n"


def test_append_to_a_whole_file_adds_no_blank_line_and_creates_a_missing_one(tmp_path):
    p = paths.as_path(tmp_path / "results.jsonl")
    _append(p, [A])
    _append(p, [B_BASE])
    _append(p, [])
    assert p.read_text() == _line(A) + _line(B_BASE)


@pytest.mark.parametrize("bad", [b"42", b"{}", b'{"cell": "a"}', b"\xff\xfe garbage", b"[1, 2"])
def test_lines_that_are_no_record_are_skipped_by_number(tmp_path, capfd, bad):
    p = tmp_path / "results.jsonl"
    p.write_bytes(_line(A).encode() + b"\n" + bad + b"\n" + _line(B_OE).encode())
    assert read_results(p) == [A, B_OE]  # the blank line 2 is no record and no error
    assert capfd.readouterr().err == f"{p} line 3 is torn or not JSON; skipped (its cell will be rerun)\n"


def test_append_on_an_object_store_also_starts_after_a_torn_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with fake_bucket(tmp_path / "bucket"):
        p = paths.as_path(f"{BUCKET}/w/results.jsonl")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(_line(A) + TORN)
        _append(p, [B_BASE])
        assert read_results(p) == [A, B_BASE]
    assert (tmp_path / "bucket" / "w" / "results.jsonl").read_text() == _line(A) + TORN + "\n" + _line(B_BASE)
    assert not (tmp_path / "gs:").exists()  # nothing bypassed the path layer


@pytest.mark.parametrize("content", [b"", b'{"arm": "oe", "metrics": {"top1": 4', b"\x00\x00\x00", b"[]",
                                     b'{"arm": "oe"}'])
def test_empty_or_torn_result_json_means_the_arm_is_not_finished(tmp_path, capfd, content):
    f = tmp_path / "oe" / "result.json"
    f.parent.mkdir()
    f.write_bytes(content)
    assert finished_result(paths.as_path(f)) is None
    assert capfd.readouterr().err == (f"note: {f} is empty, torn or not a result; the arm counts as not finished "
                                      "and runs again\n")
    assert f.read_bytes() == content  # left for the rerun to overwrite atomically


def test_finished_or_missing_result_json(tmp_path, capfd):
    f = paths.as_path(tmp_path / "result.json")
    assert finished_result(f) is None
    f.write_text(json.dumps({"arm": "oe", "metrics": {"top1": 43.25}, "steps": 3}))
    assert finished_result(f) == {"arm": "oe", "metrics": {"top1": 43.25}, "steps": 3}
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("content", [None, "", TORN])
def test_summarize_without_records_writes_nothing(tmp_path, content):
    results = tmp_path / "results.jsonl"
    if content is not None:
        results.write_text(content)
    with pytest.raises(ValueError, match=rf"^{results}: no grid records to summarize \(the file is missing, empty or "
                                         r"unreadable\); run the grid first$"):
        summarize(results, tmp_path / "summary")
    assert not (tmp_path / "summary").exists()
    with pytest.raises(FileNotFoundError, match=rf"^--also {tmp_path}/nope.jsonl: no such results file$"):
        summarize(results, tmp_path / "summary", also=(tmp_path / "nope.jsonl",))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return run_cli(args, module="oefsmc_jax.experiments")


GRID = f"""
import ml_collections
{config_import("demo")}


def get_config():
    return ml_collections.ConfigDict({{
        "title": "t", "rho": 4.0, "base": demo.get_config(), "teacher_for_arch": {{}},
        "groups": [{{"name": "g", "method": ["kd"], "arch": ["resnet8"], "per_class": [3], "mode": ["exp"],
                     "seed": [0, 1], "arms": "base,oe"}},
                   {{"name": "h", "method": ["bp"], "arch": ["resnet8"], "per_class": [3], "mode": ["exp"],
                     "seed": [0], "arms": "base"}}]}})
"""


def test_cli_unknown_group_or_cell_is_one_line_before_anything_is_written(tmp_path):
    (tmp_path / "grid.py").write_text(GRID)
    w = tmp_path / "w"
    p = _cli("--config", str(tmp_path / "grid.py"), "--workdir", str(w), "--only", "NO_SUCH_GROUP")
    assert p.returncode == 2, p.stderr
    assert p.stderr == "error: --only 'NO_SUCH_GROUP': no such group in this grid config; groups: g, h\n"
    p = _cli("--config", str(tmp_path / "grid.py"), "--workdir", str(w), "--only", "g", "--cell", "NOPE")
    assert p.returncode == 2, p.stderr
    assert p.stderr == ("error: --cell 'NOPE': no such cell of group 'g' in this grid config; cells: "
                        "kd-resnet8-n3-exp-s0, kd-resnet8-n3-exp-s1\n")
    p = _cli("--config", str(tmp_path / "grid.py"), "--workdir", str(w), "--cell",
             "kd-resnet8-n3-exp-s1,bp-resnet8-n3-exp-s9")
    assert p.returncode == 2, p.stderr
    assert p.stderr == ("error: --cell 'bp-resnet8-n3-exp-s9': no such cell in this grid config; cells: "
                        "kd-resnet8-n3-exp-s0, kd-resnet8-n3-exp-s1, bp-resnet8-n3-exp-s0\n")
    assert not w.exists()


@pytest.mark.slow
def test_cli_summarize_without_records_or_with_a_missing_also_file(tmp_path):
    (tmp_path / "results.jsonl").write_text("")
    p = _cli("summarize", "--workdir", str(tmp_path))
    assert p.returncode == 2, p.stderr
    assert p.stderr == (f"error: {tmp_path}/results.jsonl: no grid records to summarize (the file is missing, empty "
                        "or unreadable); run the grid first\n")
    (tmp_path / "results.jsonl").write_text(_line(A))
    p = _cli("summarize", "--workdir", str(tmp_path), "--also", str(tmp_path / "nope.jsonl"))
    assert p.returncode == 2, p.stderr
    assert p.stderr == f"error: --also {tmp_path}/nope.jsonl: no such results file\n"
    assert sorted(os.listdir(tmp_path)) == ["results.jsonl"]  # no summary folder
