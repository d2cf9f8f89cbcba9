"""Commands that write a folder (export, import-teacher) never delete what they did not write: an OUT that is, holds
or lies inside the run directory (or the teacher file) is refused even with --overwrite, a non-empty OUT without it,
and --overwrite replaces OUT atomically. JSON and model files that do not parse are named in one line."""

from __future__ import annotations

import errno
import pathlib
import shutil

import pytest
import test_export  # a test module beside this one

from oefsmc_jax import export, paths
from oefsmc_jax.export import export_student, load_compressed
from oefsmc_jax.training import checkpoint
from oefsmc_jax.training.checkpoint import load_model

run_dir = test_export.run_dir  # the fake finished run of test_export (a pytest fixture), built once here

TEACHER = ("teachers", "akamaster_cifar10_resnet", "resnet20-12fca82f.npz")


def snapshot(root: pathlib.Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes), to assert a folder is byte-identical afterwards."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def truncate(path: pathlib.Path, keep: int = 10) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def read_only_for_writes(init):
    """A ``Checkpointer.__init__`` that fails as a read-only disk does for a model being written (a ``.tmp``
    sibling) and reads as usual."""

    def wrapped(self, directory, max_to_keep=2):
        if ".tmp" in pathlib.Path(directory).name:
            raise OSError(errno.EROFS, "Read-only file system", str(directory))
        init(self, directory, max_to_keep)

    return wrapped


@pytest.fixture
def foreign(tmp_path):
    """A folder of someone else's files."""
    d = tmp_path / "mine"
    (d / "sub").mkdir(parents=True)
    (d / "notes.txt").write_text("precious")
    (d / "sub" / "data.bin").write_bytes(b"\x00\x01")
    return d


# ---------------------------------------------------------------------- the shared rule (paths)
def test_check_output_dir_rules(tmp_path, foreign):
    run = tmp_path / "run"
    (run / "oe").mkdir(parents=True)
    prot = [(run, "the run directory")]
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=r"^--out .*/run is the run directory itself; writing there would "
                                             r"delete it: choose a folder outside it$"):
            paths.check_output_dir(run, overwrite=overwrite, protected=prot)
        with pytest.raises(ValueError, match=r"^--out .*/run/oe lies inside the run directory .*/run; choose"):
            paths.check_output_dir(run / "oe", overwrite=overwrite, protected=prot)
        with pytest.raises(ValueError, match=r"lies inside the run directory"):
            paths.check_output_dir(run / "new" / "deeper", overwrite=overwrite, protected=prot)
        with pytest.raises(ValueError, match=r"^--out .* contains the run directory .*/run; replacing it would "
                                             r"delete that"):
            paths.check_output_dir(tmp_path, overwrite=overwrite, protected=prot)
    (tmp_path / "link").symlink_to(run)  # the same folder under another name
    with pytest.raises(ValueError, match=r"is the run directory itself"):
        paths.check_output_dir(tmp_path / "link", overwrite=True, protected=prot)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match=r"^--out .*/afile is a file, not a folder; choose another path$"):
        paths.check_output_dir(tmp_path / "afile", overwrite=True)
    with pytest.raises(ValueError, match=r"^--out .*/afile/x/y: .*/afile is a file, not a folder"):
        paths.check_output_dir(tmp_path / "afile" / "x" / "y", overwrite=True)
    with pytest.raises(FileExistsError, match=r"^--out .*/mine already exists and is not empty \(it holds: notes.txt, "
                                              r"sub\); choose another folder, or pass --overwrite"):
        paths.check_output_dir(foreign)
    assert paths.check_output_dir(foreign, overwrite=True) == paths.as_path(foreign)
    (tmp_path / "empty").mkdir()
    paths.check_output_dir(tmp_path / "empty")
    paths.check_output_dir(tmp_path / "new" / "out")


def test_replace_dir_is_atomic(tmp_path, foreign, monkeypatch):
    before = snapshot(foreign)

    def partial(tmp):
        tmp.mkdir()
        (tmp / "half").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "half"))

    with pytest.raises(OSError, match="No space left"):
        paths.replace_dir(foreign, partial)
    assert snapshot(foreign) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # the temporary folder is gone

    # the new folder cannot be renamed in: the old one is put back
    real_replace = type(paths.as_path(foreign)).replace

    def failing_replace(self, target):
        if ".tmp" in self.name:
            raise OSError(errno.EIO, "Input/output error", str(self))
        return real_replace(self, target)

    monkeypatch.setattr(type(paths.as_path(foreign)), "replace", failing_replace)
    with pytest.raises(OSError, match="Input/output error"):
        paths.replace_dir(foreign, lambda tmp: (tmp.mkdir(), (tmp / "new").write_text("new")))
    monkeypatch.undo()
    assert snapshot(foreign) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]

    paths.replace_dir(foreign, lambda tmp: (tmp.mkdir(), (tmp / "new").write_text("new")))
    assert snapshot(foreign) == {"new": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_read_json_names_the_file(tmp_path):
    f = tmp_path / "config.json"
    f.write_text('{"data": {\n  "mean": [0.5,\n  "std')
    with pytest.raises(ValueError, match=r"^.*/config.json is not valid JSON \(truncated or corrupt\?\) "
                                         r"\(Unterminated string starting at: line 3 column 3\)$"):
        paths.read_json(f)
    f.write_bytes(b'{"a": "\xff\xff"}')  # not UTF-8
    with pytest.raises(ValueError, match=r"config.json is not valid JSON \(truncated or corrupt\?\)"):
        paths.read_json(f)


# ---------------------------------------------------------------------- export
def test_export_never_writes_over_the_run(run_dir, capsys):
    wd = run_dir[0]
    before = snapshot(wd)
    for out in (wd, wd / "oe", wd / "oe" / "student", wd / "exported", wd.parent):
        for extra in ([], ["--overwrite"]):
            rc = export.main(["--workdir", str(wd), "--arm", "oe", "--out", str(out), *extra])
            err = one_line(capsys.readouterr().err)
            assert rc == 2 and err.startswith(f"error: --out {out} ") and "the run directory" in err, err
            assert snapshot(wd) == before
    assert not (wd / "exported").exists()
    load_model(wd / "oe" / "student")  # the student is still whole


def test_export_refuses_a_non_empty_out_and_overwrite_is_atomic(run_dir, tmp_path, foreign, capsys, monkeypatch):
    wd = run_dir[0]
    before = snapshot(foreign)
    args = ["--workdir", str(wd), "--arm", "oe", "--out", str(foreign)]
    assert export.main(args) == 2
    assert one_line(capsys.readouterr().err) == (f"error: --out {foreign} already exists and is not empty (it holds: "
                                                 "notes.txt, sub); choose another folder, or pass --overwrite "
                                                 "(overwrite=True) to replace it")
    assert snapshot(foreign) == before

    # a failure in the middle of the write (after the arrays, before the swap): OUT is as it was
    real_close = checkpoint.Checkpointer.close

    def close_then_fail(self):
        real_close(self)
        if ".tmp" in self.directory.name:  # the model being written, not the student being read
            raise OSError(errno.ENOSPC, "No space left on device", str(self.directory))

    monkeypatch.setattr(checkpoint.Checkpointer, "close", close_then_fail)
    assert export.main([*args, "--overwrite"]) == 74
    err = one_line(capsys.readouterr().err)
    assert err.startswith(f"error: No space left on device: {foreign}.tmp"), err
    monkeypatch.undo()
    assert snapshot(foreign) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary folder left

    assert export.main([*args, "--overwrite"]) == 0
    capsys.readouterr()
    assert load_model(foreign)[2]["arm"] == "oe" and not (foreign / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_export_out_under_a_file_and_unwritable_out(run_dir, tmp_path, capsys, monkeypatch):
    wd = run_dir[0]
    (tmp_path / "somefile").write_text("keep")
    for out, tail in ((tmp_path / "somefile" / "x", f"{tmp_path / 'somefile'} is a file, not a folder"),
                      (tmp_path / "somefile", "is a file, not a folder")):
        assert export.main(["--workdir", str(wd), "--arm", "oe", "--out", str(out), "--overwrite"]) == 2
        err = one_line(capsys.readouterr().err)
        assert err.startswith(f"error: --out {out}") and tail in err, err
    assert (tmp_path / "somefile").read_text() == "keep"

    monkeypatch.setattr(checkpoint.Checkpointer, "__init__", read_only_for_writes(checkpoint.Checkpointer.__init__))
    out = tmp_path / "ro"
    assert export.main(["--workdir", str(wd), "--arm", "oe", "--out", str(out)]) == 74
    assert one_line(capsys.readouterr().err).startswith(f"error: Read-only file system: {out}.tmp")
    assert not out.exists()


def test_json_and_model_files_that_do_not_parse_are_named(run_dir, tmp_path, capsys):
    wd = tmp_path / "run"
    shutil.copytree(run_dir[0], wd)
    out = tmp_path / "small"
    export_student(wd, "oe", out)

    # the run's config.json and result.json
    good = (wd / "config.json").read_bytes()
    truncate(wd / "config.json", 30)
    assert export.main(["--workdir", str(wd), "--arm", "oe", "--out", str(tmp_path / "o")]) == 2
    assert one_line(capsys.readouterr().err).startswith(
        f"error: {wd / 'config.json'} is not valid JSON (truncated or corrupt?) (")
    (wd / "config.json").write_bytes(good)
    (wd / "oe" / "result.json").write_text('{"metrics": {"top1": 5')
    with pytest.raises(ValueError, match=r"oe/result.json is not valid JSON \(truncated or corrupt\?\)"):
        export_student(wd, "oe", tmp_path / "o")
    (wd / "oe" / "result.json").unlink()
    assert not (tmp_path / "o").exists()

    # the exported model's JSON files (its meta and spec; Orbax's array index)
    for rel in ("0/meta/metadata", "0/state/_METADATA"):
        bad = tmp_path / rel.replace("/", "_")
        shutil.copytree(out, bad)
        truncate(bad / rel, 50)
        with pytest.raises(ValueError, match=rf"^{bad / rel} is not valid JSON \(truncated or corrupt\?\)"):
            load_compressed(bad)

    # a truncated array file of the exported model, and of the run's own student
    bad = tmp_path / "bad_arrays"
    shutil.copytree(out, bad)
    for f in (bad / "0" / "state").rglob("d/*"):
        truncate(f)
    with pytest.raises(ValueError, match=rf"^model checkpoint {bad} is unreadable \(truncated or corrupt\?\): "):
        load_compressed(bad)
    for f in (wd / "oe" / "student" / "0" / "state").rglob("d/*"):
        truncate(f)
    assert export.main(["--workdir", str(wd), "--arm", "oe", "--out", str(tmp_path / "o")]) == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith(f"error: model checkpoint {wd / 'oe' / 'student'} is unreadable (truncated or corrupt?)")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------- import-teacher
def test_import_teacher_keeps_what_it_did_not_write(shared_data, tmp_path, foreign, capsys, monkeypatch):
    from oefsmc_jax.main import run_subcommand

    src = shared_data.joinpath(*TEACHER)
    before = snapshot(foreign)
    assert run_subcommand("import-teacher", [str(src), str(foreign)]) == 1
    assert one_line(capsys.readouterr().err).startswith(f"error: OUT_DIR {foreign} already exists and is not empty")
    assert snapshot(foreign) == before

    # OUT_DIR holding the teacher file: refused even with --overwrite
    own = tmp_path / "teachers"
    own.mkdir()
    shutil.copy(src, own / "t.npz")
    assert run_subcommand("import-teacher", [str(own / "t.npz"), str(own), "--overwrite"]) == 1
    assert "contains the teacher file" in one_line(capsys.readouterr().err)
    assert (own / "t.npz").read_bytes() == src.read_bytes()

    assert run_subcommand("import-teacher", [str(src), str(own / "t.npz" / "out")]) == 1
    assert "t.npz is a file, not a folder" in one_line(capsys.readouterr().err)

    monkeypatch.setattr(checkpoint.Checkpointer, "__init__", read_only_for_writes(checkpoint.Checkpointer.__init__))
    assert run_subcommand("import-teacher", [str(src), str(foreign), "--overwrite"]) == 74
    assert one_line(capsys.readouterr().err).startswith(f"error: Read-only file system: {foreign}.tmp")
    monkeypatch.undo()
    assert snapshot(foreign) == before

    assert run_subcommand("import-teacher", [str(src), str(foreign), "--overwrite"]) == 0
    assert f"wrote {foreign}" in capsys.readouterr().out
    assert load_model(foreign)[2]["family"] == "akamaster" and not (foreign / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "teachers"]
