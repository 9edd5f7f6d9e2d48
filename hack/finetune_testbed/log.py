"""How the test bed talks to its user: progress lines on stderr, and the one error type."""

from __future__ import annotations

import sys


class TestbedError(Exception):
    """A failure the user can act on: the CLI prints ``error: <message>`` and exits 1."""

    __test__ = False  # not a pytest test class, whatever its name


def log(msg: str) -> None:
    """One progress line on stderr (stdout is for what programs read: `env`, `build`, `status`)."""
    print(f"[cluster] {msg}", file=sys.stderr, flush=True)
