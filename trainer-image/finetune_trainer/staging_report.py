"""What staging hands back: the staging container's termination message, and how to read it.

The staging Job's container (:mod:`finetune_trainer.staging`) ends with one JSON line in its
termination message: on success a :class:`StagingReport` (resolved commits, bytes, the config.json
keys the planner reads, the tokenizer's vocabulary size), on failure a ``{"reason", "message"}``
line (:class:`StagingFailure`): ``BadInput`` for what the user must change (the job fails at
once), ``StagingFailed`` for what may pass on a retry. The operator reads it back with
:func:`parse_message`. Both sides, and the test bed that plays the staging pod, use these models,
so the format is defined once.

Pure: pydantic only (no torch, no huggingface_hub, no Kubernetes client), so the operator
imports it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from finetune_trainer.config import SourceKind

REPORT_VERSION: Literal[1] = 1
#: Failure reasons (the termination message's ``reason``).
BAD_INPUT = "BadInput"  # the user must change the spec (source, revision, token, model)
STAGING_FAILED = "StagingFailed"  # the Hub or the disk failed; a retry may pass
#: The staging container's exit codes: a Job's podFailurePolicy fails the Job at once on
#: EXIT_BAD_INPUT (no retry can help) and retries EXIT_FAILED up to its backoffLimit.
EXIT_FAILED = 1
EXIT_BAD_INPUT = 3


class _Report(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceReport(_Report):
    """One staged source (the model, or the dataset)."""

    kind: SourceKind
    #: What was staged: a Hub id, a local path or a builtin name.
    source: str
    #: The revision asked for (a branch, tag or commit), if any.
    revision: str | None = None
    #: The commit it resolved to (Hub sources): train on exactly this.
    commit: str | None = None
    #: Hub sources: the snapshot folder, relative to the cache folder (Hugging Face cache layout).
    snapshot: str | None = None
    #: Files the trainer reads, and their bytes on disk.
    files: int = 0
    bytes: int = 0
    #: Bytes downloaded by this staging (0 when everything was cached).
    fetched_bytes: int = 0
    seconds: float = 0.0


class StagingReport(_Report):
    """What staging found: the staging Job's termination message (one JSON line, < 4 KiB)."""

    version: Literal[1] = REPORT_VERSION
    model: SourceReport
    dataset: SourceReport
    #: The config.json keys the planner reads (``ModelFacts.from_hf_config`` takes this dict).
    config: dict[str, Any]
    #: The tokenizer's vocabulary (with added tokens).
    vocab_size: int
    #: What was allowed against the defaults (pickle weights, remote code): for a warning Event.
    warnings: tuple[str, ...] = ()

    def line(self) -> str:
        return self.model_dump_json() + "\n"


@dataclass(frozen=True)
class StagingFailure:
    """Why staging stopped: ``reason`` is BAD_INPUT or STAGING_FAILED (or another CamelCase word
    from an older or newer trainer, treated as STAGING_FAILED)."""

    reason: str
    message: str

    @property
    def permanent(self) -> bool:
        """Whether a retry cannot help (the user must change the spec)."""
        return self.reason == BAD_INPUT

    def line(self) -> str:
        """The termination message (the shape finetune_trainer.failure writes)."""
        return (
            json.dumps({"reason": self.reason, "message": self.message}, ensure_ascii=False) + "\n"
        )


def parse_message(text: str | None) -> StagingReport | StagingFailure | None:
    """The staging container's termination message: its report, its failure, or None when the
    text holds neither (no message, a kubelet's text, the log tail of a crash)."""
    first = (text or "").strip().splitlines()[:1]
    if not first or not first[0].startswith("{"):
        return None
    try:
        doc = json.loads(first[0])
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    if "reason" in doc and "version" not in doc:
        reason, message = doc.get("reason"), doc.get("message")
        if not isinstance(reason, str) or not reason:
            return None
        return StagingFailure(reason, message if isinstance(message, str) else "")
    try:
        return StagingReport.model_validate(doc)
    except ValidationError:
        return None
