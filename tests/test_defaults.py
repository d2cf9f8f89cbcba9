"""Every method runs with its defaults; empty splits and sources are refused before any work."""


import numpy as np
import pytest
import tiny_demo  # noqa: E402

from oefsmc_jax.config_validation import validate
from oefsmc_jax.methods import METHODS

REPO = tiny_demo.REPO
# the tiny demo with the step budgets cut; every method's own hyper-parameters stay at their defaults except the
# number of inner iterations of the two methods that have one
FAST = {**tiny_demo.OVERRIDES, "teacher.steps": 2, "train.steps": 2, "method.practise.fit_steps": 2,
        "method.cd.iters": 2}


def _demo(method, overrides=None):
    c = tiny_demo.config(overrides)
    c.method.name = method
    if method == "practise":  # what configs/demo.py:method=practise picks: ResNet-8 has no droppable block
        c.arch.name = "resnet14"
    return c


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_validates_with_its_defaults(method):
    validate(_demo(method), num_devices=4)


def test_demo_argument_picks_an_architecture_practise_can_compress():
    import demo

    assert demo.get_config("method=practise").arch.name == "resnet14"
    assert demo.get_config("method=kd").arch.name == "resnet8"
    assert demo.get_config("method=practise,arch=resnet20").arch.name == "resnet20"


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_with_its_defaults(method, tmp_path):
    """In-process: the methods share the compiled teacher and fine-tuning steps of one process."""
    from oefsmc_jax.pipeline import run

    res = run(_demo(method, FAST), tmp_path / "w")
    assert set(res["arms"]) == {"base", "oe"}
    for r in res["arms"].values():
        assert np.isfinite(r["metrics"]["top1"])
    if method == "practise":
        import json

        rec = json.loads((tmp_path / "w" / "base" / "compression" / "practise.json").read_text())
        assert rec["latency_target"] == 16.0 and rec["chosen_latency_reduction"] >= 16.0
