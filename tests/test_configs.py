"""Configs and validation: every shipped config validates; every bad field fails early with one line naming it."""

import json

import numpy as np
import pytest
from helpers import config, run_cli

from oefsmc_jax.config_validation import validate
from oefsmc_jax.errors import ConfigError

cifar10, cifar100, demo, imagenet = config("cifar10"), config("cifar100"), config("demo"), config("imagenet")


# the cifar configs name files in the shared data folder, which validate() requires to exist
@pytest.mark.parametrize("module,arg", [
    (demo, None), (demo, "method=bp,per_class=3,rho=1,oe=1"),
    *(pytest.param(cifar10, a, marks=pytest.mark.needs_data) for a in (
        None, "method=kd,arch=resnet56,per_class=10,rho=10,oe=1", "runlocal=1,oe=0",
        "family=chenyaofo,method=cd,arch=resnet32")),
    pytest.param(cifar100, "teacher=", marks=pytest.mark.needs_data), (imagenet, "runlocal=1"), (imagenet, None)])
def test_shipped_configs_validate(module, arg):
    c = module.get_config(arg)
    if module is cifar100 or module is imagenet:
        validate_tfds = c.copy_and_resolve_references()
        validate(validate_tfds, num_devices=1)
    else:
        validate(c, num_devices=4)


@pytest.mark.needs_data
def test_config_argument_parsing():
    c = cifar10.get_config("method=bp,arch=resnet56,per_class=20,rho=1,oe=0,seed=3")
    assert (c.method.name, c.arch.name, c.subset.per_class, c.subset.mode, c.arms, c.seed) == (
        "bp", "resnet56", 20, "balanced", "base", 3)
    assert c.teacher.checkpoint.endswith(".npz") and "resnet56-" in c.teacher.checkpoint
    with pytest.raises(ValueError, match="unknown key 'bogus'; allowed: .*method"):
        cifar10.get_config("bogus=1")
    with pytest.raises(ValueError, match=r"per_class='ten': expected a int"):
        cifar10.get_config("per_class=ten")


def _bad(mutate):
    c = demo.get_config()
    mutate(c)
    with pytest.raises(ConfigError) as e:
        validate(c, num_devices=4)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("mutate,field,allowed", [
    (lambda c: setattr(c.method, "name", "nope"), "config.method.name", "allowed: bp, cd, fskd, kd, mir, practise"),
    (lambda c: setattr(c.arch, "name", "resnet21"), "config.arch.name", "6n+2"),
    (lambda c: setattr(c.arch, "name", "alexnet"), "config.arch.name", "allowed: resnet<6n+2>"),
    (lambda c: setattr(c.data.id, "kind", "csv"), "config.data.id.kind", "allowed: npz, tfds, digits"),
    (lambda c: setattr(c.subset, "rho", 0.5), "config.subset.rho", "must be >= 1"),
    (lambda c: setattr(c.subset, "per_class", 0), "config.subset.per_class", ">= 1 sample per class"),
    (lambda c: setattr(c.method, "prune_ratio", 1.0), "config.method.prune_ratio", "[0, 1)"),
    (lambda c: setattr(c.method, "prune_ratio", -0.1), "config.method.prune_ratio", "[0, 1)"),
    (lambda c: setattr(c.train, "batch_id", 30), "config.train.batch_id", "not divisible by the device count 4"),
    (lambda c: setattr(c.train, "batch_ood", 18), "config.train.batch_ood", "not divisible by the device count 4"),
    (lambda c: c.data.update({"id": c.data.ood}), "config.data.ood", "same split as data.id"),
    (lambda c: c.data.update({"ood": c.data.test}), "config.data.ood", "same split as data.test"),
    (lambda c: c.data.update({"test": c.data.id}), "config.data.test", "same split as data.id"),
    (lambda c: setattr(c.subset, "mode", "zipf"), "config.subset.mode", "allowed: balanced, exp"),
    (lambda c: setattr(c, "arms", "base,oe,extra"), "config.arms", "unknown arm 'extra'"),
    (lambda c: setattr(c.oe, "bn_mode", "mixed"), "config.oe.bn_mode", "joint, separate"),
    (lambda c: setattr(c.optim, "name", "lbfgs"), "config.optim.name", "sgd, adam, adamw"),
    (lambda c: setattr(c.oe, "track_best", True), "config.oe.track_best", "set one of the two"),
    (lambda c: c.oe.update({"early_stopping": False, "track_best": True, "patience": 0}), "config.oe.eval_every",
     "oe.track_best needs oe.eval_every >= 1, oe.patience >= 1"),
])
def test_bad_fields_fail_with_one_line_naming_the_field(mutate, field, allowed):
    msg = _bad(mutate)
    assert msg.startswith(field + ":"), msg
    assert allowed in msg, msg


@pytest.mark.needs_data
def test_missing_data_file_is_named(tmp_path):
    c = cifar10.get_config()
    c.data.test.path = str(tmp_path / "nope.npz")
    with pytest.raises(ConfigError, match=r"config.data.test.path: file .*nope.npz does not exist"):
        validate(c, num_devices=1)
    c = cifar10.get_config(f"teacher={tmp_path / 'missing'}")
    with pytest.raises(ConfigError, match="config.teacher.checkpoint: .*missing does not exist"):
        validate(c, num_devices=1)


def test_overlapping_ood_and_id_images_are_refused(tmp_path):
    """Different source configs, but the OOD file holds images of the ID set: refused before training."""
    from oefsmc_jax.data import DataOverlapError, load_source
    from oefsmc_jax.data.prepare import prepare_data
    from oefsmc_jax.oe.arms import data_needs

    c = demo.get_config("per_class=3")
    train = load_source(c.data.id)
    path = tmp_path / "pool.npz"
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (300,) + train.x.shape[1:], dtype=np.uint8)
    np.savez(path, x=np.concatenate([noise, train.x]))  # the whole ID split hides in the pool
    c.data.ood = {"kind": "npz", "path": str(path), "image_size": 16, "channels": 3, "split": "pool"}
    c.oe.size = 300 + len(train) - 100
    c.oe.heldout = 100
    validate(c, num_devices=1)
    with pytest.raises(DataOverlapError, match="the OOD images overlap the in-distribution few-sample set: "
                                               r"\d+ identical images"):
        prepare_data(c, tmp_path, data_needs(c))


# each case starts a process; the quick tier keeps one per kind of failure (a field, the config argument, an override)
@pytest.mark.parametrize("args,expected", [
    (["--config", "configs/demo.py:method=nope"], "error: config.method.name: unknown method 'nope'"),
    pytest.param(["--config", "configs/demo.py", "--config.subset.rho=0.5"],
                 "error: config.subset.rho: the imbalance ratio", marks=pytest.mark.slow),
    (["--config", "configs/demo.py:bogus=1"], "error: config argument: unknown key 'bogus'"),
    (["--config", "configs/demo.py", "--config.train.stepz=3"], "error: unknown config field in an override"),
    pytest.param(["--config", "configs/demo.py:per_class=200,rho=1"], "error: few_sample_indices: class 0 has",
                 marks=pytest.mark.slow),
    pytest.param(["--config", "configs/demo.py:method=mir,oe=base", "--config.arms=base,logit_adjust"],
                 "error: config.arms: arm 'logit_adjust' adjusts the cross-entropy on labels, but method 'mir' is "
                 "label-free", marks=pytest.mark.slow),
    pytest.param(["--config", "configs/demo.py:method=cd", "--config.method.cd.mu=1.5"],
                 "error: config.method.cd.mu: must be", marks=pytest.mark.slow),
    pytest.param(["--config", "configs/demo.py:method=practise", "--config.method.practise.k=1",
                  "--config.method.practise.latency_target=10"], "error: config.method.practise.k: set at most one of",
                 marks=pytest.mark.slow),
    pytest.param(["--config", "configs/demo.py:method=practise,arch=resnet8"],
                 "error: config.method.name: practise drops residual blocks 1..n-1 of a stage; this cifar_resnet has "
                 "none", marks=pytest.mark.slow),
])
def test_cli_reports_bad_input_in_one_line(args, expected, tmp_path):
    out = run_cli([*args, "--workdir", str(tmp_path / "w")], timeout=120)
    assert out.returncode == 2
    lines = [ln for ln in out.stderr.splitlines() if ln.strip() and not ln.startswith("run: ")]
    assert len(lines) == 1 and lines[0].startswith(expected), out.stderr
    assert "Traceback" not in out.stderr


def test_ood_pools_class_disjoint_and_textures(shared_data):
    """The class-disjoint control drops the 30 Tiny-ImageNet classes that are CIFAR-10 classes in meaning; DTD-10
    has no class overlap at all."""
    from oefsmc_jax.data import load_source

    overlap = json.loads((shared_data / "tinyimagenet_cifar10_overlap.json").read_text())["all_indices"]
    disjoint = cifar10.get_config("pool=tiny_disjoint")
    validate(disjoint, num_devices=1)
    pool = load_source(disjoint.data.ood)
    with np.load(shared_data / "tinyimagenet_val_32x32.npz") as f:
        keep = ~np.isin(f["y"], overlap)
        np.testing.assert_array_equal(pool.x, f["x"][keep])
    assert len(overlap) == 30 and len(pool) == 8500 and np.all(pool.y == -1)
    assert len(load_source(disjoint.data.ood, np.arange(5))) == 5  # indices refer to the remaining images
    dtd = cifar10.get_config("pool=dtd")
    validate(dtd, num_devices=1)
    assert len(load_source(dtd.data.ood)) == 1200 and dtd.oe.heldout == 200
    bad = cifar10.get_config("pool=tiny_disjoint")
    bad.data.ood.exclude_classes = ("cat",)
    with pytest.raises(ConfigError, match=r"config.data.ood.exclude_classes: must be class ids"):
        validate(bad, num_devices=1)
