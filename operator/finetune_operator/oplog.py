"""The operator's log: INFO and up to stderr, as plain lines or one JSON object a line.

Our own loggers (``finetune_operator.*``) log at INFO: the start-up line and one line per phase
transition. kopf logs a line for every handler it runs; of its lines only warnings and errors
are kept. Pure but for configuring the standard library's logging.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import IO, Any, Literal

LogFormat = Literal["plain", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("plain", "json")

#: The attributes every LogRecord has; anything else was passed as ``extra``.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JSONFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, the ``extra`` fields, and the
    exception (if any) as text."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


PLAIN = logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")


def configure(log_format: LogFormat, stream: IO[str] | None = None) -> logging.Handler:
    """Send the operator's log to ``stream`` (stderr) in ``log_format``; the handler."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JSONFormatter() if log_format == "json" else PLAIN)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("kopf").setLevel(logging.WARNING)  # errors, not a line per handler run
    for noisy in ("kubernetes", "urllib3", "aiohttp", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return handler
