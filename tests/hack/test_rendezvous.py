"""The test bed's pure parts behind the fake trainer: the rendezvous rule, the registry's image
list, and kwok's configuration with both filled in (the cluster behaviour is in tests/e2e)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "hack"))

from finetune_testbed import manifests, rendezvous, settings
from finetune_testbed.log import TestbedError
from finetune_testbed.rendezvous import PodView

JOB = {
    "metadata": {"name": "j", "namespace": "ns"},
    "spec": {"pytorchReplicaSpecs": {"Master": {"replicas": 1}, "Worker": {"replicas": 2}}},
}


def view(rtype: str, index: int, *, running: bool = True, joined: bool = False) -> PodView:
    return PodView("ns", f"j-{rtype}-{index}", "j", (rtype, str(index)), running, joined)


def test_every_replica_of_the_pytorchjob_is_expected() -> None:
    assert rendezvous.replicas(JOB) == {("master", "0"), ("worker", "0"), ("worker", "1")}


def test_nobody_joins_while_a_replica_is_not_running() -> None:
    pods = [view("master", 0), view("worker", 0), view("worker", 1, running=False)]
    assert rendezvous.to_join(rendezvous.replicas(JOB), pods) == []


def test_all_running_pods_join_together() -> None:
    pods = [view("master", 0), view("worker", 0), view("worker", 1)]
    assert rendezvous.to_join(rendezvous.replicas(JOB), pods) == pods


def test_a_recreated_pod_joins_those_that_already_did() -> None:
    pods = [
        view("master", 0, running=False, joined=True),  # finished already
        view("worker", 0, joined=True),
        view("worker", 1),  # recreated after an OOM kill
    ]
    assert rendezvous.to_join(rendezvous.replicas(JOB), pods) == [pods[2]]


def test_a_pod_without_a_pytorchjob_joins_alone() -> None:
    assert rendezvous.to_join(None, [view("master", 0)]) == [view("master", 0)]


def test_pod_view_reads_the_training_operator_labels() -> None:
    pod = {
        "metadata": {
            "name": "j-worker-1",
            "namespace": "ns",
            "labels": {
                "training.kubeflow.org/job-name": "j",
                "training.kubeflow.org/replica-type": "worker",
                "training.kubeflow.org/replica-index": "1",
            },
            "annotations": {rendezvous.ANNOTATION: "2026-01-01T00:00:00Z"},
        },
        "status": {"phase": "Running"},
    }
    assert PodView.of(pod) == view("worker", 1, joined=True)


def test_the_registry_holds_the_project_s_images_and_what_is_added() -> None:
    assert settings.from_env({}).images == (
        "finetune-trainer",
        "finetune-operator",
        "busybox",
        "alpine",
    )
    added = settings.from_env({"TESTBED_IMAGES": "pytorch, vllm-openai"}).images
    assert added[-2:] == ("pytorch", "vllm-openai")
    with pytest.raises(TestbedError, match="TESTBED_IMAGES"):
        settings.from_env({"TESTBED_IMAGES": "docker.io/pytorch:2"})


def test_kwok_config_fills_in_the_registry_and_run_time(tmp_path: Path) -> None:
    text = manifests.kwok_config(5, tmp_path / "log", ("finetune-trainer", "busybox"))
    assert "__" not in text.replace("__meta", "")
    stages = {d["metadata"]["name"]: d for d in yaml.safe_load_all(text)}
    keys = [e["key"] for e in stages["pod-image-missing"]["spec"]["selector"]["matchExpressions"]]
    assert any('["finetune-trainer", "busybox"]' in k for k in keys)
    for name in ("training-pod-succeed", "training-pod-fail", "training-pod-oomkilled"):
        expressions = stages[name]["spec"]["selector"]["matchExpressions"]
        assert {
            "key": f'.metadata.annotations["{rendezvous.ANNOTATION}"]',
            "operator": "Exists",
        } in (expressions)
