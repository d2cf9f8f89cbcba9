"""torchvision ImageNet ResNet-18/34/50 teachers through the real import path, without torch.

The weights are rebuilt from a seed with numpy (``tests/data/make_torchvision_reference.py``: torchvision's exact
keys and shapes, non-trivial BN statistics); the PyTorch logits of two 64x64 images, computed once with torch
2.14.1 + torchvision 0.29.1 in eval mode, are committed in ``tests/data/torchvision_reference.npz``. The JAX model
imported from ``.npz`` and ``.safetensors`` must give them to a relative difference (max abs difference / max abs
logit) of 1e-5 in float32.

``tests/data/safetensors_official.safetensors`` was written by the official ``safetensors.torch.save_file``
(0.8.0) from ``base = arange(6).reshape(2, 3) * 0.5 - 1`` in F32/BF16/F16/F64 plus I64, U8, BOOL, a scalar and
an empty tensor, so the numpy parser is checked against the reference writer.
"""

from __future__ import annotations

import json
import pathlib
import struct

import jax
import numpy as np
import pytest
from helpers import config, fake_torch, module_at, torch_state_dict

from oefsmc_jax.convert import (
    TORCHVISION_INPUT,
    TORCHVISION_MEAN,
    TORCHVISION_STD,
    convert_torchvision_state_dict,
    detect_family,
    import_teacher,
    load_pretrained,
    read_safetensors_state,
    teacher_family,
    teacher_preprocessing,
    write_safetensors,
)
from oefsmc_jax.main import run_subcommand
from oefsmc_jax.models import build_model, imagenet_resnet_spec
from oefsmc_jax.training.checkpoint import load_model

DATA = pathlib.Path(__file__).with_name("data")
gen = module_at(DATA / "make_torchvision_reference.py")

REL_TOL = 1e-5


@pytest.fixture(scope="module")
def reference():
    with np.load(DATA / "torchvision_reference.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def inputs():
    return gen.normalise(gen.images())


@pytest.fixture(scope="module")
def r18():
    return gen.state_dict(18)


def rel_diff(got, want) -> float:
    return float(np.max(np.abs(np.asarray(got, np.float32) - want)) / np.max(np.abs(want)))


def logits(spec, variables, x):
    return np.asarray(build_model(spec).apply(variables, x, train=False)["logits"])


def test_reference_file_matches_generator(reference):
    assert int(reference["seed"]) == gen.SEED and int(reference["image_size"]) == gen.IMAGE_SIZE
    for d in gen.DEPTHS:
        assert reference[f"logits_resnet{d}"].shape == (gen.NUM_IMAGES, gen.NUM_CLASSES)
        assert reference[f"logits_resnet{d}"].dtype == np.float32


@pytest.mark.parametrize("depth", [18, pytest.param(34, marks=pytest.mark.slow),
                                   pytest.param(50, marks=pytest.mark.slow)])
def test_imported_logits_match_pytorch(depth, reference, inputs, tmp_path, capsys):
    """`import-teacher X.npz OUT` and the `.safetensors` of the same weights give torchvision's logits."""
    sd = gen.state_dict(depth)
    npz, st = tmp_path / f"resnet{depth}.npz", tmp_path / f"resnet{depth}.safetensors"
    np.savez(npz, **sd)
    write_safetensors(st, sd, metadata={"format": "pt"})
    out = tmp_path / "model"
    assert run_subcommand("import-teacher", [str(npz), str(out)]) == 0
    assert f"torchvision resnet{depth} ({gen.NUM_CLASSES} classes" in capsys.readouterr().out
    spec, variables, meta = load_model(out)
    assert spec == imagenet_resnet_spec(depth, num_classes=gen.NUM_CLASSES)
    assert (meta["family"], meta["depth"], meta["format"], meta["shortcut"]) == ("torchvision", depth,
                                                                                 "torchvision_npz", "B")
    pre = meta["preprocessing"]
    assert tuple(pre["mean"]) == TORCHVISION_MEAN and tuple(pre["std"]) == TORCHVISION_STD
    assert {k: pre[k] for k in TORCHVISION_INPUT} == TORCHVISION_INPUT
    got = logits(spec, variables, inputs)
    err = rel_diff(got, reference[f"logits_resnet{depth}"])
    print(f"\nresnet{depth}: relative logit difference to PyTorch {err:.2e}")
    assert err <= REL_TOL
    spec_st, v_st = load_pretrained(st, depth=depth)
    assert spec_st == spec
    for a, b in zip(jax.tree.leaves(v_st), jax.tree.leaves(variables)):
        np.testing.assert_array_equal(a, b)


def test_detect_family(r18):
    assert detect_family(list(r18)) == "torchvision"
    assert detect_family(["layer1.0.conv3.weight", "fc.weight"]) == "torchvision"  # bottleneck evidence
    assert detect_family(["layer3.0.downsample.0.weight", "fc.weight"]) == "chenyaofo"
    with pytest.raises(ValueError, match="akamaster key 'linear.weight' and torchvision key 'layer4.0"):
        detect_family([*r18, "linear.weight"], source="x.npz")


def test_teacher_family_and_preprocessing_from_files(r18, tmp_path):
    st = tmp_path / "r18.safetensors"
    write_safetensors(st, r18)
    np.savez(tmp_path / "r18.npz", **r18)
    for path in (st, tmp_path / "r18.npz"):
        assert teacher_family(path) == "torchvision"
        assert teacher_preprocessing(path) == (TORCHVISION_MEAN, TORCHVISION_STD)


def _edited(sd, drop=(), **put):
    out = {k: v for k, v in sd.items() if k not in drop}
    out.update({k.replace("__", "."): v for k, v in put.items()})
    return out


@pytest.mark.parametrize("edit, message", [
    (lambda sd: _edited(sd, drop=["layer2.0.bn1.running_var"]), "x.pth: missing key 'layer2.0.bn1.running_var'"),
    (lambda sd: _edited(sd, drop=["fc.weight"]), "x.pth: missing key 'fc.weight'"),
    (lambda sd: _edited(sd, conv1__weight=np.zeros((64, 3, 3, 3), np.float32)),
     "x.pth: key 'conv1.weight' has shape (64,3,3,3), expected (64,3,7,7)"),
    (lambda sd: _edited(sd, fc__weight=np.zeros((1000, 2048), np.float32)),
     "x.pth: 2 problems: key 'fc.weight' has shape (1000,2048), expected (1000,512); key 'fc.bias' has shape "
     "(10), expected (1000)"),
    (lambda sd: _edited(sd, fc__weight=np.zeros((512,), np.float32)),
     "x.pth: key 'fc.weight' has shape (512), expected (num_classes,512)"),
    (lambda sd: _edited(sd, layer1__0__conv1__weight=np.zeros((64, 64, 3, 3), np.int32)),
     "x.pth: key 'layer1.0.conv1.weight' has dtype int32, expected a float array"),
    (lambda sd: _edited(sd, layer1__0__downsample__0__weight=np.zeros((64, 64, 1, 1), np.float32)),
     "x.pth: unexpected key 'layer1.0.downsample.0.weight'"),
    (lambda sd: _edited(sd, layer4__2__conv1__weight=np.zeros((512, 512, 3, 3), np.float32)),
     "x.pth: basic blocks (2,2,2,3) per stage is no supported torchvision ResNet (resnet18 basic blocks "
     "(2,2,2,2), resnet34 basic blocks (3,4,6,3), resnet50 bottleneck blocks (3,4,6,3))"),
    (lambda sd: {"conv1.weight": sd["conv1.weight"]}, "x.pth: no 'layer{1,2,3,4}.<i>.*' keys"),
], ids=["missing", "missing_fc", "stem_3x3", "fc_of_resnet50", "fc_1d", "int_weight", "unexpected",
        "block_count", "no_layers"])
def test_mismatched_state_dicts(r18, edit, message):
    with pytest.raises(ValueError) as e:
        convert_torchvision_state_dict(edit(r18), source="x.pth")
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_wrong_depth_and_cli_error(r18, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"x: file has basic blocks \(2,2,2,2\) per stage \(resnet18\) but "
                                         r"depth=50 was asked"):
        convert_torchvision_state_dict(r18, depth=50, source="x")
    src = tmp_path / "r18.safetensors"
    write_safetensors(src, _edited(r18, drop=["layer3.1.bn2.weight"]))
    assert run_subcommand("import-teacher", [str(src), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err == f"error: {src}: missing key 'layer3.1.bn2.weight'\n"
    assert not (tmp_path / "out").exists()
    assert run_subcommand("import-teacher", [str(tmp_path / "r18.h5"), str(tmp_path / "out")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_pth_with_fake_torch(r18, tmp_path, monkeypatch):
    """A torchvision ``.pth`` (a bare state dict; here a stand-in torch.load) goes through the same converter."""
    fake_torch(monkeypatch, lambda: torch_state_dict(r18))
    src = tmp_path / "resnet18-f37072fd.pth"
    src.write_bytes(b"stand-in")
    spec = import_teacher(src, tmp_path / "out", depth=18)
    assert spec == imagenet_resnet_spec(18, num_classes=gen.NUM_CLASSES)
    assert load_model(tmp_path / "out")[2]["format"] == "torchvision_th"


def test_pth_real_torch(reference, inputs, tmp_path):
    """``torch.save(model.state_dict())`` of torchvision's own module converts to the reference logits."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    sd = gen.state_dict(18)
    model = torchvision.models.resnet18(num_classes=gen.NUM_CLASSES)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()})
    torch.save(model.state_dict(), tmp_path / "r18.pth")
    spec, variables = load_pretrained(tmp_path / "r18.pth")
    assert rel_diff(logits(spec, variables, inputs), reference["logits_resnet18"]) <= REL_TOL


def test_official_safetensors_file():
    got = read_safetensors_state(DATA / "safetensors_official.safetensors")
    base = np.arange(6, dtype=np.float64).reshape(2, 3) * 0.5 - 1.0
    want = {"f32": base.astype(np.float32), "bf16": base.astype(np.float32), "f16": base.astype(np.float16),
            "f64": base, "i64": np.arange(4) - 2, "u8": np.arange(3, dtype=np.uint8),
            "bool": np.array([True, False]), "scalar": np.array(2.5, np.float32), "empty": np.zeros((0, 4), np.float32)}
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        np.testing.assert_array_equal(got[k], v)


def test_safetensors_round_trip(tmp_path):
    arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([1, -2], ">i8"),
              "c": np.ones((2, 0), np.float16)}
    write_safetensors(tmp_path / "x.safetensors", arrays)
    raw = (tmp_path / "x.safetensors").read_bytes()
    assert (8 + struct.unpack("<Q", raw[:8])[0]) % 8 == 0  # buffers start 8-byte aligned
    got = read_safetensors_state(tmp_path / "x.safetensors")
    for k, v in arrays.items():
        np.testing.assert_array_equal(got[k], v)
        assert got[k].dtype == v.dtype.newbyteorder("=")


def _safetensors_bytes(header, data=b"", n=None):
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw) if n is None else n) + raw + data


@pytest.mark.parametrize("content, message", [
    (b"abc", "not a safetensors file: 3 bytes, shorter than the 8-byte header length"),
    (_safetensors_bytes({}, n=10**6), "header length 1000000 but the file has"),
    (_safetensors_bytes(b"{not json"), "its header is not JSON"),
    (_safetensors_bytes([1, 2]), "its header is a JSON list, not an object"),
    (_safetensors_bytes({"w": {"dtype": "F32", "shape": [4]}}), "tensor 'w': header entry needs dtype, shape"),
    (_safetensors_bytes({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8),
     "tensor 'w': unsupported dtype 'C64'"),
    (_safetensors_bytes({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
     "tensor 'w': data_offsets [0, 16] outside the 8-byte data (truncated file?)"),
    (_safetensors_bytes({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
     "tensor 'w': 8 bytes for F32 shape (3,), which needs 12"),
    (_safetensors_bytes({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}}, b"\0" * 8),
     "tensor 'w': shape must be a list of non-negative ints"),
], ids=["short", "header_len", "not_json", "not_object", "no_offsets", "dtype", "truncated", "size", "shape"])
def test_bad_safetensors(tmp_path, capsys, content, message):
    src = tmp_path / "bad.safetensors"
    src.write_bytes(content)
    with pytest.raises(ValueError) as e:
        read_safetensors_state(src)
    assert str(e.value).startswith(f"{src}: ") and message in str(e.value) and "\n" not in str(e.value)
    assert run_subcommand("import-teacher", [str(src), str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err == f"error: {e.value}\n"
    assert not (tmp_path / "out").exists()


def test_imagenet_config_runs_with_imported_teacher(tmp_path):
    """configs/imagenet.py:teacher=DIR: the config validates and get_teacher accepts the teacher's normalisation
    and input size (a torchvision ResNet-18 with 1000 classes, imported from .safetensors)."""
    imagenet = config("imagenet")

    from oefsmc_jax.config_validation import validate
    from oefsmc_jax.errors import ConfigError
    from oefsmc_jax.teacher import get_teacher

    src, out = tmp_path / "resnet18.safetensors", tmp_path / "r18"
    write_safetensors(src, gen.state_dict(18, num_classes=1000))
    import_teacher(src, out)
    c = imagenet.get_config(f"arch=imagenet_resnet18,teacher={out}")
    validate(c, num_devices=1)
    pre = load_model(out)[2]["preprocessing"]
    assert c.data.image_size == pre["image_size"] == pre["crop"]
    assert abs(c.data.id.center_crop_fraction - pre["crop"] / pre["resize"]) < 1e-9
    spec, _ = get_teacher(c, tmp_path / "work", None, None)
    assert spec == imagenet_resnet_spec(18)
    c.teacher.checkpoint = str(src)  # the state dict itself, imported on the fly
    spec, variables = get_teacher(c, tmp_path / "work", None, None)
    assert spec == imagenet_resnet_spec(18)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(load_model(out)[1])):
        np.testing.assert_array_equal(a, b)
    c.data.mean = (0.5, 0.5, 0.5)
    with pytest.raises(ConfigError, match="differ from the teacher's own normalisation"):
        get_teacher(c, tmp_path / "work", None, None)
