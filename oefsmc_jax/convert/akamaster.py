"""Import the pretrained CIFAR-10 ResNets of ``akamaster/pytorch_resnet_cifar10`` as Orbax model checkpoints.

This module also holds the code shared by every teacher family and the family dispatch: :func:`import_teacher`,
:func:`load_pretrained` / :func:`load_pretrained_npz` / :func:`load_pretrained_th` and
:func:`teacher_preprocessing` read the family from the state-dict keys (``linear.*`` head: akamaster,
option-A shortcuts; ``fc.*`` head or ``*.downsample.*`` keys: ``chenyaofo/pytorch-cifar-models``, option-B
shortcuts, see :mod:`.chenyaofo`).

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

Command line (``oefsmc import-teacher``, i.e. ``python -m oefsmc_jax import-teacher``, runs :func:`run_cli`;
either family; this module run as a script is an alias)::

    python -m oefsmc_jax.convert.akamaster SRC OUT_DIR [--depth N] [--check-npz CIFAR_NPZ]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from oefsmc_jax.convert.layout import (
    IGNORED_SUFFIX,
    Target,
    add_bn,
    convert_with_key_map,
    fmt_shape,
    resnet_depth,
)
from oefsmc_jax.convert.readers import (
    TORCH_SUFFIXES,
    read_npz_state,
    read_state,
    read_torch_state,
    state_format,
    state_keys,
)
from oefsmc_jax.models import ArchSpec, build_model, cifar_resnet_spec

__all__ = [
    "AKAMASTER_MEAN",
    "AKAMASTER_STD",
    "TEACHER_FAMILIES",
    "TORCH_SUFFIXES",
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

AKAMASTER_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
AKAMASTER_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
TEACHER_FAMILIES: tuple[str, ...] = ("akamaster", "chenyaofo", "torchvision")
_LAYER_RE = re.compile(r"^layer([1-3])\.(\d+)\.")
_Target = Target


def resnet_key_map(spec: ArchSpec, head: str, projection: str | None) -> dict[str, _Target]:
    """PyTorch key -> ``(collection, flax path, transform)`` for a basic-block CIFAR ResNet ``spec``.

    ``head`` is the name of the final linear layer (``'linear'``, ``'fc'``); ``projection`` the name of the
    option-B shortcut ``Sequential(conv1x1, BN)`` (``'downsample'``), mapped to ``proj_conv``/``proj_bn`` of
    every block without an identity shortcut, or None for option A. ``transform`` is ``'conv'`` (OIHW ->
    HWIO), ``'linear'`` (``[out, in]`` -> ``[in, out]``) or ``'none'``.
    """
    if spec.family != "cifar_resnet" or spec.block != "basic":
        raise ValueError(f"expected a basic-block CIFAR ResNet spec, got {spec.family}/{spec.block}")
    if (projection is None) != (spec.shortcut == "A"):
        raise ValueError(f"projection={projection!r} does not fit a spec with option-{spec.shortcut} shortcuts")
    out: dict[str, _Target] = {}
    out["conv1.weight"] = ("params", ("stem_conv", "kernel"), "conv")
    add_bn(out, "bn1", ("stem_bn",))
    for s, b in spec.blocks():
        prefix, name = f"layer{s + 1}.{b}", spec.block_name(s, b)
        for j in (1, 2):
            out[f"{prefix}.conv{j}.weight"] = ("params", (name, f"conv{j}", "kernel"), "conv")
            add_bn(out, f"{prefix}.bn{j}", (name, f"bn{j}"))
        if projection is not None and not spec.identity_shortcut(s, b):
            out[f"{prefix}.{projection}.0.weight"] = ("params", (name, "proj_conv", "kernel"), "conv")
            add_bn(out, f"{prefix}.{projection}.1", (name, "proj_bn"))
    out[f"{head}.weight"] = ("params", ("head", "kernel"), "linear")
    out[f"{head}.bias"] = ("params", ("head", "bias"), "none")
    return out


def akamaster_key_map(spec: ArchSpec) -> dict[str, _Target]:
    """PyTorch ``state_dict`` key -> ``(collection, flax path, transform)`` for a CIFAR ResNet ``spec``.

    ``transform`` is ``'conv'`` (OIHW -> HWIO), ``'linear'`` (``[out, in]`` -> ``[in, out]``) or ``'none'``.
    """
    if spec.family != "cifar_resnet" or spec.block != "basic":
        raise ValueError(f"akamaster teachers are basic-block CIFAR ResNets, got {spec.family}/{spec.block}")
    if spec.shortcut != "A":
        raise ValueError(f"akamaster teachers have option-A shortcuts, got option {spec.shortcut}")
    return resnet_key_map(spec, "linear", None)


def _blocks_per_stage(keys: Sequence[str]) -> int:
    n = [0, 0, 0]
    for k in keys:
        m = _LAYER_RE.match(k)
        if m:
            s, b = int(m.group(1)) - 1, int(m.group(2))
            n[s] = max(n[s], b + 1)
    return max(n)


def convert_resnet_state_dict(
    arrays: Mapping[str, np.ndarray], depth: int | None, source: str, *, family: str, shortcut: str,
    head: str, key_map: Callable[[ArchSpec], dict[str, _Target]],
) -> tuple[ArchSpec, dict]:
    """Shared converter of a CIFAR ResNet-(6n+2) ``state_dict`` (numpy arrays) into ``(spec, variables)``.

    The depth comes from the ``layer{1,2,3}.<i>.*`` keys (n blocks per stage -> 6n + 2) and must equal
    ``depth`` when that is given; the number of classes comes from ``{head}.weight``; the spec is
    ``cifar_resnet_spec(depth, num_classes, shortcut=shortcut)`` and ``key_map(spec)`` maps the keys. Missing,
    unexpected, non-float or mis-shaped entries raise one :class:`ValueError` (one line) naming every
    offending key, prefixed by ``source``; ``family`` names the teacher family in messages.
    """
    keys = [k for k in arrays if not k.endswith(IGNORED_SUFFIX)]
    n = _blocks_per_stage(keys)
    if n == 0:
        raise ValueError(f"{source}: no 'layer{{1,2,3}}.<i>.*' keys; not a {family} CIFAR ResNet state "
                         f"dict (keys: {sorted(keys)[:8]}{' ...' if len(keys) > 8 else ''})")
    file_depth = 6 * n + 2
    if depth is not None and int(depth) != file_depth:
        raise ValueError(f"{source}: file has {n} blocks per stage (resnet{file_depth}) but "
                         f"depth={depth} was asked")
    head_key = f"{head}.weight"
    if head_key not in arrays:
        raise ValueError(f"{source}: missing key {head_key!r}")
    lw = np.shape(arrays[head_key])
    if len(lw) != 2 or lw[0] < 1:
        raise ValueError(f"{source}: key {head_key!r} has shape {fmt_shape(lw)}, expected (num_classes,64)")
    spec = cifar_resnet_spec(file_depth, num_classes=int(lw[0]), shortcut=shortcut)

    return spec, convert_with_key_map(arrays, key_map(spec), spec, source)


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


# ---------------------------------------------------------------------------------------------- families

def detect_family(keys: Sequence[str], source: str = "state dict") -> str:
    """The teacher family of a state dict from its keys: ``'akamaster'``, ``'chenyaofo'`` or ``'torchvision'``.

    A ``linear.*`` head means akamaster (option A); ``layer4.*`` or bottleneck ``*.conv3.*`` keys mean a
    torchvision ImageNet ResNet; otherwise an ``fc.*`` head or ``*.downsample.*`` projection keys mean chenyaofo
    (option B). Evidence for two families, or for none, raises a one-line :class:`ValueError`.
    """
    from oefsmc_jax.convert.torchvision_resnet import is_torchvision_key

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
        from oefsmc_jax.convert.chenyaofo import convert_chenyaofo_state_dict

        return convert_chenyaofo_state_dict
    if family == "torchvision":
        from oefsmc_jax.convert.torchvision_resnet import convert_torchvision_state_dict

        return convert_torchvision_state_dict
    raise ValueError(f"unknown teacher family {family!r}; expected one of {TEACHER_FAMILIES}")


def family_preprocessing(family: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` (RGB, applied to ``x / 255``) the teachers of ``family`` were trained with."""
    if family == "akamaster":
        return AKAMASTER_MEAN, AKAMASTER_STD
    if family == "chenyaofo":
        from oefsmc_jax.convert.chenyaofo import CHENYAOFO_MEAN, CHENYAOFO_STD

        return CHENYAOFO_MEAN, CHENYAOFO_STD
    if family == "torchvision":
        from oefsmc_jax.convert.torchvision_resnet import TORCHVISION_MEAN, TORCHVISION_STD

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
        meta = _model_meta(path)
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
        pre = _model_meta(path).get("preprocessing")
        if not isinstance(pre, Mapping) or "mean" not in pre or "std" not in pre:
            raise ValueError(f"{path}: the model's meta records no teacher preprocessing (mean/std)")
        return tuple(float(v) for v in pre["mean"]), tuple(float(v) for v in pre["std"])
    return family_preprocessing(teacher_family(path))


def _model_meta(directory: pathlib.Path) -> dict:
    """The JSON meta of an Orbax model written by ``save_model`` (the arrays are not read)."""
    import orbax.checkpoint as ocp

    from oefsmc_jax.training.checkpoint import Checkpointer, check_model_json, unreadable_model

    check_model_json(directory)
    ckpt = Checkpointer(directory, max_to_keep=1)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"model checkpoint {directory} holds no finished checkpoint")
        out = ckpt.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - Orbax raises many types; all mean "these files are damaged"
        raise unreadable_model(directory, e) from None
    finally:
        ckpt.close()
    return dict(out["meta"])


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
        from oefsmc_jax.convert.torchvision_resnet import TORCHVISION_INPUT

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
    from oefsmc_jax.training.parallel import make_mesh
    from oefsmc_jax.training.step import make_predict

    model = build_model(spec)
    predict = make_predict(make_mesh(), model, tuple(mean), tuple(std), batch_size=batch_size)
    logits = predict(variables, x)["logits"]
    return float(100.0 * np.mean(np.argmax(logits, -1) == np.asarray(y)))


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Command line entry point: parse ``argv`` (without the program name, default ``sys.argv[1:]``) with the
    ``oefsmc import-teacher`` parser (``prog`` names the program in its usage), then :func:`run_cli`."""
    from oefsmc_jax.main import parse_subcommand

    return run_cli(parse_subcommand("import-teacher", argv, prog))


def run_cli(args: argparse.Namespace) -> int:
    """Import a teacher as ``args`` (``oefsmc import-teacher``'s flags) say, print what was written; returns the
    exit status.

    A bad teacher file (mismatched keys or shapes, wrong depth, unknown family, missing file, torch missing for
    ``.th``) or a refused OUT_DIR (exists and is not empty without ``--overwrite``, is a file, holds SRC) prints
    ``error: ...`` to stderr and returns 1; a failed write (not a folder, read-only, disk full) prints one line
    naming the path and returns 74 (``cli_util.EXIT_IO``), leaving an existing OUT_DIR as it was.
    """
    from oefsmc_jax import paths
    from oefsmc_jax.cli_util import EXIT_IO, init_absl
    from oefsmc_jax.training.checkpoint import load_model

    init_absl()

    try:
        spec = import_teacher(args.src, args.out_dir, args.depth, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {paths.os_error_line(e, args.out_dir)}", file=sys.stderr)
        return EXIT_IO
    out = pathlib.Path(args.out_dir).absolute()
    spec2, variables, meta = load_model(out)
    depth = resnet_depth(spec)
    n_params = sum(int(np.prod(np.shape(a))) for a in jax.tree.leaves(variables["params"]))
    mean, std = meta["preprocessing"]["mean"], meta["preprocessing"]["std"]
    print(f"wrote {out}: {meta['family']} resnet{depth} ({spec.num_classes} classes, {n_params:,} parameters, "
          f"shortcut {spec.shortcut}) from {args.src}")
    print(f"preprocessing: x/255, mean {tuple(mean)}, std {tuple(std)}")
    print(f"use it with teacher.checkpoint={out}")
    if args.check_npz:
        from oefsmc_jax.data import load_source

        try:
            data = load_source({"kind": "npz", "path": args.check_npz, "image_size": 32})
        except (ValueError, FileNotFoundError) as e:
            print(f"error: --check-npz: {e} (the model was written to {out})", file=sys.stderr)
            return 1
        t0 = time.perf_counter()
        acc = evaluate_top1(spec2, variables, data.x, data.y, batch_size=args.batch_size, mean=mean, std=std)
        print(f"top-1 on {args.check_npz} ({len(data)} images): {acc:.2f}% "
              f"[{time.perf_counter() - t0:.1f}s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
