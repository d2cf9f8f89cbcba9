"""``python -m oefsmc_jax``: see :mod:`oefsmc_jax.main`."""

from oefsmc_jax.main import cli

cli()
