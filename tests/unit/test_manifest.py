"""The PyTorchJob and ConfigMap a FineTuneJob becomes (pure builders)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from bad_specs import DELETE, apply
from finetune_operator import api, manifest, staging
from finetune_operator.plan import plan_config, plan_job
from finetune_operator.status import StagingStatus
from finetune_operator.translate import to_trainer_config
from finetune_trainer import names
from finetune_trainer.config import TrainerConfig
from helpers import EXAMPLES, GOLDEN_NAMESPACE, GOLDEN_UID, ROOT, load_yaml

GOLDEN = ROOT / "tests" / "golden"
#: What the staging Job of a staged example reported (fixed, for the golden files).
STAGED = StagingStatus(
    model_commit="a" * 40,
    dataset_commit="b" * 40,
    bytes=14_500_000_000,
    cache=staging.DEFAULT_CLAIM,
)


def _job(doc: dict[str, Any]) -> api.FineTuneJob:
    doc = apply(doc, {"metadata.namespace": GOLDEN_NAMESPACE, "metadata.uid": GOLDEN_UID})
    return api.parse(doc)


def _children(doc: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ConfigMap and PyTorchJob of ``doc`` as the controller makes them once the job is
    staged (with STAGED in the job's cache claim) or, for a job that is not staged, at once."""
    job = _job(doc)
    planned = plan_job(job.spec)  # None for a model only the trainer can read
    config = to_trainer_config(
        job.spec,
        name=job.name,
        default_output_dir=manifest.POD_OUTPUT_DIR,
        plan=plan_config(planned) if planned else None,
    )
    cache = None
    if staging.needed(job.spec):
        cache = staging.cache_claim(job.spec).name
        config = staging.pinned(config, STAGED.model_copy(update={"cache": cache}))
    summary = planned.summary if planned else None
    child = manifest.pytorch_job(
        job, image="finetune-trainer:0.1.0", plan_summary=summary, exists=False, cache=cache
    )
    return manifest.config_map(job, config), child


def _staging_job(doc: dict[str, Any]) -> dict[str, Any]:
    job = _job(doc)
    claim = staging.cache_claim(job.spec)
    return staging.staging_job(job, image="finetune-trainer:0.1.0", claim=claim)


STAGED_EXAMPLES = [p for p in EXAMPLES if staging.needed(_job(load_yaml(p)).spec)]


@pytest.mark.parametrize("path", STAGED_EXAMPLES, ids=lambda p: p.stem)
def test_staging_job_matches_golden(path: Path, request: pytest.FixtureRequest) -> None:
    text = yaml.safe_dump(_staging_job(load_yaml(path)), sort_keys=False)
    golden = GOLDEN / f"{path.stem}.staging-job.yaml"
    if request.config.getoption("--update-golden", default=False):
        golden.write_text(text)
    assert golden.read_text() == text, f"{golden} is stale: pytest --update-golden"


def test_hub_examples_are_staged_and_the_offline_one_is_not() -> None:
    assert {p.stem for p in STAGED_EXAMPLES} == {
        "mistral-7b-python-code",
        "llama3-8b-cnn-dailymail",
    }


def _container(child: dict[str, Any], replica: str = "Master") -> dict[str, Any]:
    spec = child["spec"]["pytorchReplicaSpecs"][replica]["template"]["spec"]
    (container,) = spec["containers"]
    return dict(container)


def test_staged_trainer_pods_load_offline_from_the_read_only_cache() -> None:
    cm, child = _children(load_yaml(ROOT / "examples" / "llama3-8b-cnn-dailymail.yaml"))
    for replica in ("Master", "Worker"):
        pod = child["spec"]["pytorchReplicaSpecs"][replica]["template"]["spec"]
        assert {
            "name": "cache",
            "persistentVolumeClaim": {"claimName": staging.DEFAULT_CLAIM_RWX, "readOnly": True},
        } in pod["volumes"]
        container = _container(child, replica)
        assert {"name": "cache", "mountPath": "/cache", "readOnly": True} in container[
            "volumeMounts"
        ]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["HF_HUB_OFFLINE"] == env["HF_DATASETS_OFFLINE"] == "1"
        assert env["HF_HOME"] == "/cache/huggingface"
        assert env["HF_DATASETS_CACHE"].startswith("/tmp/")  # writable: /tmp is the pod's own
        assert "HF_TOKEN" not in env  # staging downloaded: the token stays out of the pods
    config = TrainerConfig.model_validate_json(cm["data"]["config.json"])
    assert config.model.revision == STAGED.model_commit
    assert config.data.revision == STAGED.dataset_commit
    assert config.model.token_env is None


def test_a_job_that_is_not_staged_keeps_its_own_empty_cache(tiny_job: dict[str, Any]) -> None:
    _, child = _children(tiny_job)
    pod = child["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert {"name": "cache", "emptyDir": {}} in pod["volumes"]
    env = {e["name"] for e in _container(child)["env"]}
    assert "HF_HUB_OFFLINE" not in env


def test_staging_job_runs_the_trainer_image_restricted_and_fails_fast_on_bad_input() -> None:
    job = _staging_job(load_yaml(ROOT / "examples" / "llama3-8b-cnn-dailymail.yaml"))
    assert job["metadata"]["ownerReferences"][0]["uid"] == GOLDEN_UID
    assert job["metadata"]["namespace"] == GOLDEN_NAMESPACE
    spec = job["spec"]
    assert spec["backoffLimit"] <= 3
    (fail_at_once, _) = spec["podFailurePolicy"]["rules"]
    assert fail_at_once["action"] == "FailJob"
    assert fail_at_once["onExitCodes"]["values"] == [3]  # staging_report.EXIT_BAD_INPUT
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["image"] == "finetune-trainer:0.1.0"
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["command"] == ["python", "-m", "finetune_trainer.staging"]
    assert "--allow-pickle-weights" not in container["args"]
    token = next(e for e in container["env"] if e["name"] == "HF_TOKEN")
    assert token == {
        "name": "HF_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}},
    }
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["cache"] == {"name": "cache", "mountPath": "/cache"}  # read-write
    assert mounts["trainer-config"]["readOnly"] is True
    assert {
        "name": "cache",
        "persistentVolumeClaim": {"claimName": staging.DEFAULT_CLAIM_RWX},
    } in pod["volumes"]


def test_staging_flags_follow_the_spec() -> None:
    doc = apply(
        load_yaml(ROOT / "examples" / "mistral-7b-python-code.yaml"),
        {"spec.model.allowPickleWeights": True, "spec.model.allowRemoteCode": True},
    )
    (container,) = _staging_job(doc)["spec"]["template"]["spec"]["containers"]
    assert container["args"][-2:] == ["--allow-pickle-weights", "--allow-remote-code"]


def test_a_named_cache_claim_is_used_as_it_is() -> None:
    doc = apply(load_yaml(ROOT / "examples" / "mistral-7b-python-code.yaml"), {"spec.cache": "c"})
    claim = staging.cache_claim(_job(doc).spec)
    assert (claim.name, claim.managed, claim.access_mode) == ("c", False, "ReadWriteOnce")
    pvc = staging.cache_pvc("ns", staging.cache_claim(_job(load_yaml(EXAMPLES[0])).spec),
                            staging.CacheSettings(storage_class="nfs", size="1Ti"))  # fmt: skip
    assert pvc["spec"]["storageClassName"] == "nfs"
    assert pvc["spec"]["resources"]["requests"]["storage"] == "1Ti"
    assert "ownerReferences" not in pvc["metadata"]  # shared by the namespace's jobs


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
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    single = _children(load_yaml(ROOT / "examples" / "mistral-7b-python-code.yaml"))[1]
    assert set(single["spec"]["pytorchReplicaSpecs"]) == {"Master"}


def test_token_only_through_secret_ref() -> None:
    """Not staged (a job whose pods download themselves), the token reaches the trainer only
    from its Secret."""
    job = _job(load_yaml(ROOT / "examples" / "llama3-8b-cnn-dailymail.yaml"))
    env = manifest.pod_template(job, "i")["spec"]["containers"][0]["env"]
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
        m["mountPath"]: m.get("readOnly", False)
        for m in pod["containers"][0]["volumeMounts"]
        if m["mountPath"].startswith("/mnt/pvc")
    }
    assert mounts == {
        "/mnt/pvc/models": True,
        "/mnt/pvc/finetune-checkpoints": False,
        "/mnt/pvc/finetune-models": False,
    }
    # a false readOnly is left out, as typed clients (Kueue's) write it back: nothing to change
    assert all(
        v.get("readOnly", True) for v in pod["volumes"] + pod["containers"][0]["volumeMounts"]
    )
    claims = [v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert all(c.get("readOnly", True) for c in claims), claims


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
    # Resumed: no suspend at all (the apply drops the operator's true; one Kueue set stays).
    running = manifest.pytorch_job(_job(tiny_job), image="i", plan_summary=None, exists=True)
    assert "suspend" not in running["spec"]["runPolicy"]


def test_a_child_kueue_queued_by_the_namespaces_default_queue_is_left_to_kueue(
    tiny_job: dict[str, Any],
) -> None:
    """No queueName in the spec, but Kueue labelled the child (a LocalQueue named default):
    never a suspend in the apply, even when the user suspends (the Workload is deactivated)."""
    for suspend in (False, True):
        job = _job(apply(tiny_job, {"spec.runPolicy.suspend": suspend}))
        child = manifest.pytorch_job(job, image="i", plan_summary=None, exists=True, kueue=True)
        assert "suspend" not in child["spec"]["runPolicy"]
        assert manifest.QUEUE_LABEL not in child["metadata"]["labels"]  # Kueue's, not ours


def test_priority_and_gang_scheduling(tiny_job: dict[str, Any]) -> None:
    job = _job(
        apply(
            tiny_job,
            {
                "spec.resources.numNodes": 3,
                "spec.scheduling": {
                    "queueName": "team-a",
                    "priority": "high",
                    "priorityClassName": "training",
                    "gangScheduling": True,
                },
            },
        )
    )
    child = manifest.pytorch_job(job, image="i", plan_summary=None, exists=False)
    labels = child["metadata"]["labels"]
    assert labels["kueue.x-k8s.io/priority-class"] == "high"
    assert labels[manifest.QUEUE_LABEL] == "team-a"
    policy = child["spec"]["runPolicy"]["schedulingPolicy"]
    assert policy == {"minAvailable": 3, "priorityClass": "training"}
    plain = manifest.pytorch_job(_job(tiny_job), image="i", plan_summary=None, exists=False)
    assert "schedulingPolicy" not in plain["spec"]["runPolicy"]
    assert "kueue.x-k8s.io/priority-class" not in plain["metadata"]["labels"]


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


@pytest.mark.parametrize(
    ("written", "canonical"),
    [  # as the API server writes them back (resource.Quantity's canonical form)
        ("8", "8"),
        ("1000m", "1"),
        ("1500m", "1500m"),
        ("0.5", "500m"),
        ("2000", "2k"),
        ("32", "32"),
        ("512Gi", "512Gi"),
        ("1024Mi", "1Gi"),
        ("1.5Gi", "1536Mi"),
        ("100M", "100M"),
        ("0", "0"),
        ("512Ki", "512Ki"),
    ],
)
def test_quantities_are_written_in_kubernetes_canonical_form(written: str, canonical: str) -> None:
    """Kueue rewrites the child's pod templates in canonical form: an apply of another spelling
    would change its spec (and generation) on every reconcile."""
    assert manifest.canonical_quantity(written) == canonical
