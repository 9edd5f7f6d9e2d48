"""The one error type for bad input: raised before training starts, printed without a traceback."""

from __future__ import annotations


class ConfigError(Exception):
    """Bad input. The message says what is wrong and what to do about it."""
