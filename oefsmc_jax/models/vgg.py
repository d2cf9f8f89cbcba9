"""VGG with BatchNorm (CIFAR style: global average pooling after the conv stack, then a small classifier).

Conv layer (stage s, index i) is the module ``s{s}c{i}`` holding ``conv``, ``bn`` and mask ``mask0``
(multiplies the BN output before the ReLU).  Classifier: ``fc{i}`` Dense+ReLU layers, then ``head``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from oefsmc_jax.models.resnet import ConvFn, batch_norm, conv, correction, mask_variable
from oefsmc_jax.models.spec import ArchSpec

Array = Any
Dtype = Any


class VGGLayer(nn.Module):
    """3x3 conv (no bias) -> BN -> * mask0 -> ReLU."""

    width: int
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32
    corrections: tuple[str, ...] = ()
    conv_general_dilated: ConvFn = lax.conv_general_dilated

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        """Apply the layer to an NHWC map."""
        mask = mask_variable(self, "mask0", self.width)
        y = conv(self.width, 3, 1, "conv", self.dtype, self.conv_general_dilated)(x)
        y = correction(self, "bn", batch_norm(train, self.bn_axis_name, "bn", self.dtype)(y), self.corrections)
        return nn.relu(y * mask.astype(y.dtype))


class VGG(nn.Module):
    """VGG-BN; returns ``{'logits': [B, K] float32, 'features': map after the last max-pool}``."""

    spec: ArchSpec
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32
    conv_general_dilated: ConvFn = lax.conv_general_dilated  # what every convolution calls

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> dict[str, Array]:
        """Forward pass on a normalised NHWC batch."""
        spec = self.spec
        if spec.family != "vgg":
            raise ValueError(f"VGG cannot build family {spec.family!r}")
        if x.ndim != 4 or x.shape[-1] != spec.in_channels:
            raise ValueError(f"expected NHWC input with {spec.in_channels} channels, got shape {x.shape}")
        x = x.astype(self.dtype)
        for s in range(spec.num_stages):
            for i in range(len(spec.inner_widths[s])):
                layer = VGGLayer(
                    spec.inner_widths[s][i][0], self.bn_axis_name, self.dtype, spec.corrections,
                    self.conv_general_dilated, name=spec.block_name(s, i)
                )
                x = layer(x, train)
            if spec.stage_strides[s] == 2:
                if min(x.shape[1:3]) < 2:
                    raise ValueError(f"input too small for VGG: stage {s} max-pool sees {x.shape[1:3]}")
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        features = x
        h = jnp.mean(x, axis=(1, 2))
        for i, w in enumerate(spec.vgg_classifier):
            h = nn.relu(nn.Dense(w, dtype=self.dtype, name=f"fc{i}")(h))
        logits = nn.Dense(spec.num_classes, dtype=self.dtype, name="head")(h)
        return {"logits": logits.astype(jnp.float32), "features": features}
