"""FineTuneJobs queued through a real Kueue (v0.17, built by hack/cluster up --kueue) on the test
bed: real API server, scheduler, kwok GPU nodes (2 x 8 H100), Kubeflow training-operator, our
operator. The ClusterQueue ``gpus`` holds 16 GPUs; each test's namespace gets the LocalQueue
``default`` feeding it. Kueue's ``waitForPodsReady`` evicts a job whose pods are not all ready
in 20 s and requeues it after a short backoff (hack/finetune_testbed/kueue.py).

First what Kueue does with the operator's children (quota, waitForPodsReady, deletion), then
the operator's side: phase Queued with Kueue's conditions mirrored into the FineTuneJob, Events,
a user's suspend while queued (the Workload deactivated, no fight over the child's suspend), and
a job Kueue queues through a namespace's ``default`` LocalQueue.

The tests of what Kueue and the operator do with a queued child run for both children: the
PyTorchJob (Kueue's ``kubeflow.org/pytorchjob`` integration) and the TrainJob (Kubeflow Trainer
v2, ``trainer.kubeflow.org/trainjob``; ``hack/cluster up --trainer``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from helpers import ROOT, load_yaml

pytestmark = [pytest.mark.e2e, pytest.mark.kueue]

HOUR = {"testbed.finetune.dev/run-duration": "1h"}
SHORTFALL = "insufficient unused quota for nvidia.com/gpu in flavor h100-80gb"


@dataclass(frozen=True)
class ChildKind:
    """How a test finds the child of a FineTuneJob, its pods and its suspension."""

    resource: str  # for kubectl get
    kind: str  # its Workload's owner
    pod_label: str  # names the child on its pods
    suspend_path: tuple[str, ...]  # under spec


PYTORCHJOB = ChildKind("pytorchjob", "PyTorchJob", "training.kubeflow.org/job-name", ("runPolicy",))
TRAINJOB = ChildKind("trainjob", "TrainJob", "jobset.sigs.k8s.io/jobset-name", ())
#: The child of the test running now (set by ``queued``).
CHILD = [PYTORCHJOB]
#: Tests that run for both children (``queued`` parametrized), by the marker below.
both_children = pytest.mark.parametrize("queued", ["pytorchjob", "trainjob"], indirect=True)


@pytest.fixture
def queued(request: pytest.FixtureRequest, kueue_testbed: Any) -> Iterator[Any]:
    """The operator, in a namespace whose LocalQueue ``default`` feeds the ClusterQueue gpus;
    with the TrainJob child when the test is parametrized so (``both_children``).

    Afterwards its jobs are deleted while the operator still runs, and the test waits until
    Kueue has let go of their Workloads: the shared ClusterQueue's quota is free for the next
    test (a namespace's deletion alone leaves that to Kueue's own time)."""
    child = getattr(request, "param", "pytorchjob")
    CHILD[0] = TRAINJOB if child == "trainjob" else PYTORCHJOB
    operator = request.getfixturevalue("trainjob_operator" if child == "trainjob" else "operator")
    kueue_testbed.local_queue(operator.namespace)
    yield operator
    ns = operator.namespace
    kueue_testbed.kubectl("delete", "ftj", "--all", "-n", ns, "--wait=true", "--timeout=120s")
    kueue_testbed.wait_for(
        lambda: (
            not kueue_testbed.kubectl_json("get", "workloads.kueue.x-k8s.io", "-n", ns)["items"]
        ),
        timeout=120,
        desc="the namespace's Workloads gone (their quota free)",
    )


def job16(name: str, annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    """The tiny example (a builtin model and data: nothing to stage, so the pods' annotations
    reach only the trainer's pods) on 2 nodes x 8 H100, all of the ClusterQueue's quota, queued
    in ``default``, without storage."""
    job = load_yaml(ROOT / "examples" / "tiny-local.yaml")
    job["metadata"] = {"name": name}
    del job["spec"]["checkpoint"]["storage"]
    del job["spec"]["output"]
    job["spec"]["hyperparameters"]["globalBatchSize"] = 64
    job["spec"]["resources"] = {"numNodes": 2, "gpusPerNode": 8, "gpuType": "H100-80GB"}
    job["spec"]["scheduling"] = {"queueName": "default"}
    if annotations:
        job["spec"]["podMetadata"] = {"annotations": annotations}
    job["spec"].update(spec)
    return job


def get(testbed: Any, kind: str, ns: str, name: str) -> dict[str, Any] | None:
    p = testbed.kubectl("get", kind, name, "-n", ns, "-o", "json")
    return json.loads(p.stdout) if p.returncode == 0 else None


def workload(testbed: Any, ns: str, name: str) -> dict[str, Any] | None:
    """The Workload Kueue made for the child ``name`` (found by its owner)."""
    items = testbed.kubectl_json("get", "workloads.kueue.x-k8s.io", "-n", ns)["items"]
    for wl in items:
        owners = wl["metadata"].get("ownerReferences") or []
        if any(o["kind"] == CHILD[0].kind and o["name"] == name for o in owners):
            return dict(wl)
    return None


def wl_condition(wl: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    conditions = ((wl or {}).get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == type_), {})


def suspended(testbed: Any, ns: str, name: str) -> bool | None:
    child = get(testbed, CHILD[0].resource, ns, name)
    if child is None:
        return None
    spec = child["spec"]
    for key in CHILD[0].suspend_path:
        spec = spec.get(key, {})
    return bool(spec.get("suspend"))


def phase(testbed: Any, ns: str, name: str) -> str:
    job = get(testbed, "ftj", ns, name) or {}
    return str((job.get("status") or {}).get("phase", ""))


def ftj_condition(testbed: Any, ns: str, name: str, type_: str) -> dict[str, Any]:
    job = get(testbed, "ftj", ns, name) or {}
    conditions = (job.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == type_), {})


def pods(testbed: Any, ns: str, name: str) -> list[dict[str, Any]]:
    selector = f"{CHILD[0].pod_label}={name}"
    return list(testbed.kubectl_json("get", "pods", "-n", ns, "-l", selector)["items"])


def pod_story(testbed: Any, ns: str, name: str) -> list[tuple[str, Any, Any, Any]]:
    """Each of the child's pods: name, phase, IP, annotations (what a timed-out wait shows)."""
    return [
        (p["metadata"]["name"], p["status"].get("phase"), p["status"].get("podIP"),
         p["metadata"].get("annotations"))
        for p in pods(testbed, ns, name)
    ]  # fmt: skip


def evictions(wl: dict[str, Any] | None) -> int:
    """How many times Kueue evicted the Workload because its pods were not ready in time."""
    stats = ((wl or {}).get("status") or {}).get("schedulingStats") or {}
    return sum(
        e.get("count", 0) for e in stats.get("evictions") or [] if e["reason"] == "PodsReadyTimeout"
    )


def admitted(testbed: Any, ns: str, name: str) -> bool:
    return wl_condition(workload(testbed, ns, name), "Admitted").get("status") == "True"


def start_holder(testbed: Any, ns: str, name: str = "holder") -> None:
    """A 16-GPU job that runs for an hour: all of the quota, admitted and running."""
    assert testbed.apply(job16(name, HOUR), "-n", ns).returncode == 0
    testbed.wait_for(lambda: admitted(testbed, ns, name), timeout=120, desc=f"{name} admitted")
    testbed.wait_for(
        lambda: suspended(testbed, ns, name) is False, timeout=60, desc=f"{name} unsuspended"
    )


def wait_short_of_quota(testbed: Any, ns: str, name: str) -> dict[str, Any]:
    """``name``'s Workload waiting: QuotaReserved False with Kueue's shortfall."""
    wl: dict[str, Any] = testbed.wait_for(
        lambda: (
            (w := workload(testbed, ns, name))
            and SHORTFALL in wl_condition(w, "QuotaReserved").get("message", "")
            and w
        ),
        timeout=90,
        desc=f"{name}'s Workload short of quota",
    )
    return wl


# --------------------------------------------------------------------------- today


@both_children
def test_a_job_beyond_the_quota_waits_suspended_and_runs_when_the_first_is_done(
    queued: Any,
) -> None:
    testbed, ns = queued.testbed, queued.namespace
    first = job16("first", {"testbed.finetune.dev/run-duration": "20s"})
    assert testbed.apply(first, "-n", ns).returncode == 0
    testbed.wait_for(lambda: admitted(testbed, ns, "first"), timeout=120, desc="first admitted")
    assert testbed.apply(job16("second"), "-n", ns).returncode == 0

    waiting = wait_short_of_quota(testbed, ns, "second")
    reserved = wl_condition(waiting, "QuotaReserved")
    assert reserved["status"] == "False"
    assert reserved["reason"] == "Pending"
    assert "more needed" in reserved["message"]
    assert waiting["spec"]["queueName"] == "default"
    assert suspended(testbed, ns, "second") is True  # created suspended; Kueue keeps it so
    assert not pods(testbed, ns, "second")
    assert suspended(testbed, ns, "first") is False

    testbed.wait_for(lambda: phase(testbed, ns, "first") == "Succeeded", timeout=180, desc="first")
    testbed.wait_for(
        lambda: admitted(testbed, ns, "second"), timeout=120, desc="second admitted after first"
    )
    testbed.wait_for(
        lambda: phase(testbed, ns, "second") == "Succeeded", timeout=180, desc="second Succeeded"
    )
    # Kueue's own story, in the Workload's Events: why it waited, then its admission.
    name = waiting["metadata"]["name"]
    selector = f"involvedObject.kind=Workload,involvedObject.name={name}"
    events = testbed.kubectl_json("get", "events", "-n", ns, "--field-selector", selector)
    told = {(e["reason"], e["type"]): e["message"] for e in events["items"]}
    assert SHORTFALL in told[("Pending", "Warning")]
    assert "Admitted by ClusterQueue gpus" in told[("Admitted", "Normal")]


@both_children
def test_pods_that_never_become_ready_are_evicted_and_requeued(queued: Any) -> None:
    testbed, ns = queued.testbed, queued.namespace
    job = job16("stuck", {"testbed.finetune.dev/pending": "true"})
    assert testbed.apply(job, "-n", ns).returncode == 0
    testbed.wait_for(lambda: admitted(testbed, ns, "stuck"), timeout=120, desc="stuck admitted")
    testbed.wait_for(lambda: pods(testbed, ns, "stuck"), timeout=60, desc="its pods")

    wl = testbed.wait_for(
        lambda: evictions(wl := workload(testbed, ns, "stuck")) and wl,
        timeout=120,
        desc="a PodsReadyTimeout eviction",
    )
    assert wl["status"]["requeueState"]["count"] >= 1, wl["status"]
    # Requeued and admitted again after the backoff: its pods are placed anew, never half.
    testbed.wait_for(lambda: admitted(testbed, ns, "stuck"), timeout=90, desc="re-admitted")
    assert phase(testbed, ns, "stuck") != "Failed"


@both_children
def test_deleting_queued_and_running_jobs_takes_their_children_and_frees_quota(
    queued: Any,
) -> None:
    testbed, ns = queued.testbed, queued.namespace
    start_holder(testbed, ns)
    assert testbed.apply(job16("waiting", HOUR), "-n", ns).returncode == 0
    wait_short_of_quota(testbed, ns, "waiting")

    # Deleted while queued: its suspended PyTorchJob and Kueue's Workload go with it.
    testbed.kubectl("delete", "ftj", "waiting", "-n", ns, "--wait=true", check=True)
    testbed.wait_for(
        lambda: (
            get(testbed, CHILD[0].resource, ns, "waiting") is None
            and workload(testbed, ns, "waiting") is None
        ),
        timeout=120,
        desc="waiting's PyTorchJob and Workload gone",
    )
    assert suspended(testbed, ns, "holder") is False  # the admitted one is untouched
    assert admitted(testbed, ns, "holder")

    # Deleted while running: its pods and Workload go, and its quota admits the next job.
    assert testbed.apply(job16("next", HOUR), "-n", ns).returncode == 0
    wait_short_of_quota(testbed, ns, "next")
    testbed.kubectl("delete", "ftj", "holder", "-n", ns, "--wait=true", check=True)
    testbed.wait_for(
        lambda: workload(testbed, ns, "holder") is None and not pods(testbed, ns, "holder"),
        timeout=120,
        desc="holder's children gone",
    )
    testbed.wait_for(lambda: admitted(testbed, ns, "next"), timeout=120, desc="next admitted")
    testbed.wait_for(
        lambda: suspended(testbed, ns, "next") is False, timeout=60, desc="next unsuspended"
    )


# --------------------------------------------------------------------------- the operator's side


@both_children
def test_a_job_short_of_quota_is_queued_with_kueues_reason(queued: Any) -> None:
    testbed, ns = queued.testbed, queued.namespace
    start_holder(testbed, ns)
    assert testbed.apply(job16("queued", HOUR), "-n", ns).returncode == 0
    wait_short_of_quota(testbed, ns, "queued")
    testbed.wait_for(
        lambda: phase(testbed, ns, "queued") == "Queued", timeout=10, desc="phase Queued"
    )
    reserved = ftj_condition(testbed, ns, "queued", "QuotaReserved")
    assert reserved["status"] == "False"
    assert reserved["reason"] == "Pending"
    assert SHORTFALL in reserved["message"]
    assert "Queued" in testbed.kubectl("get", "ftj", "queued", "-n", ns).stdout
    # The plan is computed and shown before admission.
    assert (get(testbed, "ftj", ns, "queued") or {})["status"]["plan"]["summary"]
    holder = ftj_condition(testbed, ns, "holder", "Admitted")
    assert holder["status"] == "True"


@both_children
def test_a_pods_ready_eviction_is_reported_in_status(queued: Any) -> None:
    testbed, ns = queued.testbed, queued.namespace
    job = job16("stuck", {"testbed.finetune.dev/pending": "true"})
    assert testbed.apply(job, "-n", ns).returncode == 0
    testbed.wait_for(
        lambda: evictions(workload(testbed, ns, "stuck")), timeout=90, desc="Kueue's eviction"
    )
    testbed.wait_for(
        lambda: ftj_condition(testbed, ns, "stuck", "Evicted").get("reason") == "PodsReadyTimeout",
        timeout=10,
        desc="Evicted (PodsReadyTimeout) on the FineTuneJob",
    )
    events = testbed.kubectl(
        "get", "events", "-n", ns, "--field-selector", "involvedObject.kind=FineTuneJob"
    ).stdout
    assert "Evicted" in events


@both_children
def test_a_user_suspending_a_queued_job_neither_fights_kueue_nor_gets_admitted(
    queued: Any,
) -> None:
    testbed, ns = queued.testbed, queued.namespace
    start_holder(testbed, ns)
    assert testbed.apply(job16("paused", HOUR), "-n", ns).returncode == 0
    wait_short_of_quota(testbed, ns, "paused")
    before = get(testbed, CHILD[0].resource, ns, "paused")
    assert before is not None
    patch = json.dumps({"spec": {"runPolicy": {"suspend": True}}})
    testbed.kubectl("patch", "ftj", "paused", "-n", ns, "--type=merge", "-p", patch, check=True)
    time.sleep(8)  # the operator reconciles the change; Kueue sees the job
    after = get(testbed, CHILD[0].resource, ns, "paused")
    assert after is not None
    # (1) Nobody rewrote the child: it was never unsuspended (and suspended again by Kueue).
    assert after["metadata"]["generation"] == before["metadata"]["generation"]
    assert suspended(testbed, ns, "paused") is True
    # (2) Freed quota does not start a job its user suspended.
    testbed.kubectl("delete", "ftj", "holder", "-n", ns, "--wait=true", check=True)
    testbed.wait_for(
        lambda: workload(testbed, ns, "holder") is None, timeout=120, desc="holder gone"
    )
    time.sleep(8)  # Kueue would admit it within a second or two
    assert not admitted(testbed, ns, "paused")
    assert suspended(testbed, ns, "paused") is True
    assert phase(testbed, ns, "paused") == "Suspended"


@both_children
def test_a_job_queued_by_the_namespaces_default_local_queue_is_left_to_kueue(
    queued: Any,
) -> None:
    testbed, ns = queued.testbed, queued.namespace
    start_holder(testbed, ns)
    job = job16("defaulted", HOUR)
    del job["spec"]["scheduling"]
    assert testbed.apply(job, "-n", ns).returncode == 0
    waiting = wait_short_of_quota(testbed, ns, "defaulted")
    assert waiting["spec"]["queueName"] == "default"  # Kueue's LocalQueue defaulting
    before = get(testbed, CHILD[0].resource, ns, "defaulted")
    assert before is not None
    assert before["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "default"
    patch = json.dumps({"spec": {"hyperparameters": {"maxSteps": 61}}})
    testbed.kubectl("patch", "ftj", "defaulted", "-n", ns, "--type=merge", "-p", patch, check=True)
    time.sleep(8)  # the operator applies the change
    after = get(testbed, CHILD[0].resource, ns, "defaulted")
    assert after is not None
    # maxSteps lives in the trainer's ConfigMap: the child's spec has nothing to change, and
    # nobody unsuspended it (and Kueue suspended it again).
    assert after["metadata"]["generation"] == before["metadata"]["generation"]
    assert suspended(testbed, ns, "defaulted") is True


@pytest.fixture
def fake_trainer(queued: Any) -> Any:
    """The test bed's fake trainer serves the master pods' metrics (added in place), and the
    namespace has the claim the jobs checkpoint to (the test bed's default StorageClass)."""
    testbed = queued.testbed
    if testbed.external:
        pytest.skip("the fake trainer's metrics are the test bed's")
    up = subprocess.run(
        [sys.executable, str(ROOT / "hack" / "cluster"), "up", "--trainer-metrics"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert up.returncode == 0, up.stderr
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "finetune-checkpoints"},
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    assert testbed.apply(claim, "-n", queued.namespace).returncode == 0
    return queued


def status_of(testbed: Any, ns: str, name: str) -> dict[str, Any]:
    return dict((get(testbed, "ftj", ns, name) or {}).get("status") or {})


@both_children
def test_a_preempted_job_is_requeued_and_resumes_from_its_checkpoint(fake_trainer: Any) -> None:
    """low (priority low) runs on all 16 GPUs and checkpoints every 5 steps; high (priority
    high) preempts it: low says Preempted and Queued, high runs to Succeeded, and low is admitted
    again, goes on from its last checkpoint's step (never from step 0) and succeeds."""
    testbed, ns = fake_trainer.testbed, fake_trainer.namespace
    low = job16(
        "low",
        {"testbed.finetune.dev/run-duration": "60s", "testbed.finetune.dev/total-steps": "60"},
        scheduling={"queueName": "default", "priority": "low"},
        checkpoint={"storage": "pvc://finetune-checkpoints/low", "everySteps": 5},
    )
    assert testbed.apply(low, "-n", ns).returncode == 0
    saved = testbed.wait_for(
        lambda: (status_of(testbed, ns, "low").get("checkpoint") or {}).get("step", 0) >= 10,
        timeout=120,
        desc="low's checkpoint at step 10",
        explain=lambda: (status_of(testbed, ns, "low"), pod_story(testbed, ns, "low")),
    )
    assert saved
    high = job16(
        "high",
        {"testbed.finetune.dev/run-duration": "15s"},
        scheduling={"queueName": "default", "priority": "high"},
    )
    assert testbed.apply(high, "-n", ns).returncode == 0
    testbed.wait_for(
        lambda: ftj_condition(testbed, ns, "low", "Preempted").get("status") == "True",
        timeout=60,
        desc="low Preempted",
    )
    preempted = ftj_condition(testbed, ns, "low", "Preempted")
    assert preempted["reason"] == "InClusterQueue", preempted
    assert "prioritization" in preempted["message"]
    checkpoint = status_of(testbed, ns, "low")["checkpoint"]["step"]
    assert checkpoint >= 10
    testbed.wait_for(lambda: phase(testbed, ns, "low") == "Queued", timeout=30, desc="Queued")
    testbed.wait_for(
        lambda: phase(testbed, ns, "high") == "Succeeded", timeout=120, desc="high Succeeded"
    )

    # Admitted again: it goes on from its checkpoint, and every step it reports is past it.
    steps: list[int] = []

    def resumed_and_done() -> bool:
        status = status_of(testbed, ns, "low")
        if status.get("phase") == "Running" and admitted(testbed, ns, "low"):
            step = (status.get("progress") or {}).get("step")
            if step is not None:
                steps.append(step)
        return status.get("phase") == "Succeeded"

    testbed.wait_for(resumed_and_done, timeout=150, interval=0.5, desc="low resumed, Succeeded")
    assert steps, "no progress seen after low was admitted again"
    assert min(steps) >= checkpoint, (checkpoint, steps)
    assert status_of(testbed, ns, "low")["progress"]["step"] == 60
    told = testbed.kubectl(
        "get", "events", "-n", ns, "--field-selector", "involvedObject.name=low"
    ).stdout
    assert "Preempted" in told
    assert "Queued" in told
