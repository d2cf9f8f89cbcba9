"""PyTorch -> Flax layouts and the checked conversion of a ``state_dict`` through a key map (every family).

A key map sends each PyTorch key to ``(collection, flax path inside the collection, transform)``, where
``transform`` is ``'conv'`` (OIHW -> HWIO), ``'linear'`` (``[out, in]`` -> ``[in, out]``) or ``'none'``.
:func:`convert_with_key_map` applies it and names every missing, unexpected, mis-shaped or non-float entry in one
line. :func:`resnet_key_map` and :func:`convert_resnet_state_dict` are the key map and the converter of the basic-block
CIFAR ResNets that the akamaster (option A) and chenyaofo (option B) families share. This module imports no family's
module, so every family's converter can use it without an import cycle.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from oefsmc_jax.models import ArchSpec, build_model, cifar_resnet_spec

__all__ = [
    "BN_FIELDS",
    "IGNORED_SUFFIX",
    "Target",
    "abstract_variables",
    "add_bn",
    "check_same_tree",
    "convert_resnet_state_dict",
    "convert_with_key_map",
    "fmt_shape",
    "resnet_depth",
    "resnet_key_map",
    "to_flax",
    "to_torch_shape",
]

# (PyTorch BN field, Flax collection, Flax name)
BN_FIELDS = (("weight", "params", "scale"), ("bias", "params", "bias"),
             ("running_mean", "batch_stats", "mean"), ("running_var", "batch_stats", "var"))
IGNORED_SUFFIX = ".num_batches_tracked"  # newer PyTorch BN counters: accepted, not used in eval mode

# one entry of a key map: (collection, flax path inside the collection, layout transform name)
Target = tuple[str, tuple[str, ...], str]
_CIFAR_LAYER_RE = re.compile(r"^layer([1-3])\.(\d+)\.")


def add_bn(out: dict[str, Target], prefix: str, path: tuple[str, ...]) -> None:
    """Map the four entries of the PyTorch BatchNorm ``prefix`` onto the Flax BatchNorm at ``path``."""
    for torch_name, coll, flax_name in BN_FIELDS:
        out[f"{prefix}.{torch_name}"] = (coll, path + (flax_name,), "none")


def to_torch_shape(shape: tuple[int, ...], transform: str) -> tuple[int, ...]:
    """The PyTorch shape of a Flax variable of ``shape`` under ``transform``."""
    if transform == "conv":  # HWIO -> OIHW
        return (shape[3], shape[2], shape[0], shape[1])
    if transform == "linear":
        return (shape[1], shape[0])
    return tuple(shape)


def to_flax(a: np.ndarray, transform: str) -> np.ndarray:
    """A PyTorch array in the Flax layout of ``transform``, as contiguous float32."""
    if transform == "conv":
        a = a.transpose(2, 3, 1, 0)
    elif transform == "linear":
        a = a.T
    return np.ascontiguousarray(a, dtype=np.float32)


def fmt_shape(shape: Sequence[int]) -> str:
    """``(16,3,3,3)``: a shape as the error messages print it."""
    return "(" + ",".join(str(int(d)) for d in shape) + ")"


def abstract_variables(spec: ArchSpec) -> dict:
    """Shapes/dtypes of ``build_model(spec).init(...)`` (traced only, nothing is computed)."""
    model = build_model(spec)
    x = jnp.zeros((1, 32, 32, spec.in_channels), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))


def resnet_depth(spec: ArchSpec) -> int:
    """The conventional depth of a ResNet spec: weighted layers of all blocks (2 per basic block, 3 per
    bottleneck) plus the stem and the head (CIFAR 6n+2; torchvision 18/34/50)."""
    per_block = 3 if spec.block == "bottleneck" else 2
    return per_block * sum(len(st) for st in spec.kept) + 2


def check_same_tree(variables: dict, abstract: dict, source: str) -> None:
    """Structure, shapes and dtypes of ``variables`` must equal those of the model's ``init``."""
    got = jax.tree_util.tree_flatten_with_path(variables)
    want = jax.tree_util.tree_flatten_with_path(abstract)
    if got[1] != want[1]:
        raise ValueError(f"{source}: imported variable tree {got[1]} differs from the model's {want[1]}")
    for (path, a), (_, ref) in zip(got[0], want[0]):
        if tuple(a.shape) != tuple(ref.shape) or a.dtype != ref.dtype:
            raise ValueError(f"{source}: variable {jax.tree_util.keystr(path)} is {a.dtype}{fmt_shape(a.shape)}, "
                             f"the model has {ref.dtype}{fmt_shape(ref.shape)}")


def convert_with_key_map(arrays: Mapping[str, np.ndarray], kmap: Mapping[str, Target], spec: ArchSpec,
                         source: str) -> dict:
    """The model variables of ``spec`` from the PyTorch ``arrays`` through ``kmap``.

    Every key of ``kmap`` must be present with the PyTorch shape of its variable and a float dtype; keys not in
    ``kmap`` (except ``*.num_batches_tracked``) are unexpected. All problems raise one :class:`ValueError`
    prefixed by ``source``. The result has 'params', 'batch_stats' and 'masks' (all ones), exactly the tree of
    ``build_model(spec).init(...)``.
    """
    abstract = abstract_variables(spec)
    problems = [f"missing key {k!r}" for k in kmap if k not in arrays]
    problems += [f"unexpected key {k!r}" for k in arrays if k not in kmap and not k.endswith(IGNORED_SUFFIX)]
    converted: dict[str, dict] = {"params": {}, "batch_stats": {}}
    for k, (coll, path, transform) in kmap.items():
        if k not in arrays:
            continue
        a = np.asarray(arrays[k])
        ref = abstract[coll]
        for p in path:
            ref = ref[p]
        want = to_torch_shape(tuple(ref.shape), transform)
        if a.shape != want:
            problems.append(f"key {k!r} has shape {fmt_shape(a.shape)}, expected {fmt_shape(want)}")
            continue
        if not np.issubdtype(a.dtype, np.floating):
            problems.append(f"key {k!r} has dtype {a.dtype}, expected a float array")
            continue
        node = converted[coll]
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = to_flax(a, transform)
    if problems:
        head_msg = problems[0] if len(problems) == 1 else f"{len(problems)} problems: " + "; ".join(problems)
        raise ValueError(f"{source}: {head_msg}")
    variables = {
        "params": converted["params"],
        "batch_stats": converted["batch_stats"],
        "masks": jax.tree.map(lambda s: np.ones(s.shape, s.dtype), abstract["masks"]),
    }
    check_same_tree(variables, abstract, source)
    return variables


def resnet_key_map(spec: ArchSpec, head: str, projection: str | None) -> dict[str, Target]:
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
    out: dict[str, Target] = {}
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


def _blocks_per_stage(keys: Sequence[str]) -> int:
    n = [0, 0, 0]
    for k in keys:
        m = _CIFAR_LAYER_RE.match(k)
        if m:
            s, b = int(m.group(1)) - 1, int(m.group(2))
            n[s] = max(n[s], b + 1)
    return max(n)


def convert_resnet_state_dict(
    arrays: Mapping[str, np.ndarray], depth: int | None, source: str, *, family: str, shortcut: str,
    head: str, key_map: Callable[[ArchSpec], dict[str, Target]],
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
