"""One process per workdir (``oefsmc_jax/workdir_lock.py``), fsync'ed atomic writes, and a real full or read-only
disk ending in one line with exit 74 and no traceback from any thread (``oefsmc_jax/disk_errors.py``).

The disk tests mount a small tmpfs (the tests run as root); where mounting is not permitted they are skipped.
"""

import errno
import json
import os
import pathlib
import subprocess
import sys
import threading

import ml_collections
import pytest
from helpers import config, run_cli

from oefsmc_jax import cli_util, paths, workdir_lock
from oefsmc_jax.workdir_lock import WorkdirBusy

REPO = pathlib.Path(__file__).resolve().parents[1]
import tiny_demo  # noqa: E402

demo = config("demo")

ENV = {**os.environ, "PYTHONPATH": str(REPO)}

HOLDER = """\
import sys
from oefsmc_jax import workdir_lock

@workdir_lock.scope
def hold():
    workdir_lock.take(sys.argv[1])
    print("locked", flush=True)
    sys.stdin.read()  # until the test closes stdin (or kills this process)

hold()
"""


def _holder(workdir):
    """A process holding ``workdir``'s lock until its stdin is closed; returns the process once it holds it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)], cwd=REPO, env=ENV, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@workdir_lock.scope
def _take_and(workdir, then=lambda: None):
    workdir_lock.take(workdir)
    return then()


# ---------------------------------------------------------------------------------------------------------- lock


def test_second_run_on_a_locked_workdir_is_refused_with_exit_73_naming_the_holder(tmp_path):
    work = tmp_path / "w"
    holder = _holder(work)
    try:
        out = run_cli(["--config", "configs/demo.py", "--workdir", str(work)], env=ENV, timeout=300)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == cli_util.EXIT_LOCKED == 73, out.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert lines[0].startswith(f"error: workdir {work} is in use by PID {holder.pid} on ")
    assert lines[0].endswith("; wait for it or stop it (a lock left by a dead process is taken over)")
    assert sorted(p.name for p in work.iterdir()) == []  # the refused run wrote nothing; the holder removed .lock


def test_grid_workdir_is_locked_and_its_cells_lock_their_own_folders(tmp_path):
    from oefsmc_jax.experiments import run_grid

    base = demo.get_config()
    grid = ml_collections.ConfigDict({
        "title": "t", "rho": 4.0, "base": base, "teacher_for_arch": {},
        "groups": [{"name": "g", "method": ["kd"], "arch": ["resnet8"], "per_class": [3], "mode": ["exp"],
                    "seed": [0], "arms": "base"}]})
    holder = _holder(tmp_path / "g")
    try:
        with pytest.raises(WorkdirBusy, match=rf"workdir {tmp_path / 'g'} is in use by PID {holder.pid} on "):
            run_grid(grid, tmp_path / "g")
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    # a grid holds G's lock while its cells (threads of a group) take G/cells/ID: distinct folders, no conflict
    seen = []

    def cells():
        threads = [threading.Thread(target=lambda i=i: seen.append(_take_and(tmp_path / "g" / "cells" / str(i),
                                                                             lambda: "ok"))) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    _take_and(tmp_path / "g", cells)
    assert seen == ["ok"] * 3


def test_same_workdir_in_another_thread_is_refused_not_deadlocked(tmp_path):
    errors = []

    def other():
        try:
            _take_and(tmp_path)
        except WorkdirBusy as e:
            errors.append(str(e))

    def inside():
        t = threading.Thread(target=other)
        t.start()
        t.join(timeout=30)

    _take_and(tmp_path, inside)
    assert len(errors) == 1 and f"in use by PID {os.getpid()} on " in errors[0]


def test_lock_left_by_a_dead_process_is_taken_over(tmp_path, capfd):
    (tmp_path / ".lock").write_text(json.dumps({"pid": 999999, "host": "gone", "since": "yesterday"}))  # no flock
    held = _take_and(tmp_path, lambda: json.loads((tmp_path / ".lock").read_text()))
    assert held["pid"] == os.getpid()
    assert "took over the lock of PID 999999 on gone since yesterday" in capfd.readouterr().err
    # a holder killed with SIGKILL: the kernel drops its flock, its file stays and is taken over
    holder = _holder(tmp_path)
    holder.kill()
    holder.wait(timeout=30)
    assert (tmp_path / ".lock").exists()
    _take_and(tmp_path)
    assert f"took over the lock of PID {holder.pid} on " in capfd.readouterr().err


def test_lock_is_released_on_return_on_error_and_at_exit(tmp_path):
    _take_and(tmp_path)
    assert not (tmp_path / ".lock").exists()
    with pytest.raises(OSError) as e:  # an error escaping the scope names the workdir and frees it
        _take_and(tmp_path, lambda: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    assert e.value.oefsmc_workdir == str(tmp_path)
    _take_and(tmp_path)
    holder = _holder(tmp_path)  # a process that ends normally
    holder.stdin.close()
    assert holder.wait(timeout=30) == 0 and not (tmp_path / ".lock").exists()
    _take_and(tmp_path)


# --------------------------------------------------------------------------------------------------- fsync


def test_atomic_write_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", os.fspath(b))),
                                                     real_replace(a, b))[1])
    target = tmp_path / "result.json"
    paths.write_text_atomic(target, '{"top1": 1}')
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"], events
    assert ".tmp" in events[0][1] and events[1][1] == str(target) and events[2][1] == str(tmp_path)
    assert target.read_text() == '{"top1": 1}' and [p.name for p in tmp_path.iterdir()] == ["result.json"]

    events.clear()
    (tmp_path / "log.jsonl").write_bytes(b'{"a": 1}\n{"torn')  # a torn last line
    paths.append_text(tmp_path / "log.jsonl", '{"b": 2}')
    assert events == [("fsync", str(tmp_path / "log.jsonl"))]
    assert (tmp_path / "log.jsonl").read_text().splitlines() == ['{"a": 1}', '{"torn', '{"b": 2}']


def test_failed_atomic_write_removes_its_temporary_file(tmp_path, monkeypatch):
    def fail(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="No space left"):
        paths.write_text_atomic(tmp_path / "result.json", "{}")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------- disk errors, one line

BACKGROUND = """\
import atexit, errno, sys, threading
from absl import logging
from oefsmc_jax.cli_util import run_reporting_errors

kind = sys.argv[1]


def fn():
    full = OSError(errno.ENOSPC, "No space left on device")
    t = threading.Thread(target=lambda: (_ for _ in ()).throw(full))  # an uncaught error in a thread
    t.start()
    t.join()
    try:
        raise full
    except OSError:  # what Orbax's async save thread logs, with its traceback
        logging.exception("Failed to run Commit operations in background save thread, directory: /w/base/ckpt/20")

    def late():  # a writer flushing at exit (tensorboardX) and a thread dying once its handle is closed
        threading.Thread(target=lambda: (_ for _ in ()).throw(OSError("handle is closed"))).start()
        raise full
    atexit.register(late)

    class Abandoned:  # what tensorstore reports for a write whose asyncio loop was closed when it completed
        def __del__(self):
            raise RuntimeError("Event loop is closed")

    Abandoned()
    if kind == "value":
        raise ValueError('RESOURCE_EXHAUSTED: Error writing local file "/w/base/ckpt/20/d/ab12": '
                         "[OS error 28: No space left on device]")
    if kind == "runtime":
        raise RuntimeError("INTERNAL: Error opening file: Read-only file system [errno=30]")
    raise full


run_reporting_errors(fn)
"""


@pytest.mark.parametrize("kind,expected", [
    ("value", "error: [Errno 28] No space left on device: '/w/base/ckpt/20/d/ab12'; nothing finished was lost"),
    ("runtime", "error: [Errno 30] Read-only file system (writing under /w/base/ckpt/20); nothing finished"),
    ("oserror", "error: [Errno 28] No space left on device (writing under /w/base/ckpt/20); nothing finished"),
])
def test_disk_errors_of_any_writer_and_thread_end_in_one_line_exit_74(kind, expected):
    out = subprocess.run([sys.executable, "-c", BACKGROUND, kind], cwd=REPO, env=ENV, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 74, out.stderr[-3000:]
    assert out.stderr.count("\n") == 1 and out.stderr.startswith(expected), out.stderr[-3000:]


def test_which_errors_count_as_a_full_or_read_only_disk():
    from jax.errors import JaxRuntimeError

    from oefsmc_jax.disk_errors import as_os_error

    e = as_os_error(ValueError('RESOURCE_EXHAUSTED: Error writing local file "/w/d/ab": [OS error 28]'))
    assert (e.errno, e.filename) == (errno.ENOSPC, "/w/d/ab")
    assert as_os_error(JaxRuntimeError("INTERNAL: open: Read-only file system")).errno == errno.EROFS
    # the same status for device memory is no disk error; nor is a permission error (it exits 74 as an OSError)
    assert as_os_error(JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8 bytes.")) is None
    assert as_os_error(OSError(errno.EACCES, "Permission denied", "/x")) is None
    assert as_os_error(ValueError("class 3 has 28 examples")) is None


# ---------------------------------------------------------------------------------------- real tmpfs mounts


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a tmpfs at ``tmp_path/mnt`` of the size given to the returned function; unmounted afterwards."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounted = []

    def mount(size):
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True,
                           text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {r.stderr.strip()}")
        mounted.append(mnt)
        return mnt

    yield mount
    for m in mounted:
        subprocess.run(["umount", "-l", str(m)], capture_output=True)


def _remount(mnt, opts):
    subprocess.run(["mount", "-o", f"remount,{opts}", str(mnt)], check=True, capture_output=True)


SMALL = {**tiny_demo.OVERRIDES, "teacher.steps": 20, "train.steps": 60, "train.ckpt_every": 20,
         "train.log_every": 20, "oe.eval_every": 20}
PROGRESS = ("run: ", "data: ", "teacher: ", "[", "| ", "report: ", "workdir: ", "oefsmc: preloading")


def _demo_cli(work):
    out = run_cli(["--config", "configs/demo.py:per_class=5", "--workdir", str(work), *tiny_demo.flags(SMALL)],
                  env=ENV, timeout=900)
    return out.returncode, out.stderr, [ln for ln in out.stderr.splitlines() if ln.strip() and
                                        not ln.startswith(PROGRESS)]


@pytest.mark.slow
def test_real_full_disk_mid_run_is_one_line_exit_74_and_the_rerun_finishes(tmpfs):
    mnt = tmpfs("600k")  # fills up in the teacher's or the first student's checkpoints (Orbax, tensorstore)
    code, err, lines = _demo_cli(mnt / "w")
    assert "Traceback" not in err, err[-4000:]
    assert code == 74 and len(lines) == 1, err[-4000:]
    assert lines[0].startswith("error: [Errno 28] No space left on device") and str(mnt / "w") in lines[0]
    assert lines[0].endswith("nothing finished was lost: rerun the same command once the workdir is writable")
    assert not (mnt / "w" / ".lock").exists()
    teacher_done = (mnt / "w" / "teacher" / "model").exists()  # where the disk fills up depends on timing
    _remount(mnt, "size=16m")
    code, err, lines = _demo_cli(mnt / "w")
    assert code == 0 and "Traceback" not in err, err[-4000:]
    assert (mnt / "w" / "report.md").exists() and ("teacher: reusing" in err or not teacher_done)


def test_real_read_only_workdir_is_one_line_exit_74_and_changes_nothing(tmpfs):
    mnt = tmpfs("1m")
    work = mnt / "w"
    (work / "base").mkdir(parents=True)
    for name in ("config.json", "subset.json", "base/result.json"):
        (work / name).write_text('{"finished": true}')
    _remount(mnt, "ro")
    code, err, lines = _demo_cli(work)
    assert "Traceback" not in err, err[-4000:]
    assert code == 74 and lines == [f"error: [Errno 30] Read-only file system: '{work / '.lock'}'; nothing finished "
                                    "was lost: rerun the same command once the workdir is writable"], err[-4000:]
    _remount(mnt, "rw")
    assert sorted(str(p.relative_to(work)) for p in work.rglob("*")) == ["base", "base/result.json", "config.json",
                                                                         "subset.json"]
    assert all((work / n).read_text() == '{"finished": true}' for n in ("config.json", "base/result.json"))

