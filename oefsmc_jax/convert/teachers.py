"""The family dispatch of the teacher importers: which family a state dict is (from its keys), its converter and
preprocessing, and :func:`import_teacher`, which writes a teacher of any family as an Orbax model checkpoint.

Families: :mod:`.akamaster` (CIFAR ResNets, option-A shortcuts, ``linear.*`` head), :mod:`.chenyaofo` (CIFAR
ResNets, option-B shortcuts, ``fc.*`` head or ``*.downsample.*`` keys) and :mod:`.torchvision_resnet` (ImageNet
ResNet-18/34/50, ``layer4.*`` or ``*.conv3.*`` keys). The command line ``oefsmc import-teacher`` (in
:mod:`oefsmc_jax.main`) calls :func:`import_teacher`.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from oefsmc_jax.convert.akamaster import AKAMASTER_MEAN, AKAMASTER_STD, convert_akamaster_state_dict
from oefsmc_jax.convert.chenyaofo import CHENYAOFO_MEAN, CHENYAOFO_STD, convert_chenyaofo_state_dict
from oefsmc_jax.convert.layout import resnet_depth
from oefsmc_jax.convert.readers import TORCH_SUFFIXES, read_state, state_format, state_keys
from oefsmc_jax.convert.torchvision_resnet import (
    TORCHVISION_INPUT,
    TORCHVISION_MEAN,
    TORCHVISION_STD,
    convert_torchvision_state_dict,
    is_torchvision_key,
)
from oefsmc_jax.models import ArchSpec, build_model
from oefsmc_jax.training.checkpoint import load_model_meta

__all__ = [
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

TEACHER_FAMILIES: tuple[str, ...] = ("akamaster", "chenyaofo", "torchvision")


def detect_family(keys: Sequence[str], source: str = "state dict") -> str:
    """The teacher family of a state dict from its keys: ``'akamaster'``, ``'chenyaofo'`` or ``'torchvision'``.

    A ``linear.*`` head means akamaster (option A); ``layer4.*`` or bottleneck ``*.conv3.*`` keys mean a
    torchvision ImageNet ResNet; otherwise an ``fc.*`` head or ``*.downsample.*`` projection keys mean chenyaofo
    (option B). Evidence for two families, or for none, raises a one-line :class:`ValueError`.
    """
    keys = list(keys)
    aka = sorted(k for k in keys if k.startswith("linear."))
    tv = sorted(k for k in keys if is_torchvision_key(k))
    chen = sorted(k for k in keys if k.startswith("fc.") or ".downsample." in k)
    if aka and (tv or chen):
        other, key = ("torchvision", tv[0]) if tv else ("chenyaofo", chen[0])
        raise ValueError(f"{source}: cannot tell the teacher family: akamaster key {aka[0]!r} and {other} key "
                         f"{key!r} in one file")
    if aka:
        return "akamaster"
    if tv:
        return "torchvision"
    if chen:
        return "chenyaofo"
    raise ValueError(f"{source}: cannot tell the teacher family: no 'linear.*' (akamaster) nor 'fc.*' / "
                     f"'*.downsample.*' (chenyaofo) nor 'layer4.*' / '*.conv3.*' (torchvision) keys (keys: "
                     f"{sorted(keys)[:8]}{' ...' if len(keys) > 8 else ''})")


def _converter(family: str) -> Callable[..., tuple[ArchSpec, dict]]:
    if family == "akamaster":
        return convert_akamaster_state_dict
    if family == "chenyaofo":
        return convert_chenyaofo_state_dict
    if family == "torchvision":
        return convert_torchvision_state_dict
    raise ValueError(f"unknown teacher family {family!r}; expected one of {TEACHER_FAMILIES}")


def family_preprocessing(family: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` (RGB, applied to ``x / 255``) the teachers of ``family`` were trained with."""
    if family == "akamaster":
        return AKAMASTER_MEAN, AKAMASTER_STD
    if family == "chenyaofo":
        return CHENYAOFO_MEAN, CHENYAOFO_STD
    if family == "torchvision":
        return TORCHVISION_MEAN, TORCHVISION_STD
    raise ValueError(f"unknown teacher family {family!r}; expected one of {TEACHER_FAMILIES}")


def _is_torch_file(path: pathlib.Path) -> bool:
    return path.suffix.lower() in TORCH_SUFFIXES


def _load_detected(path: str | os.PathLike, depth: int | None) -> tuple[str, ArchSpec, dict]:
    path = pathlib.Path(path)
    arrays = read_state(path)
    family = detect_family(arrays, source=str(path))
    spec, variables = _converter(family)(arrays, depth, source=str(path))
    return family, spec, variables


def load_pretrained_npz(path: str | os.PathLike, depth: int | None = None) -> tuple[ArchSpec, dict]:
    """Read a ``.npz`` teacher of any family (detected from the keys); returns ``(spec, variables)``.

    Akamaster files give ``cifar_resnet_spec(depth, K, 'A')``, chenyaofo files ``cifar_resnet_spec(depth, K,
    'B')``; ``variables`` is the model's full tree (masks all ones). Bad files raise :class:`ValueError`.
    """
    path = pathlib.Path(path)
    if path.suffix.lower() != ".npz":
        raise ValueError(f"{path}: expected a .npz file")
    return _load_detected(path, depth)[1:]


def load_pretrained_th(path: str | os.PathLike, depth: int | None = None) -> tuple[ArchSpec, dict]:
    """Read an original torch teacher (``.th``/``.pth``/``.pt``, needs ``torch``) of any family."""
    path = pathlib.Path(path)
    if not _is_torch_file(path):
        raise ValueError(f"{path}: expected one of {TORCH_SUFFIXES}")
    return _load_detected(path, depth)[1:]


def load_pretrained(path: str | os.PathLike, depth: int | None = None) -> tuple[ArchSpec, dict]:
    """Read a pretrained teacher file of any family: ``.npz`` / ``.safetensors``, or a torch pickle (needs
    ``torch``).

    The family is detected from the keys (:func:`detect_family`); returns ``(spec, variables)``.
    """
    return _load_detected(path, depth)[1:]


def teacher_family(path: str | os.PathLike) -> str:
    """Family of a teacher file (``.npz``/``.safetensors``: reads only the key names; torch files need ``torch``),
    or of an
    Orbax model written by :func:`import_teacher` (its meta's ``family``)."""
    path = pathlib.Path(path)
    if path.is_dir():
        meta = load_model_meta(path)
        if "family" in meta:
            return str(meta["family"])
        if str(meta.get("format", "")).startswith("akamaster_"):  # written before families were recorded
            return "akamaster"
        raise ValueError(f"{path}: the model's meta records no teacher family")
    if not path.is_file():
        raise FileNotFoundError(f"teacher file {path} does not exist")
    return detect_family(state_keys(path), source=str(path))


def teacher_preprocessing(path: str | os.PathLike) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` (RGB, for ``x / 255``) a teacher expects: of its family for a ``.npz``/torch file, or
    the ``preprocessing`` recorded in the meta of an Orbax model written by :func:`import_teacher`."""
    path = pathlib.Path(path)
    if path.is_dir():
        pre = load_model_meta(path).get("preprocessing")
        if not isinstance(pre, Mapping) or "mean" not in pre or "std" not in pre:
            raise ValueError(f"{path}: the model's meta records no teacher preprocessing (mean/std)")
        return tuple(float(v) for v in pre["mean"]), tuple(float(v) for v in pre["std"])
    return family_preprocessing(teacher_family(path))


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def import_teacher(src: str | os.PathLike, out_dir: str | os.PathLike, depth: int | None = None, *,
                   overwrite: bool = False) -> ArchSpec:
    """Convert a pretrained teacher (``.npz``, ``.safetensors``, or ``.th``/``.pth``/``.pt`` with torch) into an
    Orbax model.

    The family (akamaster, chenyaofo or torchvision) is detected from the keys. Writes ``out_dir`` with
    :func:`oefsmc_jax.training.checkpoint.save_model` (read back by ``load_model``, named by a config's
    ``teacher.checkpoint``); the meta records the source path, its sha256, the format (``{family}_npz``,
    ``{family}_safetensors`` or ``{family}_th``), the family, the depth, the shortcut option and the
    preprocessing (``scale``, ``mean``, ``std``; torchvision adds ``image_size``, ``resize``, ``crop``,
    ``interpolation``). Returns the architecture spec.

    An existing, non-empty ``out_dir`` raises ``FileExistsError`` unless ``overwrite`` (then it is replaced
    atomically); ``out_dir`` being a file, or holding ``src``, raises ``ValueError`` (see
    :func:`oefsmc_jax.paths.check_output_dir`). Both are checked before the teacher is read.
    """
    from oefsmc_jax import paths
    from oefsmc_jax.training.checkpoint import save_model

    src = pathlib.Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"teacher file {src} does not exist")
    paths.check_output_dir(out_dir, overwrite=overwrite, protected=[(src, "the teacher file")], what="OUT_DIR")
    family, spec, variables = _load_detected(src, depth)
    mean, std = family_preprocessing(family)
    preprocessing: dict[str, Any] = {"scale": 1.0 / 255.0, "mean": list(mean), "std": list(std)}
    if family == "torchvision":
        preprocessing.update(TORCHVISION_INPUT)
    meta = {
        "source": str(src),
        "source_sha256": _sha256(src),
        "format": f"{family}_{state_format(src)}",
        "family": family,
        "depth": resnet_depth(spec),
        "num_classes": spec.num_classes,
        "shortcut": spec.shortcut,
        "preprocessing": preprocessing,
    }
    save_model(out_dir, spec, variables, meta)
    return spec


def evaluate_top1(spec: ArchSpec, variables: dict, x: np.ndarray, y: np.ndarray, batch_size: int = 500,
                  mean: Sequence[float] = AKAMASTER_MEAN, std: Sequence[float] = AKAMASTER_STD) -> float:
    """Top-1 accuracy (percent) of the model on uint8 images ``x`` normalised by ``mean``/``std`` (default:
    the akamaster preprocessing; see :func:`teacher_preprocessing` / :func:`family_preprocessing`)."""
    from oefsmc_jax.training import xla_cpu
    from oefsmc_jax.training.parallel import make_mesh
    from oefsmc_jax.training.step import make_predict

    model = build_model(spec)
    predict = make_predict(make_mesh(), model, tuple(mean), tuple(std), batch_size=batch_size,
                           cpu_fusion=xla_cpu.resolve_mode(""))  # $OEFSMC_CPU_FUSION, else the default
    logits = predict(variables, x)["logits"]
    return float(100.0 * np.mean(np.argmax(logits, -1) == np.asarray(y)))
