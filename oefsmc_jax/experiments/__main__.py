"""``python -m oefsmc_jax.experiments ...``: the same as ``oefsmc experiments ...`` (see :mod:`oefsmc_jax.main`).

``python -m oefsmc_jax.experiments --config GRID.py[:arg] --workdir DIR [--only GROUP] [--cell ID]`` runs (or
resumes) a grid and summarises it into ``DIR/summary``;
``python -m oefsmc_jax.experiments summarize --workdir DIR [--out OUT]`` only rewrites the summary."""

import sys

from oefsmc_jax.main import cli

if __name__ == "__main__":
    cli(["experiments", *sys.argv[1:]])
