"""Errors the command line turns into one line (no traceback)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config field has a value that is not allowed; the message starts with ``config.FIELD:``."""


def fail(field: str, msg: str) -> None:
    """Raise :class:`ConfigError` for ``config.FIELD``."""
    raise ConfigError(f"config.{field}: {msg}")
