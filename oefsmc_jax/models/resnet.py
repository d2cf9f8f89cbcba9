"""CIFAR (He et al. 2016, option A/B shortcuts) and ImageNet (torchvision v1.5) ResNets in Flax Linen.

Layout mirrors PyTorch so weights can be imported: convs without bias (kernels HWIO), symmetric padding
``k // 2``, BatchNorm with PyTorch defaults (momentum 0.1 == flax 0.9, eps 1e-5), He-normal (fan_out)
conv init.  Every block owns a 'masks' collection: ``mask{j}`` (one per inner width, multiplies the BN
output before the ReLU) and a scalar ``gate`` multiplying the residual branch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from oefsmc_jax.models.spec import ArchSpec

Array = Any
Dtype = Any
#: what the convolutions call: ``lax.conv_general_dilated`` or a drop-in with its signature (the train step passes
#: the CPU filter-gradient kernel's, ``oefsmc_jax.kernels.cpu_conv.conv_general_dilated``, under ``cpu_wgrad=kernel``)
ConvFn = Callable[..., Any]

conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(features: int, kernel: int, stride: int, name: str, dtype: Dtype,
         conv_general_dilated: ConvFn = lax.conv_general_dilated) -> nn.Conv:
    """Bias-free square conv with PyTorch-style symmetric padding ``kernel // 2`` that calls
    ``conv_general_dilated``."""
    p = kernel // 2
    return nn.Conv(
        features, (kernel, kernel), strides=(stride, stride), padding=((p, p), (p, p)), use_bias=False,
        kernel_init=conv_kernel_init, dtype=dtype, name=name,
        conv_general_dilated=conv_general_dilated,
    )


def batch_norm(train: bool, axis_name: str | None, name: str, dtype: Dtype) -> nn.BatchNorm:
    """BatchNorm with PyTorch defaults (momentum 0.1 in PyTorch terms, eps 1e-5)."""
    return nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5, axis_name=axis_name, dtype=dtype, name=name
    )


def mask_variable(module: nn.Module, name: str, width: int) -> Array:
    """Declare (or read) a float32 ones-initialised mask of shape [width] in the 'masks' collection."""
    return module.variable("masks", name, lambda: jnp.ones((width,), jnp.float32)).value


def correction(module: nn.Module, bn_name: str, y: Array, corrections: tuple[str, ...]) -> Array:
    """``y @ Q`` with the block's identity-initialised square parameter ``q_<bn_name>`` when ``bn_name`` is in
    ``corrections`` (FSKD's unfolded 1x1 correction after that BN); else ``y`` unchanged."""
    if bn_name not in corrections:
        return y
    w = y.shape[-1]
    q = module.param(f"q_{bn_name}", lambda key, shape: jnp.eye(shape[0], dtype=jnp.float32), (w, w))
    return jnp.einsum("...c,cd->...d", y, q.astype(y.dtype))


class ResidualBlock(nn.Module):
    """Basic (conv3x3-conv3x3) or bottleneck (1x1-3x3-1x1, stride on the 3x3) residual block.

    ``out = relu(shortcut(x) + gate * branch(x))`` with ``mask{j}`` multiplying the j-th internal BN output.
    """

    kind: str
    widths: tuple[int, ...]
    in_width: int
    out_width: int
    stride: int
    shortcut: str
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32
    corrections: tuple[str, ...] = ()
    conv_general_dilated: ConvFn = lax.conv_general_dilated

    @property
    def identity(self) -> bool:
        """True if the shortcut is the identity."""
        return self.stride == 1 and self.in_width == self.out_width

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        """Apply the block to an NHWC map."""
        masks = [mask_variable(self, f"mask{j}", w) for j, w in enumerate(self.widths)]
        gate = self.variable("masks", "gate", lambda: jnp.ones((), jnp.float32)).value
        corr = self.corrections

        def bn(name):
            return lambda y: correction(self, name, batch_norm(train, self.bn_axis_name, name, self.dtype)(y), corr)

        if self.kind == "basic":
            y = conv(self.widths[0], 3, self.stride, "conv1", self.dtype, self.conv_general_dilated)(x)
            y = nn.relu(bn("bn1")(y) * masks[0].astype(y.dtype))
            y = bn("bn2")(conv(self.out_width, 3, 1, "conv2", self.dtype, self.conv_general_dilated)(y))
        elif self.kind == "bottleneck":
            y = conv(self.widths[0], 1, 1, "conv1", self.dtype, self.conv_general_dilated)(x)
            y = nn.relu(bn("bn1")(y) * masks[0].astype(y.dtype))
            y = conv(self.widths[1], 3, self.stride, "conv2", self.dtype, self.conv_general_dilated)(y)
            y = nn.relu(bn("bn2")(y) * masks[1].astype(y.dtype))
            y = bn("bn3")(conv(self.out_width, 1, 1, "conv3", self.dtype, self.conv_general_dilated)(y))
        else:
            raise ValueError(f"unknown residual block kind {self.kind!r}")

        if self.identity:
            sc = x
        elif self.shortcut == "A":
            sc = x[:, :: self.stride, :: self.stride, :]
            diff = self.out_width - self.in_width
            sc = jnp.pad(sc, ((0, 0), (0, 0), (0, 0), (diff // 2, diff - diff // 2)))
        else:
            proj = conv(self.out_width, 1, self.stride, "proj_conv", self.dtype, self.conv_general_dilated)
            sc = bn("proj_bn")(proj(x))
        return nn.relu(sc.astype(y.dtype) + gate.astype(y.dtype) * y)


class ResNet(nn.Module):
    """ResNet for family 'cifar_resnet' (3x3 stem) or 'imagenet_resnet' (7x7/2 stem + 3x3/2 max-pool).

    Returns ``{'logits': [B, K] float32, 'features': [B, H, W, C]}`` (features = map before global pooling).
    """

    spec: ArchSpec
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32
    conv_general_dilated: ConvFn = lax.conv_general_dilated  # what every convolution calls

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> dict[str, Array]:
        """Forward pass on a normalised NHWC batch."""
        spec = self.spec
        if spec.family not in ("cifar_resnet", "imagenet_resnet"):
            raise ValueError(f"ResNet cannot build family {spec.family!r}")
        if x.ndim != 4 or x.shape[-1] != spec.in_channels:
            raise ValueError(f"expected NHWC input with {spec.in_channels} channels, got shape {x.shape}")
        x = x.astype(self.dtype)
        if spec.family == "cifar_resnet":
            x = conv(spec.stem_width, 3, 1, "stem_conv", self.dtype, self.conv_general_dilated)(x)
            x = nn.relu(batch_norm(train, self.bn_axis_name, "stem_bn", self.dtype)(x))
        else:
            x = conv(spec.stem_width, 7, 2, "stem_conv", self.dtype, self.conv_general_dilated)(x)
            x = nn.relu(batch_norm(train, self.bn_axis_name, "stem_bn", self.dtype)(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for s, b in spec.blocks():
            x = ResidualBlock(
                kind=spec.block,
                widths=spec.inner_widths[s][b],
                in_width=spec.block_in_width(s, b),
                out_width=spec.block_out_width(s, b),
                stride=spec.block_stride(s, b),
                shortcut=spec.shortcut,
                bn_axis_name=self.bn_axis_name,
                dtype=self.dtype,
                corrections=spec.corrections,
                conv_general_dilated=self.conv_general_dilated,
                name=spec.block_name(s, b),
            )(x, train)
        features = x
        logits = nn.Dense(spec.num_classes, dtype=self.dtype, name="head")(jnp.mean(x, axis=(1, 2)))
        return {"logits": logits.astype(jnp.float32), "features": features}
