"""The operator end to end on the test bed: real API server, scheduler, controller-manager,
kwok GPU nodes and Kubeflow training-operator. kwok plays the kubelet, so pods "run" for a few
seconds and can be told (by pod annotation) to fail, be OOMKilled or stay Pending."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator import __version__
from helpers import GOLDEN_NAMESPACE, GOLDEN_UID, ROOT, load_yaml
from operator_fixtures import Operator

pytestmark = pytest.mark.e2e

GOLDEN = ROOT / "tests" / "golden"


def gpu_job(name: str, **spec_changes: Any) -> dict[str, Any]:
    """The Mistral example on one 8-GPU node, without PVCs (the test bed has no storage)."""
    job = load_yaml(ROOT / "examples" / "mistral-7b-python-code.yaml")
    job["metadata"] = {"name": name}
    del job["spec"]["checkpoint"]["storage"]
    del job["spec"]["output"]
    del job["spec"]["model"]["tokenSecretRef"]
    for key, value in spec_changes.items():
        job["spec"][key] = value
    return job


def finetune(testbed: Any, *args: str) -> subprocess.CompletedProcess[str]:
    """The user's CLI against the test bed."""
    exe = str(Path(sys.executable).parent / "finetune")
    return subprocess.run(
        [exe, *args],
        capture_output=True,
        text=True,
        env=testbed.env(COLUMNS="200"),
        timeout=120,
        check=False,
    )


def reconciles(operator: Any) -> float:
    """How many reconciles the operator has finished (its own metric)."""
    lines = [
        line
        for line in operator.metrics().splitlines()
        if line.startswith("finetune_operator_reconcile_total")
    ]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def ftj(testbed: Any, namespace: str, name: str) -> dict[str, Any]:
    return testbed.kubectl_json("get", "ftj", name, "-n", namespace)


def wait_phase(
    testbed: Any, namespace: str, name: str, phase: str, timeout: float = 180
) -> dict[str, Any]:
    return testbed.wait_for(
        lambda: (
            (job := ftj(testbed, namespace, name)).get("status", {}).get("phase") == phase and job
        ),
        timeout=timeout,
        desc=f"{name} to be {phase}",
    )


def condition(job: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in job["status"]["conditions"] if c["type"] == type_)


def pods(testbed: Any, namespace: str, name: str) -> list[dict[str, Any]]:
    selector = f"training.kubeflow.org/job-name={name}"
    return testbed.kubectl_json("get", "pods", "-n", namespace, "-l", selector)["items"]


@pytest.mark.parametrize(
    "example", ["mistral-7b-python-code", "llama3-8b-cnn-dailymail", "tiny-local"]
)
def test_example_becomes_the_golden_pytorchjob(operator: Any, example: str) -> None:
    testbed, ns = operator.testbed, operator.namespace
    job = load_yaml(ROOT / "examples" / f"{example}.yaml")
    assert testbed.apply(job, "-n", ns).returncode == 0
    child = testbed.wait_for(
        lambda: (
            testbed.kubectl("get", "pytorchjob", example, "-n", ns, "-o", "json").returncode == 0
            and testbed.kubectl_json("get", "pytorchjob", example, "-n", ns)
        ),
        timeout=60,
        desc="the PyTorchJob",
    )
    uid = ftj(testbed, ns, example)["metadata"]["uid"]
    text = (GOLDEN / f"{example}.pytorchjob.yaml").read_text()
    golden = yaml.safe_load(text.replace(GOLDEN_NAMESPACE, ns).replace(GOLDEN_UID, uid))
    for key in ("apiVersion", "kind"):
        assert child[key] == golden[key]
    for key in ("name", "namespace", "labels", "ownerReferences", "annotations"):
        assert child["metadata"][key] == golden["metadata"][key], key
    # Every field we set is there with our value (the server may add its defaults).
    assert _missing(child["spec"], golden["spec"]) is None
    assert child["spec"]["nprocPerNode"] == golden["spec"]["nprocPerNode"]
    status = ftj(testbed, ns, example)["status"]
    assert status["plan"]["summary"] == golden["metadata"]["annotations"]["finetune.dev/plan"]
    assert condition(ftj(testbed, ns, example), "Planned")["status"] == "True"


def _missing(theirs: Any, ours: Any, path: str = "") -> str | None:
    """The first path where a field we set is absent or differs (the server may add defaults)."""
    if isinstance(ours, dict):
        if not isinstance(theirs, dict):
            return path
        for key, value in ours.items():
            if key not in theirs:
                return f"{path}.{key} (absent)"
            found = _missing(theirs[key], value, f"{path}.{key}")
            if found:
                return found
        return None
    if isinstance(ours, list):
        if not isinstance(theirs, list) or len(ours) != len(theirs):
            return f"{path} (list {theirs!r} != {ours!r})"
        for i, (a, b) in enumerate(zip(theirs, ours, strict=True)):
            found = _missing(a, b, f"{path}[{i}]")
            if found:
                return found
        return None
    return None if ours == theirs or str(ours) == str(theirs) else f"{path}: {theirs!r} != {ours!r}"


def test_job_runs_to_succeeded(operator: Any) -> None:
    testbed, ns = operator.testbed, operator.namespace
    assert testbed.apply(gpu_job("ok"), "-n", ns).returncode == 0
    job = wait_phase(testbed, ns, "ok", "Succeeded")
    assert job["status"]["completionTime"]
    assert job["status"]["pytorchJob"]["name"] == "ok"
    assert condition(job, "Succeeded")["status"] == "True"
    assert all(
        c["observedGeneration"] == job["metadata"]["generation"]
        for c in job["status"]["conditions"]
    )
    events = testbed.kubectl(
        "get",
        "events",
        "-n",
        ns,
        "--field-selector",
        "involvedObject.name=ok,involvedObject.kind=FineTuneJob",
    ).stdout
    assert "Succeeded" in events
    assert "Planned" in events
    table = testbed.kubectl("get", "ftj", "ok", "-n", ns).stdout
    assert "Succeeded" in table
    assert "fsdp8" in table
    assert 'finetune_operator_jobs{phase="Succeeded"} 1.0' in operator.metrics()

    listed = finetune(testbed, "get", "-n", ns)
    assert listed.returncode == 0, listed.stderr
    assert "ok" in listed.stdout
    assert "Succeeded" in listed.stdout
    described = finetune(testbed, "describe", "ok", "-n", ns)
    assert "fsdp8" in described.stdout
    assert "Conditions" in described.stdout
    assert "training finished" in described.stdout  # the Succeeded event
    watched = finetune(testbed, "watch", "ok", "-n", ns)
    assert watched.returncode == 0
    assert "ok: Succeeded" in watched.stdout

    # A finished job's children are never recreated, even when the spec changes afterwards.
    testbed.kubectl("delete", "pytorchjob", "ok", "-n", ns, "--wait=true", check=True)
    before = reconciles(operator)
    patch = '{"spec":{"hyperparameters":{"epochs":4}}}'
    testbed.kubectl("patch", "ftj", "ok", "-n", ns, "--type=merge", "-p", patch, check=True)
    testbed.wait_for(lambda: reconciles(operator) > before, timeout=60, desc="the update handled")
    assert testbed.kubectl("get", "pytorchjob", "ok", "-n", ns).returncode != 0
    assert ftj(testbed, ns, "ok")["status"]["phase"] == "Succeeded"


def test_progress_is_scraped_from_the_trainer_metrics(operator: Any) -> None:
    """The master pod's address is pointed at loopback, where the trainer's own metrics module
    serves its real metric names; the operator turns them into status.progress."""
    from finetune_trainer import metrics

    testbed, ns = operator.testbed, operator.namespace
    job = gpu_job(
        "progress", podMetadata={"annotations": {"testbed.finetune.dev/run-duration": "1h"}}
    )
    assert testbed.apply(job, "-n", ns).returncode == 0
    wait_phase(testbed, ns, "progress", "Running")
    trainer = metrics.create(torch_version="cpu", transformers_version="test")
    metrics.serve(trainer, operator.trainer_metrics_port, addr="127.0.0.1")
    try:
        trainer.steps.inc(30)
        trainer.progress.set(0.3)
        trainer.loss.set(2.5)
        trainer.tokens.inc(60_000)
        for _ in range(30):
            trainer.step_duration.observe(2.0)
        trainer.checkpoint_last_step.set(20)
        trainer.checkpoint_last_save.set(1_795_392_000)  # 2026-11-23T00:00:00Z
        patch = '{"status":{"podIP":"127.0.0.1","podIPs":[{"ip":"127.0.0.1"}]}}'
        testbed.kubectl(
            "patch",
            "pod",
            "progress-master-0",
            "-n",
            ns,
            "--subresource=status",
            "--type=merge",
            "-p",
            patch,
            check=True,
        )
        done = testbed.wait_for(
            lambda: ftj(testbed, ns, "progress").get("status", {}).get("progress"),
            timeout=60,
            desc="status.progress",
        )
    finally:
        trainer.close()
    assert (done["step"], done["totalSteps"], done["percent"]) == (30, 100, 30)
    assert done["loss"] == "2.5000"
    assert done["etaSeconds"] == 140
    assert done["summary"] in testbed.kubectl("get", "ftj", "progress", "-n", ns).stdout
    saved = ftj(testbed, ns, "progress")["status"]["checkpoint"]
    assert saved == {"step": 20, "time": "2026-11-23T00:00:00Z"}  # no storage in this spec
    described = finetune(testbed, "describe", "progress", "-n", ns)
    assert "step 20 (" in described.stdout


def test_oom_killed_pod_fails_the_job_with_that_reason(operator: Any) -> None:
    testbed, ns = operator.testbed, operator.namespace
    job = gpu_job(
        "oom",
        podMetadata={"annotations": {"testbed.finetune.dev/oom": "true"}},
        runPolicy={"backoffLimit": 0},
    )
    assert testbed.apply(job, "-n", ns).returncode == 0
    wait_phase(testbed, ns, "oom", "Failed")
    # The job fails on the backoff limit; the pod's own reason may arrive a moment later.
    failed = testbed.wait_for(
        lambda: (
            (job := ftj(testbed, ns, "oom"))["status"]["failure"]["reason"] == "OOMKilled" and job
        ),
        timeout=60,
        desc="failure reason OOMKilled",
    )
    assert failed["status"]["failure"]["exitCode"] == 137
    assert "oom-master-0" in failed["status"]["failure"]["message"]
    watched = finetune(testbed, "watch", "oom", "-n", ns)
    assert watched.returncode == 1
    assert "OOMKilled" in watched.stderr


def test_the_trainers_own_cause_becomes_the_jobs_failure(operator: Any) -> None:
    """The trainer writes its cause as one line to the termination log (here the fake pod's
    container status carries the line the trainer's own code makes); the job fails with it."""
    from finetune_trainer.failure import Failure

    testbed, ns = operator.testbed, operator.namespace
    line = Failure("LossDiverged", "loss not finite since step 41 through step 43").line()
    annotations = {
        "testbed.finetune.dev/exit-code": "1",
        "testbed.finetune.dev/termination-message": line,
    }
    job = gpu_job(
        "diverged", podMetadata={"annotations": annotations}, runPolicy={"backoffLimit": 0}
    )
    assert testbed.apply(job, "-n", ns).returncode == 0
    wait_phase(testbed, ns, "diverged", "Failed")
    failed = testbed.wait_for(
        lambda: (
            (job := ftj(testbed, ns, "diverged"))["status"]["failure"]["reason"] == "LossDiverged"
            and job
        ),
        timeout=60,
        desc="failure reason LossDiverged",
    )
    failure = failed["status"]["failure"]
    assert failure["message"] == (
        "pod diverged-master-0 (exit 1): loss not finite since step 41 through step 43"
    )
    assert failure["exitCode"] == 1
    assert "LossDiverged" in testbed.kubectl("get", "ftj", "diverged", "-n", ns).stdout
    watched = finetune(testbed, "watch", "diverged", "-n", ns)
    assert watched.returncode == 1
    assert "LossDiverged: pod diverged-master-0" in watched.stderr


def test_more_gpus_than_exist_says_unschedulable(operator: Any) -> None:
    testbed, ns = operator.testbed, operator.namespace
    job = gpu_job(
        "big",
        resources={"numNodes": 3, "gpusPerNode": 8, "gpuType": "H100-80GB"},
        hyperparameters={"epochs": 1, "globalBatchSize": 48},
        podMetadata={"annotations": {"testbed.finetune.dev/run-duration": "1h"}},
    )
    assert testbed.apply(job, "-n", ns).returncode == 0

    def unschedulable() -> bool:
        status = ftj(testbed, ns, "big").get("status", {})
        running = next((c for c in status.get("conditions", []) if c["type"] == "Running"), {})
        return running.get("reason") == "Unschedulable" and "nvidia.com/gpu" in running.get(
            "message", ""
        )

    testbed.wait_for(unschedulable, timeout=120, desc="an Unschedulable condition")

    # The trainer's log: the master pod is either waiting for GPUs (the user hears why there is
    # no log, not a traceback or nothing) or running (its log, served by kwok as the kubelet).
    def settled_master() -> dict[str, Any] | None:
        """The master once it is Running (for an hour) or Unschedulable (for good)."""
        found = [p for p in pods(testbed, ns, "big") if p["metadata"]["name"] == "big-master-0"]
        status = found[0].get("status", {}) if found else {}
        conditions = status.get("conditions") or []
        stuck = any(c.get("reason") == "Unschedulable" for c in conditions)
        return found[0] if status.get("phase") == "Running" or stuck else None

    master = testbed.wait_for(settled_master, timeout=60, desc="the master pod settled")
    logs = finetune(testbed, "logs", "big", "-n", ns)
    if master["status"]["phase"] == "Pending":
        assert logs.returncode == 1
        assert "the trainer pod big-master-0 has not started yet" in logs.stderr
        assert "finetune watch big" in logs.stderr
    else:
        assert logs.returncode == 0, logs.stderr
        assert logs.stdout.splitlines() == testbed.trainer_log_lines()
    assert "Traceback" not in logs.stderr


def test_infeasible_plan_fails_fast_without_children(operator: Any) -> None:
    testbed, ns = operator.testbed, operator.namespace
    job = gpu_job(
        "toobig",
        resources={"numNodes": 1, "gpusPerNode": 1, "gpuType": "A100-40GB"},
        parallelism={"cpuOffload": False},
    )
    assert testbed.apply(job, "-n", ns).returncode == 0
    failed = wait_phase(testbed, ns, "toobig", "Failed", timeout=60)
    assert failed["status"]["failure"]["reason"] == "PlanInfeasible"
    assert "Would fit" in failed["status"]["failure"]["message"]
    assert testbed.kubectl("get", "pytorchjob", "toobig", "-n", ns).returncode != 0
    logs = finetune(testbed, "logs", "toobig", "-n", ns)
    assert logs.returncode == 1
    assert "has no trainer pod (phase Failed)" in logs.stderr
    assert "finetune describe toobig" in logs.stderr


def test_delete_takes_the_children(operator: Any) -> None:
    testbed, ns = operator.testbed, operator.namespace
    job = gpu_job("gone", podMetadata={"annotations": {"testbed.finetune.dev/run-duration": "1h"}})
    assert testbed.apply(job, "-n", ns).returncode == 0
    testbed.wait_for(lambda: pods(testbed, ns, "gone"), timeout=120, desc="pods")

    # The trainer's log, through the API server from the node (kwok plays the kubelet).
    def master_running() -> bool:
        return any(
            p["metadata"]["name"] == "gone-master-0" and p["status"].get("phase") == "Running"
            for p in pods(testbed, ns, "gone")
        )

    testbed.wait_for(master_running, timeout=120, desc="the master pod running")
    expected = testbed.trainer_log_lines()
    assert expected, "the test bed serves a trainer log"
    logs = finetune(testbed, "logs", "gone", "-n", ns)
    assert logs.returncode == 0, logs.stderr
    assert logs.stdout.splitlines() == expected
    last = finetune(testbed, "logs", "gone", "-n", ns, "--tail", "1")
    assert last.stdout.splitlines() == expected[-1:]
    testbed.kubectl("delete", "ftj", "gone", "-n", ns, "--wait=true", check=True)
    testbed.wait_for(
        lambda: (
            testbed.kubectl(
                "get", "pytorchjob,configmap", "-n", ns, "-l", "finetune.dev/job=gone", "-o", "name"
            ).stdout.strip()
            == ""
            and not pods(testbed, ns, "gone")
        ),
        timeout=120,
        desc="children to be garbage-collected",
    )


def test_a_job_goes_while_the_operator_is_down_and_an_old_finalizer_is_dropped(
    operator: Any,
) -> None:
    """Nothing of the operator's must run before a FineTuneJob goes: deleting one (or its
    namespace) never waits for an operator that is down. The finalizer an older version put on
    every job is taken off by this one."""
    testbed, ns = operator.testbed, operator.namespace
    job = gpu_job("legacy")
    job["metadata"]["finalizers"] = ["finetune.dev/finalizer"]  # as an older operator left it
    assert testbed.apply(job, "-n", ns).returncode == 0
    testbed.wait_for(
        lambda: (
            ftj(testbed, ns, "legacy").get("status", {}).get("phase") in ("Pending", "Running")
            and not ftj(testbed, ns, "legacy")["metadata"].get("finalizers")
        ),
        timeout=120,
        desc="the job planned and its old finalizer dropped",
    )
    operator.kill()
    try:
        gone = testbed.kubectl("delete", "ftj", "legacy", "-n", ns, "--timeout=60s")
        assert gone.returncode == 0, gone.stderr
    finally:
        operator.start()


def test_suspend_stops_the_pods_and_resume_brings_them_back(operator: Any) -> None:
    testbed, ns = operator.testbed, operator.namespace
    job = gpu_job("pause", podMetadata={"annotations": {"testbed.finetune.dev/run-duration": "1h"}})
    assert testbed.apply(job, "-n", ns).returncode == 0
    wait_phase(testbed, ns, "pause", "Running")

    def set_suspend(value: bool) -> None:
        patch = json.dumps({"spec": {"runPolicy": {"suspend": value}}})
        testbed.kubectl("patch", "ftj", "pause", "-n", ns, "--type=merge", "-p", patch, check=True)

    set_suspend(True)
    wait_phase(testbed, ns, "pause", "Suspended")
    testbed.wait_for(lambda: not pods(testbed, ns, "pause"), timeout=120, desc="pods to go")
    set_suspend(False)
    testbed.wait_for(lambda: pods(testbed, ns, "pause"), timeout=120, desc="pods to come back")
    wait_phase(testbed, ns, "pause", "Running")


def test_operator_restart_while_creating_loses_and_duplicates_nothing(operator: Any) -> None:
    testbed, ns = operator.testbed, operator.namespace
    names = [f"burst-{i}" for i in range(20)]
    jobs = [
        gpu_job(n, podMetadata={"annotations": {"testbed.finetune.dev/pending": "true"}})
        for n in names
    ]
    assert testbed.apply(jobs[:10], "-n", ns).returncode == 0
    operator.kill()
    assert testbed.apply(jobs[10:], "-n", ns).returncode == 0
    operator.start()

    def converged() -> bool:
        children = testbed.kubectl_json("get", "pytorchjobs", "-n", ns)["items"]
        planned = [ftj(testbed, ns, n).get("status", {}).get("phase") for n in names]
        return sorted(c["metadata"]["name"] for c in children) == sorted(names) and all(
            p in {"Pending", "Running"} for p in planned
        )

    testbed.wait_for(converged, timeout=240, interval=3, desc="20 jobs to converge")
    configmaps = testbed.kubectl_json("get", "configmaps", "-n", ns, "-l", "finetune.dev/job")[
        "items"
    ]
    assert len(configmaps) == 20


def test_example_files_are_refused_by_the_api_server_when_bad(
    crd: Any, namespace: str, tmp_path: Path
) -> None:
    job = load_yaml(ROOT / "examples" / "tiny-local.yaml")
    job["spec"]["hyperparameters"]["learningRate"] = 0.001
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(job))
    result = crd.kubectl("apply", "-n", namespace, "-f", str(path))
    assert result.returncode != 0
    assert "spec.hyperparameters.learningRate" in result.stderr


def test_operator_logs_its_start_and_each_transition_as_json(
    crd: Any, namespace: str, tmp_path: Path
) -> None:
    op = Operator(crd, namespace, tmp_path / "operator.log", args=("--log-format", "json"))
    op.start()
    try:
        assert crd.apply(gpu_job("logged"), "-n", namespace).returncode == 0
        wait_phase(crd, namespace, "logged", "Succeeded")
        infeasible = gpu_job(
            "too-big",
            resources={"numNodes": 1, "gpusPerNode": 1, "gpuType": "A100-40GB"},
            parallelism={"cpuOffload": False},
        )
        assert crd.apply(infeasible, "-n", namespace).returncode == 0
        wait_phase(crd, namespace, "too-big", "Failed")
    finally:
        op.stop()
    text = op.log.read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]  # all of them JSON
    started = next(line for line in lines if "started" in line["message"])
    assert started["level"] == "INFO"
    assert started["namespaces"] == [namespace]
    assert started["version"] == __version__
    assert started["trainer_image"] == f"finetune-trainer:{__version__}"
    server = crd.kubectl(
        "config", "view", "--minify", "-o", "jsonpath={.clusters[0].cluster.server}"
    )
    assert started["cluster"] == server.stdout.strip()

    went = [(line["before"], line["phase"]) for line in lines if line.get("job") == "logged"]
    assert went[0] == (None, "Staging")  # the model is fetched and its config.json read first
    assert went[1] == ("Staging", "Pending")  # planned, and its PyTorchJob made, in one write
    assert went[-1][1] == "Succeeded"
    assert all(prev[1] == then[0] for prev, then in itertools.pairwise(went))  # a chain
    assert all(line["level"] == "INFO" for line in lines if line.get("job") == "logged")
    failed = [line for line in lines if line.get("job") == "too-big"]
    assert [f["phase"] for f in failed[:-1]] == ["Staging"] * (len(failed) - 1)
    assert (failed[-1]["phase"], failed[-1]["reason"]) == ("Failed", "PlanInfeasible")
    assert "PlanInfeasible" in failed[-1]["message"]
    assert not any("Handler" in line["message"] for line in lines)  # not a line per handler run


def test_a_job_with_too_few_gpus_never_succeeds(operator: Any) -> None:
    """Three 8-GPU nodes asked of two H100 nodes: one pod never starts (the scheduler may leave
    the master or a worker out), so (as torchrun would) the two that run never get past the
    rendezvous: the job waits, Unschedulable, and never Succeeds."""
    testbed, ns = operator.testbed, operator.namespace
    job = gpu_job(
        "short",
        resources={"numNodes": 3, "gpusPerNode": 8, "gpuType": "H100-80GB"},
        hyperparameters={"epochs": 1, "globalBatchSize": 48},
    )  # the test bed's default run-duration: pods that run finish after 5 s
    assert testbed.apply(job, "-n", ns).returncode == 0

    def phases() -> dict[str, str | None]:
        return {p["metadata"]["name"]: p["status"].get("phase") for p in pods(testbed, ns, "short")}

    def two_running_one_left_out() -> bool:
        seen = sorted(phases().values(), key=str)
        return seen == ["Pending", "Running", "Running"]

    def state() -> str:
        status = ftj(testbed, ns, "short").get("status", {})
        shown = {
            p["metadata"]["name"]: (p["status"].get("phase"), p["spec"].get("nodeName"))
            for p in testbed.kubectl_json("get", "pods", "-n", ns)["items"]
        }
        nodes = testbed.kubectl(
            "get",
            "pods",
            "-A",
            "-o",
            "wide",
            "--field-selector",
            "status.phase!=Succeeded,status.phase!=Failed",
        ).stdout
        return f"status: {status}\npods: {shown}\nall live pods:\n{nodes}"

    # staging, planning, the child, its pods: minutes on a loaded 2-core machine
    testbed.wait_for(
        two_running_one_left_out, timeout=300, desc="two pods Running, one Pending", explain=state
    )
    time.sleep(15)  # three run-durations
    status = ftj(testbed, ns, "short")["status"]
    assert status["phase"] == "Pending", status
    assert status["failure"]["reason"] == "Unschedulable"
    child = testbed.kubectl_json("get", "pytorchjob", "short", "-n", ns)
    assert not any(
        c["type"] == "Succeeded" and c["status"] == "True"
        for c in child["status"].get("conditions", [])
    )
    left_out = [name for name, phase in phases().items() if phase == "Pending"]
    assert sorted(phases().values(), key=str) == ["Pending", "Running", "Running"], phases()
    assert status["failure"]["pod"] in left_out, (status["failure"], left_out)


def test_an_image_that_does_not_exist_says_so_and_never_runs(operator: Any) -> None:
    testbed, ns = operator.testbed, operator.namespace
    image = "ghcr.io/finetune-dev/finetune-trainr:0.1.0"  # the typo a user makes
    assert testbed.apply(gpu_job("typo", image=image), "-n", ns).returncode == 0

    def pull_failure() -> dict[str, Any] | None:
        status = ftj(testbed, ns, "typo").get("status", {})
        failure = status.get("failure") or {}
        return status if failure.get("reason") == "ImagePullBackOff" else None

    status = testbed.wait_for(pull_failure, timeout=120, desc="an ImagePullBackOff failure")
    assert image in status["failure"]["message"]
    assert "check spec.image" in status["failure"]["message"]
    time.sleep(8)  # longer than a pod's run-duration: it never ran
    # the staging pod runs the same image, so the job never gets past staging
    assert ftj(testbed, ns, "typo")["status"]["phase"] == "Staging"
    assert all(p["status"].get("phase") == "Pending" for p in pods(testbed, ns, "typo"))


def _node_products(testbed: Any, ns: str, name: str) -> set[str]:
    found = set()
    for pod in pods(testbed, ns, name):
        node = testbed.kubectl_json("get", "node", pod["spec"]["nodeName"])
        found.add(node["metadata"]["labels"]["nvidia.com/gpu.product"])
    return found


def test_a_job_planned_for_one_gpu_type_is_never_scheduled_on_another(operator: Any) -> None:
    """The test bed has H100-80GB nodes and an A100-40GB node: each job's pods land on its own
    GPU type, and a job for a type no node has (A100-80GB) waits and says so."""
    testbed, ns = operator.testbed, operator.namespace
    hour = {"annotations": {"testbed.finetune.dev/run-duration": "1h"}}
    for name, gpu in (("on-a100", "A100-40GB"), ("on-h100", "H100-80GB"), ("none", "A100-80GB")):
        resources = {"numNodes": 1, "gpusPerNode": 8, "gpuType": gpu}
        job = gpu_job(name, resources=resources, podMetadata=hour)
        assert testbed.apply(job, "-n", ns).returncode == 0
    wait_phase(testbed, ns, "on-a100", "Running")
    wait_phase(testbed, ns, "on-h100", "Running")
    assert _node_products(testbed, ns, "on-a100") == {"NVIDIA-A100-SXM4-40GB"}
    assert _node_products(testbed, ns, "on-h100") == {"NVIDIA-H100-80GB-HBM3"}

    def no_node_said() -> dict[str, Any] | None:
        status = ftj(testbed, ns, "none").get("status", {})
        failure = status.get("failure") or {}
        return status if "no node offers" in failure.get("message", "") else None

    status = testbed.wait_for(no_node_said, timeout=120, desc="no node offers A100-80GB")
    assert status["phase"] == "Pending"
    assert status["failure"]["reason"] == "Unschedulable"
    assert "no node offers 8 A100-80GB GPUs" in status["failure"]["message"]
    assert "NVIDIA-A100-SXM4-80GB" in status["failure"]["message"]
    (pod,) = pods(testbed, ns, "none")
    assert not pod["spec"].get("nodeName")


def test_a_job_without_gpu_type_on_nodes_of_two_types_waits_until_it_is_set(
    operator: Any,
) -> None:
    """gpuType left out is inferred from the nodes when they have one GPU type; the test bed has
    H100-80GB and A100-40GB nodes, so the operator does not guess: the job waits, says which types
    it found and to set gpuType, and runs on those GPUs once it is set."""
    testbed, ns = operator.testbed, operator.namespace
    explained = testbed.kubectl("explain", "ftj.spec.resources.gpuType").stdout
    assert "Left out: inferred from the nodes' nvidia.com/gpu.product" in " ".join(
        explained.split()
    )
    hour = {"annotations": {"testbed.finetune.dev/run-duration": "1h"}}
    job = gpu_job("which-gpu", resources={"numNodes": 1, "gpusPerNode": 8}, podMetadata=hour)
    assert testbed.apply(job, "-n", ns).returncode == 0

    def waiting() -> dict[str, Any] | None:
        status = ftj(testbed, ns, "which-gpu").get("status", {})
        return (
            status if (status.get("failure") or {}).get("reason") == "GpuTypeNotInferred" else None
        )

    status = testbed.wait_for(waiting, timeout=60, desc="GpuTypeNotInferred")
    message = status["failure"]["message"]
    assert status["phase"] == "Pending"
    assert "several GPU types" in message
    assert "A100-40GB (nvidia.com/gpu.product=NVIDIA-A100-SXM4-40GB on " in message
    assert "H100-80GB (nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3 on " in message
    assert "set spec.resources.gpuType to one of A100-40GB, H100-80GB" in message
    assert condition(ftj(testbed, ns, "which-gpu"), "Planned")["reason"] == "GpuTypeNotInferred"
    assert testbed.kubectl("get", "pytorchjob", "which-gpu", "-n", ns).returncode != 0

    patch = json.dumps({"spec": {"resources": {"gpuType": "H100-80GB"}}})
    patched = testbed.kubectl("patch", "ftj", "which-gpu", "-n", ns, "--type=merge", "-p", patch)
    assert patched.returncode == 0, patched.stderr
    running = wait_phase(testbed, ns, "which-gpu", "Running")
    assert "failure" not in running["status"]
    assert _node_products(testbed, ns, "which-gpu") == {"NVIDIA-H100-80GB-HBM3"}


def test_gang_scheduling_asks_for_every_replica_and_training_operators_webhook_takes_it(
    operator: Any,
) -> None:
    """For a gang scheduler: runPolicy.schedulingPolicy.minAvailable is every replica (2 nodes:
    the master and a worker), with the pods' PriorityClass; training-operator's own validating
    webhook admits the PyTorchJob, and the job runs to Succeeded."""
    testbed, ns = operator.testbed, operator.namespace
    job = gpu_job(
        "gang",
        resources={"numNodes": 2, "gpusPerNode": 8, "gpuType": "H100-80GB"},
        hyperparameters={"epochs": 1, "globalBatchSize": 32},
        scheduling={"gangScheduling": True, "priorityClassName": "system-cluster-critical"},
    )
    assert testbed.apply(job, "-n", ns).returncode == 0
    child = testbed.wait_for(
        lambda: (
            (p := testbed.kubectl("get", "pytorchjob", "gang", "-n", ns, "-o", "json")).returncode
            == 0
            and json.loads(p.stdout)
        ),
        timeout=60,
        desc="the PyTorchJob",
    )
    policy = child["spec"]["runPolicy"]["schedulingPolicy"]
    assert policy == {"minAvailable": 2, "priorityClass": "system-cluster-critical"}
    testbed.wait_for(
        lambda: ftj(testbed, ns, "gang").get("status", {}).get("phase") == "Succeeded",
        timeout=120,
        desc="gang Succeeded",
    )
