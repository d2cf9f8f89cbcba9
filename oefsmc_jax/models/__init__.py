"""Models: architecture specs, Flax builders, pruning surgery and analytic cost counts.

``build_model(spec).apply(variables, x, train=False)`` returns
``{'logits': [B, K], 'features': [B, H, W, C]}``; variables have the
collections 'params', 'batch_stats' and 'masks'.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from oefsmc_jax.models.flops import count_flops, count_params
from oefsmc_jax.models.resnet import ConvFn, ResidualBlock, ResNet
from oefsmc_jax.models.spec import (
    ArchSpec,
    ResNetStages,
    build_arch,
    cifar_resnet_spec,
    imagenet_resnet_spec,
    resnet_spec,
    vgg16_spec,
    vgg_spec,
)
from oefsmc_jax.models.surgery import (
    WidthLink,
    drop_blocks,
    droppable_blocks,
    l1_prune,
    mask_multipliers,
    prunable_widths,
    set_masks,
    shrink,
    width_links,
)
from oefsmc_jax.models.vgg import VGG, VGGLayer


def build_model(spec: ArchSpec, *, bn_axis_name: str | None = None, dtype: Any = jnp.float32,
                conv_general_dilated: ConvFn = lax.conv_general_dilated) -> nn.Module:
    """Flax module for ``spec``; ``bn_axis_name`` syncs BN batch statistics across that mapped axis; every
    convolution calls ``conv_general_dilated`` (a drop-in for ``lax.conv_general_dilated``, the default)."""
    if not isinstance(spec, ArchSpec):
        raise TypeError(f"build_model expects an ArchSpec, got {type(spec).__name__}")
    if spec.family == "vgg":
        return VGG(spec=spec, bn_axis_name=bn_axis_name, dtype=dtype, conv_general_dilated=conv_general_dilated)
    return ResNet(spec=spec, bn_axis_name=bn_axis_name, dtype=dtype, conv_general_dilated=conv_general_dilated)



def init_variables(spec: ArchSpec, image_size: int, seed: int) -> dict:
    """Randomly initialised variables (on the host) of the model for ``spec`` on ``image_size`` square images."""
    model = build_model(spec)
    x = jnp.zeros((1, image_size, image_size, spec.in_channels), jnp.float32)
    return jax.device_get(jax.jit(lambda k: model.init(k, x, train=False))(jax.random.PRNGKey(seed)))

__all__ = [
    "VGG",
    "ArchSpec",
    "ResNet",
    "ResNetStages",
    "ResidualBlock",
    "VGGLayer",
    "WidthLink",
    "build_arch",
    "build_model",
    "cifar_resnet_spec",
    "count_flops",
    "count_params",
    "drop_blocks",
    "droppable_blocks",
    "imagenet_resnet_spec",
    "init_variables",
    "l1_prune",
    "mask_multipliers",
    "prunable_widths",
    "resnet_spec",
    "set_masks",
    "shrink",
    "vgg16_spec",
    "vgg_spec",
    "width_links",
]
