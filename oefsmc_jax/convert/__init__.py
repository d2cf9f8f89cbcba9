"""Import pretrained teachers from other frameworks as Orbax model checkpoints.

Two families of CIFAR-10 ResNets are supported: :mod:`.akamaster` (option-A shortcuts; this module also holds
the family dispatch, :func:`import_teacher` and the command line) and :mod:`.chenyaofo` (option-B shortcuts);
and torchvision's ImageNet ResNet-18/34/50 (:mod:`.torchvision_resnet`). :mod:`.readers` reads ``.npz``,
``.safetensors`` and torch files into numpy arrays, :mod:`.layout` maps them onto the Flax variables.
:func:`load_pretrained`, :func:`import_teacher` and :func:`teacher_preprocessing` detect the family from the
state-dict keys.

The names below are loaded lazily (PEP 562), so ``python -m oefsmc_jax.convert.akamaster`` runs the module
once without the "found in sys.modules" warning, and importing the package stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_AKAMASTER = [
    "AKAMASTER_MEAN",
    "AKAMASTER_STD",
    "TEACHER_FAMILIES",
    "akamaster_key_map",
    "convert_akamaster_state_dict",
    "detect_family",
    "evaluate_top1",
    "family_preprocessing",
    "import_teacher",
    "load_akamaster_npz",
    "load_akamaster_th",
    "load_pretrained",
    "load_pretrained_npz",
    "load_pretrained_th",
    "main",
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
__all__ = sorted(_AKAMASTER + _CHENYAOFO + _TORCHVISION + _READERS)


def __getattr__(name: str) -> Any:
    """Resolve the public names from their submodules on first use."""
    if name in _AKAMASTER:
        return getattr(importlib.import_module("oefsmc_jax.convert.akamaster"), name)
    if name in _CHENYAOFO:
        return getattr(importlib.import_module("oefsmc_jax.convert.chenyaofo"), name)
    if name in _TORCHVISION:
        return getattr(importlib.import_module("oefsmc_jax.convert.torchvision_resnet"), name)
    if name in _READERS:
        return getattr(importlib.import_module("oefsmc_jax.convert.readers"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
