"""Importing the second teacher family (chenyaofo CIFAR-10 ResNets, option-B shortcuts) through the same path.

Accuracy: ResNet-20 (through ``python -m oefsmc_jax import-teacher ... --check-npz``) and ResNet-56 (Orbax model
read back, normalisation from its meta) on the full JPEG-q75 test set against the data README; ResNet-32/44 on
the fixed slice of the first 2,000 test images against figures measured with this code (their full-set figures,
82.83 / 82.99, equal the README's too; the full set for all four takes over a minute on 2 CPU cores).
"""

from __future__ import annotations

import hashlib
import re
import sys

import jax
import numpy as np
import pytest
from helpers import fake_torch, torch_state_dict

from oefsmc_jax.convert import (
    AKAMASTER_MEAN,
    AKAMASTER_STD,
    CHENYAOFO_MEAN,
    CHENYAOFO_STD,
    chenyaofo_key_map,
    detect_family,
    evaluate_top1,
    import_teacher,
    load_akamaster_npz,
    load_chenyaofo_npz,
    load_pretrained,
    load_pretrained_npz,
    load_pretrained_th,
    teacher_family,
    teacher_preprocessing,
)
from oefsmc_jax.data import load_source
from oefsmc_jax.main import run_subcommand
from oefsmc_jax.models import build_model, cifar_resnet_spec
from oefsmc_jax.training.checkpoint import load_model

STEMS = {20: "cifar10_resnet20-eb80202b", 32: "cifar10_resnet32-4a8f68a8", 44: "cifar10_resnet44-fe235e59",
         56: "cifar10_resnet56-121838a9"}
README_TOP1 = {20: 81.05, 32: 82.83, 44: 82.99, 56: 83.67}  # full JPEG-q75 test set, plain PyTorch forward
SLICE_TOP1 = {20: 81.10, 32: 79.75, 44: 81.65, 56: 83.30}  # test images 0-1999, measured with this converter


def chen_file(shared_data, depth: int, suffix: str = ".npz"):
    return shared_data / "teachers" / "chenyaofo_cifar10_resnet" / (STEMS[depth] + suffix)


def aka_file(shared_data):
    return shared_data / "teachers" / "akamaster_cifar10_resnet" / "resnet20-12fca82f.npz"


@pytest.fixture(scope="module")
def jpeg_test(shared_data):
    s = load_source({"kind": "npz", "path": str(shared_data / "cifar10_test_jpeg75.npz"), "image_size": 32})
    assert len(s) == 10000
    return s.x, s.y


@pytest.mark.slow
def test_import_teacher_cli_resnet20_full_test(shared_data, tmp_path, monkeypatch, capsys):
    """`python -m oefsmc_jax import-teacher SRC OUT --check-npz TEST` detects the family, records its
    preprocessing in the meta and evaluates with it: exactly the README's 81.05% on the 10k JPEG test set."""
    from oefsmc_jax.main import cli

    src, out = chen_file(shared_data, 20), tmp_path / "teacher20"
    test_npz = shared_data / "cifar10_test_jpeg75.npz"
    argv = ["oefsmc_jax", "import-teacher", str(src), str(out), "--depth", "20", "--check-npz", str(test_npz)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        cli()
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert f"wrote {out}: chenyaofo resnet20 (10 classes, " in text and "shortcut B" in text
    top1 = float(text.split(f"top-1 on {test_npz} (10000 images): ")[1].split("%")[0])
    print(f"\nchenyaofo resnet20: JPEG-q75 test {top1:.2f}% (README {README_TOP1[20]:.2f}%)")
    assert abs(top1 - README_TOP1[20]) <= 0.01 + 1e-9

    spec, variables, meta = load_model(out)
    assert spec == cifar_resnet_spec(20, 10, shortcut="B")
    assert meta["family"] == "chenyaofo" and meta["format"] == "chenyaofo_npz" and meta["shortcut"] == "B"
    assert meta["depth"] == 20 and meta["num_classes"] == 10 and meta["source"] == str(src)
    assert meta["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert meta["preprocessing"] == {"scale": 1 / 255, "mean": list(CHENYAOFO_MEAN), "std": list(CHENYAOFO_STD)}
    assert teacher_preprocessing(out) == (CHENYAOFO_MEAN, CHENYAOFO_STD) and teacher_family(out) == "chenyaofo"
    ref_spec, ref = load_pretrained_npz(src)
    assert ref_spec == spec and jax.tree.structure(ref) == jax.tree.structure(variables)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(variables)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_resnet56_slice_from_checkpoint(shared_data, tmp_path, jpeg_test):
    """ResNet-56 written by import_teacher, read back, normalised as its meta says: on test images 0-1999 the
    figure measured once on the full set as the README's 83.67% (ResNet-20's full-set check is the CLI test)."""
    out = tmp_path / "teacher56"
    spec = import_teacher(chen_file(shared_data, 56), out, depth=56)
    spec2, variables, _ = load_model(out)
    assert spec2 == spec == cifar_resnet_spec(56, 10, shortcut="B")
    mean, std = teacher_preprocessing(out)
    x, y = jpeg_test
    top1 = evaluate_top1(spec2, variables, x[:2000], y[:2000], mean=mean, std=std)
    print(f"\nchenyaofo resnet56: JPEG-q75 test 0-1999 {top1:.2f}% (measured {SLICE_TOP1[56]:.2f}%)")
    assert abs(top1 - SLICE_TOP1[56]) <= 0.05 + 1e-9


@pytest.mark.parametrize("depth", [32, 44])
@pytest.mark.slow
def test_slice_accuracy(shared_data, jpeg_test, depth):
    """ResNet-32/44 through load_pretrained_npz + teacher_preprocessing on test images 0-1999."""
    src = chen_file(shared_data, depth)
    spec, variables = load_pretrained_npz(src, depth=depth)
    assert spec == cifar_resnet_spec(depth, 10, shortcut="B")
    x, y = jpeg_test
    mean, std = teacher_preprocessing(src)
    top1 = evaluate_top1(spec, variables, x[:2000], y[:2000], mean=mean, std=std)
    print(f"\nchenyaofo resnet{depth}: JPEG-q75 test 0-1999 {top1:.2f}% (measured {SLICE_TOP1[depth]:.2f}%)")
    assert abs(top1 - SLICE_TOP1[depth]) <= 0.05 + 1e-9  # at most one of 2,000 images may flip


def test_spec_and_layouts(shared_data):
    """Option B: proj_conv/proj_bn exactly in s1b0 and s2b0, filled from layer{2,3}.0.downsample.{0,1}."""
    src = chen_file(shared_data, 20)
    spec, v = load_chenyaofo_npz(src)
    assert spec.shortcut == "B" and spec == cifar_resnet_spec(20, 10, shortcut="B")
    with_proj = sorted(name for name, mod in v["params"].items() if "proj_conv" in mod)
    assert with_proj == ["s1b0", "s2b0"]
    assert sorted(name for name, mod in v["batch_stats"].items() if "proj_bn" in mod) == ["s1b0", "s2b0"]
    assert v["params"]["s1b0"]["proj_conv"]["kernel"].shape == (1, 1, 16, 32)
    assert v["params"]["s2b0"]["proj_conv"]["kernel"].shape == (1, 1, 32, 64)
    with np.load(src) as f:
        for flax_name, torch_stage in (("s1b0", 2), ("s2b0", 3)):
            p = f"layer{torch_stage}.0.downsample"
            np.testing.assert_array_equal(v["params"][flax_name]["proj_conv"]["kernel"],
                                          f[f"{p}.0.weight"].transpose(2, 3, 1, 0))
            np.testing.assert_array_equal(v["params"][flax_name]["proj_bn"]["scale"], f[f"{p}.1.weight"])
            np.testing.assert_array_equal(v["params"][flax_name]["proj_bn"]["bias"], f[f"{p}.1.bias"])
            np.testing.assert_array_equal(v["batch_stats"][flax_name]["proj_bn"]["mean"], f[f"{p}.1.running_mean"])
            np.testing.assert_array_equal(v["batch_stats"][flax_name]["proj_bn"]["var"], f[f"{p}.1.running_var"])
        np.testing.assert_array_equal(v["params"]["head"]["kernel"], f["fc.weight"].T)
        np.testing.assert_array_equal(v["params"]["head"]["bias"], f["fc.bias"])
        np.testing.assert_array_equal(v["params"]["s2b2"]["conv1"]["kernel"],
                                      f["layer3.2.conv1.weight"].transpose(2, 3, 1, 0))
        # every key of the file is used exactly once
        assert set(chenyaofo_key_map(spec)) == set(f.files)
    # the tree is exactly the one the model initialises (structure, shapes, dtypes), masks all ones
    init = jax.eval_shape(build_model(spec).init, jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32))
    assert jax.tree.structure(init) == jax.tree.structure(v)
    for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(v)):
        assert a.shape == b.shape and a.dtype == b.dtype
    assert all(np.all(m == 1) for m in jax.tree.leaves(v["masks"]))


def test_dispatch_both_families(shared_data):
    """One loader for both families; preprocessing and family follow the file's keys."""
    chen, aka = chen_file(shared_data, 20), aka_file(shared_data)
    assert teacher_family(chen) == "chenyaofo" and teacher_family(aka) == "akamaster"
    assert teacher_preprocessing(chen) == (CHENYAOFO_MEAN, CHENYAOFO_STD)
    assert teacher_preprocessing(aka) == (AKAMASTER_MEAN, AKAMASTER_STD)
    for loader in (load_pretrained_npz, load_pretrained):
        spec_a, v_a = loader(aka)
        spec_ref, v_ref = load_akamaster_npz(aka)
        assert spec_a == spec_ref and spec_a.shortcut == "A"
        for a, b in zip(jax.tree.leaves(v_a), jax.tree.leaves(v_ref)):
            np.testing.assert_array_equal(a, b)
        spec_c, _ = loader(chen)
        assert spec_c.shortcut == "B"
    assert detect_family(["conv1.weight", "layer1.0.conv1.weight", "linear.weight"]) == "akamaster"
    assert detect_family(["conv1.weight", "layer2.0.downsample.0.weight"]) == "chenyaofo"
    with pytest.raises(ValueError, match="cannot tell the teacher family: akamaster key 'linear.bias' and "
                                         "chenyaofo key 'fc.weight'"):
        detect_family(["linear.bias", "linear.weight", "fc.weight"])
    with pytest.raises(ValueError, match=r"cannot tell the teacher family: no 'linear\.\*'"):
        detect_family(["conv1.weight", "layer1.0.conv1.weight"])


def _modified(shared_data, tmp_path, edit, depth: int = 20):
    with np.load(chen_file(shared_data, depth)) as f:
        arrays = {k: f[k] for k in f.files}
    edit(arrays)
    path = tmp_path / "modified.npz"
    np.savez(path, **arrays)
    return path


def _conv3x3_shortcut(a):
    a["layer2.0.downsample.0.weight"] = np.zeros((32, 16, 3, 3), np.float32)


def _no_projection(a):
    for k in [k for k in a if ".downsample." in k and k.startswith("layer3.")]:
        a.pop(k)


def _wide_head(a):
    a["fc.weight"] = np.zeros((10, 128), np.float32)


@pytest.mark.parametrize("edit, message", [
    (_conv3x3_shortcut, "key 'layer2.0.downsample.0.weight' has shape (32,16,3,3), expected (32,16,1,1)"),
    (_no_projection, "5 problems: missing key 'layer3.0.downsample.0.weight'; missing key "
                     "'layer3.0.downsample.1.weight'"),
    (_wide_head, "key 'fc.weight' has shape (10,128), expected (10,64)"),
], ids=["shortcut_shape", "missing_projection", "head_shape"])
def test_wrong_architecture(shared_data, tmp_path, edit, message):
    """A wrong-architecture file: one-line ValueError naming the key and shape; nothing written."""
    path = _modified(shared_data, tmp_path, edit)
    for load in (load_pretrained_npz, load_chenyaofo_npz):
        with pytest.raises(ValueError) as e:
            load(path)
        msg = str(e.value)
        assert message in msg and msg.startswith(f"{path}: ") and "\n" not in msg
    with pytest.raises(ValueError, match=re.escape(message)):
        import_teacher(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_wrong_depth_and_family(shared_data, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"file has 9 blocks per stage \(resnet56\) but depth=20 was asked"):
        load_pretrained_npz(chen_file(shared_data, 56), depth=20)
    # a chenyaofo file is not an akamaster file (and the reverse)
    with pytest.raises(ValueError, match="missing key 'linear.weight'"):
        load_akamaster_npz(chen_file(shared_data, 20))
    with pytest.raises(ValueError, match="missing key 'fc.weight'"):
        load_chenyaofo_npz(aka_file(shared_data))
    argv = [str(chen_file(shared_data, 32)), str(tmp_path / "out"), "--depth", "20"]
    assert run_subcommand("import-teacher", argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "resnet32" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_pt_path_with_fake_torch(shared_data, tmp_path, monkeypatch):
    """The release .pt files are bare state dicts; a stand-in torch.load plays torch (not installed here)."""
    with np.load(chen_file(shared_data, 20)) as f:
        state = torch_state_dict(f)
    calls = fake_torch(monkeypatch, lambda: state)
    src = tmp_path / "cifar10_resnet20.pt"
    src.write_bytes(b"not really torch")
    spec, v = load_pretrained_th(src, depth=20)
    spec_ref, v_ref = load_chenyaofo_npz(chen_file(shared_data, 20))
    assert spec == spec_ref and calls == [(str(src), "cpu", True)]
    for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(v_ref)):
        np.testing.assert_array_equal(a, b)
    out = tmp_path / "model"
    import_teacher(src, out)
    meta = load_model(out)[2]
    assert meta["format"] == "chenyaofo_th" and meta["family"] == "chenyaofo"
    assert teacher_preprocessing(src) == (CHENYAOFO_MEAN, CHENYAOFO_STD)


@pytest.mark.slow
def test_practise_on_the_option_b_teacher_adapts_the_downsample_convs(shared_data, tmp_path):
    """PRACTISE's adaptor rule for downsample convs (baselines.md §2.3) on the real chenyaofo ResNet-20: the gaps in
    stages 0 and 1 put adaptors on the next stage's 1x1 projection; every candidate gets a finite score."""
    import json

    from oefsmc_jax.methods import CompressionContext, build_method
    from oefsmc_jax.methods.practise import adaptor_points
    from oefsmc_jax.oe.calibration import calibration_set
    from oefsmc_jax.training.parallel import make_mesh

    spec, variables = load_pretrained_npz(chen_file(shared_data, 20))
    assert "s1b0/proj_conv:in" in adaptor_points(spec, 0, 1) and "s2b0/proj_conv:in" in adaptor_points(spec, 1, 2)
    assert "s1b0/proj_conv:out" in adaptor_points(spec, 1, 1)
    with np.load(shared_data / "cifar10_train_lossless_first4000.npz") as f:
        cal = calibration_set(f["x"][:16], f["y"][:16], 10)
    method = build_method({"name": "practise", "practise": {"k": 2, "fit_steps": 2, "batch_size": 8}}, spec)
    ctx = CompressionContext(spec, variables, cal, CHENYAOFO_MEAN, CHENYAOFO_STD, jax.random.PRNGKey(0),
                             mesh=make_mesh(1), workdir=tmp_path, log=lambda s: None)
    out_spec, out = method.compress(ctx)
    record = json.loads((tmp_path / "compression" / "practise.json").read_text())
    rows = record["candidates"] if isinstance(record["candidates"], list) else list(record["candidates"].values())
    assert len(rows) == 6 and all(np.isfinite(r["score"]) for r in rows)
    gates = {n: float(m["gate"]) for n, m in out["masks"].items() if "gate" in m}
    assert sorted(n for n, g in gates.items() if g == 0.0) == sorted(record["chosen"])
