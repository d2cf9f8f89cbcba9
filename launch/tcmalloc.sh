# Sourced by the launch scripts: preload tcmalloc for the Python process when it is installed.
#
# On the 2-core dev CPU the JAX train step ran 1.19x faster with it (1,220 against 1,451 ms per step, ResNet-56
# benchmark, see benchmarks/README.md); it speeds PyTorch up too. Install it with
#     sudo apt-get install libtcmalloc-minimal4        (Debian / Ubuntu; other systems: gperftools)
# OEFSMC_TCMALLOC=0 turns it off; OEFSMC_TCMALLOC=/path/to/libtcmalloc_minimal.so.4 picks a library explicitly.
# The library is found by oefsmc_jax/allocator.py (standard library only), the same function with which
# `python -m oefsmc_jax` re-executes itself when started without it.
oefsmc_tcmalloc_py="$(dirname "${BASH_SOURCE[0]}")/../oefsmc_jax/allocator.py"
if oefsmc_tcmalloc="$("$(command -v python3 || command -v python)" "$oefsmc_tcmalloc_py" ld-preload)"; then
  if [[ -n "$oefsmc_tcmalloc" ]]; then export LD_PRELOAD="$oefsmc_tcmalloc"; fi
else
  exit 2
fi
unset oefsmc_tcmalloc oefsmc_tcmalloc_py
