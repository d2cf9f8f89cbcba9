"""Export the compressed student of a finished run as a small, self-contained model, and load it for inference.

A run writes ``WORKDIR/config.json`` and, per arm, ``WORKDIR/ARM/student/`` (an Orbax model from
:func:`oefsmc_jax.training.checkpoint.save_model`). :func:`export_student` reads that student, physically removes masked
channels and gate-0 blocks with :func:`oefsmc_jax.models.shrink` (idempotent on an already shrunk model), and
writes ``OUT`` as an Orbax model whose meta carries everything inference needs: the preprocessing (``x / 255``,
then per-channel ``mean``/``std``), the input size, the arm, the method, the parameter and MAC counts, and the
run directory's name (never an absolute path). ``OUT`` must lie outside the run directory; an existing, non-empty
``OUT`` is replaced only with ``--overwrite``, and then atomically (written beside it, then swapped in).

:func:`load_compressed` turns ``OUT`` into a ready-to-call function ``uint8 images [N, H, W, C] -> float32 logits
[N, K]`` (preprocessing inside, compiled once, fixed-size batches). Command line::

    python -m oefsmc_jax export --workdir DIR --arm ARM --out OUT [--overwrite]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

FORMAT = "oefsmc_jax.compressed/1"
_NOT_ARMS = {"cache", "teacher"}

__all__ = ["FORMAT", "CompressedModel", "export_student", "load_compressed", "main"]


def _get(config: Mapping[str, Any], dotted: str, where: pathlib.Path) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ValueError(f"{where} has no {dotted}; a run's config.json holds data.mean, data.std and "
                             "data.image_size")
        node = node[part]
    return node


def _arms(workdir: pathlib.Path, config: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(arms of the run, finished arms): the config's ``arms`` plus any directory holding a student or result."""
    named = [a.strip() for a in str(config.get("arms", "")).split(",") if a.strip()]
    found = [d.name for d in sorted(workdir.iterdir()) if d.is_dir() and d.name not in _NOT_ARMS
             and any((d / f).exists() for f in ("student", "compressed", "result.json"))]
    arms = named + [a for a in found if a not in named]
    finished = [a for a in arms if (workdir / a / "student").is_dir()]
    return arms, finished


def _teacher_cost(config: Mapping[str, Any], workdir: pathlib.Path, image_size: int) -> dict | None:
    """Params/MACs of the run's teacher when it can be found here (the workdir's trained teacher, or the
    ``teacher.checkpoint`` file/directory, if it exists on this machine); None otherwise."""
    from oefsmc_jax.models import count_flops, count_params
    from oefsmc_jax.training.checkpoint import load_model

    path = str((config.get("teacher") or {}).get("checkpoint") or "")
    candidates = [workdir / "teacher" / "model"] + ([pathlib.Path(path)] if path else [])
    for cand in candidates:
        if not cand.exists():
            continue
        try:
            if cand.suffix == ".npz":
                from oefsmc_jax.convert import load_akamaster_npz

                spec = load_akamaster_npz(cand)[0]
            elif cand.is_dir():
                spec = load_model(cand)[0]
            else:  # a torch pickle: reading it needs torch, which export does not require
                continue
        except (ValueError, FileNotFoundError, OSError, KeyError):
            continue
        return {"name": cand.name, "params": count_params(spec), "macs": count_flops(spec, image_size)}
    return None


def export_student(workdir: str | os.PathLike, arm: str, out: str | os.PathLike, *,
                   overwrite: bool = False) -> dict:
    """Shrink the student of ``arm`` in run directory ``workdir`` and write it to ``out`` (an Orbax model).

    Returns the meta written beside the spec (``format``, ``preprocessing`` {scale, mean, std, image_size,
    in_channels}, ``arm``, ``method``, ``params``, ``macs``, ``params_before_shrink``, ``teacher`` (params/MACs or
    None), ``source`` {workdir name, arm}, ``version``). Raises FileNotFoundError (no run directory, no
    config.json, the arm has no student yet), ValueError (unknown arm, incomplete config, a JSON file or the
    student that cannot be read, ``out`` a file or equal to, inside or containing the run directory, with or
    without ``overwrite``) or FileExistsError (``out`` exists and is not empty, without ``overwrite``), each naming
    what is missing and what exists. ``out`` is replaced atomically (:func:`oefsmc_jax.paths.replace_dir`): if the
    export fails, an existing ``out`` is left as it was.
    """
    from oefsmc_jax import __version__, paths
    from oefsmc_jax.models import count_flops, count_params, shrink
    from oefsmc_jax.training.checkpoint import load_model, save_model

    workdir, out = paths.as_path(workdir), paths.as_path(out)
    if not workdir.is_dir():
        raise FileNotFoundError(f"run directory {workdir} does not exist")
    cfg_path = workdir / "config.json"
    if not cfg_path.is_file():
        held = ", ".join(sorted(p.name for p in workdir.iterdir())) or "nothing"
        raise FileNotFoundError(f"{workdir} has no config.json, so it is not a run directory (it holds: {held})")
    config = paths.read_json(cfg_path)
    if not isinstance(config, Mapping):
        raise ValueError(f"{cfg_path} holds no JSON object; a run's config.json holds data.mean, data.std and "
                         "data.image_size")
    arms, finished = _arms(workdir, config)
    done = ", ".join(finished) or "none"
    if arm not in arms:
        raise ValueError(f"arm {arm!r} does not exist in {workdir}; its arms: {', '.join(arms) or 'none'} "
                         f"(finished: {done})")
    sdir = workdir / arm / "student"
    if not sdir.is_dir():
        raise FileNotFoundError(f"arm {arm!r} has not finished: {sdir} does not exist (finished arms: {done})")
    paths.check_output_dir(out, overwrite=overwrite, protected=[(workdir, "the run directory")])

    mean = [float(m) for m in _get(config, "data.mean", cfg_path)]
    std = [float(s) for s in _get(config, "data.std", cfg_path)]
    image_size = int(_get(config, "data.image_size", cfg_path))
    spec, variables, smeta = load_model(sdir)
    if not (len(mean) == len(std) == spec.in_channels):
        raise ValueError(f"{cfg_path}: data.mean/data.std have {len(mean)}/{len(std)} values but the student "
                         f"takes {spec.in_channels} input channels")
    params_before = count_params(spec)
    spec, variables = shrink(spec, variables)
    method = (config.get("method") or {}).get("name") or smeta.get("method")
    meta = {
        "format": FORMAT,
        "preprocessing": {"scale": 1.0 / 255.0, "mean": mean, "std": std, "image_size": image_size,
                          "in_channels": spec.in_channels},
        "arm": arm,
        "method": method,
        "params": count_params(spec),
        "macs": count_flops(spec, image_size),
        "params_before_shrink": params_before,
        "teacher": _teacher_cost(config, workdir, image_size),
        "source": {"workdir": workdir.resolve().name, "arm": arm},
        "version": __version__,
    }
    result = workdir / arm / "result.json"
    if result.is_file():
        record = paths.read_json(result)
        top1 = (record.get("metrics") or {}).get("top1") if isinstance(record, Mapping) else None
        if top1 is not None:
            meta["test_top1"] = float(top1)
    save_model(out, spec, variables, meta)
    return meta


class CompressedModel:
    """An exported model as a function ``uint8 images [N, H, W, C] -> float32 logits [N, K]``.

    The preprocessing (``x / 255``, then ``(x - mean) / std`` per channel) runs inside one jitted forward that is
    compiled for ``batch_size`` images only: inputs are cut into batches of that size and the last one is padded,
    so any N reuses the same executable. ``spec``, ``meta``, ``image_size`` and ``batch_size`` are attributes;
    ``traces`` counts how often the forward was traced (1 after the first call).
    """

    def __init__(self, spec: Any, variables: dict, meta: dict, batch_size: int = 128):
        import jax
        import jax.numpy as jnp

        from oefsmc_jax.models import build_model

        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        pre = meta["preprocessing"]
        self.spec, self.meta, self.batch_size = spec, meta, int(batch_size)
        self.image_size, self.in_channels = int(pre["image_size"]), int(pre["in_channels"])
        self.num_classes = spec.num_classes
        self.traces = 0
        model = build_model(spec)
        scale = jnp.float32(pre.get("scale", 1.0 / 255.0))
        mean, std = jnp.asarray(pre["mean"], jnp.float32), jnp.asarray(pre["std"], jnp.float32)

        def forward(v: dict, x: jax.Array) -> jax.Array:
            self.traces += 1
            x = (x.astype(jnp.float32) * scale - mean) / std
            return model.apply(v, x, train=False)["logits"].astype(jnp.float32)

        self._forward = jax.jit(forward)
        self._variables = jax.device_put(variables)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one input image."""
        return self.image_size, self.image_size, self.in_channels

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Logits ``[N, K]`` (float32) for uint8 ``images`` ``[N, H, W, C]``."""
        x = np.asarray(images)
        h, w, c = self.input_shape
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (h, w, c):
            raise ValueError(f"expected uint8 images of shape [N, {h}, {w}, {c}], got {x.dtype} array of shape "
                             f"{list(x.shape)}")
        n, b = len(x), self.batch_size
        out = []
        for start in range(0, n, b):
            chunk = x[start:start + b]
            pad = b - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, h, w, c), np.uint8)])
            out.append(np.asarray(self._forward(self._variables, chunk))[:b - pad])
        return np.concatenate(out) if out else np.zeros((0, self.num_classes), np.float32)


def load_compressed(out: str | os.PathLike, batch_size: int = 128) -> CompressedModel:
    """Load a model written by :func:`export_student` as a callable ``uint8 [N, H, W, C] -> logits [N, K]``.

    ``batch_size`` is the fixed batch the forward is compiled for (use 1 for one image at a time).
    """
    from oefsmc_jax.training.checkpoint import load_model

    spec, variables, meta = load_model(out)
    pre = meta.get("preprocessing") or {}
    missing = [k for k in ("mean", "std", "image_size", "in_channels") if k not in pre]
    if missing:
        raise ValueError(f"{out} is not an exported compressed model: its meta has no preprocessing "
                         f"{', '.join(missing)}; write it with `python -m oefsmc_jax export`")
    return CompressedModel(spec, variables, meta, batch_size)


# ---------------------------------------------------------------------- command line
def _fmt_cost(params: int, macs: int, ref: Mapping[str, Any] | None = None) -> str:
    s = f"{params:,} params, {macs / 1e6:,.2f}M MACs"
    if ref:
        s += f" ({params / ref['params']:.1%} / {macs / ref['macs']:.1%} of the teacher)"
    return s


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """``export --workdir DIR --arm ARM --out OUT`` (``argv`` without the program name, default
    ``sys.argv[1:]``): parse with the ``oefsmc export`` parser, then :func:`run_cli`."""
    from oefsmc_jax.main import parse_subcommand

    return run_cli(parse_subcommand("export", argv, prog))


def run_cli(args: argparse.Namespace) -> int:
    """Export a run's student as ``args`` (``oefsmc export``'s flags) say; prints what was written.

    Returns 0; 2 after one ``error: ...`` line on stderr for bad input (missing run, arm or student, a file that
    does not parse, an OUT that exists or is, holds or lies inside the run directory); 74 (``cli_util.EXIT_IO``)
    after one line naming the path when writing fails (not a folder, read-only, disk full).
    """
    from oefsmc_jax import paths
    from oefsmc_jax.cli_util import EXIT_IO, EXIT_USAGE, init_absl

    init_absl()  # Orbax logs every save at INFO: WARNING and up only
    try:
        meta = export_student(args.workdir, args.arm, args.out, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # not a folder, read-only, disk full: OUT is left as it was
        print(f"error: {paths.os_error_line(e, args.out)}", file=sys.stderr)
        return EXIT_IO
    teacher = meta["teacher"]
    print(f"wrote {args.out}: arm {meta['arm']} ({meta['method']}) of run {meta['source']['workdir']}")
    if teacher:
        print(f"teacher: {_fmt_cost(teacher['params'], teacher['macs'])}  [{teacher['name']}]")
    else:
        print("teacher: unknown (no workdir/teacher/model and teacher.checkpoint is not readable here)")
    print(f"student: {_fmt_cost(meta['params'], meta['macs'], teacher)}")
    pre = meta["preprocessing"]
    print(f"input: uint8 [N, {pre['image_size']}, {pre['image_size']}, {pre['in_channels']}]; "
          f"use it with oefsmc_jax.load_compressed({str(args.out)!r})")
    return 0


if __name__ == "__main__":
    from oefsmc_jax.main import cli

    cli(["export", *sys.argv[1:]])
