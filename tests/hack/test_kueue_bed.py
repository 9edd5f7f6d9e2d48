"""Kueue on the test bed (`hack/cluster up --kueue`): what hack/finetune_testbed/kueue.py takes
from Kueue's module and changes, and that the Kueue it starts is real: the API server calls its
webhooks, it queues a labelled PyTorchJob through a Workload, its queues are active."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed import CLUSTER, REPO

sys.path.insert(0, str(REPO / "hack"))
from finetune_testbed import kueue
from finetune_testbed.build import kueue_source
from finetune_testbed.settings import from_env

pytestmark = pytest.mark.kueue  # all of it reads Kueue's module (downloaded by Go), or runs it


@pytest.fixture(scope="module")
def module_src() -> Path:
    """Kueue's module in Go's module cache (hack/cluster build --kueue downloads it)."""
    return kueue_source(from_env(os.environ))


def test_only_kueues_own_and_the_enabled_integrations_webhooks_are_installed(
    module_src: Path,
) -> None:
    docs = [
        yaml.safe_load(d) for d in kueue.yaml_documents(kueue.webhook_file(module_src).read_text())
    ]
    assert [d["kind"] for d in docs] == [
        "MutatingWebhookConfiguration",
        "ValidatingWebhookConfiguration",
    ]
    mutating = kueue.webhook_configuration(docs[0], 4567, b"CA")
    validating = kueue.webhook_configuration(docs[1], 4567, b"CA")
    assert mutating["metadata"]["name"] == kueue.MUTATING
    assert validating["metadata"]["name"] == kueue.VALIDATING
    names = {h["name"] for h in mutating["webhooks"] + validating["webhooks"]}
    assert {"mpytorchjob.kb.io", "vpytorchjob.kb.io", "mtrainjob.kb.io", "vworkload.kb.io"} <= names
    # Pods, Deployments, batch Jobs...: their frameworks are off, Kueue stays out of their way.
    assert not names & {"mpod.kb.io", "vpod.kb.io", "mjob.kb.io", "mdeployment.kb.io"}
    for hook in mutating["webhooks"] + validating["webhooks"]:
        url = hook["clientConfig"]["url"]
        assert url.startswith("https://127.0.0.1:4567/"), url
        assert "service" not in hook["clientConfig"]
        assert hook["failurePolicy"] == "Fail"  # as Kueue ships them
    pytorch = next(h for h in mutating["webhooks"] if h["name"] == "mpytorchjob.kb.io")
    assert pytorch["clientConfig"]["url"].endswith("/mutate-kubeflow-org-v1-pytorchjob")


def test_the_configuration_queues_only_labelled_jobs_and_waits_for_pods_ready(
    tmp_path: Path,
) -> None:
    config = yaml.safe_load(kueue.configuration(4567, 4568, tmp_path))
    assert config["apiVersion"] == "config.kueue.x-k8s.io/v1beta2"
    assert config["manageJobsWithoutQueueName"] is False
    assert "kubeflow.org/pytorchjob" in config["integrations"]["frameworks"]
    assert config["waitForPodsReady"]["timeout"] == "20s"
    assert config["webhook"] == {"host": "127.0.0.1", "port": 4567, "certDir": str(tmp_path)}
    assert config["internalCertManagement"]["webhookSecretName"] == kueue.WEBHOOK_SECRET


def test_kueues_crds_are_all_there_and_the_converted_ones_known(module_src: Path) -> None:
    names = {kueue.crd_name(f) for f in kueue.crd_files(module_src)}
    assert {"workloads.kueue.x-k8s.io", "clusterqueues.kueue.x-k8s.io"} <= names
    assert {f"{c}.kueue.x-k8s.io" for c in kueue.CONVERTED_CRDS} <= names


# --------------------------------------------------------------------------- the running Kueue


@pytest.mark.e2e
def test_the_api_server_calls_kueues_webhooks(kueue_testbed: Any) -> None:
    denied = kueue_testbed.apply(kueue.INVALID_CLUSTER_QUEUE, "--dry-run=server")
    assert denied.returncode != 0
    assert 'admission webhook "vclusterqueue.kb.io" denied the request' in denied.stderr


@pytest.mark.e2e
def test_the_queues_are_active(kueue_testbed: Any) -> None:
    cq = kueue_testbed.kubectl_json("get", "clusterqueue", kueue.CLUSTER_QUEUE)
    active = next(c for c in cq["status"]["conditions"] if c["type"] == "Active")
    assert active["status"] == "True", active
    quota = cq["spec"]["resourceGroups"][0]["flavors"][0]["resources"]
    assert {"name": "nvidia.com/gpu", "nominalQuota": str(kueue.GPU_QUOTA)} in quota
    classes = kueue_testbed.kubectl_json("get", "workloadpriorityclasses")["items"]
    assert {c["metadata"]["name"]: c["value"] for c in classes} == kueue.PRIORITIES
    status = subprocess.run([str(CLUSTER), "status"], capture_output=True, text=True, check=False)
    assert any(line.split()[:2] == ["kueue", "ok"] for line in status.stdout.splitlines())


@pytest.mark.e2e
def test_a_labelled_pytorchjob_is_suspended_and_queued_through_a_workload(
    kueue_testbed: Any, kube_namespace: str
) -> None:
    ns = kube_namespace
    kueue_testbed.local_queue(ns, "team")
    job = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": "plain", "labels": {"kueue.x-k8s.io/queue-name": "team"}},
        "spec": {
            "runPolicy": {"suspend": False},
            "pytorchReplicaSpecs": {
                "Master": {
                    "replicas": 1,
                    "restartPolicy": "Never",
                    "template": {
                        "spec": {
                            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
                            "containers": [
                                {
                                    "name": "pytorch",
                                    "image": "busybox",
                                    "resources": {"limits": {"nvidia.com/gpu": 32}},
                                }
                            ],
                        }
                    },
                }
            },
        },
    }
    applied = kueue_testbed.apply(job, "-n", ns)
    assert applied.returncode == 0, applied.stderr
    created = kueue_testbed.kubectl_json("get", "pytorchjob", "plain", "-n", ns)
    assert created["spec"]["runPolicy"]["suspend"] is True  # Kueue's webhook, at creation

    def workload() -> Any:
        items = kueue_testbed.kubectl_json("get", "workloads", "-n", ns)["items"]
        reserved = [
            c
            for w in items
            for c in w["status"].get("conditions", [])
            if c["type"] == "QuotaReserved"
        ]
        return reserved and reserved[0]

    reserved = kueue_testbed.wait_for(workload, timeout=60, desc="the Workload's QuotaReserved")
    assert reserved["status"] == "False"
    # 32 GPUs never fit the 16 of the ClusterQueue: Kueue says so.
    assert "insufficient quota for nvidia.com/gpu in flavor h100-80gb" in reserved["message"], (
        json.dumps(reserved)
    )
