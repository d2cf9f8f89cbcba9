"""launch/: the TPU VM dry run prints every command it would run, in order; the GPU check and its data rebuild."""

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _launch(*args):
    return subprocess.run(["bash", str(ROOT / "launch" / "tpu_vm.sh"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_dry_run_prints_every_step_in_order():
    out = _launch("--dry-run", "--name", "t1", "--zone", "us-central2-b", "--project", "p1",
                  "--config", "configs/cifar10.py:data=tfds", "--workdir", "gs://bkt/runs/a",
                  "--tfds-data-dir", "gs://bkt/tfds", "--spot", "--delete", "--", "--config.train.steps=2000")
    assert out.returncode == 0, out.stderr
    cmds = [ln for ln in out.stdout.splitlines() if ln.startswith("+ ")]
    expect = [
        ("gcloud compute tpus tpu-vm create t1 --zone us-central2-b --project p1 --accelerator-type v5litepod-8",
         "--spot"),
        ("git archive --format=tar.gz --prefix=oefsmc_jax/",),
        ("gcloud compute tpus tpu-vm scp", "t1:oefsmc_jax.tar.gz", "--worker=all"),
        ("gcloud compute tpus tpu-vm ssh t1", "--worker=all", "pip install -q ./oefsmc_jax", "jax[tpu]>=0.8.0,<0.12",
         "gcsfs"),
        ("--worker=all", "source launch/tcmalloc.sh",
         "python -m oefsmc_jax --multihost --config configs/cifar10.py:data=tfds",
         "--workdir gs://bkt/runs/a", "TFDS_DATA_DIR=gs://bkt/tfds", "--config.train.steps=2000"),
        ("mkdir -p runs/tpu/t1",),
        ("gcloud storage rsync --recursive", "gs://bkt/runs/a runs/tpu/t1"),
        ("gcloud compute tpus tpu-vm delete t1 --zone us-central2-b --project p1 --quiet",),
    ]
    assert len(cmds) == len(expect), "\n".join(cmds)
    for cmd, parts in zip(cmds, expect):
        for part in parts:
            assert part in cmd, (part, cmd)


def test_gcsfuse_mounts_the_bucket_and_runs_on_the_mount():
    out = _launch("--dry-run", "--name", "t3", "--zone", "z", "--config", "configs/demo.py", "--workdir",
                  "gs://bkt/runs/b", "--gcsfuse")
    assert out.returncode == 0, out.stderr
    cmds = [ln for ln in out.stdout.splitlines() if ln.startswith("+ ")]
    assert "gcsfuse --implicit-dirs bkt /gcs/bkt" in cmds[4] and "--worker=all" in cmds[4]
    assert "--workdir /gcs/bkt/runs/b" in cmds[5]
    assert "gcloud storage rsync --recursive" in cmds[7] and "gs://bkt/runs/b runs/tpu/t3" in cmds[7]


def test_local_workdir_copies_back_from_worker_0_and_keeps_the_vm():
    out = _launch("--dry-run", "--name", "t2", "--zone", "z", "--config", "configs/demo.py", "--workdir", "runs/d")
    assert out.returncode == 0, out.stderr
    cmds = [ln for ln in out.stdout.splitlines() if ln.startswith("+ ")]
    assert not any("gcsfuse" in c or "delete" in c for c in cmds)
    assert "--workdir runs/d" in cmds[4] and "--multihost" in cmds[4]
    assert cmds[-1].startswith("+ gcloud compute tpus tpu-vm scp --recurse t2:runs/d runs/tpu/t2") and \
        "--worker=0" in cmds[-1]
    assert "keeps billing until deleted" in out.stderr


def test_missing_or_unknown_arguments_fail_in_one_line():
    out = _launch("--dry-run", "--zone", "z", "--config", "c.py", "--workdir", "w")
    assert out.returncode == 2 and out.stderr.strip() == "error: --name is required (see --help)"
    out = _launch("--bogus")
    assert out.returncode == 2 and "unknown argument '--bogus'" in out.stderr
    out = _launch("--help")
    assert out.returncode == 0 and "--accelerator-type" in out.stdout and "--dry-run" in out.stdout


def _preload(env_value, preload=""):
    script = f"source {ROOT / 'launch' / 'tcmalloc.sh'}; echo \"LD_PRELOAD=$LD_PRELOAD\""
    env = {"PATH": "/usr/bin:/bin", "OEFSMC_TCMALLOC": env_value, "LD_PRELOAD": preload}
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30, env=env)


def test_tcmalloc_is_preloaded_unless_turned_off(tmp_path):
    lib = tmp_path / "libtcmalloc_minimal.so.4"
    lib.write_bytes(b"")  # only the path is used: sourcing the script loads nothing
    assert _preload(str(lib)).stdout.strip() == f"LD_PRELOAD={lib}"
    assert _preload(str(lib), "/x/other.so").stdout.strip() == f"LD_PRELOAD={lib}:/x/other.so"
    assert _preload(str(lib), f"{lib}").stdout.strip() == f"LD_PRELOAD={lib}"  # never twice
    assert _preload("0", "/x/other.so").stdout.strip() == "LD_PRELOAD=/x/other.so"
    bad = _preload(str(tmp_path / "missing.so"))
    assert bad.returncode == 2 and "OEFSMC_TCMALLOC=" in bad.stderr and "is not a file" in bad.stderr


def test_rebuild_cifar10_decodes_orders_and_checks_the_hash(tmp_path):
    """launch/rebuild_cifar10.py: JPEG bytes -> the shared files' order (train: first per_class of each class in
    stored order; test: by class, then rank), with the decoded array's sha256 checked."""
    import hashlib
    import importlib.util
    import io

    import numpy as np
    from PIL import Image

    spec = importlib.util.spec_from_file_location("rebuild_cifar10", ROOT / "launch" / "rebuild_cifar10.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rng = np.random.default_rng(0)
    files, images = {}, {}
    for split, y, rank in [("train", [1, 0, 1, 0, 1], [0, 0, 1, 1, 2]), ("test", [1, 0, 1, 0], [1, 1, 0, 0])]:
        blobs = []
        for _ in y:
            b = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(b, format="JPEG", quality=75)
            blobs.append(np.frombuffer(b.getvalue(), np.uint8))
        files[f"{split}_jpeg"] = np.concatenate(blobs)
        files[f"{split}_offsets"] = np.cumsum([0] + [len(b) for b in blobs])
        files[f"{split}_y"], files[f"{split}_idx_in_class"] = np.array(y), np.array(rank)
        images[split] = np.stack([np.asarray(Image.open(io.BytesIO(b.tobytes())).convert("RGB")) for b in blobs])
    sha = {s: hashlib.sha256(images[s].tobytes()).hexdigest() for s in images}
    out = mod.rebuild(files, per_class=2, sha256=sha)
    # train: rank < 2 keeps stored indices 0-3, sorted by (class, rank): 1 (0,0), 3 (0,1), 0 (1,0), 2 (1,1)
    np.testing.assert_array_equal(out["train"]["x"], images["train"][[1, 3, 0, 2]])
    assert out["train"]["y"].tolist() == [0, 0, 1, 1] and out["train"]["idx_in_class"].tolist() == [0, 1, 0, 1]
    # test: sorted by (class, rank): 3 (0,0), 1 (0,1), 2 (1,0), 0 (1,1)
    np.testing.assert_array_equal(out["test"]["x"], images["test"][[3, 1, 2, 0]])
    assert out["test"]["y"].dtype == np.int64
    with pytest.raises(ValueError, match="decoded test images: sha256"):
        mod.rebuild(files, per_class=2, sha256={"test": "0" * 64})
    # the command line: a folder without the source file is named; with it, both files are written
    assert mod.main([str(tmp_path)]) == 2
    np.savez(tmp_path / "cifar10_jpeg75_files.npz", **files)
    mod.SHA256 = sha
    assert mod.main([str(tmp_path)]) == 0
    with np.load(tmp_path / "cifar10_test_jpeg75.npz") as f:
        np.testing.assert_array_equal(f["x"], images["test"][[3, 1, 2, 0]])


def test_gpu_check_names_its_verbs():
    out = subprocess.run(["bash", str(ROOT / "launch" / "gpu_check.sh"), "nonsense"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "usage: bash launch/gpu_check.sh stage | throughput | long" in out.stderr
