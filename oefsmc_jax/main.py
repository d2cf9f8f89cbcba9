"""Command line: ``oefsmc`` (``python -m oefsmc_jax``) and its subcommands, one argparse tree.

``oefsmc [run] --config configs/NAME.py[:arg] --workdir DIR [--config.FIELD=VALUE ...]`` runs a compression (``run``
is the default when the first argument is a flag); ``oefsmc experiments --config GRID.py --workdir DIR`` runs (or
resumes) a grid in this process and summarises it (``experiments summarize`` or ``summarize`` only summarises);
``oefsmc export --workdir DIR --arm ARM --out OUT`` writes a physically smaller student with its preprocessing (load
it with ``oefsmc_jax.load_compressed``); ``oefsmc import-teacher SRC OUT_DIR [--depth N] [--check-npz NPZ]``
converts a pretrained PyTorch ResNet into an Orbax model checkpoint that ``teacher.checkpoint`` names; ``oefsmc
pools`` and ``oefsmc ood-classes`` are the grid tools. ``python -m oefsmc_jax.experiments``, ``python -m
oefsmc_jax.experiments.pools`` and ``python -m oefsmc_jax.experiments.ood_classes`` are aliases of
``experiments``, ``pools`` and ``ood-classes``.

Every subcommand parses with :func:`parse` (nothing runs; usage errors are one line, exit 2); ``--config`` and its
``--config.FIELD=VALUE`` overrides keep ml_collections' semantics (:func:`oefsmc_jax.cli_util.load_config`).
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import NamedTuple, NoReturn

from oefsmc_jax import cli_util


def _run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, metavar="FILE[:ARG]",
                   help="an ml_collections config file with get_config(arg), e.g. configs/cifar10.py:method=mir")
    p.add_argument("--config.FIELD=VALUE", dest="_override_help", action="store_true", default=argparse.SUPPRESS,
                   help="override any config field, e.g. --config.train.steps=500 --config.oe.lambda_jd=0.3 "
                        "(repeatable; docs/config.md lists every field)")
    p.add_argument("--workdir", required=True, metavar="DIR",
                   help="run directory: checkpoints, metrics, results.json per arm, report.md, per-class plot; "
                        "rerunning with the same workdir resumes")
    p.add_argument("--multihost", action="store_true",
                   help="call jax.distributed.initialize() first (one process per host of a TPU pod or a "
                        "multi-node GPU job); the mesh then spans the devices of all hosts")
    p.add_argument("--nomultihost", dest="multihost", action="store_false", help=argparse.SUPPRESS)
    p.add_argument("--coordinator_address", default=None, metavar="HOST:PORT",
                   help="with --multihost where the cluster is not detected: the coordinator's host:port "
                        "(or $JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num_processes", type=int, default=None, metavar="N",
                   help="with --multihost: the number of processes (or $OEFSMC_NUM_PROCESSES)")
    p.add_argument("--process_id", type=int, default=None, metavar="I",
                   help="with --multihost: this process's id, 0..N-1 (or $OEFSMC_PROCESS_ID)")


def _summary_flags(p: argparse.ArgumentParser, *, config_required_text: str) -> None:
    p.add_argument("--config", default=None, metavar="GRID.py[:ARG]",
                   help=f"a grid config (base run config + groups), e.g. configs/paper_cifar10.py:seeds=5; "
                        f"{config_required_text}")
    p.add_argument("--config.FIELD=VALUE", dest="_override_help", action="store_true", default=argparse.SUPPRESS,
                   help="override a field of the grid config, e.g. --config.base.train.log_every=250")
    p.add_argument("--workdir", required=True, metavar="DIR",
                   help="the grid directory (results.jsonl, cells/, cache/, summary/)")
    p.add_argument("--out", default=None, metavar="OUT", help="where the summary goes (default DIR/summary)")
    p.add_argument("--also", action="append", default=[], metavar="FILE",
                   help="join another results.jsonl into the summary (DIR's record wins where group, cell and arm "
                        "repeat); repeatable, e.g. to pair runs with early stopping off against an earlier grid")


def _experiments_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("command", nargs="?", choices=["summarize"], metavar="summarize",
                   help="only rewrite the summary of DIR's results.jsonl (no --config needed)")
    _summary_flags(p, config_required_text="required unless summarize (where it names the classes and title)")
    p.add_argument("--only", default=None, metavar="GROUP", help="run only the group with this name")
    p.add_argument("--cell", default=None, metavar="ID[,ID...]",
                   help="run only these cells (comma-separated), e.g. kd-resnet20-n10-exp-s0,kd-resnet20-n10-exp-s1")


def _export_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", required=True, metavar="DIR",
                   help="run directory (holds config.json and one folder per arm)")
    p.add_argument("--arm", required=True, help="arm to export, e.g. base or oe")
    p.add_argument("--out", required=True, help="directory of the exported model to write (outside the run "
                                                "directory)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it exists and is not empty (written beside it, then swapped in)")


def _import_teacher_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC",
                   help="teacher file: .npz / .safetensors (no torch needed) or the original .th/.pth/.pt")
    p.add_argument("out_dir", metavar="OUT_DIR",
                   help="directory of the Orbax model checkpoint to write (new or empty, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT_DIR if it exists and is not empty (written beside it, then swapped in)")
    p.add_argument("--depth", type=int, default=None, help="expected depth (20, 32, 44, 56, ...; 18, 34, 50); checked")
    p.add_argument("--check-npz", default=None, metavar="CIFAR_NPZ",
                   help="also evaluate the written model on this npz (keys x, y) with the teacher family's "
                        "normalisation and print top-1")
    p.add_argument("--batch-size", type=int, default=500, help="evaluation batch size (default 500)")


def _name_eq_path(item: str) -> str:
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{item!r}: expected NAME=PATH")
    return item


def _pools_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", action="append", required=True, type=_name_eq_path, metavar="NAME=RESULTS.jsonl",
                   help="a pool's name and its grid's results file (repeat per pool)")
    p.add_argument("--group", default=None, help="only records of this group (e.g. factorial)")
    p.add_argument("--out", required=True, help="folder for STEM.md and STEM.png")
    p.add_argument("--stem", default="pools", help="file name of the table and figure (default pools)")
    p.add_argument("--label", default="OOD pool",
                   help="what the grids differ in: the first column's header (default 'OOD pool'; e.g. 'budget')")
    p.add_argument("--title", default="The same arms on each OOD pool", help="heading of the table and figure")


def _ood_classes_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--data", default=None, help="shared data folder (default $OEFSMC_DATA or ../shared/data)")
    p.add_argument("--arch", default="resnet20", help="akamaster CIFAR-10 teacher (default resnet20)")
    p.add_argument("--per-class", type=int, nargs="+", default=[10, 50], help="budgets (default 10 50)")
    p.add_argument("--rho", type=float, default=10.0, help="imbalance ratio (default 10)")
    p.add_argument("--factor", type=float, default=2.5, help="oe.selection_factor c of the teacher rules "
                                                             "(default 2.5)")
    p.add_argument("--pool", choices=("tiny", "tiny_disjoint", "dtd"), default="tiny",
                   help="OOD pool: tiny (Tiny-ImageNet val, default), tiny_disjoint (without its classes that overlap "
                        "CIFAR-10), dtd (DTD-10 textures)")


class Subcommand(NamedTuple):
    """One subcommand: its one-line help, what its ``--help`` says, its flags, and how it runs."""

    summary: str
    description: str
    flags: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]
    examples: tuple[str, ...] = ()
    lock_config: bool = True


def _run_command(args: argparse.Namespace) -> int:
    """Validate the config, then run every arm and write the report."""
    cli_util.init_absl()
    from oefsmc_jax.run import run

    if args.multihost:
        from oefsmc_jax.training.distributed import initialize

        initialize(args.coordinator_address, args.num_processes, args.process_id)
    cli_util.run_reporting_errors(lambda: run(args.config, args.workdir), debug_value_errors=True)
    return 0


def _experiments_command(args: argparse.Namespace) -> int:
    """Run the grid (unless ``summarize``), then write the summary."""
    cli_util.init_absl()
    from oefsmc_jax import paths
    from oefsmc_jax.experiments import run_grid, summarize

    workdir = paths.as_path(args.workdir)
    out = args.out or workdir / "summary"
    cfg = args.config
    for f in args.also:  # checked before a grid runs for hours only to fail at its summary
        if not paths.as_path(f).exists():
            print(f"error: --also {f}: no such results file", file=sys.stderr)
            return cli_util.EXIT_USAGE
    if getattr(args, "command", "summarize") != "summarize":
        cli_util.run_reporting_errors(lambda: run_grid(cfg, workdir, args.only, args.cell))
    names = list(cfg.base.data.class_names) if cfg is not None else None
    title = cfg.title if cfg is not None else "Results"

    def write_summary() -> None:
        path = summarize(workdir / "results.jsonl", out, names, title, also=tuple(args.also),
                         primary=cfg.get("primary_contrasts") if cfg is not None else None,
                         primary_after_results=bool(cfg.get("primary_declared_after_results", False))
                         if cfg is not None else False,
                         tuning_rule=cfg.get("tuning_rule") if cfg is not None else None)
        print(f"summary: {path}", file=sys.stderr)

    cli_util.run_reporting_errors(write_summary)  # no records, or a missing --also file: one line, exit 2
    return 0


def _import_teacher_command(args: argparse.Namespace) -> int:
    """Import a teacher as ``args`` (``oefsmc import-teacher``'s flags) say and print what was written; returns the
    exit status.

    A bad teacher file (mismatched keys or shapes, wrong depth, unknown family, missing file, torch missing for
    ``.th``) or a refused OUT_DIR (exists and is not empty without ``--overwrite``, is a file, holds SRC) prints
    ``error: ...`` to stderr and returns 1; a failed write (not a folder, read-only, disk full) prints one line
    naming the path and returns 74 (``cli_util.EXIT_IO``), leaving an existing OUT_DIR as it was.
    """
    import pathlib
    import time

    import jax
    import numpy as np

    from oefsmc_jax import paths
    from oefsmc_jax.convert.layout import resnet_depth
    from oefsmc_jax.convert.teachers import evaluate_top1, import_teacher
    from oefsmc_jax.training.checkpoint import load_model

    cli_util.init_absl()

    try:
        spec = import_teacher(args.src, args.out_dir, args.depth, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {paths.os_error_line(e, args.out_dir)}", file=sys.stderr)
        return cli_util.EXIT_IO
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


def _lazy(target: str) -> Callable[[argparse.Namespace], int | None]:
    """``module:function``, imported when the subcommand runs (``--help`` imports no JAX)."""
    def call(args: argparse.Namespace) -> int | None:
        import importlib

        module, name = target.split(":")
        return getattr(importlib.import_module(module), name)(args)

    return call


SUBCOMMANDS: dict[str, Subcommand] = {
    "run": Subcommand(
        "(the default) compress, fine-tune and evaluate every arm of a config; the same workdir resumes",
        "Compress the config's teacher with its method, with and without OOD images (every arm), fine-tune, "
        "evaluate, and write DIR/report.md. `run` is the default: `oefsmc --config ...` is `oefsmc run --config ...`.",
        _run_flags, _run_command,
        ("oefsmc --config configs/demo.py --workdir runs/demo",
         "oefsmc --config configs/cifar10.py:method=practise,per_class=10 --workdir runs/p --config.train.steps=2000")),
    "experiments": Subcommand(
        "run (or resume) a grid of runs in this process, then summarise it with paired intervals and plots",
        "Run (or resume) a grid of runs: every cell (method x architecture x budget x profile x seed, with its arms) "
        "runs one full run in DIR/cells/ID and appends one record per arm (metrics, git commit, versions, "
        "device, portable config) to DIR/results.jsonl; finished cells are skipped, so a stopped grid resumes. Then "
        "DIR/summary gets tables with paired differences and 95 % intervals over seeds, and plots. `summarize` only "
        "rewrites the summary. (`python -m oefsmc_jax.experiments ...` is the same.)",
        _experiments_flags, _experiments_command,
        ("oefsmc experiments --config configs/paper_cifar10.py:runlocal=1 --workdir runs/grid_check",
         "oefsmc experiments --config configs/methods_cifar10.py:methods=cd,budgets=10 --workdir runs/cd",
         "oefsmc experiments summarize --workdir runs/cd --out docs/results/cd"),
        lock_config=False),
    "summarize": Subcommand(
        "only rewrite a grid's summary from its results.jsonl (the same as `experiments summarize`)",
        "Write DIR/summary (or OUT) from DIR/results.jsonl: tables with paired differences and 95 % intervals over "
        "seeds, and plots. The same as `oefsmc experiments summarize`.",
        lambda p: _summary_flags(p, config_required_text="optional: names the classes, title and primary "
                                                         "contrasts"),
        _experiments_command,
        ("oefsmc summarize --config configs/paper_cifar10.py:seeds=5 --workdir runs/paper --out OUT",),
        lock_config=False),
    "export": Subcommand(
        "write one arm's compressed student, physically smaller, with its preprocessing inside",
        "Export the compressed student of one arm of a finished run as a physically smaller Orbax model with its "
        "preprocessing; load it with oefsmc_jax.load_compressed(OUT). Exit 2 for bad input, 74 when a write fails.",
        _export_flags, _lazy("oefsmc_jax.export:run_cli"),
        ("oefsmc export --workdir runs/practise --arm oe --out runs/practise_student",)),
    "import-teacher": Subcommand(
        "convert a pretrained PyTorch ResNet (.npz, .safetensors or .th) into an Orbax model checkpoint",
        "Import a pretrained ResNet teacher (CIFAR: akamaster/pytorch_resnet_cifar10 or "
        "chenyaofo/pytorch-cifar-models; ImageNet: torchvision resnet18/34/50; .npz or .safetensors, or the torch "
        "original with torch) as an Orbax model checkpoint that configs can name via teacher.checkpoint. The family "
        "is detected from the state-dict keys. Exit 1 for a bad teacher file or a refused OUT_DIR, 74 when a write "
        "fails.",
        _import_teacher_flags, _import_teacher_command,
        ("oefsmc import-teacher resnet20-12fca82f.npz teachers/r20 --depth 20 --check-npz cifar10_test.npz",)),
    "pools": Subcommand(
        "the same arms of several grids (OOD pools, budgets) side by side: a table and a figure",
        "For each pool (NAME=results.jsonl) and each setting of the group, every contrast whose two arms were run is "
        "paired by seed with a 95 % t-interval; OUT/STEM.md has the table, OUT/STEM.png one panel per pool and "
        "setting. (`python -m oefsmc_jax.experiments.pools ...` is the same.)",
        _pools_flags, _lazy("oefsmc_jax.experiments.pools:run_cli"),
        ("oefsmc pools --results tiny=A/results.jsonl --results dtd=B/results.jsonl --group factorial --out OUT",)),
    "ood-classes": Subcommand(
        "which pool classes each OOD selection rule picks, per CIFAR-10 class (tables, plots, JSON)",
        "Which Tiny-ImageNet classes each OOD selection rule (random, teacher_complement, teacher_confidence) "
        "picks per CIFAR-10 class, with the share from classes that overlap CIFAR-10 in meaning; writes "
        "ood_classes_nN.md/.png per budget and ood_classes.json. (`python -m oefsmc_jax.experiments.ood_classes "
        "...` is the same.)",
        _ood_classes_flags, _lazy("oefsmc_jax.experiments.ood_classes:run_cli"),
        ("oefsmc ood-classes --out docs/results/ood_classes",)),
}

HELP_WORDS = ("-h", "--help", "-help", "--helpfull", "--helpshort", "help")


def _usage() -> str:
    rows = "\n".join(f"  {name:<16} {s.summary}" for name, s in SUBCOMMANDS.items())
    examples = "\n".join(f"  {e}" for name in ("run", "experiments", "export", "import-teacher")
                         for e in SUBCOMMANDS[name].examples[:2])
    return f"""\
usage: oefsmc [run] --config CONFIG.py[:ARG] --workdir DIR [--config.FIELD=VALUE ...] [--multihost ...]
       oefsmc SUBCOMMAND [FLAGS ...]        (`oefsmc` is `python -m oefsmc_jax`)

OE-FSMC in JAX/Flax: compress a pretrained image classifier from a few class-imbalanced labelled images, with
out-of-distribution images in the compression and the fine-tuning stage.

subcommands (`oefsmc SUBCOMMAND --help` gives its flags):
{rows}

run flags:
  --config FILE[:ARG]     an ml_collections config file with get_config(arg), e.g. configs/cifar10.py:method=mir
  --config.FIELD=VALUE    override any config field, e.g. --config.train.steps=500 --config.oe.lambda_jd=0.3
  --workdir DIR           checkpoints, metrics, results.json per arm, report.md, per-class plot
  --multihost             call jax.distributed.initialize() first (one process per host)

examples:
{examples}

Every config field with its default: docs/config.md.
"""


USAGE = _usage()


def subcommand_parser(name: str, prog: str | None = None) -> argparse.ArgumentParser:
    """The parser of subcommand ``name`` (its ``--help`` shows ``prog``, default ``oefsmc NAME``)."""
    s = SUBCOMMANDS[name]
    epilog = "examples:\n" + "\n".join(f"  {e}" for e in s.examples) if s.examples else None
    p = cli_util.ArgumentParser(prog=prog or f"oefsmc {name}", description=textwrap.fill(s.description, 116),
                                epilog=epilog)
    s.flags(p)
    return p


def _usage_error(message: str) -> NoReturn:
    print(f"error: {message} (see oefsmc --help)", file=sys.stderr)
    sys.exit(cli_util.EXIT_USAGE)


def parse_subcommand(name: str, argv: Sequence[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    """Parse the flags of subcommand ``name`` (default ``sys.argv[1:]``), loading ``--config`` with its overrides;
    runs nothing. ``--help`` exits 0, a usage error exits 2 with one line."""
    s = SUBCOMMANDS[name]
    p = subcommand_parser(name, prog)
    args = cli_util.parse_args(p, sys.argv[1:] if argv is None else argv, lock_config=s.lock_config)
    if name == "experiments" and args.command != "summarize" and args.config is None:
        p.error("--config is required to run a grid (`summarize` needs only --workdir)")
    return args


def run_subcommand(name: str, argv: Sequence[str]) -> int:
    """Parse ``argv`` as the flags of subcommand ``name`` and run it in this process (nothing is re-executed);
    returns its exit status. A usage error exits 2 in one line, as in :func:`parse_subcommand`."""
    return SUBCOMMANDS[name].run(parse_subcommand(name, argv)) or 0


def parse(argv: Sequence[str]) -> tuple[str, argparse.Namespace]:
    """The subcommand and its parsed flags of an ``oefsmc`` command line (without the program name); runs nothing.
    ``run`` is the default when the first argument is a flag. Help exits 0, a usage error exits 2 in one line."""
    argv = list(argv)
    if not argv:
        _usage_error("no subcommand or flags given")
    if argv[0] in HELP_WORDS:
        if argv[0] == "help" and len(argv) > 1 and argv[1] in SUBCOMMANDS:
            return parse([argv[1], "--help"])
        print(USAGE, end="")
        sys.exit(0)
    name, rest = ("run", argv) if argv[0].startswith("-") else (argv[0], argv[1:])
    if name not in SUBCOMMANDS:
        _usage_error(f"unknown subcommand {name!r}; choose from {', '.join(SUBCOMMANDS)}")
    return name, parse_subcommand(name, rest)


def cli(argv: Sequence[str] | None = None) -> None:
    """Entry point (``python -m oefsmc_jax`` and the ``oefsmc`` command; ``argv`` defaults to ``sys.argv[1:]``):
    parse, then run the subcommand in this process and exit with its status."""
    name, args = parse(sys.argv[1:] if argv is None else argv)
    from oefsmc_jax.allocator import maybe_reexec

    maybe_reexec()  # once, with tcmalloc preloaded when installed (OEFSMC_TCMALLOC=0 turns it off)
    sys.exit(SUBCOMMANDS[name].run(args) or 0)


if __name__ == "__main__":
    cli()
