"""Recovery end to end on the test bed (kwok plays the kubelet, the test bed's fake trainer
serves metrics): a job whose pod cannot pull its image fails at its startup deadline with the
pod's own message; a job that stops stepping is restarted within runPolicy.maxRestarts, then
fails Hung; a job OOMKilled is re-planned with more memory headroom, each attempt recorded."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from helpers import ROOT, load_yaml

pytestmark = pytest.mark.e2e

CLUSTER = ROOT / "hack" / "cluster"


def gpu_job(name: str, annotations: dict[str, str], **spec: Any) -> dict[str, Any]:
    """The Mistral example on one 8-GPU node, without PVCs, its pods steered by annotations."""
    job = load_yaml(ROOT / "examples" / "mistral-7b-python-code.yaml")
    job["metadata"] = {"name": name}
    del job["spec"]["checkpoint"]["storage"]
    del job["spec"]["output"]
    del job["spec"]["model"]["tokenSecretRef"]
    job["spec"]["podMetadata"] = {"annotations": annotations}
    job["spec"].update(spec)
    return job


def ftj(testbed: Any, namespace: str, name: str) -> dict[str, Any]:
    return testbed.kubectl_json("get", "ftj", name, "-n", namespace)


def wait_phase(testbed: Any, ns: str, name: str, phase: str, timeout: float) -> dict[str, Any]:
    return testbed.wait_for(
        lambda: (job := ftj(testbed, ns, name)).get("status", {}).get("phase") == phase and job,
        timeout=timeout,
        desc=f"{name} to be {phase}",
    )


def events(testbed: Any, ns: str, name: str) -> list[tuple[str, str, str]]:
    """(type, reason, message) of the Events about the FineTuneJob ``name``."""
    found = testbed.kubectl_json(
        "get", "events", "-n", ns, "--field-selector", f"involvedObject.name={name}"
    )["items"]
    return [
        (e["type"], e["reason"], e["message"])
        for e in found
        if e["involvedObject"]["kind"] == "FineTuneJob"
    ]


def pod_uids(testbed: Any, ns: str, name: str) -> set[str]:
    selector = f"training.kubeflow.org/job-name={name}"
    items = testbed.kubectl_json("get", "pods", "-n", ns, "-l", selector)["items"]
    return {p["metadata"]["uid"] for p in items}


def test_a_pod_that_cannot_pull_its_image_fails_the_job_at_the_startup_deadline(
    operator: Any,
) -> None:
    testbed, ns = operator.testbed, operator.namespace
    job = gpu_job(
        "nopull",
        {"testbed.finetune.dev/waiting-reason": "ImagePullBackOff"},
        runPolicy={"startupDeadlineSeconds": 10},
    )
    assert testbed.apply(job, "-n", ns).returncode == 0
    failed = wait_phase(testbed, ns, "nopull", "Failed", timeout=120)
    failure = failed["status"]["failure"]
    assert failure["reason"] == "StartupDeadlineExceeded"
    assert failure["pod"] == "nopull-master-0"
    assert "runPolicy.startupDeadlineSeconds is 10" in failure["message"]
    # The pod's own words, as the (simulated) kubelet wrote them.
    pods_words = "waits with ImagePullBackOff: simulated by the test bed: ImagePullBackOff"
    assert pods_words in failure["message"]
    told = events(testbed, ns, "nopull")
    assert ("Warning", "StartupDeadlineExceeded", failure["message"]) in told
    child = testbed.kubectl_json("get", "pytorchjob", "nopull", "-n", ns)
    assert child["spec"]["runPolicy"].get("suspend") is True, "its pods are stopped"


@pytest.fixture
def trainer_metrics(operator: Any) -> Any:
    """The test bed's fake trainer serves the master pods' metrics (added in place)."""
    testbed = operator.testbed
    if testbed.external:
        pytest.skip("the fake trainer's metrics are the test bed's")
    up = subprocess.run(
        [sys.executable, str(CLUSTER), "up", "--trainer-metrics"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert up.returncode == 0, up.stderr
    return operator


def test_a_job_that_stops_stepping_is_restarted_then_fails_hung(trainer_metrics: Any) -> None:
    """The fake trainer loads for 10 s, steps fast, and hangs at step 30 (every gang): 20 s
    without a step restarts the pods once (maxRestarts 1), and the second hang fails the job
    with reason Hung."""
    testbed, ns = trainer_metrics.testbed, trainer_metrics.namespace
    job = gpu_job(
        "hung",
        {
            "testbed.finetune.dev/run-duration": "100s",
            "testbed.finetune.dev/total-steps": "3000",
            "testbed.finetune.dev/hang-after": "30",
        },
        runPolicy={"hangTimeoutSeconds": 20, "maxRestarts": 1},
    )
    assert testbed.apply(job, "-n", ns).returncode == 0
    wait_phase(testbed, ns, "hung", "Running", timeout=120)
    first = testbed.wait_for(lambda: pod_uids(testbed, ns, "hung"), timeout=60, desc="pods")
    testbed.wait_for(
        lambda: (ftj(testbed, ns, "hung")["status"].get("restarts") or 0) >= 1,
        timeout=120,
        desc="a restart",
    )
    second = testbed.wait_for(
        lambda: (uids := pod_uids(testbed, ns, "hung")) and not uids & first and uids,
        timeout=60,
        desc="the restart's new pods",
    )
    assert second
    failed = wait_phase(testbed, ns, "hung", "Failed", timeout=180)
    status = failed["status"]
    assert status["restarts"] == 1
    assert status["failure"]["reason"] == "Hung"
    assert "at step 30" in status["failure"]["message"]
    assert "the 1 restart(s) runPolicy.maxRestarts allows are spent" in status["failure"]["message"]
    told = events(testbed, ns, "hung")
    restarts = [m for t, r, m in told if r == "Restarted"]
    assert len(restarts) == 1, told
    assert "1 of 1 restarts" in restarts[0]
    assert ("Warning", "Hung", status["failure"]["message"]) in told
    restarted = next(c for c in status["conditions"] if c["type"] == "Restarted")
    assert (restarted["status"], restarted["reason"]) == ("True", "Hung")


def test_an_oom_killed_job_is_re_planned_with_more_headroom(operator: Any) -> None:
    """Every pod of the job is OOMKilled: the operator re-plans once (maxReplans 1) to a plan
    that predicts less peak memory, records both attempts, runs the new plan (its ConfigMap),
    and fails OOMKilled when the second plan runs out of memory too."""
    testbed, ns = operator.testbed, operator.namespace
    job = gpu_job(
        "oom",
        {"testbed.finetune.dev/oom": "true", "testbed.finetune.dev/run-duration": "3s"},
        runPolicy={"maxReplans": 1},
    )
    assert testbed.apply(job, "-n", ns).returncode == 0
    failed = wait_phase(testbed, ns, "oom", "Failed", timeout=240)
    status = failed["status"]
    first, second = status["attempts"]
    assert first["reason"] == "Planned"
    assert second["reason"] == "OOMKilled"
    peak = "estPeakMemoryBytesPerGPU"
    assert second["plan"][peak] <= 0.9 * first["plan"][peak]
    assert second["plan"]["summary"] != first["plan"]["summary"]
    assert status["plan"] == second["plan"]
    assert status["failure"]["reason"] == "OOMKilled"
    assert "no re-plan left after 1" in status["failure"]["message"]
    told = events(testbed, ns, "oom")
    replans = [m for t, r, m in told if r == "Replanned"]
    assert len(replans) == 1, told
    assert first["plan"]["summary"] in replans[0]
    assert second["plan"]["summary"] in replans[0]
    config = testbed.kubectl_json("get", "configmap", "oom-trainer", "-n", ns)
    assert f'"micro_batch_size": {second["plan"]["microBatchSize"]}' in str(config["data"])
