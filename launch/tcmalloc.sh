# Sourced by the launch scripts: preload tcmalloc for the Python process when it is installed.
#
# On the 2-core dev CPU the JAX train step ran 1.19x faster with it (1,220 against 1,451 ms per step, ResNet-56
# benchmark, see benchmarks/README.md); it speeds PyTorch up too. Install it with
#     sudo apt-get install libtcmalloc-minimal4        (Debian / Ubuntu; other systems: gperftools)
# OEFSMC_TCMALLOC=0 turns it off; OEFSMC_TCMALLOC=/path/to/libtcmalloc_minimal.so.4 picks a library explicitly.
oefsmc_tcmalloc="${OEFSMC_TCMALLOC:-1}"
if [[ "$oefsmc_tcmalloc" != 0 ]]; then
  if [[ "$oefsmc_tcmalloc" == 1 ]]; then
    oefsmc_tcmalloc=""
    for lib in /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 /usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4 \
               /usr/lib64/libtcmalloc_minimal.so.4 /usr/lib/libtcmalloc_minimal.so.4 /usr/local/lib/libtcmalloc_minimal.so.4; do
      if [[ -f "$lib" ]]; then oefsmc_tcmalloc="$lib"; break; fi
    done
  elif [[ ! -f "$oefsmc_tcmalloc" ]]; then
    echo "launch: OEFSMC_TCMALLOC=$oefsmc_tcmalloc is not a file; set it to 0, 1 (find it) or a library path" >&2
    exit 2
  fi
  if [[ -n "$oefsmc_tcmalloc" && ":${LD_PRELOAD:-}:" != *":$oefsmc_tcmalloc:"* ]]; then
    export LD_PRELOAD="$oefsmc_tcmalloc${LD_PRELOAD:+:$LD_PRELOAD}"
  fi
fi
unset oefsmc_tcmalloc
