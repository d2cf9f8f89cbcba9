"""Command-line helpers shared by ``python -m oefsmc_jax`` and ``python -m oefsmc_jax.experiments``."""

from __future__ import annotations

import sys
from typing import Any


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


def parse_config_flags(flags_obj: Any, argv: list[str]) -> list[str]:
    """Parse flags and load ``--config``; a bad config file, argument or override exits with one line naming it."""
    try:
        rest = flags_obj(argv)
        if flags_obj.config is not None:
            flags_obj.config.keys()  # config_flags defers load errors to the first access
    except AttributeError as e:  # an override names a field the config does not have
        print(f"error: unknown config field in an override: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # noqa: BLE001 - any failure here is a user error in the command line
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    return rest


EXIT_USAGE, EXIT_IO = 2, 74
#: the workdir is in use by another live process (``EX_CANTCREAT``); see :mod:`oefsmc_jax.workdir_lock`
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
    from oefsmc_jax.config_validation import ConfigError
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
