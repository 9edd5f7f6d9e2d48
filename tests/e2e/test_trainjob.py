"""The TrainJob child end to end: the operator run with ``FINETUNE_CHILD=trainjob`` on the test bed
with Kubeflow Trainer v2.2 and JobSet (``hack/cluster up --trainer``: their controllers and
webhooks, real), kwok GPU nodes and the Job controller. The same scenarios as the PyTorchJob's in
test_operator.py: success, out of memory, suspend and resume, deletion, never recreating a
finished job's child, an operator restart during a burst."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import yaml
from test_operator import condition, finetune, ftj, gpu_job, reconciles, wait_phase

from helpers import GOLDEN_NAMESPACE, ROOT
from operator_fixtures import TRAINJOB_RUNTIME, Operator

pytestmark = pytest.mark.e2e

GOLDEN = ROOT / "tests" / "golden"
LONG = {"annotations": {"testbed.finetune.dev/run-duration": "1h"}}


def trainer_pods(testbed: Any, namespace: str, name: str) -> list[dict[str, Any]]:
    selector = f"jobset.sigs.k8s.io/jobset-name={name}"
    return testbed.kubectl_json("get", "pods", "-n", namespace, "-l", selector)["items"]


def test_golden_trainjob_and_runtime_are_accepted_by_trainer_v2_s_webhook(
    trainjob_runtime: Any, namespace: str
) -> None:
    """The golden TrainJobs pass Trainer v2's own validation (server-side dry run against the
    golden runtime); a TrainJob that sets a variable the torch plugin owns is refused by it."""
    golden_runtime = yaml.safe_load((GOLDEN / "clustertrainingruntime.yaml").read_text())
    golden_runtime["metadata"]["name"] = "finetune-trainer-golden"
    assert trainjob_runtime.apply(golden_runtime).returncode == 0
    for path in sorted(GOLDEN.glob("*.trainjob.yaml")):
        text = path.read_text().replace(GOLDEN_NAMESPACE, namespace)
        child = yaml.safe_load(text)
        child["metadata"].pop("ownerReferences")
        child["spec"]["runtimeRef"]["name"] = "finetune-trainer-golden"
        dry = trainjob_runtime.apply(child, "--dry-run=server")
        assert dry.returncode == 0, f"{path.name}: {dry.stderr}"
    bad = yaml.safe_load((GOLDEN / "tiny-local.trainjob.yaml").read_text())
    bad["metadata"] = {"name": "bad", "namespace": namespace}
    bad["spec"]["runtimeRef"]["name"] = "finetune-trainer-golden"
    bad["spec"]["trainer"]["env"].append({"name": "PET_NNODES", "value": "3"})
    refused = trainjob_runtime.apply(bad, "--dry-run=server")
    assert refused.returncode != 0
    assert "PET_NNODES" in refused.stderr


def test_job_runs_to_succeeded_and_its_child_is_never_recreated(
    trainjob_operator: Operator,
) -> None:
    testbed, ns = trainjob_operator.testbed, trainjob_operator.namespace
    assert testbed.apply(gpu_job("ok"), "-n", ns).returncode == 0
    job = wait_phase(testbed, ns, "ok", "Succeeded")
    assert job["status"]["trainJob"]["name"] == "ok"
    assert "pytorchJob" not in job["status"]
    assert condition(job, "Succeeded")["status"] == "True"
    assert job["status"]["completionTime"]
    child = testbed.kubectl_json("get", "trainjob", "ok", "-n", ns)
    assert child["spec"]["runtimeRef"]["name"] == TRAINJOB_RUNTIME
    assert child["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
    assert testbed.kubectl("get", "pytorchjob", "ok", "-n", ns).returncode != 0
    table = testbed.kubectl("get", "ftj", "ok", "-n", ns).stdout
    assert "Succeeded" in table
    assert "fsdp8" in table
    # Trainer v2 restarts a failed TrainJob whose JobSet is deleted; the operator never makes a
    # finished job's child again, even when its spec changes afterwards.
    testbed.kubectl("delete", "trainjob", "ok", "-n", ns, "--wait=true", check=True)
    before = reconciles(trainjob_operator)
    patch = '{"spec":{"hyperparameters":{"epochs":4}}}'
    testbed.kubectl("patch", "ftj", "ok", "-n", ns, "--type=merge", "-p", patch, check=True)
    testbed.wait_for(
        lambda: reconciles(trainjob_operator) > before, timeout=60, desc="the update handled"
    )
    assert testbed.kubectl("get", "trainjob", "ok", "-n", ns).returncode != 0
    assert ftj(testbed, ns, "ok")["status"]["phase"] == "Succeeded"


def test_oom_killed_pod_fails_the_job_with_that_reason(trainjob_operator: Operator) -> None:
    testbed, ns = trainjob_operator.testbed, trainjob_operator.namespace
    job = gpu_job("oom", podMetadata={"annotations": {"testbed.finetune.dev/oom": "true"}})
    assert testbed.apply(job, "-n", ns).returncode == 0
    wait_phase(testbed, ns, "oom", "Failed")
    failed = testbed.wait_for(
        lambda: (
            (job := ftj(testbed, ns, "oom"))["status"]["failure"]["reason"] == "OOMKilled" and job
        ),
        timeout=60,
        desc="failure reason OOMKilled",
    )
    assert failed["status"]["failure"]["exitCode"] == 137
    assert failed["status"]["failure"]["pod"].startswith("oom-node-0-0")
    watched = finetune(testbed, "watch", "oom", "-n", ns)
    assert watched.returncode == 1
    assert "OOMKilled" in watched.stderr
    # Trainer v2 runs a failed TrainJob again when its JobSet is deleted (it clears the Failed
    # condition and makes the JobSet anew): the operator has suspended the failed child, so the
    # new JobSet starts no pods, and the job stays Failed.
    testbed.wait_for(
        lambda: testbed.kubectl_json("get", "trainjob", "oom", "-n", ns)["spec"].get("suspend"),
        timeout=60,
        desc="the failed TrainJob suspended",
    )
    testbed.kubectl("delete", "jobset", "oom", "-n", ns, "--wait=true", check=True)
    testbed.wait_for(
        lambda: testbed.kubectl("get", "jobset", "oom", "-n", ns).returncode == 0,
        timeout=60,
        desc="Trainer v2 to make the JobSet anew",
    )
    time.sleep(5)
    assert not [
        p for p in trainer_pods(testbed, ns, "oom") if not p["metadata"].get("deletionTimestamp")
    ]
    assert ftj(testbed, ns, "oom")["status"]["phase"] == "Failed"


def test_suspend_stops_the_pods_and_resume_brings_them_back(trainjob_operator: Operator) -> None:
    testbed, ns = trainjob_operator.testbed, trainjob_operator.namespace
    assert testbed.apply(gpu_job("pause", podMetadata=LONG), "-n", ns).returncode == 0
    wait_phase(testbed, ns, "pause", "Running")

    def set_suspend(value: bool) -> None:
        patch = json.dumps({"spec": {"runPolicy": {"suspend": value}}})
        testbed.kubectl("patch", "ftj", "pause", "-n", ns, "--type=merge", "-p", patch, check=True)

    set_suspend(True)
    wait_phase(testbed, ns, "pause", "Suspended")
    assert testbed.kubectl_json("get", "trainjob", "pause", "-n", ns)["spec"]["suspend"] is True
    testbed.wait_for(lambda: not trainer_pods(testbed, ns, "pause"), timeout=120, desc="pods to go")
    set_suspend(False)
    testbed.wait_for(
        lambda: trainer_pods(testbed, ns, "pause"), timeout=120, desc="pods to come back"
    )
    wait_phase(testbed, ns, "pause", "Running")


def test_logs_and_delete_take_the_children(trainjob_operator: Operator) -> None:
    testbed, ns = trainjob_operator.testbed, trainjob_operator.namespace
    assert testbed.apply(gpu_job("gone", podMetadata=LONG), "-n", ns).returncode == 0
    wait_phase(testbed, ns, "gone", "Running")
    expected = testbed.trainer_log_lines()
    logs = finetune(testbed, "logs", "gone", "-n", ns, "--tail", "1")
    assert logs.returncode == 0, logs.stderr
    assert logs.stdout.splitlines() == expected[-1:]
    testbed.kubectl("delete", "ftj", "gone", "-n", ns, "--wait=true", check=True)
    testbed.wait_for(
        lambda: (
            testbed.kubectl(
                "get", "trainjob,configmap", "-n", ns, "-l", "finetune.dev/job=gone", "-o", "name"
            ).stdout.strip()
            == ""
            and not trainer_pods(testbed, ns, "gone")
        ),
        timeout=120,
        desc="children to be garbage-collected",
    )


def test_operator_restart_while_creating_loses_and_duplicates_nothing(
    trainjob_operator: Operator,
) -> None:
    testbed, ns = trainjob_operator.testbed, trainjob_operator.namespace
    names = [f"burst-{i}" for i in range(10)]
    pending = {"annotations": {"testbed.finetune.dev/pending": "true"}}
    jobs = [gpu_job(n, podMetadata=pending) for n in names]
    assert testbed.apply(jobs[:5], "-n", ns).returncode == 0
    trainjob_operator.kill()
    assert testbed.apply(jobs[5:], "-n", ns).returncode == 0
    trainjob_operator.start()

    def converged() -> bool:
        made = testbed.kubectl_json("get", "trainjobs", "-n", ns)["items"]
        phases = [ftj(testbed, ns, n).get("status", {}).get("phase") for n in names]
        return sorted(c["metadata"]["name"] for c in made) == sorted(names) and all(
            p in {"Pending", "Running"} for p in phases
        )

    testbed.wait_for(converged, timeout=240, interval=3, desc="10 jobs to converge")
    assert testbed.kubectl_json("get", "pytorchjobs", "-n", ns)["items"] == []
