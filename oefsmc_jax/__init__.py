"""oefsmc_jax: few-sample, class-imbalanced model compression with out-of-distribution data (OE-FSMC) in JAX/Flax."""

__version__ = "0.1.0"
