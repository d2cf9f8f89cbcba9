"""CIFAR-style augmentation (zero-pad random crop + horizontal flip) and normalisation, pure and jittable.

Each image gets its own key, so the result for an image does not depend on how a batch is split across devices
or steps; :func:`example_keys` derives such keys from a step key and the examples' global positions.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["augment_batch", "example_keys", "flip", "normalize", "pad_crop"]


def pad_crop(key: jax.Array, image: jax.Array, pad: int) -> jax.Array:
    """Zero-pad an HWC image by ``pad`` pixels per side and crop a random ``H x W`` window.

    The same as torchvision's ``RandomCrop(size, padding=pad)``.
    """
    if pad == 0:
        return image
    h, w, c = image.shape
    padded = jnp.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    top, left = jax.random.randint(key, (2,), 0, 2 * pad + 1)
    return jax.lax.dynamic_slice(padded, (top, left, 0), (h, w, c))


def flip(key: jax.Array, image: jax.Array) -> jax.Array:
    """Mirror an HWC image left-right with probability 1/2."""
    return jnp.where(jax.random.bernoulli(key), image[:, ::-1, :], image)


def _augment_one(key: jax.Array, image: jax.Array, pad: int, do_flip: bool) -> jax.Array:
    crop_key, flip_key = jax.random.split(key)
    image = pad_crop(crop_key, image, pad)
    if do_flip:
        image = flip(flip_key, image)
    return image


@functools.partial(jax.jit, static_argnames=("pad", "flip"))
def augment_batch(keys: jax.Array, images: jax.Array, pad: int = 4, flip: bool = True) -> jax.Array:
    """Augment ``images`` ``[B, H, W, C]`` (dtype kept) with one key per image (``keys`` ``[B, ...]``)."""
    return jax.vmap(lambda k, x: _augment_one(k, x, pad, flip))(keys, images)


def example_keys(key: jax.Array, example_ids: jax.Array) -> jax.Array:
    """Per-example keys ``fold_in(key, id)`` for integer ``example_ids`` ``[B]`` (e.g. positions in the step's
    global batch)."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(example_ids, jnp.uint32))


def normalize(
    x: jax.Array,
    mean: Sequence[float] | np.ndarray | jax.Array,
    std: Sequence[float] | np.ndarray | jax.Array,
) -> jax.Array:
    """``(x / 255 - mean) / std`` in float32, with ``mean``/``std`` per channel (last axis)."""
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return (jnp.asarray(x).astype(jnp.float32) / 255.0 - mean) / std
