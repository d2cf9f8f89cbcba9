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
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    """Validate the config, then run every arm and write the report."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every checkpoint step at INFO
    from oefsmc_jax.config_validation import ConfigError
    from oefsmc_jax.data import DataOverlapError
    from oefsmc_jax.pipeline import run

    if FLAGS.multihost:
        import jax

        jax.distributed.initialize()
    try:
        run(FLAGS.config, FLAGS.workdir)
    except (ConfigError, DataOverlapError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except ValueError as e:  # e.g. a class with fewer images than the subset asks for
        if os.environ.get("OEFSMC_DEBUG"):
            raise
        print(f"error: {e} (set OEFSMC_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
    """Parse flags and load the config; a bad config file, argument or override exits with one line naming it."""
    return parse_config_flags(FLAGS, argv)


def cli() -> None:
    """Entry point: ``import-teacher`` or ``export`` subcommand, or a compression run."""
    if len(sys.argv) > 1 and sys.argv[1] == "import-teacher":
        from oefsmc_jax.convert import main as import_main

        sys.exit(import_main(sys.argv[2:], prog="python -m oefsmc_jax import-teacher"))
    if len(sys.argv) > 1 and sys.argv[1] == "export":
        from oefsmc_jax.export import main as export_main

        sys.exit(export_main(sys.argv[2:], prog="python -m oefsmc_jax export"))
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    cli()
