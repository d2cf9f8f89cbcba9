"""Named random streams: distinct, pinned (committed results depend on them), unknown names refused."""

import jax
import numpy as np
import pytest

from oefsmc_jax import seeds


def test_streams_are_distinct_and_pinned():
    assert len(set(seeds.STREAMS.values())) == len(seeds.STREAMS)
    # every committed record was drawn with these offsets; changing one changes every result
    assert seeds.STREAMS == {"few_sample": 0, "ood_split": 1, "calibration": 2, "compression": 3, "val_split": 5,
                             "count_matched": 11}
    assert seeds.seed(7, "val_split") == 12
    np.testing.assert_array_equal(seeds.key(7, "ood_split"), jax.random.PRNGKey(8))
    assert seeds.rng(1, "count_matched").integers(1 << 30) == np.random.default_rng(12).integers(1 << 30)


def test_an_unknown_stream_is_named():
    with pytest.raises(KeyError, match="unknown random stream 'subset'; known: few_sample, ood_split"):
        seeds.seed(0, "subset")
