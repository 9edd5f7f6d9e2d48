"""The trainer's termination message, read from a pod's container status.

The trainer (``finetune_trainer.failure``) writes the cause of any failure as one JSON line,
``{"reason": "LossDiverged", "message": "..."}``, to the container's termination-message file;
Kubernetes puts it in ``state.terminated.message``. Anything else there (a kubelet's text, a
crash's last log lines under ``FallbackToLogsOnError``) is not a trainer cause and is left as
it is. Pure: no Kubernetes client.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

#: A reason is one CamelCase word, as Kubernetes reasons are.
_REASON = re.compile(r"[A-Z][A-Za-z0-9]{2,63}")


@dataclass(frozen=True)
class TrainerCause:
    reason: str
    message: str


def parse(text: str | None) -> TrainerCause | None:
    """The trainer's cause in ``text`` (a termination message), or None if it holds none."""
    first = (text or "").strip().splitlines()[:1]
    if not first or not first[0].startswith("{"):
        return None
    try:
        doc = json.loads(first[0])
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    reason, message = doc.get("reason"), doc.get("message")
    if not isinstance(reason, str) or not _REASON.fullmatch(reason):
        return None
    return TrainerCause(reason, message if isinstance(message, str) else "")
