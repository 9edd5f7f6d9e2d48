"""The pure parts of Kubeflow Trainer v2 and JobSet on the test bed (``up --trainer``): the
TrainJob gang of the rendezvous, TrainJob rank 0 in trainer-metrics' eyes, the webhook
configurations and the controllers' configurations (the cluster behaviour is in
tests/e2e/test_trainer_v2_bed.py)."""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "hack"))

from finetune_testbed import rendezvous, trainer_v2
from finetune_testbed.rendezvous import PodView

JOBSET = {
    "metadata": {"name": "tj", "namespace": "ns"},
    "spec": {
        "replicatedJobs": [
            {"name": "dataset-initializer", "replicas": 1, "template": {"spec": {}}},
            {
                "name": "node",
                "replicas": 1,
                "template": {"spec": {"parallelism": 3, "completions": 3}},
            },
        ]
    },
}


def pod(index: int, phase: str = "Running", rjob: str = "node") -> dict:
    return {
        "metadata": {
            "namespace": "ns",
            "name": f"tj-{rjob}-0-{index}",
            "labels": {
                "jobset.sigs.k8s.io/jobset-name": "tj",
                "jobset.sigs.k8s.io/replicatedjob-name": rjob,
                "jobset.sigs.k8s.io/job-index": "0",
                "batch.kubernetes.io/job-completion-index": str(index),
            },
        },
        "status": {"phase": phase},
    }


def test_the_gang_of_a_trainjob_is_its_node_jobs_pods() -> None:
    assert rendezvous.jobset_replicas(JOBSET) == {("0", "0"), ("0", "1"), ("0", "2")}
    views = [PodView.of(pod(i)) for i in range(3)]
    assert {v.gang for v in views} == {("jobset", "ns", "tj")}
    expected = rendezvous.jobset_replicas(JOBSET)
    assert rendezvous.to_join(expected, views[:2]) == []
    assert rendezvous.to_join(expected, views) == views


def test_a_pytorchjob_pod_keeps_its_gang() -> None:
    p = pod(0)
    p["metadata"]["labels"] = {
        "training.kubeflow.org/job-name": "j",
        "training.kubeflow.org/replica-type": "Master",
        "training.kubeflow.org/replica-index": "0",
    }
    view = PodView.of(p)
    assert view.gang == ("pytorchjob", "ns", "j")
    assert view.replica == ("master", "0")


def test_webhooks_point_at_loopback_and_pod_hooks_see_only_jobset_pods() -> None:
    module = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "mutating-webhook-configuration"},
        "webhooks": [
            {
                "name": "mpod.kb.io",
                "clientConfig": {
                    "service": {"name": "s", "namespace": "x", "path": "/mutate--v1-pod"}
                },
                "rules": [{"resources": ["pods"]}],
            },
            {
                "name": "mjobset.kb.io",
                "clientConfig": {"service": {"name": "s", "namespace": "x", "path": "/m-js"}},
                "rules": [{"resources": ["jobsets"]}],
            },
        ],
    }
    got = trainer_v2.webhook_configuration(module, "jobset-mutating", 9443, b"CA")
    assert got["metadata"] == {"name": "jobset-mutating"}
    pods, jobsets = got["webhooks"]
    assert pods["clientConfig"] == {
        "url": "https://127.0.0.1:9443/mutate--v1-pod",
        "caBundle": base64.b64encode(b"CA").decode(),
    }
    assert pods["objectSelector"]["matchExpressions"][0]["key"] == "jobset.sigs.k8s.io/jobset-name"
    assert "objectSelector" not in jobsets
    assert module["webhooks"][0]["clientConfig"]["service"]["path"] == "/mutate--v1-pod"


def test_configurations_turn_off_cert_management_and_leader_election(tmp_path: Path) -> None:
    js = json.loads(trainer_v2.jobset_configuration(1, 2, tmp_path))
    assert js["internalCertManagement"] == {"enable": False}
    assert js["webhook"] == {"host": "127.0.0.1", "port": 1, "certDir": str(tmp_path)}
    assert js["leaderElection"] == {"leaderElect": False}
    tr = json.loads(trainer_v2.trainer_configuration(3, 4))
    assert tr["certManagement"] == {"enable": False}
    assert tr["health"]["healthProbeBindAddress"] == "127.0.0.1:4"
    assert tr["leaderElection"] == {"leaderElect": False}


def test_module_manifests_are_where_the_bed_reads_them() -> None:
    trainer = Path.home() / "go/pkg/mod/github.com/kubeflow/trainer/v2@v2.2.0"
    if not trainer.is_dir():
        return  # not downloaded here: `hack/cluster build --trainer` fetches it
    names = [trainer_v2.crd_name(f) for f in trainer_v2.trainer_crd_files(trainer)]
    assert "trainjobs.trainer.kubeflow.org" in names
    assert trainer_v2.trainer_role_file(trainer).is_file()
    assert trainer_v2.trainer_webhook_file(trainer).is_file()


def test_only_the_uncompilable_rule_is_dropped() -> None:
    crd = (
        "            type: object\n"
        "            x-kubernetes-validations:\n"
        "            - message: namespace cannot be set for VolumeClaimPolicies\n"
        "                templates\n"
        "              rule: self.templates.all(t, !has(t.metadata.namespace)\n"
        "                || size(t.metadata.namespace) == 0)\n"
        "          maxItems: 50\n"
    )
    assert trainer_v2.without_uncompilable_rule(crd) == (
        "            type: object\n          maxItems: 50\n"
    )
    assert trainer_v2.without_uncompilable_rule("type: object\n") is None
    two = crd.replace("          maxItems: 50\n", "            - rule: self.x > 0\n")
    assert trainer_v2.without_uncompilable_rule(two) is None
