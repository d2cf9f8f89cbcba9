"""Command-line helpers shared by every subcommand of ``oefsmc`` (``python -m oefsmc_jax``), see
:mod:`oefsmc_jax.main`."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from oefsmc_jax.errors import ConfigError


def one_line(e: BaseException) -> str:
    """The useful last line of an error whose text may carry a traceback (as config_flags' errors do)."""
    text = str(e).replace("\\n", "\n").replace("\\'", "'")
    text = text.strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":  # a quoted repr of the message: unwrap once
        text = text[1:-1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    for ln in reversed(lines):
        for prefix in ("ValueError: ", "KeyError: ", "TypeError: ", "AttributeError: ", "FileNotFoundError: "):
            if ln.startswith(prefix):
                return ln[len(prefix):]
    if len(lines) > 1 and lines[-1].startswith("[Errno"):
        return f"{lines[0].split(':')[0]}: {lines[-1]}"
    return " ".join(lines[:2]) if len(lines) > 1 and len(lines[0]) < 40 else lines[0]


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line usage errors (``error: ...``, exit 2) and no abbreviated flag names."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"error: {message} (see {self.prog} --help)\n")


#: ``--config.FIELD[=VALUE]`` and ``--noconfig.FIELD``, with one or two dashes, as ml_collections matches them
_OVERRIDE = re.compile(r"^--?(no)?config\.")
_NEGATIVE_NUMBER = re.compile(r"^-\.?\d")


def split_config_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``argv`` split into (the rest, the ``--config.FIELD`` overrides in order). An override without ``=`` takes
    the next argument as its value unless that is a flag (``--config.train.steps 500`` as absl reads it)."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if _OVERRIDE.match(arg):
            overrides.append(arg)
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if "=" not in arg and nxt is not None and (not nxt.startswith("-") or _NEGATIVE_NUMBER.match(nxt)):
                overrides.append(nxt)
                i += 1
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def load_config(config: str | None, overrides: Sequence[str], *, lock_config: bool = True) -> Any:
    """The ConfigDict of ``--config FILE[:ARG]`` with ``--config.FIELD=VALUE`` ``overrides`` applied, parsed by
    ml_collections' ``config_flags`` on a private absl ``FlagValues`` (its exact semantics; no global flags), or
    None without ``config``. A bad file, argument or override exits 2 with one line naming it."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["oefsmc", *([f"--config={config}"] if config is not None else []), *overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "configs/NAME.py[:arg]", flag_values=fv,
                                    lock_config=lock_config, sys_argv=argv)
    try:
        if overrides and config is None:
            raise ValueError(f"{overrides[0]} overrides a field of --config FILE, which is not given")
        rest = fv(argv)
        if fv.config is not None:
            fv.config.keys()  # config_flags defers load errors to the first access
    except AttributeError as e:  # an override names a field the config does not have
        print(f"error: unknown config field in an override: {one_line(e)}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except Exception as e:  # noqa: BLE001 - any failure here is a user error in the command line
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    if len(rest) > 1:  # a value that followed a boolean override (which takes none)
        print(f"error: unexpected argument {rest[1]!r} after a --config override; write a boolean field as "
              "--config.FIELD=true or false", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    return fv.config


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str], *, lock_config: bool = True
               ) -> argparse.Namespace:
    """Parse ``argv`` with ``parser`` (flags and positionals in any order); when the parser has ``--config``,
    ``args.config`` becomes the loaded ConfigDict (see :func:`load_config`) with the ``--config.FIELD`` overrides
    applied. Usage errors exit 2 with one line."""
    has_config = "--config" in parser._option_string_actions
    rest, overrides = split_config_overrides(argv) if has_config else (list(argv), [])
    known = parser._option_string_actions  # argparse keeps no public index of its flags
    flags_ = rest[:rest.index("--")] if "--" in rest else rest
    unknown = [a for a in flags_ if a.startswith("-") and a != "-" and not _NEGATIVE_NUMBER.match(a)
               and a.split("=", 1)[0] not in known]
    if unknown:  # named before any missing required flag, which argparse would report first
        parser.error(f"unknown flag{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
    args = parser.parse_intermixed_args(rest)
    if has_config:
        args.config = load_config(args.config, overrides, lock_config=lock_config)
    return args


def init_absl() -> None:
    """What absl's ``app.run`` set up for a process, without its global flags: the global absl flags marked as
    parsed at their defaults (so library logs carry no 'before flag parsing' notice), absl's log format at
    WARNING (Orbax logs every checkpoint step at INFO), and faulthandler's tracebacks on a crash."""
    import faulthandler

    from absl import flags, logging

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    logging.use_absl_handler()
    logging.set_verbosity(logging.WARNING)
    try:
        if not faulthandler.is_enabled():
            faulthandler.enable()
    except Exception:  # noqa: BLE001 - a stderr without a file descriptor (a test capturing it): no crash dumps
        pass


EXIT_USAGE, EXIT_IO = 2, 74
#: the workdir is in use by another live process (``EX_CANTCREAT``): :class:`oefsmc_jax.workdir_lock.WorkdirBusy`
EXIT_LOCKED = 73


def _exit_io(e: BaseException) -> None:
    """Exit 74 with one line naming the path that a disk error (``OSError``, or tensorstore's wrapped one) hit."""
    from oefsmc_jax import disk_errors

    print(f"error: {disk_errors.line(e)}; nothing finished was lost: rerun the same command once the workdir is "
          "writable", file=sys.stderr, flush=True)
    disk_errors.ending()
    sys.exit(EXIT_IO)


def run_reporting_errors(fn: Any, *, debug_value_errors: bool = False) -> None:
    """Run ``fn()`` with SIGTERM turned into a checkpoint-and-stop, and every expected failure reported in one line
    with its exit code: preempted 75, non-finite streak 3, bad config or data 2, a read-only or full workdir 74
    (whichever writer or thread met it), a workdir in use by another process 73.

    With ``debug_value_errors`` a ``ValueError`` is re-raised with its traceback when ``$OEFSMC_DEBUG`` is set.
    """
    import os

    from oefsmc_jax import disk_errors, workdir_lock
    from oefsmc_jax.data import DataOverlapError
    from oefsmc_jax.training import preemption

    fn = disk_errors.quiet_background()(fn)  # a background thread's disk error prints no traceback of its own
    try:
        with preemption.handle_signals():
            fn()
    except preemption.Preempted as e:  # 75 after a SIGTERM, 130 after a SIGINT (Ctrl-C)
        print(f"{e} (exit code {preemption.exit_code()})", file=sys.stderr)
        sys.exit(preemption.exit_code())
    except preemption.NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(preemption.EXIT_NONFINITE)
    except workdir_lock.WorkdirBusy as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_LOCKED)
    except (ConfigError, DataOverlapError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except OSError as e:  # a read-only or full workdir: every finished piece was written atomically and is kept
        _exit_io(e)
    except RuntimeError as e:  # tensorstore's disk errors arrive as (Xla)RuntimeError or ValueError
        if disk_errors.as_os_error(e) is None:
            raise
        _exit_io(e)
    except ValueError as e:  # e.g. a class with fewer images than the subset asks for
        if disk_errors.as_os_error(e) is not None:
            _exit_io(e)
        if debug_value_errors and os.environ.get("OEFSMC_DEBUG"):
            raise
        hint = " (set OEFSMC_DEBUG=1 for the traceback)" if debug_value_errors else ""
        print(f"error: {e}{hint}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
