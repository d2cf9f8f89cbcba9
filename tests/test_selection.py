"""Teacher-guided OOD selection (method.md §4b): pure selection rules, the cached teacher pass, the arms."""

import dataclasses

import jax
import numpy as np
import pytest
from helpers import tiny_spec

from oefsmc_jax.data import ImageSet, image_hashes, ood_split
from oefsmc_jax.data.prepare import prepare_data
from oefsmc_jax.models import init_variables
from oefsmc_jax.oe.arms import arm_selection, data_needs
from oefsmc_jax.oe.selection import (
    complement_requests,
    select,
    select_teacher_complement,
    select_teacher_confidence,
)
from oefsmc_jax.teacher import teacher_pool_probs
from oefsmc_jax.training.parallel import make_mesh

PROBS = np.array([  # 6 pool images x 3 classes
    [0.7, 0.2, 0.1],
    [0.1, 0.8, 0.1],
    [0.2, 0.3, 0.5],
    [0.1, 0.6, 0.3],
    [0.05, 0.05, 0.9],
    [0.4, 0.35, 0.25],
])


def test_complement_requests():
    np.testing.assert_array_equal(complement_requests(np.array([5, 3, 1]), 1.0), [0, 2, 4])
    np.testing.assert_array_equal(complement_requests(np.array([5, 3, 1]), 2.5), [0, 5, 10])
    np.testing.assert_array_equal(complement_requests(np.array([4, 4]), 3.0), [0, 0])


def test_complement_picks_top_images_per_class_without_repeats():
    sel = select_teacher_complement(PROBS, np.array([3, 2, 1]), 1.0)  # requests [0, 1, 2]
    # class 2 (need 2) picks first: images 4 (0.9) and 2 (0.5); class 1 (need 1) then takes image 1 (0.8)
    assert sel.indices.tolist() == [4, 2, 1] and sel.classes.tolist() == [2, 2, 1]
    assert not sel.short and sel.shortfall_message() == ""
    sel = select_teacher_complement(PROBS, np.array([3, 1, 1]), 1.0)  # requests [0, 2, 2]: tie -> class 1 first
    assert sel.indices.tolist() == [1, 3, 4, 2]
    # requests [0, 3, 3]: class 1 (tie, first) takes 1, 3, 5; class 2 ranks 4, 2, 3, 5, 0, 1 but 3 and 5 are taken,
    # so it takes 4, 2, 0 (with repeats allowed it would take 4, 2, 3)
    sel = select_teacher_complement(PROBS, np.array([4, 1, 1]), 1.0)
    assert sel.indices.tolist() == [1, 3, 5, 4, 2, 0] and sel.classes.tolist() == [1, 1, 1, 2, 2, 2]
    assert not sel.short


def test_complement_fills_up_to_the_pool_supply_and_says_so():
    sel = select_teacher_complement(PROBS, np.array([5, 1, 0]), 1.0)  # requests [0, 4, 5] > 6 images
    assert sorted(sel.indices.tolist()) == list(range(6))
    assert sel.supplied.tolist() == [0, 1, 5] and sel.short
    assert "3 of 9 requested images could not be supplied" in sel.shortfall_message()


def test_confidence_takes_the_most_confident_images_of_any_class():
    sel = select_teacher_confidence(PROBS, np.array([3, 2, 1]), 1.0)  # 3 images
    assert sel.indices.tolist() == [4, 1, 0] and sel.classes.tolist() == [2, 1, 0]
    with pytest.raises(ValueError, match="oe.selection: 'random' is not a teacher rule"):
        select("random", PROBS, np.array([1, 1, 1]), 1.0)


def _demo_config(arms):

    from helpers import config

    demo = config("demo")

    c = demo.get_config("per_class=3")
    c.arms = arms
    c.data.ood.num_images = 400
    c.oe.heldout = 50
    return c


def test_random_rule_is_the_seeded_uniform_draw_and_teacher_arms_get_the_rest_of_the_pool(tmp_path):
    c = _demo_config("base,oe,oe_complement")
    assert [arm_selection(c, a) for a in ("base", "oe", "oe_complement", "oe_confidence")] == [
        "none", "random", "teacher_complement", "teacher_confidence"]
    data = prepare_data(c, tmp_path, data_needs(c))
    from oefsmc_jax.data import load_source

    pool = load_source(c.data.ood)
    m = 10 * int(data.counts.max()) - int(data.counts.sum())
    ood_idx, held_idx = ood_split(jax.random.PRNGKey(c.subset.seed + 1), len(pool), m, 50)
    np.testing.assert_array_equal(data.ood.x, pool.x[ood_idx])
    np.testing.assert_array_equal(data.candidates.take().x, np.delete(pool.x, held_idx, axis=0))
    np.testing.assert_array_equal(data.candidate_hashes, image_hashes(np.delete(pool.x, held_idx, axis=0)))


def test_teacher_pool_pass_is_cached_and_keyed_by_the_teacher(tmp_path, capfd):
    c = _demo_config("oe_complement")
    c.data.image_size = 16
    spec = tiny_spec()
    pool = ImageSet(np.random.default_rng(0).integers(0, 256, (300, 16, 16, 3), dtype=np.uint8),
                    np.full(300, -1, np.int32), "pool")
    mesh = make_mesh(1)
    t1 = (spec, init_variables(spec, 16, 0))
    p1 = teacher_pool_probs(c, tmp_path, mesh, t1, pool, chunk=128)
    assert p1.shape == (300, 10) and np.allclose(p1.sum(1), 1, atol=1e-5)
    assert "pool pass 300/300" in capfd.readouterr().err
    again = teacher_pool_probs(c, tmp_path, mesh, t1, pool)
    np.testing.assert_array_equal(again, p1)
    assert "reusing pool probabilities" in capfd.readouterr().err
    p2 = teacher_pool_probs(c, tmp_path, mesh, (spec, init_variables(spec, 16, 1)), pool)
    assert not np.allclose(p2, p1)
    assert len(list((tmp_path / "cache").glob("pool_probs_*.npy"))) == 2


def test_teacher_pool_pass_streams_a_mapped_pool_in_chunks_and_equals_the_in_memory_pass(tmp_path):
    from oefsmc_jax.data import open_source

    c = _demo_config("oe_complement")
    c.data.image_size = 16
    spec = tiny_spec()
    x = np.random.default_rng(1).integers(0, 256, (300, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "pool.npz", x=x)
    src = open_source({"kind": "npz", "path": str(tmp_path / "pool.npz"), "image_size": 16})
    assert src.mapped
    sizes = []
    counted = dataclasses.replace(src, read=lambda idx: (sizes.append(len(idx)), src.read(idx))[1])
    mesh = make_mesh(1)
    t = (spec, init_variables(spec, 16, 0))
    streamed = teacher_pool_probs(c, tmp_path / "a", mesh, t, counted.subset(np.arange(7, 300)), chunk=128)
    assert sizes == [293, 128, 128, 37]  # the content hashes (4,096 a read), then the teacher pass, by chunks
    assert isinstance(streamed, np.memmap)  # served from the cache file, not a host copy
    whole = teacher_pool_probs(c, tmp_path / "b", mesh, t, ImageSet(x[7:], np.full(293, -1, np.int32), "p"))
    np.testing.assert_array_equal(np.asarray(streamed), np.asarray(whole))
    sel = select_teacher_complement(streamed, np.array([5, 1, 1, 1, 1, 1, 1, 1, 1, 1]), 2.0)
    ref = select_teacher_complement(np.array(whole, np.float64), np.array([5, 1, 1, 1, 1, 1, 1, 1, 1, 1]), 2.0)
    np.testing.assert_array_equal(sel.indices, ref.indices)
    conf = select_teacher_confidence(streamed, np.array([5, 1, 1, 1, 1, 1, 1, 1, 1, 1]), 2.0)
    order = np.argsort(-np.asarray(whole).max(1), kind="stable")[:72]
    np.testing.assert_array_equal(conf.indices, order)
    np.testing.assert_array_equal(conf.classes, np.asarray(whole)[order].argmax(1))


def test_pipeline_keeps_an_npz_pool_on_disk_and_reads_only_the_chosen_images(tmp_path):
    import ml_collections

    from oefsmc_jax.data import load_source

    c = _demo_config("base,oe,oe_complement")
    pool = load_source(c.data.ood)
    np.savez(tmp_path / "pool.npz", x=pool.x)
    c.data.ood = ml_collections.ConfigDict({"kind": "npz", "path": str(tmp_path / "pool.npz"),
                                            "image_size": c.data.image_size})
    data = prepare_data(c, tmp_path / "w", data_needs(c))
    assert data.candidates.mapped and len(data.candidates) == len(pool) - 50
    m = 10 * int(data.counts.max()) - int(data.counts.sum())
    ood_idx, held_idx = ood_split(jax.random.PRNGKey(c.subset.seed + 1), len(pool), m, 50)
    np.testing.assert_array_equal(data.ood.x, pool.x[ood_idx])
    np.testing.assert_array_equal(data.heldout.x, pool.x[held_idx])
    keep = np.delete(np.arange(len(pool)), held_idx)
    np.testing.assert_array_equal(data.candidates.take([0, len(keep) - 1]).x, pool.x[keep[[0, -1]]])
