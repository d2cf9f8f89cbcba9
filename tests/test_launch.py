"""launch/tpu_vm.sh: the dry run prints every command it would run, in order, and runs none."""

import subprocess
from pathlib import Path

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
