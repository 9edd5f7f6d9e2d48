"""What a FineTuneJob's phase transitions tell the user: one Kubernetes Event and one log line
per transition, in the order the transitions happened.

A status write can jump over a phase (a refresh that first sees the PyTorchJob Succeeded never
saw it Running): the story still tells the phase it jumped over, so a job that succeeded always
shows that it ran. Pure but for the ``recorder`` it is handed (the real one is
:class:`finetune_operator.kube.Kube`) and the log.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

from finetune_operator.controller import Outcome
from finetune_operator.queueing import MIRRORED
from finetune_operator.status import FineTuneJobStatus, staged_message

log = logging.getLogger("finetune_operator.jobs")


@dataclass(frozen=True)
class Note:
    """One Event: Normal or Warning, its reason (the phase, or the failure's reason), message."""

    type: str
    reason: str
    message: str


class Recorder(Protocol):
    """What records Events about an object (Kube.event)."""

    def event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """Record an Event about ``obj``."""


def recovered(outcome: Outcome) -> list[Note]:
    """The operator's own recoveries a status write records: a restart of hung pods, a re-plan
    after out-of-memory (one Event each, whatever the phase does)."""
    prev, status = outcome.previous, outcome.status
    if prev is None:
        return []
    told: list[Note] = []
    if (status.restarts or 0) > (prev.restarts or 0):
        cond = next((c for c in status.conditions or [] if c.type == "Restarted"), None)
        told.append(Note("Warning", "Restarted", cond.message if cond else "pods restarted"))
    attempts = status.attempts or []
    if len(attempts) > len(prev.attempts or []):
        told.append(Note("Warning", "Replanned", attempts[-1].message))
    return told


def queue_moves(outcome: Outcome) -> list[Note]:
    """Kueue's moves a status write mirrors: one Event per Workload condition that became True
    (quota reserved, admitted; evicted and preempted as Warnings), with Kueue's reason and
    message."""
    previous = outcome.previous.conditions if outcome.previous else None
    before = {c.type: c for c in previous or []}
    told: list[Note] = []
    now = {c.type: c for c in outcome.status.conditions or []}
    for cond in (now[t] for t in MIRRORED if t in now):
        if cond.status != "True":
            continue
        was = before.get(cond.type)
        if (
            was is not None
            and was.status == "True"
            and (was.last_transition_time == cond.last_transition_time)
        ):
            continue
        kind = "Warning" if cond.type in ("Evicted", "Preempted") else "Normal"
        said = f"Kueue: {cond.reason}: {cond.message}" if cond.message else f"Kueue: {cond.reason}"
        told.append(Note(kind, cond.type, said))
    return told


def notes(outcome: Outcome) -> list[Note]:
    """The Events one status write tells, in order: the operator's recoveries, Kueue's moves,
    then the phase transition (none when the phase did not change)."""
    before, after = outcome.before, outcome.after
    told: list[Note] = recovered(outcome) + queue_moves(outcome)
    if before == after or after is None:
        return told
    status = outcome.status
    if after == "Staging":
        return told + _staging(outcome)
    if before == "Staging" and status.staging is not None:
        told.append(Note("Normal", "Staged", staged_message(status.staging)))
        told += [Note("Warning", "StagingWarning", w) for w in status.staging.warnings or []]
    made = status.pytorch_job is not None or status.train_job is not None
    if before in (None, "Staging") and after not in ("Planned", "Failed") and made:
        # planned and made in one write: the plan is still told, before what came of it
        told.append(Note("Normal", "Planned", _planned(status)))
    if after == "Succeeded" and before != "Running":  # it ran, though no write saw it running
        told.append(Note("Normal", "Running", "training started"))
    if after == "Failed" and status.failure is not None:
        told.append(Note("Warning", status.failure.reason, status.failure.message))
        return told
    child = "TrainJob" if status.train_job is not None else "PyTorchJob"
    if after == "Pending" and status.failure is not None and not made:
        # waiting before any child exists (e.g. for its GPU type): the reason, not "created"
        told.append(Note("Warning", status.failure.reason, status.failure.message))
        return told
    waiting = f": {status.failure.message}" if status.failure else ""
    running = next((c for c in status.conditions or [] if c.type == "Running"), None)
    messages = {
        "Planned": _planned(status),
        "Pending": f"{child} created; waiting for the pods{waiting}",
        "Running": "training started",
        "Suspended": "suspended: the pods are stopped",
        "Queued": running.message if running else "queued in Kueue",
        "Succeeded": "training finished",
    }
    told.append(Note("Normal", after, messages.get(after, after)))
    return told


def _planned(status: FineTuneJobStatus) -> str:
    return status.plan.reason if status.plan else "the trainer will plan at start"


def _staging(outcome: Outcome) -> list[Note]:
    """A job that starts staging: what the staging Job does, what the spec allows against the
    defaults (a warning each), or why staging waits (a problem a user can act on)."""
    status = outcome.status
    staged = next((c for c in status.conditions or [] if c.type == "Staged"), None)
    told = [Note("Normal", "Staging", staged.message if staged else "staging the model and data")]
    model = outcome.job.spec.model
    if model.allow_pickle_weights:
        told.append(
            Note(
                "Warning",
                "PickleWeightsAllowed",
                "spec.model.allowPickleWeights is true: staging may fetch pickle weights, and "
                "loading them runs code from the files",
            )
        )
    if model.allow_remote_code:
        told.append(
            Note(
                "Warning",
                "RemoteCodeAllowed",
                "spec.model.allowRemoteCode is true: the trainer runs the model's own code from "
                "its repository",
            )
        )
    if status.failure is not None:
        told.append(Note("Warning", status.failure.reason, status.failure.message))
    return told


def announce(recorder: Recorder, body: dict[str, Any], outcome: Outcome) -> None:
    """Record the Events of ``outcome`` about the job ``body``, and log its transition."""
    told = notes(outcome)
    if not told:
        return
    meta = body.get("metadata", {})
    namespace, name = meta.get("namespace"), meta.get("name")
    failure = outcome.status.failure
    log.info(
        "FineTuneJob %s/%s: %s -> %s%s",
        namespace,
        name,
        outcome.before or "(new)",
        outcome.after,
        f" ({failure.reason}: {failure.message})" if failure else "",
        extra={
            "namespace": namespace,
            "job": name,
            "uid": meta.get("uid"),
            "before": outcome.before,
            "phase": outcome.after,
            "reason": failure.reason if failure else None,
        },
    )
    for note in told:
        recorder.event(body, note.type, note.reason, note.message)
