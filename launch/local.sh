#!/usr/bin/env bash
# Run a config locally. Usage: launch/local.sh CONFIG[:ARG] WORKDIR [NUM_SIMULATED_CPU_DEVICES] [--config.x=y ...]
# With a device count, JAX simulates that many CPU devices, so the data-parallel path runs as on a multi-chip host.
set -euo pipefail
cd "$(dirname "$0")/.."
config="$1"; workdir="$2"; shift 2
if [[ $# -gt 0 && "$1" =~ ^[0-9]+$ ]]; then
  export XLA_FLAGS="--xla_force_host_platform_device_count=$1 ${XLA_FLAGS:-}"
  export JAX_PLATFORMS=cpu
  shift
fi
# tcmalloc when installed (faster CPU steps; OEFSMC_TCMALLOC=0 turns it off): see launch/tcmalloc.sh
source launch/tcmalloc.sh
exec python -m oefsmc_jax --config "$config" --workdir "$workdir" "$@"
