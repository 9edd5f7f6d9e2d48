"""The controller against a real API server, with no operator process and no fakes.

Each test calls :mod:`finetune_operator.controller` with the real client (:class:`Kube`) on the
test bed's kube-apiserver (our CRD installed, the PyTorchJob CRD installed by the test bed) and
checks what the controller wrote there. The Kubeflow training-operator may or may not be running
(``FINETUNE_TESTBED=api`` starts only etcd and kube-apiserver): no test depends on what it does.
Where a test needs a PyTorchJob in a given state it plays the training-operator's part itself,
on a PyTorchJob marked ``runPolicy.managedBy: kueue.x-k8s.io/multikueue``, which a running
training-operator leaves alone (as it does for MultiKueue).
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import config
from kubernetes.dynamic.exceptions import DynamicApiError

from finetune_operator import api, controller, manifest, story
from finetune_operator.children import PYTORCHJOB_CHILD
from finetune_operator.kube import EventLanes, Kube, Scraper
from finetune_operator.objects import Pod
from finetune_operator.plan import plan_job, plan_status
from finetune_trainer import metrics as trainer_metrics
from helpers import ROOT, load_yaml

pytestmark = pytest.mark.integration

IMAGE = "finetune-trainer:test"
#: A training-operator running in the test bed leaves PyTorchJobs with this manager alone.
EXTERNAL = "kueue.x-k8s.io/multikueue"


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def kube(crd: Any) -> Kube:
    """The operator's own client, on the test bed."""
    return Kube(config.new_client_from_config(config_file=crd.kubeconfig))


def create_job(testbed: Any, kube: Kube, namespace: str, name: str) -> api.FineTuneJob:
    """The offline example, created by a user (kubectl) and read back as the operator reads it."""
    document = load_yaml(ROOT / "examples" / "tiny-local.yaml")
    document["metadata"] = {"name": name, "namespace": namespace}
    created = testbed.apply(document)
    assert created.returncode == 0, created.stderr
    return read(kube, namespace, name)


def read(kube: Kube, namespace: str, name: str) -> api.FineTuneJob:
    found = kube.finetunejob(namespace, name)
    assert found is not None, f"FineTuneJob {namespace}/{name} is gone"
    return api.parse(found)


def write_status(testbed: Any, kind: str, namespace: str, name: str, status: Any) -> None:
    """Another writer (kubectl) changes an object's status through the status subresource."""
    patched = testbed.kubectl(
        "patch", kind, name, "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": status}),
    )  # fmt: skip
    assert patched.returncode == 0, patched.stderr


def external_child(testbed: Any, job: api.FineTuneJob) -> None:
    """The job's PyTorchJob, created (as MultiKueue would) for a training-operator to leave alone:
    the test then writes its status, as the training-operator would."""
    child = manifest.pytorch_job(job, image=IMAGE, plan_summary=None, exists=False)
    child["spec"]["runPolicy"]["managedBy"] = EXTERNAL
    applied = testbed.kubectl(
        "apply", "--server-side", "--field-manager=test-multikueue", "-f", "-",
        input=json.dumps(child),
    )  # fmt: skip
    assert applied.returncode == 0, applied.stderr


def child_conditions(testbed: Any, job: api.FineTuneJob, *types: str, message: str = "") -> None:
    conditions = [
        {"type": t, "status": "True", "reason": f"PyTorchJob{t}", "message": message} for t in types
    ]
    status = {"conditions": conditions, "replicaStatuses": {"Master": {}}}
    write_status(testbed, "pytorchjob", job.metadata.namespace or "", job.name, status)


def make_pod(
    testbed: Any, job: api.FineTuneJob, name: str, replica: str, status: dict[str, Any]
) -> Pod:
    """A pod of the job's PyTorchJob, with the labels the training-operator sets, that no
    scheduler or kubelet touches (its scheduler does not exist): the test writes its status."""
    namespace = job.metadata.namespace or ""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                "training.kubeflow.org/job-name": job.name,
                "training.kubeflow.org/replica-type": replica,
                manifest.JOB_LABEL: job.name,
            },
        },
        "spec": {
            "schedulerName": "nobody",
            "containers": [{"name": manifest.CONTAINER, "image": IMAGE}],
        },
    }
    created = testbed.apply(pod)
    assert created.returncode == 0, created.stderr
    write_status(testbed, "pod", namespace, name, status)
    return Pod.parse(testbed.kubectl_json("get", "pod", name, "-n", namespace))


def container(**state: Any) -> dict[str, Any]:
    return {"name": manifest.CONTAINER, "image": IMAGE, "ready": False, "restartCount": 1,
            "imageID": "", **state}  # fmt: skip


OOM_RESTARTING = {
    "phase": "Running",
    "containerStatuses": [
        container(
            state={"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s"}},
            lastState={
                "terminated": {
                    "exitCode": 137,
                    "reason": "OOMKilled",
                    "startedAt": "2026-01-01T00:00:00Z",
                    "finishedAt": "2026-01-01T00:01:00Z",
                }
            },
        )
    ],
}


# --------------------------------------------------------------------------- status before children


@pytest.fixture
def no_pytorchjobs(crd: Any, namespace: str) -> Iterator[str]:
    """An admission policy that refuses every PyTorchJob in ``namespace`` (so the controller's
    children cannot be made); its message."""
    name = f"no-pytorchjobs-{namespace}"
    message = f"test policy: no PyTorchJobs in {namespace}"
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                "resourceRules": [
                    {
                        "apiGroups": ["kubeflow.org"],
                        "apiVersions": ["*"],
                        "operations": ["CREATE", "UPDATE"],
                        "resources": ["pytorchjobs"],
                    }
                ],
            },
            "validations": [{"expression": "false", "message": message, "reason": "Forbidden"}],
        },
    }
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {"policyName": name, "validationActions": ["Deny"]},
    }
    applied = crd.apply([policy, binding])
    assert applied.returncode == 0, applied.stderr
    probe = {
        "apiVersion": manifest.PYTORCHJOB_API_VERSION,
        "kind": manifest.PYTORCHJOB_KIND,
        "metadata": {"name": "probe", "namespace": namespace},
        "spec": {"pytorchReplicaSpecs": {"Master": {"replicas": 1, "template": {"spec": {
            "containers": [{"name": manifest.CONTAINER, "image": IMAGE}]}}}}},
    }  # fmt: skip
    crd.wait_for(
        lambda: (
            message
            in crd.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(probe)).stderr
        ),
        timeout=60,
        interval=0.5,
        desc="the admission policy to take effect",
    )
    yield message
    crd.kubectl("delete", "validatingadmissionpolicybinding,validatingadmissionpolicy", name)


def test_status_and_plan_are_written_before_any_child(
    crd: Any, kube: Kube, namespace: str, no_pytorchjobs: str
) -> None:
    job = create_job(crd, kube, namespace, "first-status")
    with pytest.raises(DynamicApiError) as refused:
        controller.reconcile(kube, job, image=IMAGE)
    assert no_pytorchjobs in str(refused.value)  # the PyTorchJob was refused ...
    stored = read(kube, namespace, job.name)
    assert stored.status is not None  # ... and by then the status was written, with the plan
    result = plan_job(job.spec)
    assert result is not None
    assert stored.status.plan == plan_status(result)
    assert stored.status.phase == "Planned"
    assert stored.status.pytorch_job is None
    assert kube.child(PYTORCHJOB_CHILD, namespace, job.name) is None


# --------------------------------------------------------------------------- terminal phases


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_children_are_never_recreated_after_a_terminal_phase(
    crd: Any, kube: Kube, namespace: str, phase: str
) -> None:
    job = create_job(crd, kube, namespace, f"done-{phase.lower()}")
    controller.reconcile(kube, job, image=IMAGE)
    assert kube.child(PYTORCHJOB_CHILD, namespace, job.name) is not None
    config_map = manifest.config_map_name(job.name)
    assert kube.get("v1", "ConfigMap", namespace, config_map) is not None
    write_status(crd, "ftj", namespace, job.name, {"phase": phase})  # as a refresh would
    deleted = crd.kubectl(
        "delete", "pytorchjob/" + job.name, "configmap/" + config_map, "-n", namespace
    )
    assert deleted.returncode == 0, deleted.stderr
    finished = read(kube, namespace, job.name)

    assert controller.reconcile(kube, finished, image=IMAGE) == []

    assert kube.child(PYTORCHJOB_CHILD, namespace, job.name) is None
    assert kube.get("v1", "ConfigMap", namespace, config_map) is None
    assert read(kube, namespace, job.name).status == finished.status


# --------------------------------------------------------------------------- write conflicts


class RacingKube(Kube):
    """The real client, raced by a second real writer: right after each of the controller's first
    ``races`` reads of the FineTuneJob, ``other_writer`` changes that job's status, so the copy
    the controller just read is stale before it can write. (It counts reads and writes.)"""

    def __init__(self, kubeconfig: str, other_writer: Callable[[int], None], races: int) -> None:
        super().__init__(config.new_client_from_config(config_file=kubeconfig))
        self.other_writer, self.races = other_writer, races
        self.reads = self.writes = 0

    def finetunejob(self, namespace: str, name: str) -> dict[str, Any] | None:
        document = super().finetunejob(namespace, name)
        self.reads += 1
        if self.reads <= self.races:
            self.other_writer(self.reads)
        return document

    def replace_status(self, document: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
        self.writes += 1
        return super().replace_status(document, status)


def _progress_writer(testbed: Any, job: api.FineTuneJob) -> Callable[[int], None]:
    """The other writer: the progress scrape of another worker thread, setting step 100 + n."""

    def write(n: int) -> None:
        write_status(
            testbed, "ftj", job.metadata.namespace or "", job.name, {"progress": {"step": 100 + n}}
        )

    return write


def test_a_status_write_that_loses_a_race_recomputes_from_a_fresh_read_and_wins(
    crd: Any, kube: Kube, namespace: str
) -> None:
    job = create_job(crd, kube, namespace, "raced")
    other = _progress_writer(crd, job)
    other(0)  # the copy the controller is handed is stale already
    races = controller.ATTEMPTS - 2  # then it loses this many more: its last attempt wins
    racing = RacingKube(crd.kubeconfig, other, races)

    outcomes = controller.reconcile(racing, job, image=IMAGE)

    stored = read(kube, namespace, job.name)
    assert stored.status is not None
    assert stored.status.progress is not None
    assert stored.status.progress.step == 100 + races  # the other writer's last change is kept
    result = plan_job(job.spec)
    assert result is not None
    assert stored.status.plan == plan_status(result)  # and the controller's is there too
    assert outcomes[0].changed
    assert outcomes[0].status.progress == stored.status.progress
    assert racing.reads == races + 1
    # every lost race cost one write; then one write of the plan and the child together
    assert racing.writes == (races + 1) + 1


def test_a_status_write_that_keeps_losing_gives_up_after_attempts(
    crd: Any, kube: Kube, namespace: str
) -> None:
    job = create_job(crd, kube, namespace, "outraced")
    other = _progress_writer(crd, job)
    other(0)
    racing = RacingKube(crd.kubeconfig, other, races=10 * controller.ATTEMPTS)

    with pytest.raises(controller.WriteConflictError, match="kept changing"):
        controller.reconcile(racing, job, image=IMAGE)

    assert racing.writes == controller.ATTEMPTS
    stored = read(kube, namespace, job.name)
    assert stored.status is not None
    assert stored.status.plan is None  # nothing of the controller's was written ...
    assert stored.status.progress is not None
    assert stored.status.progress.step == 100 + racing.reads  # ... nor lost of the other's
    # The child was applied (its status write is what gave up): kopf's retry converges, with
    # the other writer's progress still there.
    controller.reconcile(kube, stored, image=IMAGE)
    settled = read(kube, namespace, job.name).status
    assert settled is not None
    assert settled.plan is not None
    assert settled.pytorch_job is not None
    assert settled.pytorch_job.uid == kube.child(PYTORCHJOB_CHILD, namespace, job.name).uid
    assert settled.progress == stored.status.progress


# --------------------------------------------------------------------------- refresh


def _running(crd: Any, kube: Kube, namespace: str, name: str) -> api.FineTuneJob:
    """A reconciled job whose PyTorchJob the test plays, with its condition Running."""
    job = create_job(crd, kube, namespace, name)
    external_child(crd, job)
    controller.reconcile(kube, job, image=IMAGE)
    child_conditions(crd, job, "Created", "Running")
    return read(kube, namespace, name)


def test_refresh_derives_status_from_the_child_and_its_pods(
    crd: Any, kube: Kube, namespace: str
) -> None:
    job = _running(crd, kube, namespace, "refreshed")
    assert job.status is not None
    assert job.status.phase == "Pending"  # the child had no conditions at reconcile
    make_pod(crd, job, f"{job.name}-master-0", "master", OOM_RESTARTING)

    outcomes = controller.refresh(kube, job)

    stored = read(kube, namespace, job.name)
    assert [o.after for o in outcomes] == ["Running"]
    assert stored.status is not None
    assert stored.status.phase == "Running"
    assert stored.status.start_time is not None
    child = kube.child(PYTORCHJOB_CHILD, namespace, job.name)
    assert child is not None
    assert stored.status.pytorch_job is not None
    assert (stored.status.pytorch_job.name, stored.status.pytorch_job.uid) == (job.name, child.uid)
    failure = stored.status.failure  # the restarting master says why
    assert failure is not None
    assert (failure.reason, failure.exit_code, failure.pod) == (
        "OOMKilled",
        137,
        f"{job.name}-master-0",
    )
    running = next(c for c in stored.status.conditions or [] if c.type == "Running")
    assert (running.status, running.reason) == ("True", "OOMKilled")


def test_refresh_learns_why_a_failed_job_failed_from_a_pod_that_is_gone(
    crd: Any, kube: Kube, namespace: str
) -> None:
    job = _running(crd, kube, namespace, "late-pod")
    pod = make_pod(crd, job, f"{job.name}-master-0", "master", OOM_RESTARTING)
    deleted = crd.kubectl("delete", "pod", pod.name, "-n", namespace, "--grace-period=0")
    assert deleted.returncode == 0, deleted.stderr
    backoff = "PyTorchJob late-pod has failed because it has reached the specified backoff limit"
    child_conditions(crd, job, "Created", "Failed", message=backoff)

    failed = controller.refresh(kube, job)  # the child's event: the pod is gone

    job = read(kube, namespace, job.name)
    assert [o.after for o in failed] == ["Failed"]
    assert job.status is not None
    assert job.status.failure is not None
    assert job.status.failure.reason == "BackoffLimitExceeded"
    assert controller.refresh(kube, job) == []  # a finished job: nothing more to read

    refined = controller.refresh(kube, job, seen=pod)  # the pod's deletion event, late

    stored = read(kube, namespace, job.name)
    assert refined[0].changed
    assert stored.status is not None
    assert stored.status.phase == "Failed"
    assert stored.status.failure is not None
    assert (stored.status.failure.reason, stored.status.failure.exit_code) == ("OOMKilled", 137)
    failed_condition = next(c for c in stored.status.conditions or [] if c.type == "Failed")
    assert failed_condition.reason == "OOMKilled"


def test_the_sweep_learns_why_a_failed_job_failed_when_the_pod_event_came_too_early(
    crd: Any, kube: Kube, namespace: str
) -> None:
    """The pod's own end can reach the operator before its child fails (that event's refresh
    sees a job still running); the child's failure then says only "backoff limit". The progress
    sweep's visit, with the pods as the watch has them, tells the pod's reason, and a visit with
    nothing more to tell writes nothing."""
    job = _running(crd, kube, namespace, "early-pod")
    pod = make_pod(crd, job, f"{job.name}-master-0", "master", OOM_RESTARTING)
    backoff = "PyTorchJob early-pod has failed because it has reached the specified backoff limit"
    child_conditions(crd, job, "Created", "Failed", message=backoff)
    child = controller.look(kube, job).child
    assert child is not None
    # the child's event, the pod's state not in the watch yet
    controller.refresh(kube, job, sight=controller.Sight(child, ()))
    job = read(kube, namespace, job.name)
    assert job.status is not None
    assert job.status.failure is not None
    assert job.status.failure.reason == "BackoffLimitExceeded"
    version = job.metadata.resource_version
    assert controller.refresh(kube, job, sight=controller.Sight(child, ())) == []
    assert read(kube, namespace, job.name).metadata.resource_version == version  # no write

    visited = controller.refresh(kube, job, sight=controller.Sight(child, (pod,)))

    stored = read(kube, namespace, job.name)
    assert visited[0].changed
    assert stored.status is not None
    assert stored.status.failure is not None
    assert (stored.status.failure.reason, stored.status.failure.exit_code) == ("OOMKilled", 137)


# --------------------------------------------------------------------------- progress


@pytest.fixture
def trainer_endpoints() -> Iterator[Callable[[str, int, int], int]]:
    """Serve the trainer's own /metrics (its real registry and HTTP server) on a loopback
    address; ``serve(address, steps, port)`` returns the port (0: pick a free one)."""
    served: list[trainer_metrics.TrainerMetrics] = []

    def serve(address: str, steps: int, port: int) -> int:
        m = trainer_metrics.create("test", "test")
        m.steps.inc(steps)
        m.progress.set(steps / 1000)
        m.loss.set(1.23456)
        m.tokens.inc(2000 * steps)
        for _ in range(steps):
            m.step_duration.observe(2.0)
        m.checkpoint_last_step.set(400)
        m.checkpoint_last_save.set(1.7956512e9)
        trainer_metrics.serve(m, port, addr=address)
        served.append(m)
        assert m.port is not None
        return m.port

    yield serve
    for m in served:
        m.close()


def _with_ip(ip: str) -> dict[str, Any]:
    return {
        "phase": "Running",
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "containerStatuses": [
            container(state={"running": {"startedAt": "2026-01-01T00:00:00Z"}}, ready=True)
        ],
    }


def test_scrape_progress_reads_the_master_pod_s_metrics_into_status(
    crd: Any, kube: Kube, namespace: str, trainer_endpoints: Callable[[str, int, int], int]
) -> None:
    job = create_job(crd, kube, namespace, "scraped")
    write_status(crd, "ftj", namespace, job.name, {"phase": "Running"})  # as a refresh would
    job = read(kube, namespace, job.name)
    port = trainer_endpoints("127.0.0.1", 450, 0)
    trainer_endpoints("127.0.0.2", 7, port)  # a worker, on the same port: not what to read
    make_pod(crd, job, f"{job.name}-a-worker-0", "worker", _with_ip("127.0.0.2"))  # listed first
    make_pod(crd, job, f"{job.name}-master-0", "master", _with_ip("127.0.0.1"))

    outcomes = scrape(kube, job, port)

    assert [o.changed for o in outcomes] == [True]
    stored = read(kube, namespace, job.name)
    assert stored.status is not None
    assert stored.status.phase == "Running"
    progress = stored.status.progress
    assert progress is not None
    assert (progress.step, progress.total_steps, progress.percent) == (450, 1000, 45)
    assert (progress.loss, progress.tokens_per_second, progress.eta_seconds) == (
        "1.2346",
        1000,
        1100,
    )
    assert stored.status.checkpoint is not None
    assert stored.status.checkpoint.step == 400
    assert stored.status.checkpoint.latest == (
        "file:///tmp/finetune-runs/tiny-local/checkpoints/step-00000400"
    )


def test_scrape_progress_writes_nothing_while_the_job_is_not_running(
    crd: Any, kube: Kube, namespace: str, trainer_endpoints: Callable[[str, int, int], int]
) -> None:
    job = create_job(crd, kube, namespace, "not-yet")
    write_status(crd, "ftj", namespace, job.name, {"phase": "Pending"})
    job = read(kube, namespace, job.name)
    port = trainer_endpoints("127.0.0.1", 450, 0)
    make_pod(crd, job, f"{job.name}-master-0", "master", _with_ip("127.0.0.1"))

    assert scrape(kube, job, port) == []
    assert read(kube, namespace, job.name).status == job.status


def test_a_master_that_does_not_answer_costs_the_others_nothing(
    trainer_endpoints: Callable[[str, int, int], int],
) -> None:
    """Eight masters that accept the connection but never answer, scraped together with one
    that answers: the answering one is read first, as if alone; each silent one gives None once
    its timeout is up (the operator's progress timer awaits them: no thread is held)."""
    port = trainer_endpoints("127.0.0.1", 450, 0)
    silent = socket.socket()
    silent.bind(("127.0.0.3", 0))
    silent.listen(16)  # accepts, never answers
    quiet = [Pod(f"q-{i}", pod_ip="127.0.0.3") for i in range(8)]
    answering = Pod("a", pod_ip="127.0.0.1")
    done: list[str] = []

    async def scrape_all() -> list[str | None]:
        scraper = Scraper(concurrency=16, timeout=1.0)

        async def one(pod: Pod, at: int) -> str | None:
            text = await scraper.metrics(pod, at)
            done.append(pod.name)
            return text

        texts = await asyncio.gather(
            *(one(p, silent.getsockname()[1]) for p in quiet), one(answering, port)
        )
        await scraper.close()
        return list(texts)

    try:
        texts = asyncio.run(scrape_all())
    finally:
        silent.close()
    assert done[0] == "a", done
    assert texts[:-1] == [None] * 8
    assert texts[-1] is not None
    assert "finetune_train_steps_total 450.0" in texts[-1]


def scrape(kube: Kube, job: api.FineTuneJob, port: int) -> list[controller.Outcome]:
    """What the progress timer does: the job's pods, its master's metrics, the status write."""
    pods = kube.pods(PYTORCHJOB_CHILD, job.metadata.namespace or "", job.name)
    master = controller.master(pods)
    text = asyncio.run(_fetch(master, port)) if master else None
    return controller.scrape_progress(kube, job, pods, text)


async def _fetch(pod: Pod, port: int) -> str | None:
    scraper = Scraper()
    try:
        return await scraper.metrics(pod, port)
    finally:
        await scraper.close()


# --------------------------------------------------------------------------- recovering


MISSING_CLAIM = (
    '0/3 nodes are available: persistentvolumeclaim "finetune-checkpoints" not found. '
    "preemption: 0/3 nodes are available: 3 Preemption is not helpful for scheduling."
)  # what kube-scheduler says of a pod whose claim does not exist (seen on the test bed)
UNSCHEDULED = {
    "phase": "Pending",
    "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": MISSING_CLAIM},
    ],
}  # fmt: skip


def test_a_failure_is_cleared_when_the_job_recovers_and_succeeds(
    crd: Any, kube: Kube, namespace: str
) -> None:
    job = _running(crd, kube, namespace, "recovers")
    child_conditions(crd, job, "Created")
    make_pod(crd, job, f"{job.name}-master-0", "master", UNSCHEDULED)

    controller.refresh(kube, job)

    stuck = read(kube, namespace, job.name)
    assert stuck.status is not None
    assert stuck.status.phase == "Pending"
    assert stuck.status.failure is not None
    assert stuck.status.failure.reason == "PersistentVolumeClaimMissing"
    assert "create a PersistentVolumeClaim named finetune-checkpoints" in (
        stuck.status.failure.message
    )
    wide = crd.kubectl("get", "ftj", job.name, "-n", namespace, "-o", "wide")
    assert wide.returncode == 0, wide.stderr
    header, row = wide.stdout.splitlines()
    assert header.split()[-2:] == ["AGE", "MESSAGE"]
    assert "PersistentVolumeClaimMissing" in row
    assert "create a PersistentVolumeClaim named finetune-checkpoints" in row
    assert "MESSAGE" not in crd.kubectl("get", "ftj", job.name, "-n", namespace).stdout

    # The user creates the claim: the pod is scheduled and runs, the job runs, then succeeds.
    write_status(crd, "pod", namespace, f"{job.name}-master-0", {
        **_with_ip("127.0.0.1"), "conditions": [{"type": "PodScheduled", "status": "True"}],
    })  # fmt: skip
    child_conditions(crd, job, "Created", "Running")
    controller.refresh(kube, stuck)
    running = read(kube, namespace, job.name)
    assert running.status is not None
    assert (running.status.phase, running.status.failure) == ("Running", None)

    child_conditions(crd, job, "Created", "Succeeded")
    controller.refresh(kube, running)
    done = read(kube, namespace, job.name)
    assert done.status is not None
    assert (done.status.phase, done.status.failure) == ("Succeeded", None)
    columns = crd.kubectl("get", "ftj", job.name, "-n", namespace, "-o", "wide").stdout
    assert "PersistentVolumeClaimMissing" not in columns


# --------------------------------------------------------------------------- events


def _reasons(events: list[Any]) -> list[str]:
    return [e.reason for e in events]


def test_events_are_this_job_s_own_in_the_order_it_went(
    crd: Any, kube: Kube, namespace: str
) -> None:
    def lived(name: str) -> tuple[api.FineTuneJob, list[bool]]:
        """A job reconciled (its Events told as the operator tells them); for each write,
        whether the controller had applied the children (its ConfigMap first) when its Events
        were told."""
        job = create_job(crd, kube, namespace, name)
        external_child(crd, job)
        kube_children: list[bool] = []
        config_map = manifest.config_map_name(name)

        def told(outcome: controller.Outcome) -> None:
            applied = kube.get("v1", "ConfigMap", namespace, config_map) is not None
            kube_children.append(applied)
            story.announce(kube, job.to_document(), outcome)

        controller.reconcile(kube, job, image=IMAGE, on_write=told)
        return read(kube, namespace, name), kube_children

    first, _ = lived("again")
    deleted = crd.kubectl("delete", "ftj", "again", "-n", namespace, "--wait=true")
    assert deleted.returncode == 0, deleted.stderr
    for child in ("pytorchjob/again", f"configmap/{manifest.config_map_name('again')}"):
        crd.kubectl("delete", child, "-n", namespace, "--wait=true")  # no garbage collector
    job, children = lived("again")
    assert job.metadata.uid != first.metadata.uid
    # One status write, after the children were applied (the plan and the child together),
    # told as Planned then Pending.
    assert children == [True]
    child_conditions(crd, job, "Created", "Succeeded")  # no refresh saw it Running
    for outcome in controller.refresh(kube, job):
        story.announce(kube, job.to_document(), outcome)

    mine = kube.events(namespace, job.metadata.uid or "")
    assert _reasons(mine) == ["Planned", "Pending", "Running", "Succeeded"]
    assert _reasons(kube.events(namespace, first.metadata.uid or "")) == ["Planned", "Pending"]

    described = subprocess.run(
        [str(Path(sys.executable).parent / "finetune"), "describe", "again", "-n", namespace],
        capture_output=True, text=True, env=crd.env(COLUMNS="200"), timeout=60, check=False,
    )  # fmt: skip
    assert described.returncode == 0, described.stderr
    events = described.stdout.split("Events", 1)[1].splitlines()
    told = [line.split()[1] for line in events if line.split()[:1] == ["Normal"]]
    assert told == ["Planned", "Pending", "Running", "Succeeded"], described.stdout


def test_events_sent_off_the_thread_keep_each_jobs_order_and_a_failure_is_only_logged(
    crd: Any, kube: Kube, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The operator tells Events through EventLanes (its reconciles do not wait on them): each
    job's Events arrive in the order told, stamped when told; one the API server refuses is
    logged, never raised; close() sends everything queued first."""
    jobs = [create_job(crd, kube, namespace, f"told-{i}").to_document() for i in range(4)]
    lanes = EventLanes(kube, lanes=2)
    reasons = [f"Step{n}" for n in range(6)]
    for reason in reasons:
        for job in jobs:
            lanes.event(job, "Normal", reason, f"{job['metadata']['name']} {reason}")
    gone = {"metadata": {"name": "nobody", "namespace": f"no-such-{uuid.uuid4().hex[:6]}"}}
    with caplog.at_level("WARNING", logger="finetune_operator"):
        lanes.event(gone, "Warning", "Lost", "a namespace that does not exist")
        lanes.close()
    for job in jobs:
        told = kube.events(namespace, job["metadata"]["uid"])
        assert _reasons(told) == reasons
        assert all(e.message.startswith(job["metadata"]["name"]) for e in told)
    assert any("could not record Event Lost" in r.getMessage() for r in caplog.records)


def test_a_job_names_every_claim_it_misses_until_they_exist(
    crd: Any, kube: Kube, namespace: str
) -> None:
    document = load_yaml(ROOT / "examples" / "tiny-local.yaml")
    document["metadata"] = {"name": "claims", "namespace": namespace}
    document["spec"]["checkpoint"]["storage"] = "pvc://finetune-checkpoints/tiny"
    document["spec"]["output"]["storage"] = "pvc://finetune-models/tiny"
    assert crd.apply(document).returncode == 0
    job = read(kube, namespace, "claims")
    external_child(crd, job)

    controller.reconcile(kube, job, image=IMAGE)

    stuck = read(kube, namespace, "claims")
    assert stuck.status is not None
    assert stuck.status.failure is not None
    assert stuck.status.failure.reason == "PersistentVolumeClaimMissing"
    assert "finetune-checkpoints, finetune-models do not exist" in stuck.status.failure.message

    for claim in ("finetune-checkpoints", "finetune-models"):
        made = crd.apply({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": namespace},
            "spec": {"accessModes": ["ReadWriteMany"],
                     "resources": {"requests": {"storage": "1Gi"}}},
        })  # fmt: skip
        assert made.returncode == 0, made.stderr
    controller.refresh(kube, stuck)

    ready = read(kube, namespace, "claims")
    assert ready.status is not None
    assert (ready.status.phase, ready.status.failure) == ("Pending", None)


# --------------------------------------------------------------------------- gpuType from the nodes

POOL = "finetune.dev/test-pool"
#: No pod tolerates it: nothing runs on the test's own nodes.
TEST_TAINT = {"key": "finetune.dev/test-only", "effect": "NoSchedule"}
H100 = "NVIDIA-H100-80GB-HBM3"


@pytest.fixture
def gpu_pool(crd: Any) -> Iterator[Callable[..., str]]:
    """Nodes of a pool of the test's own: ``pool(*products)`` makes one Node per product,
    labelled nvidia.com/gpu.product as GPU feature discovery labels it and ``POOL=<id>``, and
    returns the id. Jobs select the pool with a nodeSelector, so the test bed's own nodes never
    count. The nodes are tainted (no pod lands on them) and carry no nvidia.com/gpu.present label
    (the test bed's checks of its own GPU nodes never see them); they go at the end."""
    made: list[str] = []

    def pool(*products: str, pool_id: str | None = None) -> str:
        pool_id = pool_id or uuid.uuid4().hex[:8]
        for product in products:
            name = f"gpu-type-test-{pool_id}-{len(made)}"
            node = {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "labels": {POOL: pool_id, "nvidia.com/gpu.product": product},
                },
                "spec": {"taints": [TEST_TAINT]},
            }
            created = crd.apply(node)
            assert created.returncode == 0, created.stderr
            made.append(name)
        return pool_id

    yield pool
    if made:
        crd.kubectl("delete", "node", *made, "--wait=false")


def job_without_gpu_type(testbed: Any, kube: Kube, namespace: str, name: str, pool: str) -> (
    api.FineTuneJob
):  # fmt: skip
    """The offline example on 2 GPUs of the nodes in ``pool``, gpuType left out."""
    document = load_yaml(ROOT / "examples" / "tiny-local.yaml")
    document["metadata"] = {"name": name, "namespace": namespace}
    resources = document["spec"]["resources"]
    del resources["gpuType"]
    resources.update(gpusPerNode=2, nodeSelector={POOL: pool})
    created = testbed.apply(document)
    assert created.returncode == 0, created.stderr
    return read(kube, namespace, name)


def node_products(child: dict[str, Any]) -> set[str]:
    pod = child["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    required = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    (term,) = required["nodeSelectorTerms"]
    by_key = {e["key"]: e["values"] for e in term["matchExpressions"]}
    return set(by_key["nvidia.com/gpu.product"])


def test_gpu_type_is_inferred_from_nodes_of_one_type_and_kept(
    crd: Any, kube: Kube, namespace: str, gpu_pool: Callable[..., str]
) -> None:
    pool = gpu_pool("NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-80GB-PCIe")
    job = job_without_gpu_type(crd, kube, namespace, "one-type", pool)

    controller.reconcile(kube, job, image=IMAGE)

    planned = read(kube, namespace, job.name)
    assert planned.status is not None
    inferred = planned.status.inferred_gpu_type
    assert inferred is not None
    assert (inferred.gpu_type, inferred.nodes) == ("A100-80GB", 2)
    assert inferred.node_products == ["NVIDIA-A100-80GB-PCIe", "NVIDIA-A100-SXM4-80GB"]
    assert planned.status.plan is not None
    assert planned.status.plan.world == 2
    conditions = {c.type: c for c in planned.status.conditions or []}
    assert conditions["Planned"].message.startswith(
        "gpuType inferred from nodes: A100-80GB (node label nvidia.com/gpu.product="
    )
    child = kube.get(manifest.PYTORCHJOB_API_VERSION, manifest.PYTORCHJOB_KIND, namespace, job.name)
    assert child is not None
    assert node_products(child) == set(manifest.gpu_node_products("A100-80GB"))
    config = kube.get("v1", "ConfigMap", namespace, manifest.config_map_name(job.name))
    assert config is not None
    assert json.loads(config["data"]["config.json"])["hardware"]["gpu_type"] == "A100-80GB"

    # An H100 node joins the pool: the job keeps the GPUs it was planned for.
    gpu_pool(H100, pool_id=pool)
    controller.reconcile(kube, planned, image=IMAGE)
    controller.refresh(kube, read(kube, namespace, job.name))
    kept = read(kube, namespace, job.name)
    assert kept.status is not None
    assert kept.status.inferred_gpu_type == inferred
    child = kube.get(manifest.PYTORCHJOB_API_VERSION, manifest.PYTORCHJOB_KIND, namespace, job.name)
    assert child is not None
    assert node_products(child) == set(manifest.gpu_node_products("A100-80GB"))


@pytest.mark.parametrize(
    ("products", "says"),
    [
        (
            (H100, "NVIDIA-A100-SXM4-40GB"),
            "the nodes that match spec.resources.nodeSelector have several GPU types",
        ),
        (("Tesla-V100-SXM2-16GB",), "nvidia.com/gpu.product=Tesla-V100-SXM2-16GB on 1 node"),
        ((), "no node that matches spec.resources.nodeSelector has the nvidia.com/gpu.product"),
    ],
    ids=["several", "unknown", "none"],
)
def test_a_job_whose_gpu_type_the_nodes_do_not_tell_waits_until_it_is_set(
    crd: Any,
    kube: Kube,
    namespace: str,
    gpu_pool: Callable[..., str],
    products: tuple[str, ...],
    says: str,
) -> None:
    pool = gpu_pool(*products)
    job = job_without_gpu_type(crd, kube, namespace, "which-gpu", pool)

    controller.reconcile(kube, job, image=IMAGE)

    waiting = read(kube, namespace, job.name)
    assert waiting.status is not None
    assert waiting.status.phase == "Pending"
    assert waiting.status.failure is not None
    assert waiting.status.failure.reason == "GpuTypeNotInferred"
    assert says in waiting.status.failure.message, waiting.status.failure.message
    assert "set spec.resources.gpuType" in waiting.status.failure.message
    assert kube.child(PYTORCHJOB_CHILD, namespace, job.name) is None
    assert controller.refresh(kube, waiting) == []  # the timer's refresh leaves it as it is

    patched = crd.kubectl(
        "patch", "ftj", job.name, "-n", namespace, "--type=merge",
        "-p", json.dumps({"spec": {"resources": {"gpuType": "H100-80GB"}}}),
    )  # fmt: skip
    assert patched.returncode == 0, patched.stderr
    controller.reconcile(kube, read(kube, namespace, job.name), image=IMAGE)

    going = read(kube, namespace, job.name)
    assert going.status is not None
    assert going.status.phase == "Pending"
    assert going.status.failure is None or going.status.failure.reason == "Unschedulable"
    assert going.status.inferred_gpu_type is None
    child = kube.get(manifest.PYTORCHJOB_API_VERSION, manifest.PYTORCHJOB_KIND, namespace, job.name)
    assert child is not None
    assert node_products(child) == set(manifest.gpu_node_products("H100-80GB"))
