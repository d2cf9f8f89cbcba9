"""Importing the akamaster CIFAR-10 ResNet teachers: accuracy on real data, checkpoint round trip, errors."""

from __future__ import annotations

import hashlib
import sys
import time

import jax
import numpy as np
import pytest
from helpers import fake_torch, torch_state_dict

from oefsmc_jax.convert import (
    AKAMASTER_MEAN,
    AKAMASTER_STD,
    convert_akamaster_state_dict,
    import_teacher,
    load_akamaster_npz,
    load_akamaster_th,
)
from oefsmc_jax.data import load_source
from oefsmc_jax.main import run_subcommand
from oefsmc_jax.models import build_model, cifar_resnet_spec
from oefsmc_jax.training.checkpoint import load_model
from oefsmc_jax.training.parallel import make_mesh
from oefsmc_jax.training.step import make_predict

TEACHERS = {  # depth -> (file stem, README top-1 on the full JPEG-q75 test set)
    20: ("resnet20-12fca82f", 81.03),
    32: ("resnet32-d509ac18", 82.56),
    44: ("resnet44-014dd654", 82.67),
    56: ("resnet56-4bfd9763", 83.20),
}


def teacher_file(shared_data, depth: int, suffix: str = ".npz"):
    return shared_data / "teachers" / "akamaster_cifar10_resnet" / (TEACHERS[depth][0] + suffix)


@pytest.fixture(scope="module")
def eval_sets(shared_data) -> dict:
    """The lossless train images 0-3999 and the full JPEG-q75 test set (uint8 images, int labels)."""
    out = {}
    files = (("lossless4k", "cifar10_train_lossless_first4000.npz"), ("jpeg_test", "cifar10_test_jpeg75.npz"))
    for name, fname in files:
        s = load_source({"kind": "npz", "path": str(shared_data / fname), "image_size": 32})
        out[name] = (s.x, s.y)
    return out


@pytest.fixture(scope="module")
def mesh():
    return make_mesh()


@pytest.fixture(scope="module")
def imported(shared_data, tmp_path_factory) -> dict:
    """depth -> checkpoint directory written by import_teacher (lazily, once per module)."""
    root = tmp_path_factory.mktemp("teachers")
    cache: dict = {}

    def get(depth: int):
        if depth not in cache:
            out = root / f"resnet{depth}"
            spec = import_teacher(teacher_file(shared_data, depth), out, depth=depth)
            cache[depth] = (spec, out)
        return cache[depth]

    return get


@pytest.mark.parametrize("depth", sorted(TEACHERS))
@pytest.mark.slow
def test_teacher_accuracy(depth, imported, eval_sets, mesh):
    """Each imported teacher (read back from its Orbax checkpoint) reproduces the README accuracies."""
    spec, out = imported(depth)
    spec2, variables, meta = load_model(out)
    assert spec2 == spec == cifar_resnet_spec(depth, 10, shortcut="A")
    predict = make_predict(mesh, build_model(spec2), AKAMASTER_MEAN, AKAMASTER_STD, batch_size=500)
    acc = {}
    t0 = time.perf_counter()
    for name, (x, y) in eval_sets.items():
        acc[name] = 100.0 * float(np.mean(np.argmax(predict(variables, x)["logits"], -1) == y))
    print(f"\nresnet{depth}: lossless train 0-3999 {acc['lossless4k']:.2f}%, JPEG-q75 test "
          f"{acc['jpeg_test']:.2f}% (README {TEACHERS[depth][1]:.2f}%) [{time.perf_counter() - t0:.1f}s]")
    assert acc["lossless4k"] >= 99.0
    assert abs(acc["jpeg_test"] - TEACHERS[depth][1]) <= 0.3


@pytest.mark.slow
def test_import_round_trip(shared_data, imported):
    """import_teacher -> load_model gives back exactly the arrays of load_akamaster_npz, plus the meta."""
    src = teacher_file(shared_data, 20)
    spec, variables = load_akamaster_npz(src)
    spec_ck, out = imported(20)
    spec2, variables2, meta = load_model(out)
    assert spec == spec_ck == spec2
    assert jax.tree.structure(variables) == jax.tree.structure(variables2)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(variables2)):
        assert a.dtype == b.dtype == np.float32
        np.testing.assert_array_equal(a, b)
    assert meta["source"] == str(src) and meta["format"] == "akamaster_npz" and meta["depth"] == 20
    assert meta["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    # the tree is exactly the one the model initialises (structure, shapes, dtypes), masks all ones
    init = build_model(spec).init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32))
    assert jax.tree.structure(init) == jax.tree.structure(variables)
    for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(variables)):
        assert a.shape == b.shape and a.dtype == b.dtype
    assert all(np.all(m == 1) for m in jax.tree.leaves(variables["masks"]))


def test_layouts(shared_data):
    """OIHW -> HWIO for convs, [out, in] -> [in, out] for the head, BN fields to scale/bias/mean/var."""
    src = teacher_file(shared_data, 20)
    spec, v = load_akamaster_npz(src)
    with np.load(src) as f:
        np.testing.assert_array_equal(v["params"]["stem_conv"]["kernel"],
                                      f["conv1.weight"].transpose(2, 3, 1, 0))
        np.testing.assert_array_equal(v["params"]["s1b0"]["conv2"]["kernel"],
                                      f["layer2.0.conv2.weight"].transpose(2, 3, 1, 0))
        np.testing.assert_array_equal(v["params"]["head"]["kernel"], f["linear.weight"].T)
        np.testing.assert_array_equal(v["params"]["head"]["bias"], f["linear.bias"])
        np.testing.assert_array_equal(v["params"]["s2b2"]["bn1"]["scale"], f["layer3.2.bn1.weight"])
        np.testing.assert_array_equal(v["params"]["s2b2"]["bn1"]["bias"], f["layer3.2.bn1.bias"])
        np.testing.assert_array_equal(v["batch_stats"]["s2b2"]["bn1"]["mean"], f["layer3.2.bn1.running_mean"])
        np.testing.assert_array_equal(v["batch_stats"]["stem_bn"]["var"], f["bn1.running_var"])


def _modified_copy(shared_data, tmp_path, edit, depth: int = 20):
    with np.load(teacher_file(shared_data, depth)) as f:
        arrays = {k: f[k] for k in f.files}
    edit(arrays)
    path = tmp_path / "modified.npz"
    np.savez(path, **arrays)
    return path


def _drop(key):
    return lambda a: a.pop(key)


def _reshape_conv1(a):
    a["conv1.weight"] = np.zeros((16, 3, 5, 5), np.float32)


def _extra(a):
    a["fc.weight"] = np.zeros((10, 64), np.float32)


@pytest.mark.parametrize("edit, message", [
    (_drop("layer2.0.bn1.running_var"), "missing key 'layer2.0.bn1.running_var'"),
    (_drop("linear.weight"), "missing key 'linear.weight'"),
    (_reshape_conv1, "key 'conv1.weight' has shape (16,3,5,5), expected (16,3,3,3)"),
    (_extra, "unexpected key 'fc.weight'"),
], ids=["missing", "missing_head", "shape", "unexpected"])
def test_mismatched_files(shared_data, tmp_path, edit, message):
    path = _modified_copy(shared_data, tmp_path, edit)
    with pytest.raises(ValueError) as e:
        load_akamaster_npz(path)
    assert message in str(e.value)
    assert str(path) in str(e.value)


def test_wrong_depth(shared_data, tmp_path):
    with pytest.raises(ValueError, match=r"file has 9 blocks per stage \(resnet56\) but depth=20 was asked"):
        load_akamaster_npz(teacher_file(shared_data, 56), depth=20)
    with pytest.raises(ValueError, match=r"file has 3 blocks per stage \(resnet20\) but depth=32 was asked"):
        import_teacher(teacher_file(shared_data, 20), tmp_path / "out", depth=32)
    assert not (tmp_path / "out").exists()


def test_several_problems_listed_and_extras_ignored(shared_data, tmp_path):
    def edit(a):
        a.pop("layer1.1.conv2.weight")
        a["layer1.0.bn1.num_batches_tracked"] = np.array(1000, np.int64)  # newer PyTorch: accepted, ignored
        a["layer3.0.shortcut.weight"] = np.zeros((64, 32, 1, 1), np.float32)

    path = _modified_copy(shared_data, tmp_path, edit)
    with pytest.raises(ValueError) as e:
        load_akamaster_npz(path)
    msg = str(e.value)
    assert "2 problems" in msg and "'layer1.1.conv2.weight'" in msg and "'layer3.0.shortcut.weight'" in msg
    assert "num_batches_tracked" not in msg


def test_unknown_suffix(tmp_path):
    src = tmp_path / "teacher.h5"
    src.write_bytes(b"")
    with pytest.raises(ValueError, match="unknown teacher format '.h5'"):
        import_teacher(src, tmp_path / "out")


def test_th_path_with_fake_torch(shared_data, tmp_path, monkeypatch):
    """The .th reader strips 'module.' and converts tensors (a stand-in torch module plays torch.load)."""
    with np.load(teacher_file(shared_data, 20)) as f:
        state = torch_state_dict(f, prefix="module.")
    calls = fake_torch(monkeypatch, lambda: {"best_prec1": 91.78, "state_dict": state})
    src = tmp_path / "resnet20.th"
    src.write_bytes(b"not really torch")
    spec, v = load_akamaster_th(src, depth=20)
    spec_ref, v_ref = load_akamaster_npz(teacher_file(shared_data, 20))
    assert spec == spec_ref and calls == [(str(src), "cpu", True)]
    for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(v_ref)):
        np.testing.assert_array_equal(a, b)


def test_th_without_torch(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    src = tmp_path / "resnet20.th"
    src.write_bytes(b"")
    with pytest.raises(ImportError, match=r"pip install torch.*oefsmc_jax\[torch\]"):
        import_teacher(src, tmp_path / "out")


def test_th_real_torch(shared_data):
    """The original torch pickle gives the same variables as the npz export (only with torch installed)."""
    pytest.importorskip("torch")
    for depth in (20, 56):
        spec, v = load_akamaster_th(teacher_file(shared_data, depth, ".th"), depth=depth)
        spec_ref, v_ref = load_akamaster_npz(teacher_file(shared_data, depth))
        assert spec == spec_ref
        for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(v_ref)):
            np.testing.assert_array_equal(a, b)


def test_not_a_state_dict():
    with pytest.raises(ValueError, match="no 'layer"):
        convert_akamaster_state_dict({"conv1.weight": np.zeros((16, 3, 3, 3), np.float32)})


def test_cli(shared_data, tmp_path, capsys):
    """`oefsmc import-teacher SRC OUT --depth 20 --check-npz ...` writes and evaluates."""
    s = load_source({"kind": "npz", "path": str(shared_data / "cifar10_train_lossless_first4000.npz"),
                     "image_size": 32})
    small = tmp_path / "small.npz"
    np.savez(small, x=s.x[:500], y=s.y[:500])
    out = tmp_path / "teacher"
    argv = [str(teacher_file(shared_data, 20)), str(out), "--depth", "20", "--check-npz", str(small)]
    assert run_subcommand("import-teacher", argv) == 0
    text = capsys.readouterr().out
    assert f"wrote {out}" in text and "resnet20" in text
    top1 = float(text.split("top-1 on ")[1].split(": ")[1].split("%")[0])
    assert top1 >= 99.0
    assert load_model(out)[0] == cifar_resnet_spec(20)


def test_cli_error(shared_data, tmp_path, capsys):
    argv = [str(teacher_file(shared_data, 56)), str(tmp_path / "out"), "--depth", "20"]
    assert run_subcommand("import-teacher", argv) == 1
    assert "error: " in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
