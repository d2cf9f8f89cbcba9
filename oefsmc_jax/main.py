"""Command line.

``python -m oefsmc_jax --config configs/NAME.py[:arg] --workdir DIR [--config.FIELD=VALUE ...]`` runs a compression;
``python -m oefsmc_jax export --workdir DIR --arm ARM --out OUT`` writes a physically smaller student with its
preprocessing (load it with ``oefsmc_jax.load_compressed``);
``python -m oefsmc_jax import-teacher SRC OUT_DIR [--depth N] [--check-npz NPZ]`` converts a pretrained PyTorch
CIFAR ResNet (akamaster ``.npz`` export or ``.th``) into an Orbax model checkpoint that ``teacher.checkpoint`` names.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from oefsmc_jax.cli_util import parse_config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, optionally with an argument: configs/NAME.py[:arg]",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, results and report. Rerunning with the "
                    "same workdir resumes.")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first (one process per host of a TPU pod "
                  "or a multi-node GPU job); the mesh then spans the devices of all hosts.")
flags.DEFINE_string("coordinator_address", None, "With --multihost where the cluster is not detected: the "
                    "coordinator's host:port (or $JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None, "With --multihost: the number of processes (or $OEFSMC_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "With --multihost: this process's id, 0..num_processes-1 "
                     "(or $OEFSMC_PROCESS_ID).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    """Validate the config, then run every arm and write the report."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every checkpoint step at INFO
    from oefsmc_jax.cli_util import run_reporting_errors
    from oefsmc_jax.pipeline import run

    if FLAGS.multihost:
        from oefsmc_jax.training.distributed import initialize

        initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    run_reporting_errors(lambda: run(FLAGS.config, FLAGS.workdir), debug_value_errors=True)


def parse_flags(argv: list[str]) -> list[str]:
    """Parse flags and load the config; a bad config file, argument or override exits with one line naming it."""
    return parse_config_flags(FLAGS, argv)


USAGE = """\
usage: oefsmc [run] --config CONFIG.py[:ARG] --workdir DIR [--config.FIELD=VALUE ...] [--multihost]
       oefsmc import-teacher SRC OUT_DIR [--depth N] [--check-npz NPZ] [--overwrite]
       oefsmc export --workdir DIR --arm ARM --out OUT [--overwrite]
       oefsmc experiments --config GRID.py[:ARG] --workdir DIR [--only GROUP] [--cell ID]
       oefsmc experiments summarize --workdir DIR [--out OUT]

OE-FSMC in JAX/Flax: compress a pretrained image classifier from a few class-imbalanced labelled images, with
out-of-distribution images in the compression and the fine-tuning stage. (`oefsmc` is `python -m oefsmc_jax`.)

subcommands:
  run (default)    compress, fine-tune and evaluate every arm of a config; rerunning the same workdir resumes
  import-teacher   convert a pretrained PyTorch CIFAR ResNet (.npz export or .th) into an Orbax model checkpoint
  export           write one arm's compressed student, physically smaller, with its preprocessing inside
  experiments      run (or resume) a grid of runs and summarise it with paired intervals and plots

run flags:
  --config FILE[:ARG]     an ml_collections config file with get_config(arg), e.g. configs/cifar10.py:method=mir
  --config.FIELD=VALUE    override any config field, e.g. --config.train.steps=500 --config.oe.lambda_jd=0.3
  --workdir DIR           checkpoints, metrics, results.json per arm, report.md, per-class plot
  --multihost             call jax.distributed.initialize() first (one process per host)

examples:
  oefsmc --config configs/demo.py --workdir runs/demo
  oefsmc --config configs/cifar10.py:method=practise,per_class=10,rho=10 --workdir runs/practise \\
      --config.train.steps=2000
  oefsmc export --workdir runs/practise --arm oe --out runs/practise_student

Subcommand help: oefsmc import-teacher --help, oefsmc export --help, oefsmc experiments --help; every config field
with its default: the README's configuration reference.
"""


def cli() -> None:
    """Entry point (``python -m oefsmc_jax`` and the ``oefsmc`` command): ``--help``, a subcommand
    (``run``, ``import-teacher``, ``export``, ``experiments``), or a compression run."""
    if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help", "help", "-help", "--helpfull"):
        print(USAGE, end="")
        sys.exit(0)
    from oefsmc_jax.allocator import maybe_reexec

    maybe_reexec()  # once, with tcmalloc preloaded when installed (OEFSMC_TCMALLOC=0 turns it off)
    if len(sys.argv) > 1 and sys.argv[1] == "run":
        sys.argv = [sys.argv[0], *sys.argv[2:]]
    if len(sys.argv) > 1 and sys.argv[1] == "experiments":
        sys.stdout.flush()  # its own absl flags clash with this module's: a fresh interpreter runs the grid
        os.execv(sys.executable, [sys.executable, "-m", "oefsmc_jax.experiments", *sys.argv[2:]])
    if len(sys.argv) > 1 and sys.argv[1] == "import-teacher":
        from oefsmc_jax.convert import main as import_main

        sys.exit(import_main(sys.argv[2:], prog="python -m oefsmc_jax import-teacher"))
    if len(sys.argv) > 1 and sys.argv[1] == "export":
        from oefsmc_jax.export import main as export_main

        sys.exit(export_main(sys.argv[2:], prog="python -m oefsmc_jax export"))
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    cli()
