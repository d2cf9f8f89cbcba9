"""The which-pool-classes-each-rule-picks tool: overlap groups and per-class pick counts, with exact values."""

import numpy as np
import pytest

from oefsmc_jax.experiments.ood_classes import overlap_groups, picks_by_class, table


def test_overlap_groups():
    overlap = {"strict": {"cat": [{"index": 1}], "dog": [{"index": 3}]}, "near": {"deer": [{"index": 0}]}}
    np.testing.assert_array_equal(overlap_groups(overlap, 5), [1, 2, 0, 2, 0])


def test_picks_teacher_complement_exact():
    # 6 pool images of 3 pool classes; ID counts [3, 1]: class 1 needs ceil(1 * 2) = 2 images, class 0 none
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.3, 0.7], [0.95, 0.05], [0.1, 0.9]])
    pool_y = np.array([0, 1, 1, 2, 2, 2])
    p = picks_by_class("teacher_complement", probs, pool_y, np.array([3, 1]), 1.0, 3)
    # the two highest p(class 1): image 5 (0.9, pool class 2) and image 1 (0.8, pool class 1)
    np.testing.assert_array_equal(p, [[0, 0, 0], [0, 1, 1]])
    conf = picks_by_class("teacher_confidence", probs, pool_y, np.array([3, 1]), 1.0, 3)
    # the two most confident images: 4 (0.95 -> class 0, pool class 2) and 0 (0.9 -> class 0, pool class 0)
    np.testing.assert_array_equal(conf, [[1, 0, 1], [0, 0, 0]])


def test_picks_random_expected_values():
    # m = K * n_max - n = 2 * 3 - 4 = 2 images; Gamma for counts [3, 1] with alpha = max + min of beta = n_k / n:
    # beta = [0.75, 0.25], alpha = 1, Gamma = [0.25, 0.75] / 1 = [0.25, 0.75]; pool shares [1/6, 2/6, 3/6]
    pool_y = np.array([0, 1, 1, 2, 2, 2])
    p = picks_by_class("random", np.zeros((6, 2)), pool_y, np.array([3, 1]), 1.0, 3)
    np.testing.assert_allclose(p, 2 * np.outer([0.25, 0.75], [1 / 6, 2 / 6, 3 / 6]), rtol=1e-6)
    rows = table(p, np.array([2, 0, 0]), ["a", "b", "c"], ["x", "y"], "random")
    assert "| x | 0 | 17 % | 0 % |" in rows[4] and "| **all** | 2 | 17 % | 0 % | |" in rows[-2]


def test_pools_load_as_the_runs_see_them(shared_data):
    from oefsmc_jax.experiments.ood_classes import load_pool

    name, x, y, names, group = load_pool(shared_data, "tiny")
    assert name == "tinyimagenet_val_32x32.npz" and len(y) == 10000 and len(names) == 200
    assert (group == 2).sum() > 0 and (group == 1).sum() > 0
    _, xd, yd, _, _ = load_pool(shared_data, "tiny_disjoint")
    assert len(yd) == 8500 and len(xd) == 8500 and not np.isin(yd, np.flatnonzero(group > 0)).any()
    name, x, y, names, group = load_pool(shared_data, "dtd")
    assert name == "dtd10_32x32.npz" and len(y) == 1200 and len(names) == 10 and not group.any()
    with pytest.raises(ValueError, match="--pool 'nope': allowed: tiny, tiny_disjoint, dtd"):
        load_pool(shared_data, "nope")
