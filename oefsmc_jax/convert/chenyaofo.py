"""Import the pretrained CIFAR-10 ResNets of ``chenyaofo/pytorch-cifar-models`` (the second teacher family).

The network is the CIFAR ResNet-(6n+2) of He et al. (16/32/64 channels, basic blocks) with **option-B**
shortcuts: where the shape changes (first block of stages 2 and 3) the shortcut is a stride-2 1x1 conv (no bias)
followed by BN, ``layer{s}.0.downsample.{0,1}``; elsewhere the identity. That is exactly
``cifar_resnet_spec(depth, num_classes, shortcut='B')``, and the key mapping is the akamaster one
(:func:`~oefsmc_jax.convert.layout.resnet_key_map`) with

==============================================  ===================================================
PyTorch key                                     Flax variable
==============================================  ===================================================
``layer{s+1}.0.downsample.0.weight``            ``params/s{s}b0/proj_conv/kernel`` (OIHW -> HWIO)
``layer{s+1}.0.downsample.1.*``                 ``.../s{s}b0/proj_bn/*`` (as for the other BNs)
``fc.weight`` / ``fc.bias``                     ``params/head/kernel`` (transposed) / ``params/head/bias``
==============================================  ===================================================

The release files are plain ``state_dict`` pickles (``.pt``, no prefix; reading them needs ``torch``); the
``.npz`` exports hold the same arrays under the same keys. The teachers expect ``x / 255`` normalised with the
CIFAR-10 statistics :data:`CHENYAOFO_MEAN` / :data:`CHENYAOFO_STD` (RGB).

``python -m oefsmc_jax import-teacher SRC OUT`` detects this family from the keys, as do
:func:`~oefsmc_jax.convert.teachers.load_pretrained` and :func:`~oefsmc_jax.convert.teachers.teacher_preprocessing`.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping

import numpy as np

from oefsmc_jax.convert.layout import convert_resnet_state_dict, resnet_key_map
from oefsmc_jax.convert.readers import read_npz_state, read_torch_state
from oefsmc_jax.models import ArchSpec

__all__ = [
    "CHENYAOFO_MEAN",
    "CHENYAOFO_STD",
    "chenyaofo_key_map",
    "convert_chenyaofo_state_dict",
    "load_chenyaofo_npz",
    "load_chenyaofo_th",
]

CHENYAOFO_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CHENYAOFO_STD: tuple[float, float, float] = (0.2023, 0.1994, 0.2010)


def chenyaofo_key_map(spec: ArchSpec) -> dict[str, tuple[str, tuple[str, ...], str]]:
    """PyTorch ``state_dict`` key -> ``(collection, flax path, transform)`` for an option-B CIFAR ResNet ``spec``.

    ``transform`` is ``'conv'`` (OIHW -> HWIO), ``'linear'`` (``[out, in]`` -> ``[in, out]``) or ``'none'``.
    """
    if spec.family != "cifar_resnet" or spec.block != "basic":
        raise ValueError(f"chenyaofo teachers are basic-block CIFAR ResNets, got {spec.family}/{spec.block}")
    if spec.shortcut != "B":
        raise ValueError(f"chenyaofo teachers have option-B shortcuts, got option {spec.shortcut}")
    return resnet_key_map(spec, "fc", "downsample")


def convert_chenyaofo_state_dict(
    arrays: Mapping[str, np.ndarray], depth: int | None = None, source: str = "state dict"
) -> tuple[ArchSpec, dict]:
    """Turn a chenyaofo ``state_dict`` (numpy arrays) into ``(spec, variables)`` with option-B shortcuts.

    The depth comes from the keys (n blocks per stage -> 6n + 2) and must equal ``depth`` when given; the
    number of classes comes from ``fc.weight``. Missing, unexpected, non-float or mis-shaped entries raise one
    one-line :class:`ValueError` naming every offending key (``source`` prefixes the message).
    """
    return convert_resnet_state_dict(arrays, depth, source, family="chenyaofo", shortcut="B", head="fc",
                                     key_map=chenyaofo_key_map)


def load_chenyaofo_npz(path: str | os.PathLike, depth: int | None = None) -> tuple[ArchSpec, dict]:
    """Read the numpy export of a chenyaofo teacher; returns ``(spec, variables)`` (host float32 arrays)."""
    return convert_chenyaofo_state_dict(read_npz_state(path), depth, source=str(pathlib.Path(path)))


def load_chenyaofo_th(path: str | os.PathLike, depth: int | None = None) -> tuple[ArchSpec, dict]:
    """Read an original chenyaofo ``.pt`` state dict (needs ``torch``); returns ``(spec, variables)``."""
    return convert_chenyaofo_state_dict(read_torch_state(path), depth, source=str(pathlib.Path(path)))
