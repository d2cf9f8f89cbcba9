"""Experiment grids: ``python -m oefsmc_jax.experiments --config configs/paper_cifar10.py[:arg] --workdir DIR``."""

from oefsmc_jax.experiments.grid import Cell, expand
from oefsmc_jax.experiments.runner import cell_config, read_results, run_grid
from oefsmc_jax.experiments.summarize import summarize

__all__ = ["Cell", "cell_config", "expand", "read_results", "run_grid", "summarize"]
