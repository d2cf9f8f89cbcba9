"""Import the pretrained CIFAR-10 ResNets of ``akamaster/pytorch_resnet_cifar10`` as Orbax model checkpoints.

:func:`~oefsmc_jax.convert.teachers.import_teacher`, :func:`~oefsmc_jax.convert.teachers.load_pretrained` and
:func:`~oefsmc_jax.convert.teachers.teacher_preprocessing` (:mod:`.teachers`) tell this family from the others by its
``linear.*`` head.

Two input formats hold the same weights:

- ``.npz`` (no torch needed): the ``state_dict`` with the ``module.`` prefix removed, PyTorch layouts (conv
  weights OIHW, ``linear.weight`` ``[out, in]``), e.g. ``conv1.weight`` ``[16, 3, 3, 3]``,
  ``layer2.0.bn1.running_var``, ``linear.weight`` ``[10, 64]``.
- ``.th`` (needs ``torch``, the optional extra ``oefsmc_jax[torch]``): the original torch pickle
  ``{'best_prec1': float, 'state_dict': {'module.conv1.weight': ..., ...}}``.

The network is the CIFAR ResNet-(6n+2) of He et al. with option-A shortcuts, which is exactly
``cifar_resnet_spec(depth, num_classes, shortcut='A')``; the key mapping is

==============================================  ===================================================
PyTorch key                                     Flax variable
==============================================  ===================================================
``conv1.weight``                                ``params/stem_conv/kernel`` (OIHW -> HWIO)
``bn1.{weight,bias}``                           ``params/stem_bn/{scale,bias}``
``bn1.{running_mean,running_var}``              ``batch_stats/stem_bn/{mean,var}``
``layer{s+1}.{b}.conv{j}.weight``               ``params/s{s}b{b}/conv{j}/kernel`` (OIHW -> HWIO)
``layer{s+1}.{b}.bn{j}.*``                      ``.../s{s}b{b}/bn{j}/*`` (as for ``bn1``)
``linear.weight`` / ``linear.bias``             ``params/head/kernel`` (transposed) / ``params/head/bias``
==============================================  ===================================================

``num_batches_tracked`` entries (newer PyTorch) are accepted and ignored; the 'masks' collection is all ones.
The teachers expect ``x / 255`` normalised with :data:`AKAMASTER_MEAN` / :data:`AKAMASTER_STD` (RGB).

Command line: ``oefsmc import-teacher`` (:mod:`oefsmc_jax.main`, any family); this module run as a script is an
alias::

    python -m oefsmc_jax.convert.akamaster SRC OUT_DIR [--depth N] [--check-npz CIFAR_NPZ]
"""

from __future__ import annotations

import os
import pathlib
import sys
from collections.abc import Mapping

import numpy as np

from oefsmc_jax.convert.layout import Target, convert_resnet_state_dict, resnet_key_map
from oefsmc_jax.convert.readers import read_npz_state, read_torch_state
from oefsmc_jax.models import ArchSpec

__all__ = [
    "AKAMASTER_MEAN",
    "AKAMASTER_STD",
    "akamaster_key_map",
    "convert_akamaster_state_dict",
    "load_akamaster_npz",
    "load_akamaster_th",
]

AKAMASTER_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
AKAMASTER_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def akamaster_key_map(spec: ArchSpec) -> dict[str, Target]:
    """PyTorch ``state_dict`` key -> ``(collection, flax path, transform)`` for a CIFAR ResNet ``spec``.

    ``transform`` is ``'conv'`` (OIHW -> HWIO), ``'linear'`` (``[out, in]`` -> ``[in, out]``) or ``'none'``.
    """
    if spec.family != "cifar_resnet" or spec.block != "basic":
        raise ValueError(f"akamaster teachers are basic-block CIFAR ResNets, got {spec.family}/{spec.block}")
    if spec.shortcut != "A":
        raise ValueError(f"akamaster teachers have option-A shortcuts, got option {spec.shortcut}")
    return resnet_key_map(spec, "linear", None)


def convert_akamaster_state_dict(
    arrays: Mapping[str, np.ndarray], depth: int | None = None, source: str = "state dict"
) -> tuple[ArchSpec, dict]:
    """Turn an akamaster ``state_dict`` (``module.`` prefix removed, numpy arrays) into ``(spec, variables)``.

    The depth comes from the keys (n blocks per stage -> depth 6n + 2) and must equal ``depth`` when that is
    given; the number of classes comes from ``linear.weight``. Missing, unexpected, non-float or mis-shaped
    entries raise a :class:`ValueError` naming every offending key (``source`` prefixes the message).
    """
    return convert_resnet_state_dict(arrays, depth, source, family="akamaster", shortcut="A", head="linear",
                                     key_map=akamaster_key_map)


def load_akamaster_npz(path: str | os.PathLike, depth: int | None = None) -> tuple[ArchSpec, dict]:
    """Read the numpy export of an akamaster teacher; returns ``(spec, variables)`` (host float32 arrays).

    ``variables`` has the collections 'params', 'batch_stats' and 'masks' (all ones) and exactly the tree of
    ``build_model(spec).init(...)``. See :func:`convert_akamaster_state_dict` for the checks.
    """
    return convert_akamaster_state_dict(read_npz_state(path), depth, source=str(pathlib.Path(path)))


def load_akamaster_th(path: str | os.PathLike, depth: int | None = None) -> tuple[ArchSpec, dict]:
    """Read an original akamaster ``.th`` checkpoint (needs ``torch``); returns ``(spec, variables)``.

    Accepts ``{'state_dict': ...}`` (``best_prec1`` etc. ignored) or a bare state dict; a ``module.`` prefix
    (from ``DataParallel``) is removed. Raises :class:`ImportError` when torch is not installed.
    """
    return convert_akamaster_state_dict(read_torch_state(path), depth, source=str(pathlib.Path(path)))


if __name__ == "__main__":  # the script alias of ``oefsmc import-teacher``; importing this module never runs it
    from oefsmc_jax.main import cli

    cli(["import-teacher", *sys.argv[1:]])
