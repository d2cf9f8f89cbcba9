#!/usr/bin/env bash
# Run one config on every worker of a Cloud TPU VM (a single host or a pod slice), then copy the results back.
#
#   launch/tpu_vm.sh --name NAME --zone ZONE --config CONFIG.py[:ARG] --workdir WORKDIR [options] [-- --config.x=y ...]
#
# Steps (each printed before it runs; --dry-run prints them and runs nothing):
#   1. create the TPU VM unless it exists (--accelerator-type, --version, --project, --spot)
#   2. copy this checkout (git archive of HEAD) to every worker and install it with the matching jax[tpu]
#   3. a gs:// WORKDIR is used as is: the package reads and writes it through etils.epath (gcsfs, installed in step
#      2) and Orbax, so every host reads and writes the same checkpoints, records and caches; with --gcsfuse it is
#      mounted on every worker at /gcs/BUCKET instead; any other WORKDIR is a path on the workers (one host only)
#   4. run `python -m oefsmc_jax --multihost ...` on all workers, streaming their logs (tfds data from --tfds-data-dir)
#   5. copy results.json, report.md, the plots and the logs of the run back to --results (default runs/tpu/NAME)
#   6. with --delete, delete the VM at the end (it bills until deleted)
#
# Options and defaults (flags, or the environment variable in brackets):
#   --name [TPU_NAME]  --zone [TPU_ZONE]  --project [TPU_PROJECT, default: gcloud's]
#   --accelerator-type [TPU_TYPE, v5litepod-8]  --version [TPU_RUNTIME, v2-alpha-tpuv5-lite]
#   --tfds-data-dir [TFDS_DATA_DIR, e.g. gs://BUCKET/tensorflow_datasets]  --results DIR  --spot  --delete
#   --gcsfuse  --dry-run  --help
set -euo pipefail

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; }

name="${TPU_NAME:-}"; zone="${TPU_ZONE:-}"; project="${TPU_PROJECT:-}"
accel="${TPU_TYPE:-v5litepod-8}"; version="${TPU_RUNTIME:-v2-alpha-tpuv5-lite}"
tfds_dir="${TFDS_DATA_DIR:-}"; config=""; workdir=""; results=""; spot=0; delete=0; dry=0; fuse=0
overrides=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --accelerator-type) accel="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --tfds-data-dir) tfds_dir="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --results) results="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --delete) delete=1; shift ;;
    --dry-run) dry=1; shift ;;
    --gcsfuse) fuse=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; overrides=("$@"); break ;;
    *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
for v in name zone config workdir; do
  if [[ -z "${!v}" ]]; then echo "error: --${v} is required (see --help)" >&2; exit 2; fi
done
results="${results:-runs/tpu/$name}"
gflags=(--zone "$zone")
[[ -n "$project" ]] && gflags+=(--project "$project")

run() {  # print a command (shell-quoted where needed), then run it unless --dry-run
  local a out="+"
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=" $a"; else out+=" '${a//\'/\'\\\'\'}'"; fi
  done
  printf '%s\n' "$out"
  if [[ $dry -eq 0 ]]; then "$@"; fi
}

# the workdir every worker sees: gs://BUCKET/PATH as is (or /gcs/BUCKET/PATH with --gcsfuse), anything else as given
remote_workdir="$workdir"; bucket=""
if [[ "$workdir" == gs://* ]]; then
  rest="${workdir#gs://}"; bucket="${rest%%/*}"
  [[ $fuse -eq 1 ]] && remote_workdir="/gcs/$rest"
fi

# 1. the VM
if [[ $dry -eq 1 ]] || ! gcloud compute tpus tpu-vm describe "$name" "${gflags[@]}" >/dev/null 2>&1; then
  create=(gcloud compute tpus tpu-vm create "$name" "${gflags[@]}" --accelerator-type "$accel" --version "$version")
  [[ $spot -eq 1 ]] && create+=(--spot)
  run "${create[@]}"
fi

# 2. the code, installed with the jax[tpu] that matches requirements.txt's jax range
tarball="$(mktemp -d)/oefsmc_jax.tar.gz"
run git archive --format=tar.gz --prefix=oefsmc_jax/ -o "$tarball" HEAD
run gcloud compute tpus tpu-vm scp "$tarball" "$name:oefsmc_jax.tar.gz" "${gflags[@]}" --worker=all
jax_req="$(grep -E '^jax[>=<]' requirements.txt | head -1)"
install="rm -rf oefsmc_jax && tar xzf oefsmc_jax.tar.gz && pip install -q ./oefsmc_jax 'jax[tpu]${jax_req#jax}' gcsfs"
run gcloud compute tpus tpu-vm ssh "$name" "${gflags[@]}" --worker=all --command "$install"

# 3. one shared workdir for all hosts (native gs:// needs nothing more; --gcsfuse mounts the bucket)
if [[ -n "$bucket" && $fuse -eq 1 ]]; then
  mount="command -v gcsfuse >/dev/null || { echo 'deb https://packages.cloud.google.com/apt gcsfuse-jammy main' \
| sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && curl -fsS \
https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add - >/dev/null && sudo apt-get -qq update \
&& sudo apt-get -qq install -y gcsfuse; }; sudo mkdir -p /gcs/$bucket && sudo chown \$USER /gcs/$bucket && \
(mountpoint -q /gcs/$bucket || gcsfuse --implicit-dirs $bucket /gcs/$bucket)"
  run gcloud compute tpus tpu-vm ssh "$name" "${gflags[@]}" --worker=all --command "$mount"
fi

# 4. the run on every worker (logs stream back); the same command twice resumes from the last checkpoint
env_prefix=""
[[ -n "$tfds_dir" ]] && env_prefix="TFDS_DATA_DIR=$(printf '%q' "$tfds_dir") "
cmd="cd oefsmc_jax && source launch/tcmalloc.sh && ${env_prefix}python -m oefsmc_jax --multihost --config $(printf '%q' "$config") --workdir \
$(printf '%q' "$remote_workdir")"
for o in "${overrides[@]}"; do cmd+=" $(printf '%q' "$o")"; done
status=0
run gcloud compute tpus tpu-vm ssh "$name" "${gflags[@]}" --worker=all --command "$cmd" || status=$?

# 5. the results (from the bucket, or from worker 0)
run mkdir -p "$results"
if [[ -n "$bucket" ]]; then
  run gcloud storage rsync --recursive --exclude='.*(checkpoints|compressed|student|tensorboard)/.*' \
    "$workdir" "$results"
else
  run gcloud compute tpus tpu-vm scp --recurse "$name:$remote_workdir" "$results" "${gflags[@]}" --worker=0
fi

# 6. tear down
if [[ $delete -eq 1 ]]; then
  run gcloud compute tpus tpu-vm delete "$name" "${gflags[@]}" --quiet
else
  echo "the VM $name keeps billing until deleted: launch/tpu_vm.sh ... --delete, or" \
       "gcloud compute tpus tpu-vm delete $name --zone $zone" >&2
fi
exit "$status"
