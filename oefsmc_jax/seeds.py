"""Named random streams of a run: each random choice draws from its own stream, derived from a base seed by name.

A stream is the base seed plus a fixed offset, so the offsets are part of every recorded result: changing one (or
deriving the streams another way, e.g. with ``jax.random.fold_in``) would change every committed record. Two
streams never share an offset, so no two choices are correlated by sharing a seed. The few-sample set and the OOD
split derive from ``subset.seed``; the compression stage's draws from the run's ``seed``.
"""

from __future__ import annotations

import jax
import numpy as np

#: stream name -> offset from its base seed
STREAMS: dict[str, int] = {
    "few_sample": 0,  # subset.seed: which ID training images form the few-sample set
    "ood_split": 1,  # subset.seed: which pool images form the OOD subset and the held-out slice
    "calibration": 2,  # seed: the labels drawn from Gamma for the calibration set's OOD rows
    "compression": 3,  # seed: the key a method's compression stage draws from (CompressionContext.key)
    "val_split": 5,  # subset.seed: the balanced validation split carved from the other training images
    "count_matched": 11,  # seed: the random OOD images of the arms matched to the teacher complement's count
}


def seed(base: int, stream: str) -> int:
    """The integer seed of ``stream`` derived from ``base``."""
    if stream not in STREAMS:
        raise KeyError(f"unknown random stream {stream!r}; known: {', '.join(STREAMS)}")
    return int(base) + STREAMS[stream]


def key(base: int, stream: str) -> jax.Array:
    """A JAX PRNG key for ``stream``."""
    return jax.random.PRNGKey(seed(base, stream))


def rng(base: int, stream: str) -> np.random.Generator:
    """A NumPy generator for ``stream``."""
    return np.random.default_rng(seed(base, stream))
