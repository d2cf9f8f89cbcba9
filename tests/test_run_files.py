"""Files a run wrote and reads back: a damaged cache is recomputed, a damaged subset record is named."""

import numpy as np
import pytest
from helpers import tiny_spec
from test_selection import _demo_config

from oefsmc_jax.data import ImageSet
from oefsmc_jax.data.prepare import prepare_data
from oefsmc_jax.models import init_variables
from oefsmc_jax.oe.arms import data_needs
from oefsmc_jax.teacher import teacher_pool_probs
from oefsmc_jax.training.parallel import make_mesh
from oefsmc_jax.workdir_guards import check_same_subset


@pytest.mark.parametrize("damage", ["truncated", "empty", "other_shape"])
def test_a_damaged_pool_cache_is_computed_again(tmp_path, capfd, damage):
    c = _demo_config("oe_complement")
    c.data.image_size = 16
    spec = tiny_spec()
    pool = ImageSet(np.random.default_rng(0).integers(0, 256, (300, 16, 16, 3), dtype=np.uint8),
                    np.full(300, -1, np.int32), "pool")
    mesh, teacher = make_mesh(1), (spec, init_variables(spec, 16, 0))
    first = np.array(teacher_pool_probs(c, tmp_path, mesh, teacher, pool))
    cache, = (tmp_path / "cache").glob("pool_probs_*.npy")
    data = cache.read_bytes()
    if damage == "other_shape":
        np.save(cache, np.zeros((3, 10), np.float32))
    else:
        cache.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    capfd.readouterr()
    again = teacher_pool_probs(c, tmp_path, mesh, teacher, pool)
    err = capfd.readouterr().err
    assert f"the cached pool probabilities {cache} are unreadable" in err and "computing them again" in err
    np.testing.assert_array_equal(again, first)
    assert cache.read_bytes() == data


def test_a_damaged_subset_record_is_named(tmp_path):
    c = _demo_config("base")
    data = prepare_data(c, tmp_path, data_needs(c))
    (tmp_path / "subset.json").write_text('{"counts": [1, 2')
    with pytest.raises(ValueError, match=r"subset\.json is not valid JSON \(truncated or corrupt\?\)"):
        check_same_subset(tmp_path / "subset.json", data.subset, ood=False)
