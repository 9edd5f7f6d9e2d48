"""Kueue's side of a FineTuneJob: its child's Workload, read once into a typed view, and what it
means for the FineTuneJob (pure: imports no Kubernetes client, kopf or torch).

Kueue admits a queued child (one labelled ``kueue.x-k8s.io/queue-name``) through a ``Workload``
(``kueue.x-k8s.io/v1beta2``) that it creates for it, owned by the child and labelled with the
child's uid (``JOB_UID_LABEL``). This module turns such a Workload (the API's JSON) into
:class:`QueueView` and says

- which FineTuneJob conditions mirror it: ``QuotaReserved``, ``Admitted``, ``Evicted`` and
  ``Preempted``, with Kueue's own status, reason and message (e.g. ``Pending``: "couldn't assign
  flavors to pod set master: insufficient unused quota for nvidia.com/gpu in flavor h100-80gb, 8
  more needed") and its transition times;
- whether Kueue holds the job (:attr:`QueueView.held`: phase ``Queued``), and why.

:mod:`finetune_operator.status` mirrors the conditions and :mod:`finetune_operator.story` tells
each one that becomes True as an Event.

It does not depend on the child's kind: a PyTorchJob's Workload and a TrainJob's read the same.
``priority_labels`` is the other direction: ``spec.scheduling.priority`` (a Kueue
WorkloadPriorityClass) as the label Kueue reads on the child.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

Raw = Mapping[str, Any]

WORKLOAD_API_VERSION = "kueue.x-k8s.io/v1beta2"
WORKLOAD_KIND = "Workload"
#: On the child: the LocalQueue (set by the operator) and the WorkloadPriorityClass.
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
#: On the Workload: the uid of the job it admits (how to find a child's Workload).
JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"

#: On a Workload the operator deactivated because its FineTuneJob's user suspended the job (it
#: activates only those again: one Kueue deactivated itself, e.g. past its requeuing limit,
#: stays deactivated).
SUSPENDED_BY_USER = "finetune.dev/suspended-by-user"

#: The Workload conditions mirrored into the FineTuneJob, in this order.
MIRRORED = ("QuotaReserved", "Admitted", "Evicted", "Preempted")
Status = Literal["True", "False", "Unknown"]


@dataclass(frozen=True)
class QueueCondition:
    """One of the Workload's conditions, as Kueue wrote it."""

    type: str
    status: Status
    reason: str
    message: str
    last_transition_time: str  # RFC 3339, as on the Workload


@dataclass(frozen=True)
class QueueView:
    """What the operator uses of a Workload."""

    name: str
    namespace: str
    queue_name: str  # spec.queueName: the LocalQueue
    priority_class: str  # spec.priorityClassRef.name ("" without one)
    priority: int | None  # spec.priority, as Kueue resolved it
    active: bool  # spec.active: false when deactivated (by a user, or a requeue limit)
    suspended_by_user: bool  # deactivated by the operator for a FineTuneJob's runPolicy.suspend
    conditions: tuple[QueueCondition, ...]
    cluster_queue: str  # status.admission.clusterQueue ("" until quota is reserved)
    requeue_count: int  # status.requeueState.count: evictions so far
    requeue_at: str  # status.requeueState.requeueAt ("" when not backing off)
    owner_kind: str  # the job it admits, from its controller owner reference
    owner_name: str
    owner_uid: str

    def condition(self, type_: str) -> QueueCondition | None:
        return next((c for c in self.conditions if c.type == type_), None)

    def is_true(self, type_: str) -> bool:
        found = self.condition(type_)
        return found is not None and found.status == "True"

    @property
    def quota_reserved(self) -> bool:
        return self.is_true("QuotaReserved")

    @property
    def admitted(self) -> bool:
        return self.is_true("Admitted")

    @property
    def finished(self) -> bool:
        return self.is_true("Finished")

    @property
    def held(self) -> bool:
        """Kueue holds the job (phase Queued): not admitted and not finished. True while it
        waits for quota, after an eviction until it is admitted again, and when deactivated."""
        return not self.admitted and not self.finished

    def mirrored(self) -> tuple[QueueCondition, ...]:
        """The Workload's conditions the FineTuneJob mirrors (MIRRORED, those Kueue has set),
        with Kueue's status, reason, message and transition time."""
        return tuple(c for t in MIRRORED if (c := self.condition(t)) is not None)

    def why_held(self) -> str:
        """One line for the FineTuneJob's status while ``held``: why Kueue holds it."""
        if not self.active:
            found = self.condition("Evicted")
            cause = f": {found.message}" if found and found.status == "True" else ""
            return f"deactivated in Kueue{cause}"
        if self.requeue_at:
            return f"evicted by Kueue, requeued at {self.requeue_at}"
        reserved = self.condition("QuotaReserved")
        if reserved is not None and reserved.status == "False" and reserved.message:
            return f"waiting in queue {self.queue_name}: {reserved.message}"
        if self.quota_reserved:
            return f"quota reserved in {self.cluster_queue}, waiting for admission checks"
        return f"waiting in queue {self.queue_name}"


def _map(raw: Raw, key: str) -> Raw:
    value = raw.get(key)
    return value if isinstance(value, Mapping) else {}


def _str(raw: Raw, key: str) -> str:
    value = raw.get(key)
    return "" if value is None else str(value)


def _status(value: object) -> Status:
    if value == "True":
        return "True"
    return "False" if value == "False" else "Unknown"


def parse_workload(raw: Raw) -> QueueView:
    """A Workload as the API returns it (JSON, camelCase) -> :class:`QueueView`. Lenient, as the
    API is: an absent field takes its default."""
    meta, spec, status = _map(raw, "metadata"), _map(raw, "spec"), _map(raw, "status")
    conditions = tuple(
        QueueCondition(
            type=_str(c, "type"),
            status=_status(c.get("status")),
            reason=_str(c, "reason"),
            message=_str(c, "message"),
            last_transition_time=_str(c, "lastTransitionTime"),
        )
        for c in status.get("conditions") or []
        if isinstance(c, Mapping) and c.get("type")
    )
    owners = [o for o in meta.get("ownerReferences") or [] if isinstance(o, Mapping)]
    owner = next((o for o in owners if o.get("controller")), owners[0] if owners else {})
    requeue = _map(status, "requeueState")
    priority = spec.get("priority")
    return QueueView(
        name=_str(meta, "name"),
        namespace=_str(meta, "namespace"),
        queue_name=_str(spec, "queueName"),
        priority_class=_str(_map(spec, "priorityClassRef"), "name"),
        priority=priority if isinstance(priority, int) else None,
        active=spec.get("active") is not False,
        suspended_by_user=_map(meta, "annotations").get(SUSPENDED_BY_USER) == "true",
        conditions=conditions,
        cluster_queue=_str(_map(status, "admission"), "clusterQueue"),
        requeue_count=int(requeue.get("count") or 0),
        requeue_at=_str(requeue, "requeueAt"),
        owner_kind=_str(owner, "kind"),
        owner_name=_str(owner, "name"),
        owner_uid=_str(owner, "uid"),
    )


def workload_of(workloads: Sequence[Raw], job_uid: str) -> QueueView | None:
    """The Workload of the child whose uid is ``job_uid``, among ``workloads`` (e.g. those of
    its namespace), or None while Kueue has made none."""
    for raw in workloads:
        labels = _map(_map(raw, "metadata"), "labels")
        if job_uid and labels.get(JOB_UID_LABEL) == job_uid:
            return parse_workload(raw)
    return None


def priority_labels(priority: str | None) -> dict[str, str]:
    """The child's label for ``spec.scheduling.priority`` (a Kueue WorkloadPriorityClass), or
    none without one."""
    return {PRIORITY_LABEL: priority} if priority else {}
