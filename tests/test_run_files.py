"""Files a run wrote and reads back: a damaged cache is recomputed, a damaged subset record is named, what early
stopping would have kept is recorded beside the result."""

import json

import numpy as np
import pytest
import tiny_demo
from helpers import tiny_spec
from test_selection import _demo_config

from oefsmc_jax.data import ImageSet
from oefsmc_jax.data.prepare import prepare_data
from oefsmc_jax.models import init_variables
from oefsmc_jax.oe.arms import data_needs
from oefsmc_jax.teacher import teacher_pool_probs
from oefsmc_jax.training.parallel import make_mesh
from oefsmc_jax.workdir_guards import check_same_subset


@pytest.mark.parametrize("damage", ["truncated", "empty", "other_shape"])
def test_a_damaged_pool_cache_is_computed_again(tmp_path, capfd, damage):
    c = _demo_config("oe_complement")
    c.data.image_size = 16
    spec = tiny_spec()
    pool = ImageSet(np.random.default_rng(0).integers(0, 256, (300, 16, 16, 3), dtype=np.uint8),
                    np.full(300, -1, np.int32), "pool")
    mesh, teacher = make_mesh(1), (spec, init_variables(spec, 16, 0))
    first = np.array(teacher_pool_probs(c, tmp_path, mesh, teacher, pool))
    cache, = (tmp_path / "cache").glob("pool_probs_*.npy")
    data = cache.read_bytes()
    if damage == "other_shape":
        np.save(cache, np.zeros((3, 10), np.float32))
    else:
        cache.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    capfd.readouterr()
    again = teacher_pool_probs(c, tmp_path, mesh, teacher, pool)
    err = capfd.readouterr().err
    assert f"the cached pool probabilities {cache} are unreadable" in err and "computing them again" in err
    np.testing.assert_array_equal(again, first)
    assert cache.read_bytes() == data


def test_a_damaged_subset_record_is_named(tmp_path):
    c = _demo_config("base")
    data = prepare_data(c, tmp_path, data_needs(c))
    (tmp_path / "subset.json").write_text('{"counts": [1, 2')
    with pytest.raises(ValueError, match=r"subset\.json is not valid JSON \(truncated or corrupt\?\)"):
        check_same_subset(tmp_path / "subset.json", data.subset, ood=False)


@pytest.mark.slow
def test_tracked_best_is_recorded_beside_the_final_result(tmp_path):
    """``oe.track_best``: every arm trains its whole budget and reports its last weights; beside them it records the
    step early stopping would have kept (the best held-out agreement before it would have stopped), where it would
    have stopped, and that student's test metrics."""
    from oefsmc_jax.run import run

    over = {**tiny_demo.OVERRIDES, "teacher.steps": 10, "train.steps": 24, "train.log_every": 8,
            "train.ckpt_every": 8, "oe.eval_every": 2, "oe.patience": 2, "oe.early_stopping": False,
            "oe.track_best": True, "oe.early_stopping_arms": "all", "arms": "base,oe"}
    out = run(tiny_demo.config(over), tmp_path)
    for arm, r in out["arms"].items():
        t = r["tracked_best"]
        assert (r["steps"], r["best_step"], r["stopped_early"]) == (24, 24, False), arm
        evals = [json.loads(x) for x in (tmp_path / arm / "metrics.jsonl").read_text().splitlines()]
        evals = [e for e in evals if e["split"] == "eval"]
        last = t["stop_step"] or 24
        assert [e["step"] for e in evals] == list(range(2, last + 1, 2)), arm  # none after the stop
        best = max(e["heldout_agreement"] for e in evals)
        assert t["heldout_agreement"] == pytest.approx(best)
        assert t["step"] == min(e["step"] for e in evals if e["heldout_agreement"] == best)
        assert t["stop_step"] in (None, t["step"] + 2 * 2)
        assert 0 <= t["metrics"]["top1"] <= 100 and len(t["metrics"]["per_class"]) == 10
        assert json.loads((tmp_path / arm / "result.json").read_text())["tracked_best"] == t
