#!/usr/bin/env bash
# The prepared check for one lent NVIDIA GPU (the 2,000-step key comparison and the grouped step's throughput), as
# one script with three verbs.
#
#   bash launch/gpu_check.sh stage          # HERE: copy what must travel into .gpudata/ (data, 48 MB) and .whl/
#                                            # (ml_collections, the one package the GPU image lacks); both git-ignored
#   bash launch/gpu_check.sh throughput     # THERE: benchmarks/grid_throughput.py, R = 1..32 runs at once (vmap)
#   bash launch/gpu_check.sh long 10        # THERE: KD, long-tailed, 10 per class, 2,000 steps, 5 seeds, arms base,
#                                            # paper (oe), random at the same count R off, teacher complement R on
#   bash launch/gpu_check.sh long 50        # the same at 50 per class
#
# THERE is the device machine, called with carry [".gpudata", ".whl"]; everything is written under $OUT (default
# runs/gpu_check), which comes back. SMOKE=1 shrinks each verb to a few steps: a CPU check of the script itself.
# The data is rebuilt there from the JPEG bytes (launch/rebuild_cifar10.py checks the published sha256).
set -euo pipefail
cd "$(dirname "$0")/.."
verb=${1:-}
OUT=${OUT:-runs/gpu_check}
SMOKE=${SMOKE:-0}
SHARED=${OEFSMC_DATA:-../shared/data}

prelude() {  # THERE: packages, data, and where results go
  if ! python3 -c "import ml_collections" 2>/dev/null; then
    [ -d .whl ] || { echo "error: ml_collections is missing and there is no .whl/ (run 'stage' here first)" >&2; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  if [ -d .gpudata ]; then
    export OEFSMC_DATA=$PWD/.gpudata
    python3 launch/rebuild_cifar10.py .gpudata
  fi
  export PYTHONUNBUFFERED=1
  mkdir -p "$OUT"
  { date -u; git rev-parse HEAD 2>/dev/null || true; nvidia-smi -L 2>/dev/null || echo "no nvidia-smi";
    python3 -c "import jax; print('jax', jax.__version__, jax.devices())"; } | tee -a "$OUT/device.txt"
}

case "$verb" in
  stage)
    mkdir -p .gpudata/teachers/akamaster_cifar10_resnet .whl
    for f in cifar10_jpeg75_files.npz tinyimagenet_val_32x32.npz tinyimagenet_cifar10_overlap.json \
             teachers/akamaster_cifar10_resnet/resnet20-12fca82f.npz; do
      cp "$SHARED/$f" ".gpudata/$f"
    done
    mkdir -p .git/info
    for p in /.gpudata/ /.whl/; do grep -qxF "$p" .git/info/exclude 2>/dev/null || echo "$p" >> .git/info/exclude; done
    python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "ml_collections>=1.0,<2"
    du -sh .gpudata .whl
    echo "staged: call the device with carry [\".gpudata\", \".whl\"]"
    ;;
  throughput)
    prelude
    if [ "$SMOKE" = 1 ]; then args=(--runs 1 2 --steps 1 --rounds 1); else args=(--runs 1 2 4 8 16 32 --steps 20 --rounds 3); fi
    python3 -m benchmarks.grid_throughput --impl vmap "${args[@]}" 2>&1 | tee "$OUT/grid_throughput.txt"
    ;;
  long)
    n=${2:?usage: gpu_check.sh long 10|50}
    prelude
    steps=2000 seeds=5
    [ "$SMOKE" = 1 ] && steps=4 seeds=1
    cfg="configs/deconfound_cifar10.py:pool=tiny,steps=$steps,seeds=$seeds,budgets=$n,arms=base+oe+oe_random_matched+oe_complement_r"
    wd="$OUT/long_n$n"
    python3 -m oefsmc_jax.experiments --config "$cfg" --workdir "$wd" --only factorial \
      --config.base.oe.eval_every=100 --config.base.oe.patience=5 --config.base.train.log_every=250 \
      --config.base.train.ckpt_every=500 2>&1 | tee -a "$wd.log"
    rm -rf "$wd/cells" "$wd/cache"  # checkpoints and the pool cache are not brought back; records, summary and log are
    ;;
  *)
    echo "usage: bash launch/gpu_check.sh stage | throughput | long 10|50   (see the comments at the top)" >&2
    exit 2
    ;;
esac
