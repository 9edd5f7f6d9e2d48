"""Kueue's Workload -> the FineTuneJob's queue conditions, Queued, Events; the priority label.

The Workloads below are shaped as Kueue v0.17 writes them (``kueue.x-k8s.io/v1beta2``), their
reasons and messages taken from Workloads of the test bed's Kueue (tests/e2e/test_kueue.py).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from finetune_operator import api, queueing
from finetune_operator.controller import Outcome
from finetune_operator.objects import Child, Condition
from finetune_operator.plan import plan_job, plan_status
from finetune_operator.status import FineTuneJobStatus, Observed, derive
from finetune_operator.story import notes
from helpers import ROOT, load_yaml

PYTORCHJOB_UID = "6c1a3e0e-3b5f-4a3c-9d61-0a9b6c1f2e11"
SHORTFALL = (  # as the test bed's Kueue wrote it for a second 16-GPU job on 16 GPUs
    "couldn't assign flavors to pod set master: insufficient unused quota for nvidia.com/gpu "
    "in flavor h100-80gb, 8 more needed; couldn't assign flavors to pod set worker: "
    "insufficient unused quota for nvidia.com/gpu in flavor h100-80gb, 16 more needed"
)


def cond(type_: str, status: str, reason: str, message: str = "", t: str = "2026-12-07T05:00:00Z"):
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": t,
        "observedGeneration": 1,
    }


def workload(*conditions: dict[str, Any], **status: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kueue.x-k8s.io/v1beta2",
        "kind": "Workload",
        "metadata": {
            "name": "pytorchjob-big-1-3f7b1",
            "namespace": "team-a",
            "labels": {queueing.JOB_UID_LABEL: PYTORCHJOB_UID},
            "ownerReferences": [
                {
                    "apiVersion": "kubeflow.org/v1",
                    "kind": "PyTorchJob",
                    "name": "big-1",
                    "uid": PYTORCHJOB_UID,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "active": True,
            "queueName": "default",
            "priority": 100,
            "priorityClassRef": {
                "group": "kueue.x-k8s.io",
                "kind": "WorkloadPriorityClass",
                "name": "low",
            },
            "podSets": [{"name": "master", "count": 1}, {"name": "worker", "count": 1}],
        },
        "status": {"conditions": list(conditions), **status},
    }


PENDING = workload(cond("QuotaReserved", "False", "Pending", SHORTFALL))
ADMITTED = workload(
    cond("QuotaReserved", "True", "QuotaReserved", "Quota reserved in ClusterQueue gpus"),
    cond("Admitted", "True", "Admitted", "The workload is admitted"),
    admission={"clusterQueue": "gpus", "podSetAssignments": []},
)
EVICTED_PODS_READY = workload(
    cond("QuotaReserved", "False", "Pending", "Exceeded the PodsReady timeout"),
    cond("Admitted", "False", "NoReservation", "The workload has no reservation"),
    cond(
        "Evicted",
        "True",
        "PodsReadyTimeout",
        "Exceeded the PodsReady timeout team-a/pytorchjob-big-1-3f7b1",
    ),
    cond("PodsReady", "False", "WaitForStart", "Not all pods are ready or succeeded"),
    cond("Requeued", "False", "PodsReadyTimeout", "Exceeded the PodsReady timeout"),
    requeueState={"count": 1, "requeueAt": "2026-12-07T05:01:02Z"},
)
PREEMPTED = workload(
    cond("QuotaReserved", "False", "Pending", "Preempted to accommodate a workload"),
    cond("Admitted", "False", "NoReservation", "The workload has no reservation"),
    cond(
        "Evicted",
        "True",
        "Preempted",
        "Preempted to accommodate a workload (UID: 9f) due to prioritization in the ClusterQueue",
    ),
    cond(
        "Preempted",
        "True",
        "InClusterQueue",
        "Preempted to accommodate a workload (UID: 9f) due to prioritization in the ClusterQueue",
    ),
)
# Re-admitted after the backoff (as the test bed's Kueue left it): the eviction is history.
READMITTED = workload(
    cond("QuotaReserved", "True", "QuotaReserved", "Quota reserved in ClusterQueue gpus"),
    cond(
        "Evicted",
        "False",
        "QuotaReserved",
        "Previously: Exceeded the PodsReady timeout team-a/pytorchjob-big-1-3f7b1",
    ),
    cond("Admitted", "True", "Admitted", "The workload is admitted"),
    cond("PodsReady", "False", "WaitForStart", "Not all pods are ready or succeeded"),
    cond("Requeued", "True", "BackoffFinished", "The workload backoff was finished"),
    admission={"clusterQueue": "gpus"},
    requeueState={"count": 1},
    schedulingStats={
        "evictions": [{"count": 1, "reason": "PodsReadyTimeout", "underlyingCause": "WaitForStart"}]
    },
)
FINISHED = workload(
    cond("QuotaReserved", "True", "QuotaReserved", "Quota reserved in ClusterQueue gpus"),
    cond("Admitted", "True", "Admitted", "The workload is admitted"),
    cond("Finished", "True", "Succeeded", "PyTorchJob big-1 is successfully completed."),
    admission={"clusterQueue": "gpus"},
)


T0, T1, T2 = "2026-12-07T05:00:10Z", "2026-12-07T05:01:10Z", "2026-12-07T05:02:40Z"
JOB = api.parse(load_yaml(ROOT / "examples" / "mistral-7b-python-code.yaml"))
_PLANNED = plan_job(JOB.spec)
assert _PLANNED is not None
PLAN = plan_status(_PLANNED)


def queued_child(*conditions: str, suspended: bool = False) -> Child:
    return Child(
        "big-1",
        PYTORCHJOB_UID,
        tuple(Condition(c, "True") for c in conditions),
        suspended=suspended,
        queue_name="default",
    )


def status_of(
    raw: dict[str, Any],
    previous: FineTuneJobStatus | None = None,
    now: str = T0,
    *child_conditions: str,
) -> FineTuneJobStatus:
    """The FineTuneJob's status while its child's Workload is ``raw``."""
    view = queueing.parse_workload(raw)
    child = queued_child("Created", *child_conditions, suspended=view.held)
    return derive(Observed(1, False, plan=PLAN, child=child, queue=view), previous, now)


def outcome(before: FineTuneJobStatus | None, after: FineTuneJobStatus) -> Outcome:
    return Outcome(before.phase if before else None, after.phase, after, True, JOB, before)


def told(before: FineTuneJobStatus | None, after: FineTuneJobStatus) -> list[tuple[str, str]]:
    return [(n.type, n.reason) for n in notes(outcome(before, after))]


def test_a_workload_is_read_once_into_a_typed_view() -> None:
    view = queueing.parse_workload(ADMITTED)
    assert view.name == "pytorchjob-big-1-3f7b1"
    assert view.namespace == "team-a"
    assert (view.queue_name, view.cluster_queue) == ("default", "gpus")
    assert (view.priority_class, view.priority) == ("low", 100)
    assert (view.owner_kind, view.owner_name) == ("PyTorchJob", "big-1")
    assert view.active
    assert view.quota_reserved
    assert view.admitted
    assert not view.finished
    assert view.requeue_count == 0
    assert view.requeue_at == ""


def test_waiting_for_quota_is_queued_with_kueues_reason_and_shortfall() -> None:
    view = queueing.parse_workload(PENDING)
    assert view.held
    assert not view.quota_reserved
    assert not view.admitted
    (reserved,) = view.mirrored()
    assert (reserved.type, reserved.status, reserved.reason) == (
        "QuotaReserved",
        "False",
        "Pending",
    )
    assert reserved.message == SHORTFALL
    assert reserved.last_transition_time == "2026-12-07T05:00:00Z"
    assert view.why_held() == f"waiting in queue default: {SHORTFALL}"


def test_an_admitted_or_finished_job_is_not_held() -> None:
    assert not queueing.parse_workload(ADMITTED).held
    assert not queueing.parse_workload(FINISHED).held
    # Finished without admission (Kueue gave up on it): over, not waiting.
    gave_up = workload(
        cond("QuotaReserved", "False", "Pending", "Preempted to accommodate a workload"),
        cond("Finished", "True", "FailedToStart", "pod set master: no matching flavor"),
    )
    assert not queueing.parse_workload(gave_up).held


def test_a_re_admitted_job_keeps_its_eviction_as_history() -> None:
    view = queueing.parse_workload(READMITTED)
    assert not view.held
    assert view.requeue_count == 1
    evicted = view.condition("Evicted")
    assert evicted is not None
    assert evicted.status == "False"
    assert evicted.message.startswith("Previously: Exceeded the PodsReady timeout")
    evicted_status = status_of(EVICTED_PODS_READY)
    again = status_of(READMITTED, evicted_status, T1, "Running")
    assert again.phase == "Running"
    assert told(evicted_status, again) == [
        ("Normal", "QuotaReserved"),
        ("Normal", "Admitted"),
        ("Normal", "Running"),
    ]


def test_mirrored_conditions_are_the_four_in_order_with_kueues_words() -> None:
    view = queueing.parse_workload(PREEMPTED)
    mirrored = view.mirrored()
    assert [c.type for c in mirrored] == ["QuotaReserved", "Admitted", "Evicted", "Preempted"]
    assert [c.status for c in mirrored] == ["False", "False", "True", "True"]
    assert mirrored[3].reason == "InClusterQueue"
    assert "prioritization in the ClusterQueue" in mirrored[3].message
    # PodsReady, Requeued, Finished are Kueue's own business, not mirrored.
    assert {c.type for c in queueing.parse_workload(EVICTED_PODS_READY).mirrored()} == {
        "QuotaReserved",
        "Admitted",
        "Evicted",
    }


def test_an_evicted_job_is_held_until_requeued_and_says_when() -> None:
    view = queueing.parse_workload(EVICTED_PODS_READY)
    assert view.held
    assert view.requeue_count == 1
    assert view.why_held() == "evicted by Kueue, requeued at 2026-12-07T05:01:02Z"
    evicted = view.condition("Evicted")
    assert evicted is not None
    assert evicted.reason == "PodsReadyTimeout"


def test_a_deactivated_workload_is_held_and_says_so() -> None:
    raw = copy.deepcopy(EVICTED_PODS_READY)
    raw["spec"]["active"] = False
    raw["status"]["conditions"][2] = cond(
        "Evicted", "True", "Deactivated", "The workload is deactivated"
    )
    view = queueing.parse_workload(raw)
    assert view.held
    assert not view.active
    assert view.why_held() == "deactivated in Kueue: The workload is deactivated"


def test_a_fresh_workload_without_status_is_held_waiting() -> None:
    raw = copy.deepcopy(PENDING)
    del raw["status"]
    view = queueing.parse_workload(raw)
    assert view.held
    assert view.mirrored() == ()
    assert view.why_held() == "waiting in queue default"


def test_odd_values_take_the_apis_defaults() -> None:
    view = queueing.parse_workload(
        {
            "metadata": {"ownerReferences": "nope"},
            "spec": {"priority": "high"},
            "status": {"conditions": [{"type": "Admitted", "status": "yes"}, "x", {}]},
        }
    )
    assert view.priority is None
    assert view.active
    assert view.owner_name == ""
    (admitted,) = view.conditions
    assert admitted.status == "Unknown"
    assert not view.admitted


def test_the_childs_workload_is_found_by_its_uid_label() -> None:
    other = copy.deepcopy(PENDING)
    other["metadata"]["labels"][queueing.JOB_UID_LABEL] = "another-uid"
    other["metadata"]["name"] = "pytorchjob-other"
    found = queueing.workload_of([other, ADMITTED], PYTORCHJOB_UID)
    assert found is not None
    assert found.name == "pytorchjob-big-1-3f7b1"
    assert found.admitted
    assert queueing.workload_of([other], PYTORCHJOB_UID) is None
    assert queueing.workload_of([ADMITTED], "") is None


@pytest.mark.parametrize(
    ("priority", "labels"),
    [("high", {"kueue.x-k8s.io/priority-class": "high"}), (None, {}), ("", {})],
)
def test_priority_becomes_kueues_priority_class_label(
    priority: str | None, labels: dict[str, str]
) -> None:
    assert queueing.priority_labels(priority) == labels


def test_events_for_the_queue_story() -> None:
    pending = status_of(PENDING)
    first = told(None, pending)
    assert first == [("Normal", "Planned"), ("Normal", "Queued")]  # planned and queued at once
    assert SHORTFALL in notes(outcome(None, pending))[1].message

    assert told(pending, status_of(PENDING, pending, T1)) == []  # nothing changed, no Event

    admitted = status_of(ADMITTED, pending, T1, "Running")
    on_admission = notes(outcome(pending, admitted))
    assert [(e.type, e.reason) for e in on_admission] == [
        ("Normal", "QuotaReserved"),
        ("Normal", "Admitted"),
        ("Normal", "Running"),
    ]
    assert on_admission[1].message == "Kueue: Admitted: The workload is admitted"

    preempted = status_of(PREEMPTED, admitted, T2)
    on_preemption = notes(outcome(admitted, preempted))
    assert [(e.type, e.reason) for e in on_preemption] == [
        ("Warning", "Evicted"),
        ("Warning", "Preempted"),
        ("Normal", "Queued"),
    ]
    assert "InClusterQueue" in on_preemption[1].message


def test_each_new_eviction_is_an_event() -> None:
    first = status_of(EVICTED_PODS_READY)
    readmitted = status_of(READMITTED, first, T1, "Running")
    again = copy.deepcopy(EVICTED_PODS_READY)
    again["status"]["requeueState"] = {"count": 2, "requeueAt": "2026-12-07T05:03:00Z"}
    again["status"]["conditions"][2]["lastTransitionTime"] = "2026-12-07T05:02:30Z"
    second = status_of(again, readmitted, T2)
    events = notes(outcome(readmitted, second))
    assert [(e.type, e.reason) for e in events] == [("Warning", "Evicted"), ("Normal", "Queued")]
    assert events[1].message == "evicted by Kueue, requeued at 2026-12-07T05:03:00Z"


def test_a_queued_job_mirrors_kueues_conditions_with_kueues_times() -> None:
    status = status_of(PENDING)
    assert status.phase == "Queued"
    (reserved,) = [c for c in status.conditions or [] if c.type == "QuotaReserved"]
    assert (reserved.status, reserved.reason, reserved.message) == ("False", "Pending", SHORTFALL)
    assert reserved.last_transition_time == "2026-12-07T05:00:00Z"  # Kueue's, not ours
    running = next(c for c in status.conditions or [] if c.type == "Running")
    assert (running.status, running.reason) == ("False", "Queued")
    assert running.message == f"waiting in queue default: {SHORTFALL}"
    assert status.plan is not None  # planned before admission


def test_a_queued_child_without_its_workload_yet_is_queued() -> None:
    status = derive(Observed(1, False, plan=PLAN, child=queued_child(suspended=True)), None, T0)
    assert status.phase == "Queued"
    running = next(c for c in status.conditions or [] if c.type == "Running")
    assert running.message == "waiting for Kueue to queue it in default"
    # Once admitted (unsuspended) and before the Workload is read again: not held.
    status = derive(Observed(1, False, plan=PLAN, child=queued_child()), status, T1)
    assert status.phase == "Pending"


def test_a_users_suspend_of_a_queued_job_is_suspended_not_queued() -> None:
    raw = copy.deepcopy(PENDING)
    raw["spec"]["active"] = False
    obs = Observed(
        1, True, plan=PLAN, child=queued_child(suspended=True), queue=queueing.parse_workload(raw)
    )
    status = derive(obs, None, T0)
    assert status.phase == "Suspended"
    suspended = next(c for c in status.conditions or [] if c.type == "Suspended")
    assert suspended.message == "runPolicy.suspend is true: its Kueue Workload is deactivated"


def test_what_kueue_said_last_stays_when_its_workload_is_gone() -> None:
    admitted = status_of(ADMITTED, None, T0, "Running")
    done = derive(
        Observed(1, False, plan=PLAN, child=queued_child("Created", "Succeeded")), admitted, T1
    )
    assert done.phase == "Succeeded"
    assert {c.type for c in done.conditions or []} >= {"QuotaReserved", "Admitted"}


def test_an_odd_reason_from_kueue_still_makes_a_valid_condition() -> None:
    status = status_of(workload(cond("QuotaReserved", "False", "not camel case!", "m")))
    (reserved,) = [c for c in status.conditions or [] if c.type == "QuotaReserved"]
    assert reserved.reason == "QuotaReserved"
