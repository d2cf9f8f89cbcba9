"""metrics.jsonl after a resume holds every (split, step) once, as an uninterrupted run's does."""

import json

from oefsmc_jax.training.metric_writer import MetricWriter


def _lines(path):
    return [(r["split"], r["step"]) for r in map(json.loads, path.read_text().splitlines())]


def test_resumed_writer_drops_lines_past_the_checkpoint_and_a_torn_tail(tmp_path):
    w = MetricWriter(tmp_path)
    for step in (10, 20, 30):
        w.write(step, "train", {"loss": 1.0})
        w.write(step, "eval", {"agreement": 50.0})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 40, "split": "tr')  # killed mid-line
    w = MetricWriter(tmp_path, resume_step=20)  # the newest checkpoint is step 20
    assert _lines(tmp_path / "metrics.jsonl") == [("train", 10), ("eval", 10), ("train", 20), ("eval", 20)]
    w.write(30, "train", {"loss": 2.0})
    w.close()
    assert _lines(tmp_path / "metrics.jsonl")[-1] == ("train", 30)
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["loss"] == 2.0


def test_fresh_writer_over_a_killed_first_attempt_starts_empty_and_a_clean_file_is_not_rewritten(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 10, "split": "train", "loss": 1.0}\n')
    MetricWriter(tmp_path).close()  # no checkpoint was written: the run starts from step 0
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    (tmp_path / "metrics.jsonl").write_text('{"step": 10, "split": "train", "loss": 1.0}\n')
    before = (tmp_path / "metrics.jsonl").stat().st_ino
    MetricWriter(tmp_path, resume_step=10).close()
    assert (tmp_path / "metrics.jsonl").stat().st_ino == before
