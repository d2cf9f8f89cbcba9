#!/usr/bin/env bash
# Run a config on every host of a Cloud TPU VM (single host or pod slice).
# Usage: launch/tpu_vm.sh TPU_NAME ZONE CONFIG[:ARG] WORKDIR [--config.x=y ...]
# WORKDIR must be visible to all hosts (a gs:// bucket or a shared file system) for checkpoints to resume.
# Each host runs the same command; --multihost makes the program call jax.distributed.initialize(), after which the
# mesh spans the chips of all hosts and the same shard_map step runs unchanged.
set -euo pipefail
tpu="$1"; zone="$2"; config="$3"; workdir="$4"; shift 4
repo_dir="${REPO_DIR:-oefsmc_jax}"
extra="$*"
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "
  set -e
  cd $repo_dir
  pip install -q -r requirements.txt 'jax[tpu]'
  python -m oefsmc_jax --multihost --config '$config' --workdir '$workdir' $extra
"
