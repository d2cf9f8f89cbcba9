"""Several processes (hosts): ``jax.distributed`` set-up for the command line.

On a TPU VM slice, Slurm or Open MPI every argument is detected; elsewhere (several GPU hosts, or two local CPU
processes in the tests) pass the coordinator ``host:port``, the number of processes and this process's id, as flags
(``--coordinator_address``, ``--num_processes``, ``--process_id``) or environment variables
(``JAX_COORDINATOR_ADDRESS``, ``OEFSMC_NUM_PROCESSES``, ``OEFSMC_PROCESS_ID``). CPU processes exchange collectives
through gloo.
"""

from __future__ import annotations

import os


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Call ``jax.distributed.initialize`` (before any other JAX call), with CPU collectives on gloo."""
    import jax

    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None and os.environ.get("OEFSMC_NUM_PROCESSES"):
        num_processes = int(os.environ["OEFSMC_NUM_PROCESSES"])
    if process_id is None and os.environ.get("OEFSMC_PROCESS_ID"):
        process_id = int(os.environ["OEFSMC_PROCESS_ID"])
    if (num_processes is None) != (process_id is None):
        raise ValueError("--num_processes and --process_id go together (or neither, where the cluster is detected)")
    platforms = os.environ.get("JAX_PLATFORMS", "") or str(jax.config.jax_platforms or "")
    if platforms in ("", "cpu"):
        try:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        except (AttributeError, ValueError):  # older or newer JAX without this option
            pass
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
