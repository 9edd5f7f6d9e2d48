"""Kubeflow Trainer v2 and JobSet on the test bed (``hack/cluster up --trainer``).

A TrainJob of a small ClusterTrainingRuntime of the test's own (torch policy, container ``node``)
becomes a JobSet, a Job and pods that kwok runs on the GPU nodes through the same Stages and
``testbed.finetune.dev/*`` annotations as PyTorchJob pods (after the rendezvous of all its
pods); Trainer's and JobSet's webhooks are served (an invalid TrainJob is denied).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

TRAINER_API = "trainer.kubeflow.org/v1alpha1"
NODE = "node"
RENDEZVOUS = "testbed.finetune.dev/rendezvous"


def runtime(name: str) -> dict[str, Any]:
    """A torch ClusterTrainingRuntime: replicated job ``node`` (Trainer's ancestor ``trainer``),
    container ``node`` with 8 GPUs, tolerating the GPU nodes' taint, never restarted."""
    container = {
        "name": NODE,
        "image": "busybox:1.36",
        "command": ["sh", "-c", "torchrun train.py"],
        "resources": {"limits": {"nvidia.com/gpu": "8"}, "requests": {"cpu": "1"}},
    }
    pod = {
        "restartPolicy": "Never",
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "containers": [container],
    }
    job = {
        "name": NODE,
        "template": {
            "metadata": {"labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
            "spec": {"backoffLimit": 0, "template": {"spec": pod}},
        },
    }
    return {
        "apiVersion": TRAINER_API,
        "kind": "ClusterTrainingRuntime",
        "metadata": {"name": name, "labels": {"trainer.kubeflow.org/framework": "torch"}},
        "spec": {
            "mlPolicy": {"numNodes": 1, "torch": {}},
            "template": {"spec": {"replicatedJobs": [job]}},
        },
    }


def trainjob(
    name: str, namespace: str, runtime_name: str, nodes: int, annotations: dict | None = None
) -> dict[str, Any]:
    """A TrainJob of ``nodes`` nodes; ``annotations`` reach its trainer pods (a runtime patch)."""
    spec: dict[str, Any] = {
        "runtimeRef": {"name": runtime_name, "kind": "ClusterTrainingRuntime"},
        "trainer": {"numNodes": nodes},
    }
    if annotations:
        pod = {"metadata": {"annotations": annotations}}
        patch = {"replicatedJobs": [{"name": NODE, "template": {"spec": {"template": pod}}}]}
        spec["runtimePatches"] = [
            {
                "manager": "finetune.dev/testbed",
                "trainingRuntimeSpec": {"template": {"spec": patch}},
            }
        ]
    return {
        "apiVersion": TRAINER_API,
        "kind": "TrainJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


@pytest.fixture(scope="module")
def torch_runtime(trainer_testbed) -> Iterator[str]:
    name = f"testbed-torch-{uuid.uuid4().hex[:6]}"
    applied = trainer_testbed.apply(runtime(name))
    assert applied.returncode == 0, applied.stderr
    yield name
    trainer_testbed.kubectl("delete", "clustertrainingruntime", name, "--ignore-not-found")


def condition(testbed, namespace: str, name: str) -> str | None:
    """The TrainJob's terminal condition (Complete or Failed) that is True, if any."""
    tj = testbed.kubectl_json("get", "trainjob", name, "-n", namespace)
    for c in tj.get("status", {}).get("conditions") or []:
        if c["type"] in ("Complete", "Failed") and c["status"] == "True":
            return str(c["type"])
    return None


def pods(testbed, namespace: str, name: str) -> list[dict[str, Any]]:
    selector = f"jobset.sigs.k8s.io/jobset-name={name}"
    return list(testbed.kubectl_json("get", "pods", "-n", namespace, "-l", selector)["items"])


def test_trainjob_runs_on_gpu_nodes_and_completes(trainer_testbed, torch_runtime, kube_namespace):
    tb, ns = trainer_testbed, kube_namespace
    applied = tb.apply(trainjob("tj", ns, torch_runtime, nodes=2))
    assert applied.returncode == 0, applied.stderr
    assert tb.wait_for(lambda: condition(tb, ns, "tj"), timeout=60, desc="tj done") == "Complete"
    got = pods(tb, ns, "tj")
    assert len(got) == 2
    for pod in got:
        labels = pod["metadata"]["labels"]
        assert labels["jobset.sigs.k8s.io/replicatedjob-name"] == NODE
        assert labels["batch.kubernetes.io/job-completion-index"] in ("0", "1")
        assert pod["spec"]["nodeName"].startswith(("kwok-gpu-", "kwok-a100-"))
        assert RENDEZVOUS in pod["metadata"]["annotations"]
        assert pod["status"]["phase"] == "Succeeded"
        env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
        assert env["PET_NNODES"]["value"] == "2"
        assert env["PET_MASTER_ADDR"]["value"] == "tj-node-0-0.tj"
        assert "PET_NODE_RANK" in env
        assert "PET_NPROC_PER_NODE" in env
    print(json.dumps({"labels": got[0]["metadata"]["labels"], "env": list(env.values())}))


def test_failing_pod_fails_the_trainjob(trainer_testbed, torch_runtime, kube_namespace):
    tb, ns = trainer_testbed, kube_namespace
    job = trainjob(
        "bad", ns, torch_runtime, nodes=1, annotations={"testbed.finetune.dev/exit-code": "3"}
    )
    applied = tb.apply(job)
    assert applied.returncode == 0, applied.stderr
    assert tb.wait_for(lambda: condition(tb, ns, "bad"), timeout=60, desc="bad done") == "Failed"
    (pod,) = pods(tb, ns, "bad")
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 3


def test_webhook_denies_a_trainjob_without_runtime(trainer_testbed, kube_namespace):
    tb, ns = trainer_testbed, kube_namespace
    applied = tb.apply(trainjob("orphan", ns, "no-such-runtime", nodes=1))
    assert applied.returncode != 0
    assert "denied the request" in applied.stderr
    # Trainer's webhook denies it, and so does Kueue's TrainJob webhook (vtrainjob.kb.io) when
    # Kueue runs on the test bed too: the API server calls validating webhooks in parallel and
    # reports whichever denial it has first
    assert (
        "runtime 'no-such-runtime' not found" in applied.stderr
        or "must be created before the TrainJob" in applied.stderr
    ), applied.stderr


def test_kueue_suspends_and_admits_a_queued_trainjob(
    trainer_testbed, kueue_testbed, torch_runtime, kube_namespace
):
    """With Kueue on the bed too: a TrainJob labelled with a queue is created suspended (Kueue's
    webhook), admitted to the ClusterQueue ``gpus`` (its Workload), unsuspended, and runs."""
    tb, ns = trainer_testbed, kube_namespace
    tb.local_queue(ns)
    job = trainjob("queued", ns, torch_runtime, nodes=1)
    job["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "default"}
    applied = tb.apply(job)
    assert applied.returncode == 0, applied.stderr
    created = tb.kubectl_json("get", "trainjob", "queued", "-n", ns)
    assert created["spec"].get("suspend") is True

    def admitted() -> bool:
        items = tb.kubectl_json("get", "workloads.kueue.x-k8s.io", "-n", ns)["items"]
        return any(
            c["type"] == "Admitted" and c["status"] == "True"
            for w in items
            for c in w.get("status", {}).get("conditions") or []
        )

    tb.wait_for(admitted, timeout=60, desc="the TrainJob's Workload admitted")
    assert tb.wait_for(lambda: condition(tb, ns, "queued"), timeout=60, desc="done") == "Complete"
    tb.kubectl("delete", "trainjob", "queued", "-n", ns, "--wait=true", "--timeout=60s")
