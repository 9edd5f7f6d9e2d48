"""The typed edge: pods, PyTorchJobs and Events parsed from the API's JSON keep what we use."""

from __future__ import annotations

from typing import Any

import kopf

from finetune_operator.objects import Child, Event, Pod, Terminated, Waiting
from finetune_operator.status import pod_problem

#: A master pod as the API server returns it (trimmed), after an OOM kill and a restart.
RAW_POD: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {
        "name": "j-master-0",
        "namespace": "ml",
        "labels": {
            "training.kubeflow.org/job-name": "j",
            "training.kubeflow.org/replica-type": "master",
        },
    },
    "spec": {"containers": [{"name": "pytorch", "image": "trainer:1"}]},
    "status": {
        "phase": "Running",
        "podIP": "10.1.2.3",
        "conditions": [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Ready", "status": "False", "reason": "ContainersNotReady", "message": "m"},
        ],
        "containerStatuses": [
            {
                "name": "pytorch",
                "image": "trainer:1",
                "restartCount": 1,
                "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s"}},
                "lastState": {
                    "terminated": {"exitCode": 137, "reason": "OOMKilled", "startedAt": "x"}
                },
            }
        ],
    },
}


def test_a_pod_keeps_what_status_and_the_cli_use() -> None:
    pod = Pod.parse(RAW_POD)
    assert (pod.name, pod.phase, pod.pod_ip, pod.replica_type) == (
        "j-master-0",
        "Running",
        "10.1.2.3",
        "master",
    )
    (container,) = pod.container_statuses
    assert (container.name, container.image) == ("pytorch", "trainer:1")
    assert container.state.waiting == Waiting("CrashLoopBackOff", "back-off 10s")
    assert container.state.terminated is None
    assert container.last_state.terminated == Terminated(137, "OOMKilled")
    assert [(c.type, c.status, c.reason) for c in pod.conditions] == [
        ("PodScheduled", "True", ""),
        ("Ready", "False", "ContainersNotReady"),
    ]
    failure = pod_problem([pod])
    assert failure is not None
    assert (failure.reason, failure.exit_code, failure.pod) == ("OOMKilled", 137, "j-master-0")


def test_a_kopf_event_body_parses_like_the_api_json() -> None:
    assert Pod.parse(kopf.Body(RAW_POD)) == Pod.parse(RAW_POD)


def test_a_pod_with_no_status_yet_takes_the_defaults() -> None:
    pod = Pod.parse({"metadata": {"name": "p"}})
    assert (pod.phase, pod.pod_ip, pod.container_statuses, pod.replica_type) == (
        "Pending",
        None,
        (),
        None,
    )
    assert pod_problem([pod]) is None


def test_a_pytorchjob_keeps_its_identity_and_true_conditions() -> None:
    job = Child.parse(
        {
            "metadata": {"name": "j", "uid": "u-1"},
            "status": {
                "conditions": [
                    {"type": "Created", "status": "True", "reason": "PyTorchJobCreated"},
                    {"type": "Running", "status": "False"},
                    {"type": "Failed", "status": "True", "message": "backoff limit"},
                ],
                "replicaStatuses": {"Master": {"failed": 1}},
            },
        }
    )
    assert (job.name, job.uid) == ("j", "u-1")
    assert sorted(job.true_conditions()) == ["Created", "Failed"]
    assert job.true_conditions()["Failed"].message == "backoff limit"
    assert Child.parse({"metadata": {"name": "j"}}).true_conditions() == {}


def test_a_queued_pytorchjob_tells_its_queue_and_who_owns_its_suspend() -> None:
    job = Child.parse(
        {
            "metadata": {
                "name": "j",
                "labels": {"kueue.x-k8s.io/queue-name": "default"},
                "managedFields": [
                    {
                        "manager": "finetune-operator",
                        "operation": "Apply",
                        "fieldsV1": {"f:spec": {"f:runPolicy": {"f:backoffLimit": {}}}},
                    },
                    {
                        "manager": "kueue",
                        "operation": "Update",
                        "fieldsV1": {"f:spec": {"f:runPolicy": {"f:suspend": {}}}},
                    },
                    {"manager": "odd", "fieldsV1": "nope"},
                ],
            },
            "spec": {"runPolicy": {"suspend": True}},
        }
    )
    assert job.queue_name == "default"
    assert job.suspended
    assert job.suspend_owners == ("kueue",)
    plain = Child.parse({"metadata": {"name": "j"}})
    assert (plain.queue_name, plain.suspend_owners, plain.suspended) == ("", (), False)


def test_an_event_takes_its_time_from_last_timestamp_else_event_time() -> None:
    old = Event.parse({"type": "Normal", "lastTimestamp": "2026-01-01T00:00:00Z"})
    new = Event.parse({"lastTimestamp": None, "eventTime": "2026-01-01T00:00:01.000000Z"})
    assert (old.time, new.time) == ("2026-01-01T00:00:00Z", "2026-01-01T00:00:01.000000Z")
    assert Event.parse({"reason": "X"}) == Event("", "X", "", "")
