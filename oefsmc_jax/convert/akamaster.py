"""Import the pretrained CIFAR-10 ResNets of ``akamaster/pytorch_resnet_cifar10`` as Orbax model checkpoints.

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

Command line (the lead wires ``python -m oefsmc_jax import-teacher`` to :func:`main`)::

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
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from oefsmc_jax.models import ArchSpec, build_model, cifar_resnet_spec

__all__ = [
    "AKAMASTER_MEAN",
    "AKAMASTER_STD",
    "TORCH_SUFFIXES",
    "akamaster_key_map",
    "convert_akamaster_state_dict",
    "evaluate_top1",
    "import_teacher",
    "load_akamaster_npz",
    "load_akamaster_th",
    "main",
]

AKAMASTER_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
AKAMASTER_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
TORCH_SUFFIXES = (".th", ".pth", ".pt")
_BN_FIELDS = (("weight", "params", "scale"), ("bias", "params", "bias"),
              ("running_mean", "batch_stats", "mean"), ("running_var", "batch_stats", "var"))
_LAYER_RE = re.compile(r"^layer([1-3])\.(\d+)\.")
_IGNORED_SUFFIX = ".num_batches_tracked"

# one entry of the key map: (collection, flax path inside the collection, layout transform name)
_Target = tuple[str, tuple[str, ...], str]


def akamaster_key_map(spec: ArchSpec) -> dict[str, _Target]:
    """PyTorch ``state_dict`` key -> ``(collection, flax path, transform)`` for a CIFAR ResNet ``spec``.

    ``transform`` is ``'conv'`` (OIHW -> HWIO), ``'linear'`` (``[out, in]`` -> ``[in, out]``) or ``'none'``.
    """
    if spec.family != "cifar_resnet" or spec.block != "basic":
        raise ValueError(f"akamaster teachers are basic-block CIFAR ResNets, got {spec.family}/{spec.block}")
    out: dict[str, _Target] = {}

    def add_bn(prefix: str, path: tuple[str, ...]) -> None:
        for torch_name, coll, flax_name in _BN_FIELDS:
            out[f"{prefix}.{torch_name}"] = (coll, path + (flax_name,), "none")

    out["conv1.weight"] = ("params", ("stem_conv", "kernel"), "conv")
    add_bn("bn1", ("stem_bn",))
    for s, b in spec.blocks():
        prefix, name = f"layer{s + 1}.{b}", spec.block_name(s, b)
        for j in (1, 2):
            out[f"{prefix}.conv{j}.weight"] = ("params", (name, f"conv{j}", "kernel"), "conv")
            add_bn(f"{prefix}.bn{j}", (name, f"bn{j}"))
    out["linear.weight"] = ("params", ("head", "kernel"), "linear")
    out["linear.bias"] = ("params", ("head", "bias"), "none")
    return out


def _to_torch_shape(shape: tuple[int, ...], transform: str) -> tuple[int, ...]:
    if transform == "conv":  # HWIO -> OIHW
        return (shape[3], shape[2], shape[0], shape[1])
    if transform == "linear":
        return (shape[1], shape[0])
    return tuple(shape)


def _to_flax(a: np.ndarray, transform: str) -> np.ndarray:
    if transform == "conv":
        a = a.transpose(2, 3, 1, 0)
    elif transform == "linear":
        a = a.T
    return np.ascontiguousarray(a, dtype=np.float32)


def _fmt(shape: Sequence[int]) -> str:
    return "(" + ",".join(str(int(d)) for d in shape) + ")"


def _abstract_variables(spec: ArchSpec) -> dict:
    """Shapes/dtypes of ``build_model(spec).init(...)`` (traced only, nothing is computed)."""
    model = build_model(spec)
    x = jnp.zeros((1, 32, 32, spec.in_channels), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))


def _blocks_per_stage(keys: Sequence[str]) -> int:
    n = [0, 0, 0]
    for k in keys:
        m = _LAYER_RE.match(k)
        if m:
            s, b = int(m.group(1)) - 1, int(m.group(2))
            n[s] = max(n[s], b + 1)
    return max(n)


def convert_akamaster_state_dict(
    arrays: Mapping[str, np.ndarray], depth: int | None = None, source: str = "state dict"
) -> tuple[ArchSpec, dict]:
    """Turn an akamaster ``state_dict`` (``module.`` prefix removed, numpy arrays) into ``(spec, variables)``.

    The depth comes from the keys (n blocks per stage -> depth 6n + 2) and must equal ``depth`` when that is
    given; the number of classes comes from ``linear.weight``. Missing, unexpected, non-float or mis-shaped
    entries raise a :class:`ValueError` naming every offending key (``source`` prefixes the message).
    """
    keys = [k for k in arrays if not k.endswith(_IGNORED_SUFFIX)]
    n = _blocks_per_stage(keys)
    if n == 0:
        raise ValueError(f"{source}: no 'layer{{1,2,3}}.<i>.*' keys; not an akamaster CIFAR ResNet state "
                         f"dict (keys: {sorted(keys)[:8]}{' ...' if len(keys) > 8 else ''})")
    file_depth = 6 * n + 2
    if depth is not None and int(depth) != file_depth:
        raise ValueError(f"{source}: file has {n} blocks per stage (resnet{file_depth}) but "
                         f"depth={depth} was asked")
    if "linear.weight" not in arrays:
        raise ValueError(f"{source}: missing key 'linear.weight'")
    lw = np.shape(arrays["linear.weight"])
    if len(lw) != 2 or lw[0] < 1:
        raise ValueError(f"{source}: key 'linear.weight' has shape {_fmt(lw)}, expected (num_classes,64)")
    spec = cifar_resnet_spec(file_depth, num_classes=int(lw[0]), shortcut="A")

    abstract = _abstract_variables(spec)
    key_map = akamaster_key_map(spec)
    problems: list[str] = []
    for k in key_map:
        if k not in arrays:
            problems.append(f"missing key {k!r}")
    for k in keys:
        if k not in key_map:
            problems.append(f"unexpected key {k!r}")
    converted: dict[str, dict] = {"params": {}, "batch_stats": {}}
    for k, (coll, path, transform) in key_map.items():
        if k not in arrays:
            continue
        a = np.asarray(arrays[k])
        ref = abstract[coll]
        for p in path:
            ref = ref[p]
        want = _to_torch_shape(tuple(ref.shape), transform)
        if a.shape != want:
            problems.append(f"key {k!r} has shape {_fmt(a.shape)}, expected {_fmt(want)}")
            continue
        if not np.issubdtype(a.dtype, np.floating):
            problems.append(f"key {k!r} has dtype {a.dtype}, expected a float array")
            continue
        node = converted[coll]
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = _to_flax(a, transform)
    if problems:
        head = problems[0] if len(problems) == 1 else f"{len(problems)} problems: " + "; ".join(problems)
        raise ValueError(f"{source}: {head}")

    variables = {
        "params": converted["params"],
        "batch_stats": converted["batch_stats"],
        "masks": jax.tree.map(lambda s: np.ones(s.shape, s.dtype), abstract["masks"]),
    }
    _check_same_tree(variables, abstract, source)
    return spec, variables


def _check_same_tree(variables: dict, abstract: dict, source: str) -> None:
    """Structure, shapes and dtypes of ``variables`` must equal those of the model's ``init``."""
    got = jax.tree_util.tree_flatten_with_path(variables)
    want = jax.tree_util.tree_flatten_with_path(abstract)
    if got[1] != want[1]:
        raise ValueError(f"{source}: imported variable tree {got[1]} differs from the model's {want[1]}")
    for (path, a), (_, ref) in zip(got[0], want[0]):
        if tuple(a.shape) != tuple(ref.shape) or a.dtype != ref.dtype:
            raise ValueError(f"{source}: variable {jax.tree_util.keystr(path)} is {a.dtype}{_fmt(a.shape)}, "
                             f"the model has {ref.dtype}{_fmt(ref.shape)}")


def load_akamaster_npz(path: str | os.PathLike, depth: int | None = None) -> tuple[ArchSpec, dict]:
    """Read the numpy export of an akamaster teacher; returns ``(spec, variables)`` (host float32 arrays).

    ``variables`` has the collections 'params', 'batch_stats' and 'masks' (all ones) and exactly the tree of
    ``build_model(spec).init(...)``. See :func:`convert_akamaster_state_dict` for the checks.
    """
    path = pathlib.Path(path)
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    return convert_akamaster_state_dict(arrays, depth, source=str(path))


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            "reading a .th teacher needs PyTorch: `pip install torch` (or the optional extra "
            "`pip install oefsmc_jax[torch]`), or use the torch-free .npz export"
        ) from e
    return torch


def load_akamaster_th(path: str | os.PathLike, depth: int | None = None) -> tuple[ArchSpec, dict]:
    """Read an original akamaster ``.th`` checkpoint (needs ``torch``); returns ``(spec, variables)``.

    Accepts ``{'state_dict': ...}`` (``best_prec1`` etc. ignored) or a bare state dict; a ``module.`` prefix
    (from ``DataParallel``) is removed. Raises :class:`ImportError` when torch is not installed.
    """
    torch = _import_torch()
    path = pathlib.Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except TypeError:  # torch < 1.13 has no weights_only
        obj = torch.load(path, map_location="cpu")
    state = obj["state_dict"] if isinstance(obj, Mapping) and "state_dict" in obj else obj
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict or {{'state_dict': ...}}, got {type(obj).__name__}")
    arrays: dict[str, np.ndarray] = {}
    for k, v in state.items():
        name = k[len("module."):] if k.startswith("module.") else k
        arrays[name] = v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
    return convert_akamaster_state_dict(arrays, depth, source=str(path))


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def import_teacher(src: str | os.PathLike, out_dir: str | os.PathLike, depth: int | None = None) -> ArchSpec:
    """Convert an akamaster teacher (``.npz``, or ``.th``/``.pth``/``.pt`` with torch) into an Orbax model.

    Writes ``out_dir`` with :func:`oefsmc_jax.checkpoint.save_model` (read back by ``load_model``, named by a
    config's ``teacher.checkpoint``); the meta records the source path, its sha256, the format, the depth and
    the preprocessing. Returns the architecture spec.
    """
    from oefsmc_jax.checkpoint import save_model

    src = pathlib.Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"teacher file {src} does not exist")
    suffix = src.suffix.lower()
    if suffix == ".npz":
        spec, variables = load_akamaster_npz(src, depth)
        fmt = "akamaster_npz"
    elif suffix in TORCH_SUFFIXES:
        spec, variables = load_akamaster_th(src, depth)
        fmt = "akamaster_th"
    else:
        raise ValueError(f"{src}: unknown teacher format {suffix!r}; expected .npz or one of "
                         f"{TORCH_SUFFIXES}")
    meta = {
        "source": str(src),
        "source_sha256": _sha256(src),
        "format": fmt,
        "depth": 6 * len(spec.kept[0]) + 2,
        "num_classes": spec.num_classes,
        "preprocessing": {"scale": 1.0 / 255.0, "mean": list(AKAMASTER_MEAN), "std": list(AKAMASTER_STD)},
    }
    save_model(out_dir, spec, variables, meta)
    return spec


def evaluate_top1(spec: ArchSpec, variables: dict, x: np.ndarray, y: np.ndarray,
                  batch_size: int = 500) -> float:
    """Top-1 accuracy (percent) of the model on uint8 images ``x`` with the akamaster preprocessing."""
    from oefsmc_jax.parallel import make_mesh
    from oefsmc_jax.step import make_predict

    model = build_model(spec)
    predict = make_predict(make_mesh(), model, AKAMASTER_MEAN, AKAMASTER_STD, batch_size=batch_size)
    logits = predict(variables, x)["logits"]
    return float(100.0 * np.mean(np.argmax(logits, -1) == np.asarray(y)))


def _parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog or "python -m oefsmc_jax.convert.akamaster",
        description="Import an akamaster/pytorch_resnet_cifar10 teacher (.npz, or .th with torch) as an "
                    "Orbax model checkpoint that configs can name via teacher.checkpoint.")
    p.add_argument("src", help="teacher file: .npz export (no torch needed) or the original .th")
    p.add_argument("out_dir", help="directory of the Orbax model checkpoint to write")
    p.add_argument("--depth", type=int, default=None, help="expected depth (20, 32, 44, 56, ...); checked")
    p.add_argument("--check-npz", default=None, metavar="CIFAR_NPZ",
                   help="also evaluate the written model on this npz (keys x, y) and print top-1")
    p.add_argument("--batch-size", type=int, default=500, help="evaluation batch size (default 500)")
    return p


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Command line entry point: import a teacher, print what was written; returns the exit status.

    ``argv`` excludes the program name (default ``sys.argv[1:]``); ``prog`` is the program name shown in the
    usage (e.g. ``"python -m oefsmc_jax import-teacher"``). A bad teacher file (mismatched keys or shapes,
    wrong depth, missing file, torch missing for ``.th``) prints ``error: ...`` to stderr and returns 1.
    """
    args = _parser(prog).parse_args(argv)
    from oefsmc_jax.checkpoint import load_model

    try:
        spec = import_teacher(args.src, args.out_dir, args.depth)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = pathlib.Path(args.out_dir).absolute()
    depth = 6 * len(spec.kept[0]) + 2
    n_params = sum(int(np.prod(np.shape(a))) for a in jax.tree.leaves(load_model(out)[1]["params"]))
    print(f"wrote {out}: akamaster resnet{depth} ({spec.num_classes} classes, {n_params:,} parameters, "
          f"shortcut {spec.shortcut}) from {args.src}")
    print(f"use it with teacher.checkpoint={out}")
    if args.check_npz:
        from oefsmc_jax.data import load_source

        data = load_source({"kind": "npz", "path": args.check_npz, "image_size": 32})
        spec2, variables, _ = load_model(out)
        t0 = time.perf_counter()
        acc = evaluate_top1(spec2, variables, data.x, data.y, batch_size=args.batch_size)
        print(f"top-1 on {args.check_npz} ({len(data)} images): {acc:.2f}% "
              f"[{time.perf_counter() - t0:.1f}s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
