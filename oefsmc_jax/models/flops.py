"""Analytic parameter and compute counts from an :class:`ArchSpec`.

``count_flops`` returns multiply-accumulates (MACs) of conv and dense layers for ONE image, the convention
of the pruning literature (e.g. Li et al. 2017 report ResNet-56 as 1.25e8 "FLOPs", torchvision lists
ResNet-50 as 4.09 "GFLOPS"; both are MACs).  BatchNorm, ReLU, pooling, residual additions and biases are
not counted.  ``count_params`` counts trainable parameters ('params' collection: conv kernels, BN
scale/bias, dense kernels/biases), not BN running statistics and not masks.
"""

from __future__ import annotations

from oefsmc_jax.models.spec import ArchSpec


def _out(size: int, kernel: int, stride: int) -> int:
    """Spatial output size of a conv/pool with PyTorch padding ``kernel // 2``."""
    return (size + 2 * (kernel // 2) - kernel) // stride + 1


def _walk(spec: ArchSpec, image_size: int) -> tuple[int, int]:
    """Return (params, macs) of the model for square ``image_size`` inputs (0: skip the MAC count)."""
    params = 0
    macs = 0
    h = image_size
    track = image_size > 0

    def conv(cin: int, cout: int, k: int, stride: int) -> None:
        nonlocal params, macs, h
        params += k * k * cin * cout + 2 * cout  # kernel + BN scale/bias
        if track:
            h = _out(h, k, stride)
            if h < 1:
                raise ValueError(f"image_size {image_size} is too small for this architecture")
            macs += h * h * k * k * cin * cout

    if spec.is_resnet:
        if spec.family == "cifar_resnet":
            conv(spec.in_channels, spec.stem_width, 3, 1)
        else:
            conv(spec.in_channels, spec.stem_width, 7, 2)
            h = _out(h, 3, 2) if track else h  # 3x3/2 max-pool, padding 1
        for s, b in spec.blocks():
            cin, cout, stride = spec.block_in_width(s, b), spec.block_out_width(s, b), spec.block_stride(s, b)
            w = spec.inner_widths[s][b]
            if spec.block == "basic":
                conv(cin, w[0], 3, stride)
                conv(w[0], cout, 3, 1)
            else:
                conv(cin, w[0], 1, 1)
                conv(w[0], w[1], 3, stride)
                conv(w[1], cout, 1, 1)
            if spec.shortcut == "B" and not spec.identity_shortcut(s, b):
                # 1x1/stride projection: same output size as the branch (h is already the output size)
                params += cin * cout + 2 * cout
                macs += h * h * cin * cout if track else 0
        feat = spec.feature_width
        hidden: tuple[int, ...] = ()
    else:
        for s in range(spec.num_stages):
            for i in range(len(spec.inner_widths[s])):
                conv(spec.block_in_width(s, i), spec.inner_widths[s][i][0], 3, 1)
            if spec.stage_strides[s] == 2 and track:
                h = h // 2
                if h < 1:
                    raise ValueError(f"image_size {image_size} is too small for this architecture")
        feat = spec.feature_width
        hidden = spec.vgg_classifier
    for w in hidden + (spec.num_classes,):
        params += feat * w + w
        macs += feat * w
        feat = w
    return params, macs


def count_params(spec: ArchSpec) -> int:
    """Number of trainable parameters of ``build_model(spec)`` (BN scale/bias included; stats, masks not)."""
    return _walk(spec, 0)[0]


def count_flops(spec: ArchSpec, image_size: int) -> int:
    """Multiply-accumulates (MACs) of convs and dense layers for one ``image_size`` x ``image_size`` image."""
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    return _walk(spec, int(image_size))[1]
