"""Typed views of the Kubernetes objects the operator reads: pods, children (a PyTorchJob or a
TrainJob, in one shape) and Events.

Parsed once at the edge (:mod:`finetune_operator.kube`, and the kopf handlers for event bodies)
from the API's JSON (camelCase keys); everything past the edge takes these types. Each holds only
the fields the operator uses. Parsing is lenient, as the API is: a field that is absent takes its
Kubernetes default. Pure: imports no Kubernetes client, kopf or torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from finetune_operator.queueing import QUEUE_LABEL
from finetune_trainer.names import (
    COMPLETION_INDEX_LABEL,
    JOB_INDEX_LABEL,
    REPLICA_TYPE_LABEL,
    REPLICATED_JOB_LABEL,
    TRAINJOB_CONTAINER,
)

Raw = Mapping[str, Any]


def _map(raw: Raw, key: str) -> Raw:
    value = raw.get(key)
    return value if isinstance(value, Mapping) else {}


def _list(raw: Raw, key: str) -> list[Raw]:
    value = raw.get(key)
    return [v for v in value if isinstance(v, Mapping)] if isinstance(value, list) else []


def _str(raw: Raw, key: str) -> str:
    value = raw.get(key)
    return "" if value is None else str(value)


def _int(raw: Raw, key: str) -> int:
    value = raw.get(key)
    try:
        return int(value) if value is not None else 0
    except (TypeError, ValueError):
        return 0


def parse_time(text: object) -> datetime | None:
    """An RFC 3339 time as the API writes it (``2026-12-07T05:00:00Z``, maybe with fractions or
    an offset), timezone-aware; None when absent or unreadable."""
    if not isinstance(text, str) or not text:
        return None
    try:
        stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Condition:
    """A condition of a pod or a child."""

    type: str
    status: str
    reason: str = ""
    message: str = ""
    #: When its status last changed (lastTransitionTime); None when not given.
    last_transition: datetime | None = None

    @classmethod
    def parse(cls, raw: Raw) -> Condition:
        return cls(
            _str(raw, "type"),
            _str(raw, "status"),
            _str(raw, "reason"),
            _str(raw, "message"),
            parse_time(raw.get("lastTransitionTime")),
        )


@dataclass(frozen=True)
class Waiting:
    """A container that has not started (or waits to restart): ImagePullBackOff, ..."""

    reason: str = ""
    message: str = ""


@dataclass(frozen=True)
class Terminated:
    """A container that ended: its exit code, and the kubelet's reason (OOMKilled, Error...)."""

    exit_code: int
    reason: str = ""
    message: str = ""


@dataclass(frozen=True)
class ContainerState:
    waiting: Waiting | None = None
    terminated: Terminated | None = None

    @classmethod
    def parse(cls, raw: Raw) -> ContainerState:
        waiting, terminated = _map(raw, "waiting"), _map(raw, "terminated")
        return cls(
            waiting=Waiting(_str(waiting, "reason"), _str(waiting, "message")) if waiting else None,
            terminated=Terminated(
                int(terminated.get("exitCode") or 0),
                _str(terminated, "reason"),
                _str(terminated, "message"),
            )
            if terminated
            else None,
        )


@dataclass(frozen=True)
class ContainerStatus:
    name: str
    image: str = ""
    state: ContainerState = ContainerState()
    #: The state before the latest restart (often the only record of an OOM kill).
    last_state: ContainerState = ContainerState()
    #: How many times the kubelet restarted this container in place.
    restart_count: int = 0
    #: Whether it is running (its state is ``running``).
    running: bool = False

    @classmethod
    def parse(cls, raw: Raw) -> ContainerStatus:
        state = _map(raw, "state")
        return cls(
            name=_str(raw, "name"),
            image=_str(raw, "image"),
            state=ContainerState.parse(state),
            last_state=ContainerState.parse(_map(raw, "lastState")),
            restart_count=_int(raw, "restartCount"),
            running=isinstance(state.get("running"), Mapping),
        )


@dataclass(frozen=True)
class Pod:
    """A trainer pod: who it is, where it runs, and how its containers are doing."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    phase: str = "Pending"
    pod_ip: str | None = None
    container_statuses: tuple[ContainerStatus, ...] = ()
    conditions: tuple[Condition, ...] = ()
    uid: str = ""
    #: When the pod object was created (metadata.creationTimestamp).
    created: datetime | None = None
    #: When the kubelet took the pod (status.startTime): before its images are pulled.
    started: datetime | None = None
    #: Set once the pod is being deleted (metadata.deletionTimestamp).
    deleting: bool = False
    #: The init containers' statuses (a pod stuck in an init container waits there).
    init_container_statuses: tuple[ContainerStatus, ...] = ()

    @property
    def replica_type(self) -> str | None:
        """``master`` or ``worker`` (the training-operator's label)."""
        return self.labels.get(REPLICA_TYPE_LABEL)

    @property
    def rank_zero(self) -> bool:
        """Whether it runs node rank 0, whose metrics tell progress: a PyTorchJob's master, or
        index 0 of the first Job of a TrainJob's ``node`` replicated job."""
        if self.replica_type is not None:
            return self.replica_type == "master"
        return (
            self.labels.get(REPLICATED_JOB_LABEL) == TRAINJOB_CONTAINER
            and self.labels.get(JOB_INDEX_LABEL, "0") == "0"
            and self.labels.get(COMPLETION_INDEX_LABEL) == "0"
        )

    @property
    def restarts(self) -> int:
        """Restarts in place of all its containers."""
        return sum(cs.restart_count for cs in self.container_statuses)

    def condition(self, type_: str) -> Condition | None:
        """Its condition of type ``type_`` (PodScheduled, Ready...), if it has one."""
        return next((c for c in self.conditions if c.type == type_), None)

    @classmethod
    def parse(cls, raw: Raw) -> Pod:
        meta, status = _map(raw, "metadata"), _map(raw, "status")
        return cls(
            name=_str(meta, "name"),
            labels={str(k): str(v) for k, v in _map(meta, "labels").items()},
            phase=_str(status, "phase") or "Pending",
            pod_ip=_str(status, "podIP") or None,
            container_statuses=tuple(
                ContainerStatus.parse(cs) for cs in _list(status, "containerStatuses")
            ),
            conditions=tuple(Condition.parse(c) for c in _list(status, "conditions")),
            uid=_str(meta, "uid"),
            created=parse_time(meta.get("creationTimestamp")),
            started=parse_time(status.get("startTime")),
            deleting=bool(meta.get("deletionTimestamp")),
            init_container_statuses=tuple(
                ContainerStatus.parse(cs) for cs in _list(status, "initContainerStatuses")
            ),
        )


#: The kinds of child a FineTuneJob runs as (children.py has one implementation for each).
PYTORCHJOB = "PyTorchJob"
TRAINJOB = "TrainJob"
#: TrainJob conditions, as the PyTorchJob's (and so status.derive) name them.
_TRAINJOB_CONDITIONS = {"Complete": "Succeeded", "Failed": "Failed", "Suspended": "Suspended"}


@dataclass(frozen=True)
class Child:
    """The child a FineTuneJob runs as, a Kubeflow PyTorchJob or a Kubeflow Trainer v2 TrainJob,
    in one shape: its identity, suspension and conditions named as a PyTorchJob's (Created,
    Running, Succeeded, Failed, Suspended)."""

    name: str
    uid: str = ""
    conditions: tuple[Condition, ...] = ()
    #: When the child object was created (metadata.creationTimestamp).
    created: datetime | None = None
    #: When its controller first saw it (a PyTorchJob's status.startTime).
    started: datetime | None = None
    #: Set once it is being deleted (metadata.deletionTimestamp).
    deleting: bool = False
    #: Its metadata.annotations (the plan summary it was built for...).
    annotations: Mapping[str, str] = field(default_factory=dict)
    #: Whether its suspend is set (Kueue or the operator holds its pods back).
    suspended: bool = False
    #: Its kueue.x-k8s.io/queue-name label: the LocalQueue Kueue admits it through ("" when
    #: not queued). Set by the operator, or by Kueue for a namespace's ``default`` LocalQueue.
    queue_name: str = ""
    #: The field managers that own its suspend field (from metadata.managedFields).
    suspend_owners: tuple[str, ...] = ()
    #: PYTORCHJOB or TRAINJOB.
    kind: str = PYTORCHJOB

    def true_conditions(self) -> dict[str, Condition]:
        """The conditions whose status is True, by type (Created, Running, Succeeded...)."""
        return {c.type: c for c in self.conditions if c.status == "True"}

    def since(self, type_: str) -> datetime | None:
        """When its condition ``type_`` last became True (None if it is not True now)."""
        for c in self.conditions:
            if c.type == type_ and c.status == "True":
                return c.last_transition
        return None

    @classmethod
    def parse(cls, raw: Raw) -> Child:
        """A PyTorchJob or a TrainJob (by its kind; a PyTorchJob when it names none)."""
        if _str(raw, "kind") == TRAINJOB:
            return cls.parse_trainjob(raw)
        return cls.parse_pytorchjob(raw)

    @classmethod
    def parse_pytorchjob(cls, raw: Raw) -> Child:
        meta, spec, status = _map(raw, "metadata"), _map(raw, "spec"), _map(raw, "status")
        return cls(
            name=_str(meta, "name"),
            uid=_str(meta, "uid"),
            conditions=tuple(Condition.parse(c) for c in _list(status, "conditions")),
            created=parse_time(meta.get("creationTimestamp")),
            started=parse_time(status.get("startTime")),
            deleting=bool(meta.get("deletionTimestamp")),
            annotations={str(k): str(v) for k, v in _map(meta, "annotations").items()},
            suspended=bool(_map(spec, "runPolicy").get("suspend")),
            queue_name=_str(_map(meta, "labels"), QUEUE_LABEL),
            suspend_owners=_suspend_owners(meta, ("f:spec", "f:runPolicy")),
            kind=PYTORCHJOB,
        )

    @classmethod
    def parse_trainjob(cls, raw: Raw) -> Child:
        """A TrainJob: Complete reads as Succeeded; Running is True while every replicated job
        has all its pods ready (status.jobsStatus), since the TrainJob has no such condition of
        its own."""
        meta, spec, status = _map(raw, "metadata"), _map(raw, "spec"), _map(raw, "status")
        conditions = [
            Condition.parse({**c, "type": _TRAINJOB_CONDITIONS[_str(c, "type")]})
            for c in _list(status, "conditions")
            if _str(c, "type") in _TRAINJOB_CONDITIONS
        ]
        jobs = _list(status, "jobsStatus")
        terminal = any(c.status == "True" and c.type in {"Succeeded", "Failed"} for c in conditions)
        ready = bool(jobs) and all(_int(j, "ready") + _int(j, "succeeded") > 0 for j in jobs)
        created = parse_time(meta.get("creationTimestamp"))
        if ready and not terminal and not spec.get("suspend"):
            # No time of its own: the pods' start times tell when the gang came up.
            conditions.append(Condition("Running", "True", "JobsReady", last_transition=created))
        return cls(
            name=_str(meta, "name"),
            uid=_str(meta, "uid"),
            conditions=tuple(conditions),
            created=created,
            deleting=bool(meta.get("deletionTimestamp")),
            annotations={str(k): str(v) for k, v in _map(meta, "annotations").items()},
            suspended=bool(spec.get("suspend")),
            queue_name=_str(_map(meta, "labels"), QUEUE_LABEL),
            suspend_owners=_suspend_owners(meta, ("f:spec",)),
            kind=TRAINJOB,
        )


def _suspend_owners(meta: Raw, path: tuple[str, ...]) -> tuple[str, ...]:
    """The field managers whose managed fields hold ``path`` + ``f:suspend``."""
    owners = []
    for entry in _list(meta, "managedFields"):
        fields = _map(entry, "fieldsV1")
        for key in path:
            fields = _map(fields, key)
        if "f:suspend" in fields:
            owners.append(_str(entry, "manager"))
    return tuple(owners)


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event about a FineTuneJob (what ``finetune describe`` lists)."""

    type: str
    reason: str
    message: str
    #: When it last happened (lastTimestamp, else eventTime), RFC 3339; "" when unknown.
    time: str = ""
    #: When it was first recorded, as precisely as the API keeps it (eventTime, in microseconds,
    #: else firstTimestamp, else ``time``): what orders events that share a second.
    recorded: str = ""

    @classmethod
    def parse(cls, raw: Raw) -> Event:
        stamp = str(raw.get("lastTimestamp") or raw.get("eventTime") or "")
        first = str(raw.get("eventTime") or raw.get("firstTimestamp") or stamp)
        return cls(_str(raw, "type"), _str(raw, "reason"), _str(raw, "message"), stamp, first)

    def order(self) -> datetime:
        """When it was recorded, for sorting (the earliest time when unknown)."""
        if not self.recorded:
            return datetime.min.replace(tzinfo=UTC)
        return datetime.fromisoformat(self.recorded.replace("Z", "+00:00"))
