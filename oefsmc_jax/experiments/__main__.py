"""Grids from the command line.

``python -m oefsmc_jax.experiments --config GRID.py[:arg] --workdir DIR [--only GROUP] [--cell ID]`` runs (or
resumes) a grid and summarises it into ``DIR/summary``;
``python -m oefsmc_jax.experiments summarize --workdir DIR [--out OUT]`` only rewrites the summary."""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Grid config file: configs/NAME.py[:arg]", lock_config=False)
flags.DEFINE_string("workdir", None, "Grid directory: results.jsonl, one folder per cell, summary/.")
flags.DEFINE_string("out", None, "Where to write the summary (default WORKDIR/summary).")
flags.DEFINE_string("only", None, "Run only the group with this name.")
flags.DEFINE_string("cell", None, "Run only the cell with this id (e.g. kd-resnet20-n10-exp-s0).")
flags.DEFINE_multi_string("also", [], "summarize: another results.jsonl whose records join the workdir's (the "
                          "workdir's record wins where group, cell and arm repeat); repeatable.")
flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
    """Run the grid (unless ``summarize``), then write the summary."""
    logging.set_verbosity(logging.WARNING)
    from oefsmc_jax import paths
    from oefsmc_jax.cli_util import run_reporting_errors
    from oefsmc_jax.experiments import run_grid, summarize

    workdir = paths.as_path(FLAGS.workdir)
    out = FLAGS.out or workdir / "summary"
    cfg = FLAGS.config
    if len(argv) > 1 and argv[1] != "summarize":
        raise app.UsageError(f"unknown command {argv[1]!r}; allowed: summarize")
    for f in FLAGS.also:  # checked before a grid runs for hours only to fail at its summary
        if not paths.as_path(f).exists():
            print(f"error: --also {f}: no such results file", file=sys.stderr)
            sys.exit(2)
    if len(argv) == 1:
        if cfg is None:
            raise app.UsageError("--config is required to run a grid")
        run_reporting_errors(lambda: run_grid(cfg, workdir, FLAGS.only, FLAGS.cell))
    names = list(cfg.base.data.class_names) if cfg is not None else None
    title = cfg.title if cfg is not None else "Results"

    def write_summary() -> None:
        path = summarize(workdir / "results.jsonl", out, names, title, also=tuple(FLAGS.also),
                         primary=cfg.get("primary_contrasts") if cfg is not None else None,
                         primary_after_results=bool(cfg.get("primary_declared_after_results", False))
                         if cfg is not None else False)
        print(f"summary: {path}", file=sys.stderr)

    run_reporting_errors(write_summary)  # no records, or a missing --also file: one line, exit 2


USAGE = """\
usage: python -m oefsmc_jax.experiments --config GRID.py[:ARG] --workdir DIR [--only GROUP] [--cell ID]
       python -m oefsmc_jax.experiments summarize --workdir DIR [--out OUT] [--also FILE ...]
       (the same as `oefsmc experiments ...`)

Run (or resume) a grid of runs: every cell (method x architecture x budget x profile x seed, with its arms) runs the
full pipeline in DIR/cells/ID and appends one record per arm (metrics, git commit, versions, device, portable
config) to DIR/results.jsonl; finished cells are skipped, so a stopped grid resumes. Then DIR/summary gets tables
with paired differences and 95 % intervals over seeds, and plots. `summarize` only rewrites the summary.

flags:
  --config GRID.py[:ARG]  a grid config (base run config + groups), e.g. configs/paper_cifar10.py:seeds=5
  --workdir DIR           the grid directory (results.jsonl, cells/, cache/, summary/)
  --only GROUP            run only the group with this name
  --cell ID               run only one cell, e.g. kd-resnet20-n10-exp-s0
  --out OUT               where `summarize` writes (default DIR/summary)
  --also FILE             summarize: join another results.jsonl (DIR's record wins where group, cell and arm
                          repeat); repeatable, e.g. to pair runs with early stopping off against an earlier grid

examples:
  python -m oefsmc_jax.experiments --config configs/paper_cifar10.py:runlocal=1 --workdir runs/grid_check
  python -m oefsmc_jax.experiments --config configs/methods_cifar10.py:methods=cd,budgets=10 --workdir runs/cd
"""


def cli() -> None:
    """Entry point: ``--help`` prints the usage; otherwise parse flags and run."""
    if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help", "help", "-help", "--helpfull"):
        print(USAGE, end="")
        sys.exit(0)
    from oefsmc_jax.allocator import maybe_reexec
    from oefsmc_jax.cli_util import parse_config_flags

    maybe_reexec()  # once, with tcmalloc preloaded when installed (OEFSMC_TCMALLOC=0 turns it off)

    app.run(main, flags_parser=lambda argv: parse_config_flags(FLAGS, argv))


if __name__ == "__main__":
    cli()
