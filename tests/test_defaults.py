"""Every method runs with its defaults; empty splits and sources are refused before any work."""


import time

import numpy as np
import pytest
import tiny_demo
from helpers import config, run_cli, tiny_spec

from oefsmc_jax.config_validation import validate
from oefsmc_jax.errors import ConfigError
from oefsmc_jax.methods import METHODS

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


def test_shared_method_defaults_are_the_configs():
    """The defaults of the method fields several methods read are declared twice: in ``base_config`` (every field)
    and in ``methods.base.SHARED_DEFAULTS`` (the methods' dataclasses and hand-written method configs); they agree,
    and a method built from a config that leaves them out equals one built from ``base_config``'s."""
    from oefsmc_jax.config_defaults import base_config
    from oefsmc_jax.methods import build_method
    from oefsmc_jax.methods.base import SHARED_DEFAULTS

    declared = base_config().method
    assert {k: declared[k] for k in SHARED_DEFAULTS} == SHARED_DEFAULTS
    spec = tiny_spec(14)
    for name in sorted(METHODS):
        if name == "supervised":
            continue
        full = declared.to_dict()
        full["name"] = name
        assert build_method({"name": name}, spec) == build_method(full, spec), name


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_validates_with_its_defaults(method):
    validate(_demo(method), num_devices=4)


def test_demo_argument_picks_an_architecture_practise_can_compress():
    demo = config("demo")

    assert demo.get_config("method=practise").arch.name == "resnet14"
    assert demo.get_config("method=kd").arch.name == "resnet8"
    assert demo.get_config("method=practise,arch=resnet20").arch.name == "resnet20"


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_with_its_defaults(method, tmp_path):
    """In-process: the methods share the compiled teacher and fine-tuning steps of one process."""
    from oefsmc_jax.run import run

    res = run(_demo(method, FAST), tmp_path / "w")
    assert set(res["arms"]) == {"base", "oe"}
    for r in res["arms"].values():
        assert np.isfinite(r["metrics"]["top1"])
    if method == "practise":
        import json

        rec = json.loads((tmp_path / "w" / "base" / "compression" / "practise.json").read_text())
        assert rec["latency_target"] == 16.0 and rec["chosen_latency_reduction"] >= 16.0


# ---------------------------------------------------------------------- empty splits and sources
def _empty_npz(path, size=32, compressed=False, **extra):
    (np.savez_compressed if compressed else np.savez)(path, x=np.zeros((0, size, size, 3), np.uint8),
                                                      y=np.zeros(0, np.int64), **extra)
    return path


@pytest.mark.needs_data
def test_an_empty_test_split_is_refused_before_any_work(tmp_path):
    """Before, it was found only after the teacher had trained ("attempt to get argmax of an empty sequence")."""
    empty = _empty_npz(tmp_path / "empty.npz")
    t0 = time.time()
    out = run_cli(["--config", "configs/cifar10.py", "--workdir", str(tmp_path / "w"),
                   f"--config.data.test.path={empty}"], timeout=120)
    assert out.returncode == 2, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert lines == [f"error: config.data.test.path: {empty} holds no images (array 'x'); the evaluation split "
                     "needs at least one"], out.stderr
    assert not (tmp_path / "w").exists() and time.time() - t0 < 60


@pytest.mark.needs_data
def test_empty_id_split_and_ood_sources_are_refused(tmp_path):
    cifar10, demo = config("cifar10"), config("demo")

    def refused(c, match):
        with pytest.raises(ConfigError, match=match):
            validate(c, num_devices=1)

    c = cifar10.get_config()
    c.data.id.path = str(_empty_npz(tmp_path / "id.npz", compressed=True))  # the header of a deflated member too
    refused(c, r"^config.data.id.path: .*id.npz holds no images \(array 'x'\); the ID training split needs")
    c = cifar10.get_config()
    c.data.ood.path = str(_empty_npz(tmp_path / "ood.npz"))
    refused(c, r"^config.data.ood.path: .*ood.npz holds no images .*; the OOD pool needs at least one$")
    c.arms = "base"
    c.oe.early_stopping = False
    validate(c, num_devices=1)  # no arm reads the pool
    c = cifar10.get_config()
    c.data.test.path = str(_empty_npz(tmp_path / "test.npz"))
    c.eval.split = "val"
    validate(c, num_devices=1)  # eval.split=val evaluates on held-back ID images, never on data.test
    # every image of the pool is in an excluded class
    pool = tmp_path / "pool.npz"
    np.savez(pool, x=np.zeros((4, 32, 32, 3), np.uint8), y=np.array([1, 1, 3, 3]))
    c = cifar10.get_config()
    c.data.ood = {**c.data.ood.to_dict(), "path": str(pool), "y_key": "y", "exclude_classes": (1, 3)}
    refused(c, r"^config.data.ood.path: .*pool.npz holds no images once exclude_classes are left out")
    c.data.ood.exclude_classes = (1,)
    validate(c, num_devices=1)
    c = demo.get_config()
    c.data.ood.num_images = 0
    refused(c, r"^config.data.ood.num_images: must be >= 1, got 0: the OOD pool would be empty$")
    c = demo.get_config()
    c.data.test.test_fraction = 0.0
    refused(c, r"^config.data.test.test_fraction: must be in \(0, 1\), got 0.0")


def test_npz_length_reads_only_the_header(tmp_path):
    from oefsmc_jax.data.sources import npz_length

    np.savez(tmp_path / "a.npz", x=np.zeros((5, 2, 2, 3), np.uint8))
    np.savez_compressed(tmp_path / "b.npz", x=np.zeros((7, 2, 2), np.uint8))
    (tmp_path / "c.npz").write_bytes(b"not a zip")
    assert npz_length({"path": str(tmp_path / "a.npz")}) == 5
    assert npz_length({"path": str(tmp_path / "b.npz")}) == 7
    assert npz_length({"path": str(tmp_path / "c.npz")}) is None  # the loader names what is wrong
    assert npz_length({"path": str(tmp_path / "a.npz"), "x_key": "images"}) is None
