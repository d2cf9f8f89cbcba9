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
flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
    """Run the grid (unless ``summarize``), then write the summary."""
    logging.set_verbosity(logging.WARNING)
    import pathlib

    from oefsmc_jax.config_validation import ConfigError
    from oefsmc_jax.data import DataOverlapError
    from oefsmc_jax.experiments import run_grid, summarize

    workdir = pathlib.Path(FLAGS.workdir)
    out = FLAGS.out or workdir / "summary"
    cfg = FLAGS.config
    if len(argv) > 1 and argv[1] != "summarize":
        raise app.UsageError(f"unknown command {argv[1]!r}; allowed: summarize")
    try:
        if len(argv) == 1:
            if cfg is None:
                raise app.UsageError("--config is required to run a grid")
            run_grid(cfg, workdir, FLAGS.only, FLAGS.cell)
    except (ConfigError, DataOverlapError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    names = list(cfg.base.data.class_names) if cfg is not None else None
    title = cfg.title if cfg is not None else "Results"
    print(f"summary: {summarize(workdir / 'results.jsonl', out, names, title)}", file=sys.stderr)


if __name__ == "__main__":
    from oefsmc_jax.cli_util import parse_config_flags

    app.run(main, flags_parser=lambda argv: parse_config_flags(FLAGS, argv))
