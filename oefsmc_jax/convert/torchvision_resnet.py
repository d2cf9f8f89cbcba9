"""Import torchvision's ImageNet ResNet-18/34/50 (``torchvision.models.resnet*``) as teachers.

The networks are the v1.5 ResNets of torchvision: a 7x7/2 stem conv + BN + ReLU + 3x3/2 max-pool, four stages of
basic blocks (18: 2,2,2,2; 34: 3,4,6,3) or bottlenecks (50: 3,4,6,3, the stride on the 3x3 conv), projection
shortcuts ``downsample = Sequential(conv1x1, BN)`` where the shape changes, global average pooling and ``fc``. That
is exactly ``imagenet_resnet_spec(depth, num_classes)``; the key mapping is

==============================================  ===================================================
PyTorch key                                     Flax variable
==============================================  ===================================================
``conv1.weight``                                ``params/stem_conv/kernel`` (OIHW -> HWIO)
``bn1.{weight,bias}``                           ``params/stem_bn/{scale,bias}``
``bn1.{running_mean,running_var}``              ``batch_stats/stem_bn/{mean,var}``
``layer{s+1}.{b}.conv{j}.weight``               ``params/s{s}b{b}/conv{j}/kernel`` (j = 1, 2; 3 for 50)
``layer{s+1}.{b}.bn{j}.*``                      ``.../s{s}b{b}/bn{j}/*`` (as for ``bn1``)
``layer{s+1}.0.downsample.0.weight``            ``params/s{s}b0/proj_conv/kernel``
``layer{s+1}.0.downsample.1.*``                 ``.../s{s}b0/proj_bn/*``
``fc.weight`` / ``fc.bias``                     ``params/head/kernel`` (transposed) / ``params/head/bias``
==============================================  ===================================================

The files are the state dicts torchvision publishes (``resnet18-f37072fd.pth`` etc., bare ``state_dict``
pickles: reading them needs ``torch``), or the same arrays as ``.npz`` / ``.safetensors`` (read with numpy). The
depth comes from the keys: the blocks per stage and whether ``conv3`` exists. The teachers expect RGB ``x / 255``
normalised with :data:`TORCHVISION_MEAN` / :data:`TORCHVISION_STD`, at 224x224 after a resize of the short side
to 256 and a centre crop (:data:`TORCHVISION_INPUT`, recorded in the imported model's meta).

``python -m oefsmc_jax import-teacher SRC OUT`` detects this family from the keys (``layer4.*`` or ``*.conv3.*``).
"""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Mapping, Sequence

import numpy as np

from oefsmc_jax.convert.layout import IGNORED_SUFFIX, Target, add_bn, convert_with_key_map, fmt_shape
from oefsmc_jax.convert.readers import read_state
from oefsmc_jax.models import ArchSpec, imagenet_resnet_spec

__all__ = [
    "TORCHVISION_DEPTHS",
    "TORCHVISION_INPUT",
    "TORCHVISION_MEAN",
    "TORCHVISION_STD",
    "convert_torchvision_state_dict",
    "is_torchvision_key",
    "load_torchvision",
    "torchvision_key_map",
]

TORCHVISION_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
TORCHVISION_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# torchvision's ImageNet evaluation transform: resize the short side to 256 (bilinear), centre-crop 224
TORCHVISION_INPUT: dict[str, int | str] = {"image_size": 224, "resize": 256, "crop": 224,
                                           "interpolation": "bilinear"}
TORCHVISION_DEPTHS: tuple[int, ...] = (18, 34, 50)
_LAYER_RE = re.compile(r"^layer(\d+)\.(\d+)\.")


def is_torchvision_key(key: str) -> bool:
    """True for a key only an ImageNet (four-stage) ResNet has: ``layer4.*`` or a bottleneck's ``*.conv3.*``."""
    return key.startswith("layer4.") or bool(re.match(r"^layer\d+\.\d+\.conv3\.", key))


def torchvision_key_map(spec: ArchSpec) -> dict[str, Target]:
    """PyTorch ``state_dict`` key -> ``(collection, flax path, transform)`` for an ImageNet ResNet ``spec``.

    ``transform`` is ``'conv'`` (OIHW -> HWIO), ``'linear'`` (``[out, in]`` -> ``[in, out]``) or ``'none'``.
    """
    if spec.family != "imagenet_resnet" or spec.shortcut != "B":
        raise ValueError(f"torchvision teachers are ImageNet ResNets with projection shortcuts, got "
                         f"{spec.family}/{spec.shortcut}")
    out: dict[str, Target] = {"conv1.weight": ("params", ("stem_conv", "kernel"), "conv")}
    add_bn(out, "bn1", ("stem_bn",))
    n_conv = 3 if spec.block == "bottleneck" else 2
    for s, b in spec.blocks():
        prefix, name = f"layer{s + 1}.{b}", spec.block_name(s, b)
        for j in range(1, n_conv + 1):
            out[f"{prefix}.conv{j}.weight"] = ("params", (name, f"conv{j}", "kernel"), "conv")
            add_bn(out, f"{prefix}.bn{j}", (name, f"bn{j}"))
        if not spec.identity_shortcut(s, b):
            out[f"{prefix}.downsample.0.weight"] = ("params", (name, "proj_conv", "kernel"), "conv")
            add_bn(out, f"{prefix}.downsample.1", (name, "proj_bn"))
    out["fc.weight"] = ("params", ("head", "kernel"), "linear")
    out["fc.bias"] = ("params", ("head", "bias"), "none")
    return out


def _layout(depth: int) -> tuple[str, tuple[int, ...]]:
    spec = imagenet_resnet_spec(depth)
    return spec.block, tuple(len(st) for st in spec.kept)


def _describe(block: str, stages: Sequence[int]) -> str:
    return f"{block} blocks {fmt_shape(stages)}"


def convert_torchvision_state_dict(
    arrays: Mapping[str, np.ndarray], depth: int | None = None, source: str = "state dict"
) -> tuple[ArchSpec, dict]:
    """Turn a torchvision ResNet ``state_dict`` (numpy arrays) into ``(spec, variables)``.

    The depth comes from the keys (blocks per stage of ``layer{1..4}.<i>.*``; bottleneck when ``conv3`` keys
    exist) and must equal ``depth`` when given; the number of classes comes from ``fc.weight``. Layouts other
    than ResNet-18/34/50, and missing, unexpected, non-float or mis-shaped entries, raise one one-line
    :class:`ValueError` prefixed by ``source`` (every offending key named).
    """
    keys = [k for k in arrays if not k.endswith(IGNORED_SUFFIX)]
    counts: dict[int, int] = {}
    for k in keys:
        m = _LAYER_RE.match(k)
        if m:
            s, b = int(m.group(1)), int(m.group(2))
            counts[s] = max(counts.get(s, 0), b + 1)
    if not counts:
        raise ValueError(f"{source}: no 'layer{{1,2,3,4}}.<i>.*' keys; not a torchvision ResNet state dict "
                         f"(keys: {sorted(keys)[:8]}{' ...' if len(keys) > 8 else ''})")
    stages = tuple(counts.get(s, 0) for s in range(1, max(counts) + 1))
    block = "bottleneck" if any(_LAYER_RE.match(k) and ".conv3." in k for k in keys) else "basic"
    known = {_layout(d): d for d in TORCHVISION_DEPTHS}
    file_depth = known.get((block, stages))
    if file_depth is None:
        supported = ", ".join(f"resnet{d} {_describe(*_layout(d))}" for d in TORCHVISION_DEPTHS)
        raise ValueError(f"{source}: {_describe(block, stages)} per stage is no supported torchvision ResNet "
                         f"({supported})")
    if depth is not None and int(depth) != file_depth:
        raise ValueError(f"{source}: file has {_describe(block, stages)} per stage (resnet{file_depth}) but "
                         f"depth={depth} was asked")
    if "fc.weight" not in arrays:
        raise ValueError(f"{source}: missing key 'fc.weight'")
    fw = np.shape(arrays["fc.weight"])
    feature_width = imagenet_resnet_spec(file_depth).feature_width
    if len(fw) != 2 or fw[0] < 1:
        raise ValueError(f"{source}: key 'fc.weight' has shape {fmt_shape(fw)}, expected "
                         f"(num_classes,{feature_width})")
    spec = imagenet_resnet_spec(file_depth, num_classes=int(fw[0]))
    return spec, convert_with_key_map(arrays, torchvision_key_map(spec), spec, source)


def load_torchvision(path: str | os.PathLike, depth: int | None = None) -> tuple[ArchSpec, dict]:
    """Read a torchvision ResNet file (``.npz``, ``.safetensors``, or ``.pth``/``.pt``/``.th`` with torch);
    returns ``(spec, variables)`` (host float32 arrays)."""
    return convert_torchvision_state_dict(read_state(path), depth, source=str(pathlib.Path(path)))
