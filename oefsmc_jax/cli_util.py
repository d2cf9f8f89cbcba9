"""Command-line helpers shared by ``python -m oefsmc_jax`` and ``python -m oefsmc_jax.experiments``."""

from __future__ import annotations

import sys
from typing import Any


def one_line(e: BaseException) -> str:
    """The useful last line of an error whose text may carry a traceback (as config_flags' errors do)."""
    text = str(e).replace("\\n", "\n").replace("\\'", "'")
    lines = [ln.strip() for ln in text.strip().strip("'\"").splitlines() if ln.strip()]
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


