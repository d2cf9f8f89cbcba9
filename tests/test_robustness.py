"""Bad inputs end in one line naming the file or field, never in a raw traceback, a lost checkpoint or a lost result.

Each test backs a row of ``docs/robustness.md`` (issue "hardened", item 6). The tests call the library functions
directly; the command line is run only where its one-line message and exit code are the point.
"""

import errno
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import config, config_import

from oefsmc_jax.config_validation import validate
from oefsmc_jax.data import load_source, open_source
from oefsmc_jax.data.prepare import prepare_data
from oefsmc_jax.errors import ConfigError
from oefsmc_jax.oe.arms import data_needs
from oefsmc_jax.progress import write_json
from oefsmc_jax.teacher import get_teacher

REPO = pathlib.Path(__file__).resolve().parents[1]
cifar10 = config("cifar10")
demo = config("demo")

SHARED = cifar10.shared_data()
AKA20 = SHARED / "teachers" / "akamaster_cifar10_resnet" / "resnet20-12fca82f.npz"
CHEN20 = SHARED / "teachers" / "chenyaofo_cifar10_resnet" / "cifar10_resnet20-eb80202b.npz"


def _images(n, size=16, channels=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


def _npz_source(path, size=16, **fields):
    return {"kind": "npz", "path": str(path), "image_size": size, "channels": 3, **fields}


def _id_npz(path, labels):
    """An ID split of random 16x16 images with ``labels`` (enough images for the demo's counts)."""
    labels = np.asarray(labels)
    np.savez(path, x=_images(len(labels), seed=1), y=labels)
    return path


def _demo_with_id(tmp_path, labels):
    c = demo.get_config()
    c.data.id = _npz_source(_id_npz(tmp_path / "id.npz", labels), split="train")
    return c


def _cli(args, tmp_path, *, runner=None, timeout=180):
    """Run ``python -m oefsmc_jax ARGS`` (or ``runner``); returns (exit code, stderr lines without progress lines)."""
    cmd = [sys.executable, *(runner or ["-m", "oefsmc_jax"]), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [ln for ln in out.stderr.splitlines() if ln.strip() and not ln.startswith(("run: ", "data: "))]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    return out.returncode, lines


def _config_file(tmp_path, body):
    """A config file around the demo config (``--config`` takes any file with ``get_config``)."""
    path = tmp_path / "bad_config.py"
    path.write_text(f"{config_import('demo')}"
                    "from oefsmc_jax.config_defaults import source\n\n\n"
                    f"def get_config(arg=None):\n    c = demo.get_config()\n    {body}\n    return c\n")
    return path


# ----------------------------------------------------------------------------------------------------------
# data files


def _corrupt(kind, path):
    np.savez(path, x=_images(20, 8), y=np.arange(20) % 4)
    raw = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "not_npz":
        path.write_bytes(b"x,y\n1,2\n" * 50)
    elif kind == "bad_crc":  # the zip directory is intact, the bytes of 'x' are not
        raw = bytearray(raw)
        raw[200:220] = b"\xff" * 20
        path.write_bytes(bytes(raw))
    elif kind == "npy":
        np.save(path.with_suffix(".npy"), _images(3, 8))
        path.write_bytes(path.with_suffix(".npy").read_bytes())


@pytest.mark.parametrize("kind,detail", [
    ("truncated", "cannot read this .npz file; is it truncated or corrupt, or not an npz of plain arrays? "
                  "(BadZipFile: File is not a zip file)"),
    ("empty", "cannot read this .npz file; is it truncated or corrupt, or not an npz of plain arrays? "
              "(EOFError: No data left in file)"),
    ("not_npz", "cannot read this .npz file; is it truncated or corrupt, or not an npz of plain arrays? "
                "(ValueError: This file contains pickled (object) data."),
    ("bad_crc", "cannot read array 'x' of this .npz file; is it truncated or corrupt, or not an npz of plain "
                "arrays? (BadZipFile: Bad CRC-32 for file 'x.npy')"),
    ("npy", "holds a single (3, 8, 8, 3) array (.npy), not an .npz archive of named arrays"),
], ids=["truncated", "empty", "not_npz", "bad_crc", "npy"])
def test_corrupt_or_truncated_npz_is_named_in_one_line(tmp_path, kind, detail):
    from oefsmc_jax.convert import load_pretrained, teacher_family

    path = tmp_path / f"{kind}.npz"
    _corrupt(kind, path)
    loaders = [lambda: load_source(_npz_source(path, 8)), lambda: open_source(_npz_source(path, 8)),
               lambda: load_pretrained(path)]
    if kind != "bad_crc":  # teacher_family reads the names only, not the damaged bytes
        loaders.append(lambda: teacher_family(path))
    for load in loaders:
        with pytest.raises(ValueError) as e:
            load()
        msg = str(e.value)
        assert msg.startswith(f"{path}: ") and detail in msg and "\n" not in msg, msg


def test_cli_corrupt_data_file_exits_2_in_one_line(tmp_path):
    path = tmp_path / "test.npz"
    _corrupt("truncated", path)
    cfg = _config_file(tmp_path, f"c.data.test = source('npz', 16, path={str(path)!r}, split='test')")
    code, lines = _cli(["--config", str(cfg), "--workdir", str(tmp_path / "w")], tmp_path)
    assert code == 2 and lines == [
        f"error: {path}: cannot read this .npz file; is it truncated or corrupt, or not an npz of plain arrays? "
        "(BadZipFile: File is not a zip file) (set OEFSMC_DEBUG=1 for the traceback)"]


@pytest.mark.needs_data  # reads the shared teachers
def test_import_teacher_with_a_corrupt_check_file_exits_1_in_one_line(tmp_path, capsys):
    from oefsmc_jax.main import run_subcommand
    from oefsmc_jax.training.checkpoint import load_model

    bad = tmp_path / "check.npz"
    bad.write_bytes(b"")
    out = tmp_path / "teacher"
    assert run_subcommand("import-teacher", [str(AKA20), str(out), "--check-npz", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err == (f"error: --check-npz: {bad}: cannot read this .npz file; is it truncated or corrupt, or not an "
                   f"npz of plain arrays? (EOFError: No data left in file) (the model was written to {out})\n")
    assert load_model(out)[0].num_classes == 10  # the imported model is kept


# ----------------------------------------------------------------------------------------------------------
# images of the wrong size or channel count, labels


def test_wrong_channel_count_or_layout_is_named_and_other_sizes_are_converted(tmp_path):
    y = np.arange(6) % 3
    for shape, message in [((6, 16, 16, 5), "'x' has 5 channels per image (shape (6, 16, 16, 5)); expected 1 (gray), "
                                             "2 (gray+alpha), 3 (RGB) or 4 (RGBA)"),
                           ((6, 768), "'x' must be images [N,H,W,C] or [N,H,W], got shape (6, 768)"),
                           ((6, 16, 16, 3, 1), "'x' must be images [N,H,W,C] or [N,H,W], got shape (6, 16, 16, 3, 1)")]:
        path = tmp_path / "bad.npz"
        np.savez(path, x=np.zeros(shape, np.uint8), y=y)
        with pytest.raises(ValueError) as e:
            load_source(_npz_source(path))
        assert str(e.value) == f"{path}: {message}"
    # documented conversions: any size is resized to image_size, gray is replicated, alpha is dropped
    for shape in [(6, 32, 32, 3), (6, 9, 9, 3), (6, 16, 16), (6, 16, 16, 1), (6, 16, 16, 4)]:
        path = tmp_path / "ok.npz"
        np.savez(path, x=np.zeros(shape, np.uint8), y=y)
        assert load_source(_npz_source(path)).x.shape == (6, 16, 16, 3)
    c = demo.get_config()
    c.data.test.image_size = 32  # a split at another resolution than the model's: refused before loading
    with pytest.raises(ConfigError, match=r"^config.data.test.image_size: is 32 but data.image_size is 16$"):
        validate(c, num_devices=1)


def test_missing_arrays_bad_dtypes_and_counts_are_named(tmp_path):
    path = tmp_path / "d.npz"
    for arrays, message in [
        ({"images": _images(4), "y": np.arange(4)}, "no array 'x' (has ['images', 'y'])"),
        ({"x": _images(4).astype(np.float32), "y": np.arange(4)}, "'x' must be uint8 images, got float32"),
        ({"x": _images(4), "y": np.arange(3)}, "4 images but 3 labels"),
        ({"x": _images(4), "y": np.array([0.0, 1.5, 2.0, 1.0])},
         "'y' must be integer class labels [N], got float64 (4,)"),
    ]:
        np.savez(path, **arrays)
        with pytest.raises(ValueError) as e:
            load_source(_npz_source(path))
        assert str(e.value) == f"{path}: {message}"
    np.savez(path, x=_images(4), y=np.array([0.0, 1.0, 2.0, 1.0]))  # whole numbers stored as floats are fine
    np.testing.assert_array_equal(load_source(_npz_source(path)).y, [0, 1, 2, 1])


def test_labels_out_of_range_are_refused_before_training(tmp_path):
    from oefsmc_jax.data import few_sample_indices
    from oefsmc_jax.evaluation import classification_metrics

    c = _demo_with_id(tmp_path, np.tile(np.arange(11), 20))  # label 10 with data.num_classes = 10
    with pytest.raises(ValueError, match=r"^few_sample_indices: label 10 >= number of classes 10$"):
        prepare_data(c, tmp_path, data_needs(c))
    # negative labels are "unlabelled" (-1 is the convention): never drawn, not refused
    idx = few_sample_indices(jax.random.PRNGKey(0), np.array([0, -5, 1, -1, 0, 1]), np.array([1, 1]))
    assert sorted(idx.tolist()) in ([0, 2], [0, 5], [2, 4], [4, 5])
    # test-split labels are checked as the data is prepared, naming the split's source
    c = demo.get_config()
    c.data.test = _npz_source(_id_npz(tmp_path / "test.npz", np.tile(np.arange(11), 5)), split="test")
    with pytest.raises(ValueError, match=r"^evaluation split .*test\.npz.*: 5 labels outside \[0, 10\) \(e\.g\. 10\); "
                                         r"check data.test / data.num_classes$"):
        prepare_data(c, tmp_path, data_needs(c))
    # and the metrics refuse them too
    with pytest.raises(ValueError, match=r"^y has class indices outside \[0, 10\)$"):
        classification_metrics(np.zeros(3, int), np.array([0, 1, 10]), 10, np.ones(10, int))


def test_empty_class_is_named(tmp_path):
    labels = np.tile(np.arange(10), 20)
    c = _demo_with_id(tmp_path, labels[labels != 3])  # class 3 has no image, the exp subset asks for 6
    with pytest.raises(ValueError) as e:
        prepare_data(c, tmp_path, data_needs(c))
    assert str(e.value) == ("few_sample_indices: class 3 has 0 examples but 6 were requested (1 class(es) too "
                            "small: [3])")


def test_pool_smaller_than_the_ood_subset_is_refused(tmp_path):
    c = demo.get_config()
    c.data.ood.num_images = 300  # the automatic OOD size (81 for these counts) plus 500 held out do not fit
    with pytest.raises(ValueError) as e:
        prepare_data(c, tmp_path, data_needs(c))
    assert str(e.value) == ("oe.size + oe.heldout = 81 + 500 exceeds the OOD pool's 300 images "
                            "(sklearn_photos/seed0); lower oe.size / oe.heldout or use a larger pool")


# ----------------------------------------------------------------------------------------------------------
# teachers


@pytest.mark.needs_data  # reads the shared teachers
def test_teacher_of_another_architecture(tmp_path, capfd):
    # a teacher file of another depth than config.arch: the file's own architecture is what runs (config.arch
    # only shapes a teacher trained from scratch), and a note says so; result.json's "spec" names what ran
    c = cifar10.get_config(f"arch=resnet56,teacher={AKA20}")
    spec, _ = get_teacher(c, tmp_path, None, None)
    assert spec.family == "cifar_resnet" and 6 * len(spec.kept[0]) + 2 == 20 and spec.shortcut == "A"
    assert ("teacher: note: the checkpoint is a cifar_resnet with 9 blocks, not the config.arch 'resnet56'; the "
            "checkpoint's architecture is what runs") in capfd.readouterr().err
    get_teacher(cifar10.get_config(f"arch=resnet20,teacher={AKA20}"), tmp_path, None, None)
    assert "note:" not in capfd.readouterr().err
    # another class count: refused
    c = cifar10.get_config(f"teacher={AKA20}")
    c.data.num_classes, c.data.class_names = 100, ()
    with pytest.raises(ValueError, match=r"^teacher.checkpoint: the teacher has 10 classes but data.num_classes "
                                         r"is 100$"):
        get_teacher(c, tmp_path, None, None)
    # another family's normalisation: refused, naming the fields to set
    c = cifar10.get_config(f"teacher={CHEN20}")
    with pytest.raises(ConfigError, match=r"^config.data.mean/std: \(0.485, 0.456, 0.406\) / \(0.229, 0.224, 0.225\) "
                                          r"differ from the teacher's own normalisation"):
        get_teacher(c, tmp_path, None, None)
    # not a CIFAR ResNet state dict at all (here a data file): refused, naming the keys it has
    c = cifar10.get_config(f"teacher={SHARED / 'dtd10_32x32.npz'}")
    with pytest.raises(ValueError, match=r"dtd10_32x32.npz: cannot tell the teacher family: no 'linear.\*' "
                                         r"\(akamaster\) nor 'fc.\*'"):
        get_teacher(c, tmp_path, None, None)
    # a folder that holds no model
    (tmp_path / "empty_model").mkdir()
    c = cifar10.get_config(f"teacher={tmp_path / 'empty_model'}")
    with pytest.raises(FileNotFoundError, match=r"empty_model holds no finished checkpoint$"):
        get_teacher(c, tmp_path, None, None)


# ----------------------------------------------------------------------------------------------------------
# config typos


@pytest.mark.parametrize("args,expected", [
    (["--config", "configs/demo.py", "--config.train.steps=abc"],
     "error: flag --config.train.steps=abc: invalid literal for int() with base 10: 'abc'"),
    (["--config", "configs/nope.py"], "error: Configuration is not available because of an earlier failure to "
                                      "load: [Errno 2] No such file or directory: 'configs/nope.py'"),
], ids=["wrong_type", "missing_file"])
def test_cli_config_value_of_the_wrong_type_or_missing_file(args, expected, tmp_path):
    code, lines = _cli([*args, "--workdir", str(tmp_path / "w")], tmp_path)
    assert code == 2 and lines == [expected]
    assert not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------------------------------------
# read-only workdir, full disk

GUARD = """\
import builtins, io, os, runpy, sys
root, code = os.path.abspath(sys.argv[1]), int(sys.argv[2])
real_open = io.open
def guarded(file, mode="r", *a, **k):  # every write under root fails with errno `code`
    if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+") and \\
            os.path.abspath(os.fspath(file)).startswith(root + os.sep):
        raise OSError(code, os.strerror(code), os.fspath(file))
    return real_open(file, mode, *a, **k)
builtins.open = io.open = guarded
sys.argv = ["oefsmc", *sys.argv[3:]]
runpy.run_module("oefsmc_jax", run_name="__main__")
"""


def _guard_writes(monkeypatch, root, code):
    import builtins
    import io

    real_open = io.open

    def guarded(file, mode="r", *a, **k):
        if isinstance(file, (str, pathlib.PurePath)) and any(ch in mode for ch in "wax+") and \
                pathlib.Path(file).absolute().is_relative_to(root):
            raise OSError(code, f"{errno.errorcode[code]} (simulated)", str(file))
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(io, "open", guarded)
    monkeypatch.setattr(builtins, "open", guarded)


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS, errno.ENOSPC])
def test_unwritable_workdir_fails_before_touching_a_finished_run(tmp_path, monkeypatch, code):
    from oefsmc_jax.run import run

    work = tmp_path / "w"
    (work / "base").mkdir(parents=True)
    for name in ("config.json", "subset.json", "base/result.json"):
        (work / name).write_text('{"finished": true}')
    _guard_writes(monkeypatch, work, code)
    with pytest.raises(OSError) as e:
        run(demo.get_config(), work)
    assert e.value.errno == code and "config.json.tmp" in e.value.filename
    for name in ("config.json", "subset.json", "base/result.json"):
        assert (work / name).read_text() == '{"finished": true}'


def test_full_disk_while_writing_a_result_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "base" / "result.json"
    write_json(path, {"top1": 50.0})
    from oefsmc_jax import paths

    cls = type(paths.as_path(path))  # every write of the path layer ends in this class's write_bytes
    real_write = cls.write_bytes

    def half_then_enospc(self, data, *a, **k):  # the disk fills up half-way through the file
        real_write(self, data[: len(data) // 2], *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(cls, "write_bytes", half_then_enospc)
    with pytest.raises(OSError, match="No space left on device"):
        write_json(path, {"top1": 60.0, "arm": "base"})
    assert json.loads(path.read_text()) == {"top1": 50.0}


def test_full_disk_at_a_checkpoint_keeps_the_previous_one_and_resumes(tmp_path, monkeypatch):
    from oefsmc_jax.methods import BP
    from oefsmc_jax.models import build_model, cifar_resnet_spec
    from oefsmc_jax.training.checkpoint import Checkpointer
    from oefsmc_jax.training.loop import finetune
    from oefsmc_jax.training.parallel import make_mesh, replicate
    from oefsmc_jax.training.step import StepConfig, StepData
    from oefsmc_jax.training.train import LoopConfig, RunJob

    spec = cifar_resnet_spec(8, 4, widths=(4, 4, 4))
    abstract = jax.eval_shape(lambda: build_model(spec).init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)),
                                                             train=False))
    rng = np.random.default_rng(0)
    teacher = {"params": jax.tree.map(lambda a: rng.normal(0, 0.3, a.shape).astype(a.dtype), abstract["params"]),
               "batch_stats": jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract["batch_stats"]),
               "masks": jax.tree.map(lambda a: np.ones(a.shape, a.dtype), abstract["masks"])}
    for bn in jax.tree.leaves(teacher["batch_stats"], is_leaf=lambda d: isinstance(d, dict) and "var" in d):
        bn["var"] += 1.0
    mesh = make_mesh(1)
    y = np.repeat(np.arange(4), 3).astype(np.int32)
    data = replicate(StepData(_images(len(y), 8), y, None, None, np.full(4, 0.25, np.float32),
                              np.ones(4, np.float32)), mesh)

    recipe = BP((0.5,) * 3).recipe()  # one object: the three runs share one compiled step

    def train(work, steps):
        return finetune(RunJob(name="r", workdir=work, mesh=mesh, spec=spec, variables=teacher,
                               recipe=recipe, teacher_spec=spec, teacher_variables=teacher, data=data,
                               step_cfg=StepConfig(batch_id=4, pad=1),
                               loop=LoopConfig(steps=steps, log_every=100, ckpt_every=1),
                               optim_cfg={"name": "sgd", "lr": 0.05, "momentum": 0.9, "schedule": "constant"},
                               seed=0))

    ref = train(tmp_path / "ref", 3)
    real_save = Checkpointer.save

    def save(self, step, *a, **k):
        if step >= 2:
            self.manager.wait_until_finished()  # Orbax finishes the previous save before it writes the next one
            raise OSError(errno.ENOSPC, "No space left on device (simulated)", str(self.directory / str(step)))
        return real_save(self, step, *a, **k)

    monkeypatch.setattr(Checkpointer, "save", save)
    with pytest.raises(OSError, match="No space left on device"):
        train(tmp_path / "run", 3)
    monkeypatch.setattr(Checkpointer, "save", real_save)
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) == ["1"]
    res = train(tmp_path / "run", 3)  # space freed: the same call resumes from step 1
    assert res.steps_run == 3
    for a, b in zip(jax.tree.leaves(ref.variables), jax.tree.leaves(res.variables)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


RAISE_IN_RUN = """\
import runpy, sys
import oefsmc_jax.run
from oefsmc_jax.training.preemption import NonFiniteError


def run(config, workdir):  # what finetune raises after train.max_nonfinite non-finite steps in a row
    raise NonFiniteError("[base] 10 consecutive steps (to step 12) had a non-finite loss or gradient, so their "
                         "updates were skipped and the run stopped; the newest checkpoint is step 10 in CKPT, "
                         "untouched. Lower optim.lr or check the data; raise train.max_nonfinite to tolerate more.")


oefsmc_jax.run.run = run
sys.argv = ["oefsmc", *sys.argv[1:]]
runpy.run_module("oefsmc_jax", run_name="__main__")
"""


def test_cli_nonfinite_streak_exits_3_in_one_line(tmp_path):
    script = tmp_path / "nan_run.py"
    script.write_text(RAISE_IN_RUN)
    code, lines = _cli(["--config", "configs/demo.py", "--workdir", str(tmp_path / "w")], tmp_path,
                       runner=[str(script)])
    assert code == 3 and len(lines) == 1
    assert lines[0].startswith("error: [base] 10 consecutive steps (to step 12) had a non-finite loss")
    assert "the newest checkpoint is step 10 in CKPT, untouched" in lines[0]


@pytest.mark.parametrize("code", [errno.EACCES, pytest.param(errno.ENOSPC, marks=pytest.mark.slow)])
def test_cli_unwritable_workdir_is_one_line(tmp_path, code):
    guard = tmp_path / "guard.py"
    guard.write_text(GUARD)
    work = tmp_path / "w"
    work.mkdir()
    code_, lines = _cli([str(work), str(code), "--config", "configs/demo.py", "--workdir", str(work)], tmp_path,
                        runner=[str(guard)])
    assert code_ == 74 and len(lines) == 1 and lines[0].startswith("error: ") and "config.json" in lines[0]
    assert "nothing finished was lost" in lines[0]


def test_workdir_of_another_config_is_refused_and_harmless_fields_resume(tmp_path):
    from oefsmc_jax.errors import ConfigError
    from oefsmc_jax.workdir_guards import check_same_config

    old = {"method": {"name": "kd", "prune_ratio": (0.5, 0.5)}, "train": {"steps": 300, "log_every": 25},
           "num_devices": 0, "legacy": 1}
    (tmp_path / "config.json").write_text(json.dumps(old))
    check_same_config(tmp_path / "config.json", {**old, "train": {"steps": 300, "log_every": 5}, "num_devices": 2,
                                                 "new_field": 3})  # logging, devices, added or removed fields: ok
    new = {**old, "method": {"name": "mir", "prune_ratio": (0.5, 0.5)}, "train": {"steps": 2000, "log_every": 25}}
    with pytest.raises(ConfigError, match=r"another config: method.name \('kd' -> 'mir'\), train.steps "
                                          r"\(300 -> 2000\); use a new --workdir"):
        check_same_config(tmp_path / "config.json", new)
    check_same_config(tmp_path / "missing.json", new)  # a fresh workdir
