"""Tests for oefsmc_jax.data: sources, few-sample subsets (method.md section 1) and augmentation."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
import PIL.Image  # noqa: E402

from oefsmc_jax.data import (  # noqa: E402
    DataOverlapError,
    ImageSet,
    augment_batch,
    check_disjoint,
    class_counts,
    class_order_permutation,
    default_ood_size,
    example_keys,
    few_sample_indices,
    flip,
    image_hashes,
    load_source,
    normalize,
    ood_split,
    open_source,
    pad_crop,
    prepare_image,
    shot_groups,
    tfds_labels,
)
from oefsmc_jax.data import sources as sources_lib  # noqa: E402

# ----------------------------------------------------------------------------------------------------------
# class_counts


def test_class_counts_exp_equal_total_hand_checked():
    # n_max = 25: 25*10**(-k/9) floors to 25,19,14,11,8,6,5,4,3,2 (total 97); n_max = 26 gives total 103.
    # Both are 3 away from K*N = 100; the tie goes to the smaller n_max.
    counts = class_counts(10, "exp", 10, rho=10.0)
    np.testing.assert_array_equal(counts, [25, 19, 14, 11, 8, 6, 5, 4, 3, 2])
    assert counts.sum() == 97


def test_class_counts_exp_formula_without_equal_total():
    # n_k = max(1, floor(10 * 10**(-k/9))) = 10, 7.7, 5.99, 4.6, 3.6, 2.8, 2.2, 1.7, 1.3, 1.0
    np.testing.assert_array_equal(
        class_counts(10, "exp", 10, rho=10.0, equal_total=False), [10, 7, 5, 4, 3, 2, 2, 1, 1, 1]
    )
    # 20 * 100**(-k/4) = 20, 6.3, 2, 0.63 -> 1 (floor 0, clipped to 1), 0.2 -> 1
    np.testing.assert_array_equal(class_counts(5, "exp", 20, rho=100.0, equal_total=False), [20, 6, 2, 1, 1])


def test_class_counts_balanced_and_rho_one():
    np.testing.assert_array_equal(class_counts(10, "balanced", 7), np.full(10, 7))
    np.testing.assert_array_equal(class_counts(10, "exp", 7, rho=1.0), np.full(10, 7))
    np.testing.assert_array_equal(class_counts(1, "exp", 7, rho=10.0), [7])


@pytest.mark.parametrize("k,per_class,rho", [(10, 10, 10.0), (10, 5, 50.0), (100, 10, 10.0), (7, 3, 2.5)])
def test_class_counts_equal_total_is_closest(k, per_class, rho):
    counts = class_counts(k, "exp", per_class, rho=rho)
    n_max = int(counts.max())
    assert counts[0] == n_max and np.all(np.diff(counts) <= 0)

    def total(n):
        return int(np.maximum(1, np.floor(n * rho ** (-np.arange(k) / (k - 1)) + 1e-9)).sum())

    target = k * per_class
    err = abs(total(n_max) - target)
    assert err == abs(int(counts.sum()) - target)
    assert err <= abs(total(n_max + 1) - target)
    if n_max > 1:  # ties go to the smaller n_max, so n_max - 1 must be strictly worse
        assert err < abs(total(n_max - 1) - target)


def test_class_counts_class_order():
    order = class_order_permutation(10, seed=3)
    np.testing.assert_array_equal(np.sort(order), np.arange(10))
    np.testing.assert_array_equal(order, class_order_permutation(10, seed=3))
    assert not np.array_equal(order, class_order_permutation(10, seed=4))
    counts = class_counts(10, "exp", 10, rho=10.0, class_order=order)
    # the class at position p gets n_p (the hand-checked counts of test_class_counts_exp_equal_total_hand_checked)
    np.testing.assert_array_equal(counts[order], [25, 19, 14, 11, 8, 6, 5, 4, 3, 2])
    assert not np.array_equal(counts, [25, 19, 14, 11, 8, 6, 5, 4, 3, 2])  # seed 3 really reorders the classes


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(mode="exp", per_class=10, rho=0.5), "rho"),
        (dict(mode="exp", per_class=0, rho=10.0), "per_class"),
        (dict(mode="linear", per_class=10), "mode"),
        (dict(mode="exp", per_class=10, rho=10.0, class_order=[0, 0, 1, 2, 3, 4, 5, 6, 7, 8]), "class_order"),
    ],
)
def test_class_counts_validation(kwargs, field):
    with pytest.raises(ValueError, match=field) as err:
        class_counts(10, **kwargs)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------------------------
# few-sample draws, OOD sizes and splits, shot groups


def _shuffled_labels(per_class: int = 30, k: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(k), per_class)).astype(np.int32)


def test_few_sample_indices_counts_unique_sorted_deterministic():
    labels = _shuffled_labels()
    counts = class_counts(10, "exp", 10, rho=10.0)
    key = jax.random.PRNGKey(0)
    idx = few_sample_indices(key, labels, counts)
    assert idx.dtype == np.int64 and len(idx) == counts.sum() == len(np.unique(idx))
    np.testing.assert_array_equal(np.bincount(labels[idx], minlength=10), counts)
    # sorted by class, then by index
    np.testing.assert_array_equal(idx, idx[np.lexsort((idx, labels[idx]))])
    np.testing.assert_array_equal(idx, few_sample_indices(key, labels, counts))
    assert not np.array_equal(idx, few_sample_indices(jax.random.PRNGKey(1), labels, counts))


def test_few_sample_indices_is_uniform_within_class():
    labels = np.repeat(np.arange(2), 10).astype(np.int32)
    counts = np.array([3, 5])
    hits = np.zeros(20)
    for s in range(300):
        hits[few_sample_indices(jax.random.PRNGKey(s), labels, counts)] += 1
    freq = hits / 300  # expected 0.3 for class 0 and 0.5 for class 1 (binomial sd <= 0.029)
    assert np.all(np.abs(freq[:10] - 0.3) < 0.12) and np.all(np.abs(freq[10:] - 0.5) < 0.12)


def test_few_sample_indices_skips_unlabelled_and_rejects_short_classes():
    labels = np.array([-1, 0, -1, 1, 0, 1, -1, 0], np.int32)
    idx = few_sample_indices(jax.random.PRNGKey(0), labels, np.array([3, 2]))
    np.testing.assert_array_equal(idx, [1, 4, 7, 3, 5])
    with pytest.raises(ValueError, match=r"class 1 has 2 examples but 3 were requested"):
        few_sample_indices(jax.random.PRNGKey(0), labels, np.array([1, 3]))
    with pytest.raises(ValueError, match="number of classes"):
        few_sample_indices(jax.random.PRNGKey(0), np.array([0, 5]), np.array([1, 1]))


def test_default_ood_size():
    counts = class_counts(10, "exp", 10, rho=10.0)
    assert default_ood_size(counts) == 10 * 25 - 97 == 153
    assert default_ood_size(counts, cap=100) == 100
    assert default_ood_size(np.full(10, 7)) == 0


def test_ood_split_disjoint_uniform_deterministic():
    key = jax.random.PRNGKey(7)
    ood, held = ood_split(key, 1000, 153, 200)
    assert len(ood) == 153 and len(held) == 200
    assert len(np.union1d(ood, held)) == 353  # disjoint, no repeats
    assert ood.min() >= 0 and max(ood.max(), held.max()) < 1000
    assert np.all(np.diff(ood) > 0) and np.all(np.diff(held) > 0)
    o2, h2 = ood_split(key, 1000, 153, 200)
    np.testing.assert_array_equal(ood, o2)
    np.testing.assert_array_equal(held, h2)
    assert not np.array_equal(ood, ood_split(jax.random.PRNGKey(8), 1000, 153, 200)[0])
    all_of_it, none = ood_split(key, 10, 10, 0)
    np.testing.assert_array_equal(all_of_it, np.arange(10))
    assert none.size == 0
    with pytest.raises(ValueError, match=r"pool has 100 images but m \+ heldout = 80 \+ 30"):
        ood_split(key, 100, 80, 30)


def test_shot_groups():
    np.testing.assert_array_equal(
        shot_groups(np.array([25, 19, 14, 11, 8, 6, 5, 4, 3, 2])), [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    )
    # ties broken by class index; 4 classes -> sizes 2/1/1
    np.testing.assert_array_equal(shot_groups(np.array([5, 5, 5, 5])), [0, 0, 1, 2])
    # ranking 9(c1), 9(c3), 5(c2), 3(c4), 1(c0); 5 classes -> sizes 2/2/1
    np.testing.assert_array_equal(shot_groups(np.array([1, 9, 5, 9, 3])), [2, 0, 1, 0, 1])
    g = shot_groups(class_counts(100, "exp", 10, rho=10.0))
    np.testing.assert_array_equal(np.bincount(g), [34, 33, 33])


# ----------------------------------------------------------------------------------------------------------
# augmentation


def _random_images(n=8, h=8, w=8, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


def test_pad_crop_is_a_window_of_the_zero_padded_image():
    img = _random_images(1, 10, 12)[0]
    padded = np.pad(img, ((4, 4), (4, 4), (0, 0)))
    offsets = set()
    for s in range(40):
        out = np.asarray(pad_crop(jax.random.PRNGKey(s), jnp.asarray(img), 4))
        assert out.shape == img.shape and out.dtype == np.uint8
        matches = [
            (t, left)
            for t in range(9)
            for left in range(9)
            if np.array_equal(out, padded[t : t + 10, left : left + 12])
        ]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) > 10  # the offset really is random
    np.testing.assert_array_equal(
        pad_crop(jax.random.PRNGKey(3), jnp.asarray(img), 4),
        pad_crop(jax.random.PRNGKey(3), jnp.asarray(img), 4),
    )


def test_flip_mirrors_with_half_probability():
    img = jnp.asarray(_random_images(1)[0])
    flipped = 0
    for s in range(64):
        out = np.asarray(flip(jax.random.PRNGKey(s), img))
        if np.array_equal(out, np.asarray(img)[:, ::-1]):
            flipped += 1
        else:
            np.testing.assert_array_equal(out, img)
    assert 16 <= flipped <= 48


def test_augment_batch_shapes_determinism_and_batch_split_invariance():
    images = _random_images(8)
    keys = example_keys(jax.random.PRNGKey(0), jnp.arange(8))
    out = augment_batch(keys, jnp.asarray(images))
    assert out.shape == images.shape and out.dtype == jnp.uint8
    np.testing.assert_array_equal(out, augment_batch(keys, jnp.asarray(images)))
    halves = jnp.concatenate([augment_batch(keys[:4], images[:4]), augment_batch(keys[4:], images[4:])])
    np.testing.assert_array_equal(out, halves)
    # sharded over the 4 simulated devices: same result
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    sharded = augment_batch(jax.device_put(keys, spec), jax.device_put(jnp.asarray(images), spec))
    np.testing.assert_array_equal(out, sharded)
    # float images keep their dtype; no-op augmentation is the identity
    f = augment_batch(keys, jnp.asarray(images, jnp.float32))
    assert f.dtype == jnp.float32
    np.testing.assert_array_equal(f, np.asarray(out, np.float32))
    np.testing.assert_array_equal(augment_batch(keys, jnp.asarray(images), pad=0, flip=False), images)
    assert not np.array_equal(out, images)


def test_example_keys_depend_on_ids_only():
    k = jax.random.PRNGKey(5)
    a = example_keys(k, jnp.arange(6))
    b = example_keys(k, jnp.arange(3, 9))
    np.testing.assert_array_equal(a[3:], b[:3])
    assert len({tuple(np.asarray(r).tolist()) for r in a}) == 6


def test_normalize():
    x = np.array([[[0, 255, 51]]], np.uint8)
    out = normalize(x, mean=[0.5, 0.5, 0.2], std=[0.25, 0.5, 0.1])
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, [[[-2.0, 1.0, 0.0]]], atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# image sets, hashing and overlap checks


def test_image_set_validation_and_take():
    x = _random_images(5)
    s = ImageSet(x, np.arange(5, dtype=np.int64), "t")
    assert len(s) == 5 and s.y.dtype == np.int32
    t = s.take([4, 1])
    np.testing.assert_array_equal(t.x, x[[4, 1]])
    np.testing.assert_array_equal(t.y, [4, 1])
    np.testing.assert_array_equal(s.take(np.array([True, False, False, True, False])).y, [0, 3])
    assert repr(s) == "ImageSet(name='t', x=uint8[5, 8, 8, 3], y=int32[5])"
    with pytest.raises(ValueError, match="uint8"):
        ImageSet(x.astype(np.float32), np.arange(5), "bad")
    with pytest.raises(ValueError, match="y must be"):
        ImageSet(x, np.arange(4), "bad")


def test_image_hashes():
    x = _random_images(6)
    x[3] = x[1]
    h = image_hashes(x)
    assert h.dtype == np.uint64 and h.shape == (6,)
    assert h[1] == h[3] and len(np.unique(h)) == 5
    np.testing.assert_array_equal(h, image_hashes(x.copy()))
    y = x.copy()
    y[0, 0, 0, 0] ^= 1
    assert image_hashes(y)[0] != h[0]


def test_check_disjoint():
    x = _random_images(10)
    a = ImageSet(x[:5], np.arange(5), "id_train")
    b = ImageSet(np.concatenate([x[5:], x[[0, 2, 4]]]), np.full(8, -1), "pool")
    check_disjoint(a, ImageSet(x[5:], np.full(5, -1), "clean"), "ood pool vs id")  # no overlap: no error
    with pytest.raises(DataOverlapError) as err:
        check_disjoint(b, a, "ood pool overlaps the in-distribution training subset")
    msg = str(err.value)
    assert isinstance(err.value, ValueError) and "\n" not in msg
    assert msg.startswith("ood pool overlaps the in-distribution training subset: 3 identical images")
    assert "use a disjoint source" in msg


# ----------------------------------------------------------------------------------------------------------
# sources: resizing, npz, digits, sklearn photos


def test_prepare_image_resizing_hand_checked():
    # 2x2 constant blocks: BOX downsampling by 2 gives exactly the block values
    blocks = np.random.default_rng(0).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    big = np.repeat(np.repeat(blocks, 2, axis=0), 2, axis=1)
    np.testing.assert_array_equal(prepare_image(big, 4), blocks)
    # non-square: shorter side to 10, then centre crop; column j of the 20x40 input holds 6*j, so after 2x BOX
    # column j holds 12*j + 3 and the centre crop keeps columns 5..14
    cols = np.tile((6 * np.arange(40)).astype(np.uint8)[None, :, None], (20, 1, 3))
    out = prepare_image(cols, 10)
    assert out.shape == (10, 10, 3)
    np.testing.assert_array_equal(out[0, :, 0], 12 * np.arange(5, 15) + 3)
    # grayscale is replicated; a constant image stays constant when upsampled
    gray = prepare_image(np.full((8, 8), 77, np.uint8), 32)
    assert gray.shape == (32, 32, 3) and np.all(gray == 77)
    # one channel: RGB -> luma
    assert prepare_image(np.full((4, 4, 3), 100, np.uint8), 4, channels=1).shape == (4, 4, 1)


def test_load_npz_temp_file(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    y = np.array([0, 1, 2, 0, 1, 2], np.int64)
    path = tmp_path / "set.npz"
    np.savez(path, x=x, y=y)
    s = load_source({"kind": "npz", "path": str(path), "image_size": 16, "channels": 3})
    np.testing.assert_array_equal(s.x, x)
    np.testing.assert_array_equal(s.y, y)
    assert s.y.dtype == np.int32 and s.name == f"npz:{path}"
    sub = load_source({"kind": "npz", "path": str(path), "image_size": 16}, indices=[5, 0])
    np.testing.assert_array_equal(sub.x, x[[5, 0]])
    # downsampled with BOX: the 2x2 means of each image (PIL's fixed-point arithmetic may be off by one)
    small = load_source({"kind": "npz", "path": str(path), "image_size": 8})
    means = x.reshape(6, 8, 2, 8, 2, 3).astype(np.float64).mean(axis=(2, 4))
    assert small.x.shape == (6, 8, 8, 3) and np.abs(small.x - means).max() <= 1.0
    # grayscale without labels
    gpath = tmp_path / "gray.npz"
    np.savez(gpath, images=x[..., 0])
    g = load_source({"kind": "npz", "path": str(gpath), "x_key": "images", "image_size": 16})
    assert g.x.shape == (6, 16, 16, 3) and np.all(g.y == -1)
    np.testing.assert_array_equal(g.x[..., 2], x[..., 0])


def test_open_source_maps_an_uncompressed_npz_and_reads_only_what_is_asked(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    y = np.arange(40) % 5
    path, zpath = tmp_path / "pool.npz", tmp_path / "pool_z.npz"
    np.savez(path, x=x, y=y)
    np.savez_compressed(zpath, x=x, y=y)
    for p, mapped in [(path, True), (zpath, False)]:
        for extra in [{}, {"exclude_classes": [1, 3]}, {"image_size": 4}]:
            cfg = {"kind": "npz", "path": str(p), "image_size": 8, **extra}
            src, ref = open_source(cfg), load_source(cfg)
            assert src.mapped is mapped and len(src) == len(ref) and src.image_shape == ref.x.shape[1:]
            np.testing.assert_array_equal(src.labels, ref.y)
            idx = np.array([len(ref) - 1, 0, 3, 3])
            np.testing.assert_array_equal(src.take(idx).x, ref.x[idx])
            np.testing.assert_array_equal(src.take(idx).y, ref.y[idx])
            np.testing.assert_array_equal(np.concatenate([c.x for c in src.chunks(7)]), ref.x)
            sub = src.subset(np.arange(2, len(ref), 3))
            np.testing.assert_array_equal(sub.take([1, 0]).x, ref.x[[5, 2]])
            np.testing.assert_array_equal(np.concatenate([c.y for c in sub.chunks(5)]), ref.y[2::3])
    assert [len(c) for c in open_source({"kind": "npz", "path": str(path), "image_size": 8}).chunks(16)] == [
        16, 16, 8]
    # mapped means read from disk at take time: change image 5's bytes on disk after opening
    src = open_source({"kind": "npz", "path": str(path), "image_size": 8})
    raw = bytearray(path.read_bytes())
    at = raw.find(x[5].tobytes())
    raw[at:at + 192] = b"\x07" * 192
    path.write_bytes(bytes(raw))
    np.testing.assert_array_equal(src.take([4, 6]).x, x[[4, 6]])
    assert np.all(src.take([5]).x == 7)
    # scattered rows come back in the order asked (one read per run of nearby rows)
    np.testing.assert_array_equal(src.take([39, 0]).x, x[[39, 0]])
    # a file cut short after it was opened: the rows past its end are named
    path.write_bytes(bytes(raw[: at + 5 * 192]))
    np.testing.assert_array_equal(src.take([0, 4]).x, x[[0, 4]])
    with pytest.raises(ValueError, match=r"pool.npz: rows 30-31 lie past the end of the file \(truncated\?\)"):
        src.take([30, 31])


def test_open_source_tfds_reads_records_on_demand(tfds_mod):
    cfg = {"kind": "tfds", "name": "cifar10", "split": "train", "image_size": 32, "channels": 3}
    with tfds_mod.testing.mock_data(num_examples=12, policy=tfds_mod.testing.MockPolicy.USE_CODE):
        src, ref = open_source(cfg), load_source(cfg)
        assert len(src) == 12 and src.name == ref.name and src.image_shape == (32, 32, 3) and not src.mapped
        np.testing.assert_array_equal(src.take([9, 2]).x, ref.x[[9, 2]])
        np.testing.assert_array_equal(src.subset([3, 4, 5]).take([2]).y, ref.y[[5]])


def test_load_npz_shared_cifar10_test(shared_data):
    ml_collections = pytest.importorskip("ml_collections")
    cfg = ml_collections.ConfigDict(
        {"kind": "npz", "path": str(shared_data / "cifar10_test_jpeg75.npz"), "image_size": 32, "channels": 3}
    )
    s = load_source(cfg)
    assert len(s) == 10000 and s.x.shape == (10000, 32, 32, 3) and s.x.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(s.y), np.full(10, 1000))
    assert len(np.unique(image_hashes(s.x))) == 10000


def test_digits_split_and_scaling():
    from sklearn.datasets import load_digits

    train = load_source({"kind": "digits", "image_size": 8, "split": "train"})
    test = load_source({"kind": "digits", "image_size": 8, "split": "test"})
    assert (len(train), len(test)) == (1078, 719)  # 40 % of 1797 rounds up to 719
    assert train.name == "digits/train" and train.x.dtype == np.uint8
    check_disjoint(test, train, "digits test vs train")
    # stratified: every class has 40 % +- 1 image in the test split
    per_class = np.bincount(load_digits().target)
    assert np.all(np.abs(np.bincount(test.y) - 0.4 * per_class) <= 1)
    # at 8x8 the images are round(v * 255 / 16), replicated over channels
    scaled = np.round(load_digits().images * 255 / 16).astype(np.uint8)
    all_x = np.concatenate([train.x, test.x])
    np.testing.assert_array_equal(all_x[..., 0], all_x[..., 2])
    assert sorted(image_hashes(all_x[..., :1]).tolist()) == sorted(image_hashes(scaled[..., None]).tolist())
    big = load_source({"kind": "digits", "image_size": 32, "split": "train", "channels": 3})
    assert big.x.shape == (1078, 32, 32, 3)
    np.testing.assert_array_equal(big.y, train.y)
    np.testing.assert_array_equal(
        big.x, load_source({"kind": "digits", "image_size": 32, "split": "train"}).x
    )


def test_sklearn_photos():
    cfg = {"kind": "sklearn_photos", "image_size": 32, "num_images": 64, "seed": 0}
    p = load_source(cfg)
    assert p.x.shape == (64, 32, 32, 3) and p.x.dtype == np.uint8 and np.all(p.y == -1)
    np.testing.assert_array_equal(p.x[..., 0], p.x[..., 1])  # grayscale by default
    np.testing.assert_array_equal(p.x, load_source(cfg).x)
    assert not np.array_equal(p.x, load_source({**cfg, "seed": 1}).x)
    assert len(np.unique(image_hashes(p.x))) == 64
    np.testing.assert_array_equal(load_source(cfg, indices=[3, 7]).x, p.x[[3, 7]])
    # crop side == image_size, colour: every image is an exact window of one of the two photos
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    c = load_source({**cfg, "num_images": 3, "grayscale": False, "crop_min": 32, "crop_max": 32})
    assert np.any(c.x[..., 0] != c.x[..., 1])
    for im in c.x:
        found = False
        for photo in photos:
            hits = np.argwhere(
                np.all(
                    np.lib.stride_tricks.sliding_window_view(photo, (32, 3), (1, 2))[:, :, 0, :, :] == im[0],
                    axis=(-2, -1),
                )
            )
            found |= any(np.array_equal(photo[r : r + 32, q : q + 32], im) for r, q in hits)
        assert found
    with pytest.raises(ValueError, match="crop_min"):
        load_source({**cfg, "crop_min": 50, "crop_max": 40})


def test_unknown_kind():
    with pytest.raises(ValueError, match="kind must be one of npz, tfds, digits, sklearn_photos"):
        load_source({"kind": "csv", "image_size": 32})


# ----------------------------------------------------------------------------------------------------------
# TFDS: mock data (tfds.testing.mock_data, policy USE_CODE) and a real array_record dataset written by tfds


@pytest.fixture(scope="module")
def tfds_mod():
    return pytest.importorskip("tensorflow_datasets")


@pytest.mark.parametrize(
    "name,raw_shape",
    [("cifar10", (32, 32, 3)), ("mnist", (28, 28, 1)), ("imagenet2012", None)],
)
def test_tfds_mock_data(tfds_mod, name, raw_shape):
    tfds = tfds_mod
    cfg = {"kind": "tfds", "name": name, "split": "train", "image_size": 32, "channels": 3}
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        raw = tfds.data_source(name, split="train")
        s = load_source(cfg)
        sub = load_source(cfg, indices=[9, 2, 2])
        first5 = load_source({**cfg, "max_examples": 5})
        unlabelled = load_source({**cfg, "label_key": None, "max_examples": 3})
        raw_ex = [raw[i] for i in range(12)]
    assert s.name == f"tfds:{name}/train"
    assert s.x.shape == (12, 32, 32, 3) and s.x.dtype == np.uint8 and s.y.dtype == np.int32
    np.testing.assert_array_equal(s.y, [int(e["label"]) for e in raw_ex])
    for i, e in enumerate(raw_ex):
        img = np.asarray(e["image"])
        if raw_shape is not None:
            assert img.shape == raw_shape
        np.testing.assert_array_equal(s.x[i], prepare_image(img, 32, 3))
    if name == "cifar10":
        np.testing.assert_array_equal(s.x, np.stack([e["image"] for e in raw_ex]))  # same size: untouched
    if name == "mnist":
        np.testing.assert_array_equal(s.x[..., 0], s.x[..., 2])  # gray replicated
    np.testing.assert_array_equal(sub.x, s.x[[9, 2, 2]])
    np.testing.assert_array_equal(sub.y, s.y[[9, 2, 2]])
    np.testing.assert_array_equal(first5.x, s.x[:5])
    np.testing.assert_array_equal(unlabelled.y, [-1, -1, -1])


def _write_array_record_dataset(tfds, data_dir, num_examples: int = 12) -> str:
    """A real array_record TFDS dataset, written by a GeneratorBasedBuilder (PIL-encoded PNGs: no TensorFlow).

    Example ``i`` has label ``i % 3`` and a 20 x (30 + i) image whose centre is ``40 * label + 10``.
    """

    class OefsmcTinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(None, None, 3)),
                        "label": tfds.features.ClassLabel(num_classes=3),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(num_examples)}

        def _generate_examples(self, n):
            for i in range(n):
                img = np.zeros((20, 30 + i, 3), np.uint8)  # left/right borders 0, the rest 40*label+10
                img[:, 3:-3] = 40 * (i % 3) + 10
                yield i, {"image": PIL.Image.fromarray(img), "label": i % 3}

    builder = OefsmcTinyImages(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return builder.name


def test_tfds_real_array_record_and_label_cache(tfds_mod, tmp_path, monkeypatch):
    tfds = tfds_mod
    name = _write_array_record_dataset(tfds, tmp_path / "tfds")
    cfg = {
        "kind": "tfds",
        "name": name,
        "split": "train",
        "data_dir": str(tmp_path / "tfds"),
        "image_size": 8,
        "channels": 3,
    }
    s = load_source(cfg)
    assert s.x.shape == (12, 8, 8, 3) and np.bincount(s.y).tolist() == [4, 4, 4]
    # shorter side (20) -> 8 and centre crop: only the constant centre remains, so the pixels encode the label
    np.testing.assert_array_equal(s.x, np.broadcast_to((40 * s.y + 10)[:, None, None, None], s.x.shape))

    # labels only: the image feature must not be decoded
    opened = []
    real_open = PIL.Image.open
    monkeypatch.setattr(PIL.Image, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    cache = tmp_path / "cache" / "labels.npz"
    y = tfds_labels(cfg, cache_path=cache)
    assert not opened and cache.exists()
    np.testing.assert_array_equal(y, s.y)
    np.testing.assert_array_equal(tfds_labels({**cfg, "max_examples": 4}), s.y[:4])
    monkeypatch.setattr(PIL.Image, "open", real_open)

    # the cache is used (TFDS is not opened again), and ignored for another split size
    def no_tfds(*a, **k):
        raise AssertionError("TFDS opened although the labels are cached")

    monkeypatch.setattr(sources_lib, "_open_tfds", no_tfds)
    np.testing.assert_array_equal(tfds_labels({**cfg, "labels_cache": str(cache)}), s.y)
    with pytest.raises(AssertionError, match="cached"):
        tfds_labels({**cfg, "max_examples": 4}, cache_path=cache)
    monkeypatch.undo()

    # a few-sample subset drawn on the labels decodes only the chosen records
    idx = few_sample_indices(jax.random.PRNGKey(0), y, np.array([1, 2, 1]))
    sub = load_source(cfg, indices=idx)
    np.testing.assert_array_equal(sub.y, [0, 1, 1, 2])
    np.testing.assert_array_equal(sub.x, s.x[idx])
