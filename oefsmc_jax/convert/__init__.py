"""Import pretrained teachers from other frameworks as Orbax model checkpoints.

Two families of CIFAR-10 ResNets are supported: :mod:`.akamaster` (option-A shortcuts) and :mod:`.chenyaofo`
(option-B shortcuts); and torchvision's ImageNet ResNet-18/34/50 (:mod:`.torchvision_resnet`). :mod:`.readers`
reads ``.npz``, ``.safetensors`` and torch files into numpy arrays, :mod:`.layout` maps them onto the Flax variables
(with the key map and converter both CIFAR families share). :mod:`.teachers` holds the family dispatch:
:func:`load_pretrained`, :func:`import_teacher` and :func:`teacher_preprocessing` detect the family from the
state-dict keys. The command line ``oefsmc import-teacher`` lives in :mod:`oefsmc_jax.main`.

The names below are loaded lazily (PEP 562), so ``python -m oefsmc_jax.convert.akamaster`` runs the module
once without the "found in sys.modules" warning, and importing the package stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_AKAMASTER = [
    "AKAMASTER_MEAN",
    "AKAMASTER_STD",
    "akamaster_key_map",
    "convert_akamaster_state_dict",
    "load_akamaster_npz",
    "load_akamaster_th",
]
_TEACHERS = [
    "TEACHER_FAMILIES",
    "detect_family",
    "evaluate_top1",
    "family_preprocessing",
    "import_teacher",
    "load_pretrained",
    "load_pretrained_npz",
    "load_pretrained_th",
    "teacher_family",
    "teacher_preprocessing",
]
_CHENYAOFO = [
    "CHENYAOFO_MEAN",
    "CHENYAOFO_STD",
    "chenyaofo_key_map",
    "convert_chenyaofo_state_dict",
    "load_chenyaofo_npz",
    "load_chenyaofo_th",
]
_TORCHVISION = [
    "TORCHVISION_INPUT",
    "TORCHVISION_MEAN",
    "TORCHVISION_STD",
    "convert_torchvision_state_dict",
    "load_torchvision",
    "torchvision_key_map",
]
_READERS = ["read_safetensors_state", "read_state", "write_safetensors"]
__all__ = sorted(_AKAMASTER + _TEACHERS + _CHENYAOFO + _TORCHVISION + _READERS)


def __getattr__(name: str) -> Any:
    """Resolve the public names from their submodules on first use."""
    if name in _AKAMASTER:
        return getattr(importlib.import_module("oefsmc_jax.convert.akamaster"), name)
    if name in _TEACHERS:
        return getattr(importlib.import_module("oefsmc_jax.convert.teachers"), name)
    if name in _CHENYAOFO:
        return getattr(importlib.import_module("oefsmc_jax.convert.chenyaofo"), name)
    if name in _TORCHVISION:
        return getattr(importlib.import_module("oefsmc_jax.convert.torchvision_resnet"), name)
    if name in _READERS:
        return getattr(importlib.import_module("oefsmc_jax.convert.readers"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
