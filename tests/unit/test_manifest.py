"""The PyTorchJob and ConfigMap a FineTuneJob becomes (pure builders)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from bad_specs import DELETE, apply
from finetune_operator import api, manifest
from finetune_operator.plan import plan_config, plan_job
from finetune_operator.translate import to_trainer_config
from finetune_trainer import names
from finetune_trainer.config import TrainerConfig
from helpers import EXAMPLES, GOLDEN_NAMESPACE, GOLDEN_UID, ROOT, load_yaml

GOLDEN = ROOT / "tests" / "golden"


def _job(doc: dict[str, Any]) -> api.FineTuneJob:
    doc = apply(doc, {"metadata.namespace": GOLDEN_NAMESPACE, "metadata.uid": GOLDEN_UID})
    return api.parse(doc)


def _children(doc: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    job = _job(doc)
    planned = plan_job(job.spec)  # None for a model only the trainer can read
    config = to_trainer_config(
        job.spec,
        name=job.name,
        default_output_dir="/cache/output",
        plan=plan_config(planned) if planned else None,
    )
    summary = planned.summary if planned else None
    child = manifest.pytorch_job(
        job, image="finetune-trainer:0.1.0", plan_summary=summary, exists=False
    )
    return manifest.config_map(job, config), child


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_pytorchjob_matches_golden(path: Path, request: pytest.FixtureRequest) -> None:
    _, child = _children(load_yaml(path))
    golden = GOLDEN / f"{path.stem}.pytorchjob.yaml"
    text = yaml.safe_dump(child, sort_keys=False)
    if request.config.getoption("--update-golden", default=False):
        golden.write_text(text)
    assert golden.read_text() == text, f"{golden} is stale: pytest --update-golden"


def test_master_and_workers_follow_num_nodes() -> None:
    _, child = _children(load_yaml(ROOT / "examples" / "llama3-8b-cnn-dailymail.yaml"))
    replicas = child["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1
    assert replicas["Worker"]["replicas"] == 1
    assert child["spec"]["nprocPerNode"] == "8"
    for spec in replicas.values():
        container = spec["template"]["spec"]["containers"][0]
        assert container["name"] == "pytorch"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    single = _children(load_yaml(ROOT / "examples" / "mistral-7b-python-code.yaml"))[1]
    assert set(single["spec"]["pytorchReplicaSpecs"]) == {"Master"}


def test_token_only_through_secret_ref() -> None:
    _, child = _children(load_yaml(ROOT / "examples" / "llama3-8b-cnn-dailymail.yaml"))
    env = child["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"]
    token = next(e for e in env if e["name"] == "HF_TOKEN")
    assert token == {
        "name": "HF_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}},
    }


def test_config_map_carries_the_trainer_config(tiny_job: dict[str, Any]) -> None:
    cm, child = _children(tiny_job)
    config = TrainerConfig.model_validate(json.loads(cm["data"]["config.json"]))
    assert config.run_name == "tiny-local"
    volumes = child["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["volumes"]
    assert {"name": "trainer-config", "configMap": {"name": cm["metadata"]["name"]}} in volumes


def test_children_are_owned_by_the_job(tiny_job: dict[str, Any]) -> None:
    for child in _children(tiny_job):
        (owner,) = child["metadata"]["ownerReferences"]
        assert owner["kind"] == "FineTuneJob"
        assert owner["uid"] == GOLDEN_UID
        assert owner["controller"] is True


def test_pvcs_are_mounted_read_only_when_only_read() -> None:
    doc = apply(
        load_yaml(ROOT / "examples" / "mistral-7b-python-code.yaml"),
        {"spec.model.source": "pvc://models/base", "spec.model.tokenSecretRef": DELETE},
    )
    _, child = _children(doc)
    pod = child["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    mounts = {
        m["mountPath"]: m["readOnly"]
        for m in pod["containers"][0]["volumeMounts"]
        if m["mountPath"].startswith("/mnt/pvc")
    }
    assert mounts == {
        "/mnt/pvc/models": True,
        "/mnt/pvc/finetune-checkpoints": False,
        "/mnt/pvc/finetune-models": False,
    }


def test_kueue_owns_suspension_of_queued_jobs(tiny_job: dict[str, Any]) -> None:
    job = _job(apply(tiny_job, {"spec.scheduling": {"queueName": "team-a"}}))
    first = manifest.pytorch_job(job, image="i", plan_summary=None, exists=False)
    later = manifest.pytorch_job(job, image="i", plan_summary=None, exists=True)
    assert first["spec"]["runPolicy"]["suspend"] is True
    assert "suspend" not in later["spec"]["runPolicy"]
    assert first["metadata"]["labels"][manifest.QUEUE_LABEL] == "team-a"


def test_suspend_follows_the_spec(tiny_job: dict[str, Any]) -> None:
    job = _job(apply(tiny_job, {"spec.runPolicy.suspend": True}))
    child = manifest.pytorch_job(job, image="i", plan_summary=None, exists=True)
    assert child["spec"]["runPolicy"]["suspend"] is True


def test_pod_metadata_reaches_the_pods(tiny_job: dict[str, Any]) -> None:
    job = _job(
        apply(tiny_job, {"spec.podMetadata": {"annotations": {"a": "b"}, "labels": {"team": "x"}}})
    )
    meta = manifest.pytorch_job(job, image="i", plan_summary=None, exists=False)["spec"][
        "pytorchReplicaSpecs"
    ]["Master"]["template"]["metadata"]
    assert meta["annotations"]["a"] == "b"
    assert meta["labels"]["team"] == "x"
    assert meta["labels"][manifest.JOB_LABEL] == "tiny-local"


def test_the_shared_names_are_the_api_s() -> None:
    """finetune_trainer.names spells out what the operator's API implies; they must agree."""
    assert names.JOB_LABEL.startswith(f"{api.GROUP}/")
    template = manifest.pod_template(_job(load_yaml(ROOT / "examples" / "tiny-local.yaml")), "i")
    assert template["metadata"]["labels"][names.JOB_LABEL] == "tiny-local"
    (container,) = template["spec"]["containers"]
    assert container["name"] == names.CONTAINER
    assert container["command"] == ["torchrun", "-m", names.ENTRY_POINT]
    assert container["ports"] == [{"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]


def _node_terms(child: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """The nodeSelectorTerms of each replica's pods (their matchExpressions)."""
    out = []
    for spec in child["spec"]["pytorchReplicaSpecs"].values():
        affinity = spec["template"]["spec"]["affinity"]["nodeAffinity"]
        required = affinity["requiredDuringSchedulingIgnoredDuringExecution"]
        out += [t["matchExpressions"] for t in required["nodeSelectorTerms"]]
    return out


@pytest.mark.parametrize(
    ("gpu_type", "gpus", "products"),
    [
        ("H100-80GB", 8, {"NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-PCIe"}),
        ("A100-40GB", 4, {"NVIDIA-A100-SXM4-40GB", "A100-SXM4-40GB", "NVIDIA-A100-PCIE-40GB"}),
        ("A100-80GB", 8, {"NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-80GB-PCIe"}),
        ("H200-141GB", 8, {"NVIDIA-H200"}),
        ("L40S-48GB", 2, {"NVIDIA-L40S"}),
        ("B200-180GB", 8, {"NVIDIA-B200"}),
    ],
)
def test_pods_need_nodes_with_the_planned_gpu_type_and_count(
    tiny_job: dict[str, Any], gpu_type: str, gpus: int, products: set[str]
) -> None:
    doc = apply(
        tiny_job,
        {"spec.resources.gpuType": gpu_type, "spec.resources.gpusPerNode": gpus},
    )
    child = manifest.pytorch_job(_job(doc), image="i", plan_summary=None, exists=False)
    terms = _node_terms(child)
    assert terms, "no node affinity"
    for expressions in terms:
        by_key = {e["key"]: e for e in expressions}
        product = by_key["nvidia.com/gpu.product"]
        assert product["operator"] == "In"
        assert products <= set(product["values"])
        # No other GPU type's product name is accepted.
        others = {
            p
            for t in ("H100-80GB", "A100-40GB", "A100-80GB", "H200", "L40S", "B200")
            if manifest.gpu_node_products(t) != manifest.gpu_node_products(gpu_type)
            for p in manifest.gpu_node_products(t)
        }
        assert not others & set(product["values"])
        count = by_key["nvidia.com/gpu.count"]
        assert (count["operator"], count["values"]) == ("Gt", [str(gpus - 1)])


def test_cpu_jobs_have_no_gpu_affinity(tiny_job: dict[str, Any]) -> None:
    doc = apply(tiny_job, {"spec.resources.gpuType": "CPU", "spec.resources.gpusPerNode": 2})
    child = manifest.pytorch_job(_job(doc), image="i", plan_summary=None, exists=False)
    for spec in child["spec"]["pytorchReplicaSpecs"].values():
        assert "affinity" not in spec["template"]["spec"]
