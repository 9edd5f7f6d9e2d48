"""Staging on the test bed: the staging Job before the PyTorchJob, its report read back into
status.staging, the plan computed from the staged config.json, the trainer pods on the read-only
cache, and a BadInput report failing the job.

kwok plays the staging pod (hack/kwok/stages.yaml, staging-pod-complete/-fail): its termination
message is the pod's ``testbed.finetune.dev/staging-message`` annotation (the job's
spec.podMetadata reaches the staging pod), which these tests build with the models the trainer's
staging writes (finetune_trainer.staging_report), never by hand. The downloads themselves (a cache
hit fetches no bytes) are tested for real in tests/trainer/test_staging.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from finetune_operator import staging
from finetune_trainer.staging_report import (
    BAD_INPUT,
    EXIT_BAD_INPUT,
    SourceReport,
    StagingFailure,
    StagingReport,
)
from helpers import ROOT, load_yaml

pytestmark = pytest.mark.e2e

#: A model no catalog knows: only its staged config.json can plan it.
MODEL = "example-org/private-llama-3b"
DATASET = "iamtarun/python_code_instructions_18k_alpaca"
MODEL_COMMIT = "3" * 40
DATASET_COMMIT = "d" * 40
#: config.json of a 3B Llama (the keys staging sends: shape_of).
CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 24,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 8192,
    "vocab_size": 128256,
    "tie_word_embeddings": True,
    "max_position_embeddings": 131072,
}


def report(fetched: int) -> StagingReport:
    return StagingReport(
        model=SourceReport(
            kind="hf",
            source=MODEL,
            commit=MODEL_COMMIT,
            snapshot=f"models--example-org--private-llama-3b/snapshots/{MODEL_COMMIT}",
            files=7,
            bytes=6_400_000_000,
            fetched_bytes=fetched,
            seconds=41.5,
        ),
        dataset=SourceReport(kind="hf", source=DATASET, commit=DATASET_COMMIT, bytes=11_000_000),
        config=CONFIG,
        vocab_size=128256,
    )


def job(name: str, staging_annotations: dict[str, str]) -> dict[str, Any]:
    """The Mistral example with the model above on 2 GPUs of a node, no PVCs; the trainer pods
    run for 30 s (the staging pod's run-duration is its own)."""
    doc = load_yaml(ROOT / "examples" / "mistral-7b-python-code.yaml")
    doc["metadata"] = {"name": name}
    spec = doc["spec"]
    del spec["checkpoint"]["storage"]
    del spec["output"]
    spec["model"] = {"source": f"hf://{MODEL}", "tokenSecretRef": {"name": "hf-token"}}
    spec["resources"] = {"numNodes": 1, "gpusPerNode": 2, "gpuType": "H100-80GB"}
    spec["podMetadata"] = {
        "annotations": {"testbed.finetune.dev/run-duration": "30s", **staging_annotations}
    }
    return doc


def ftj(testbed: Any, ns: str, name: str) -> dict[str, Any]:
    return dict(testbed.kubectl_json("get", "ftj", name, "-n", ns))


def wait_phase(testbed: Any, ns: str, name: str, phase: str) -> dict[str, Any]:
    return dict(
        testbed.wait_for(
            lambda: (j := ftj(testbed, ns, name)).get("status", {}).get("phase") == phase and j,
            timeout=90,
            desc=f"{name} to be {phase}",
        )
    )


def condition(doc: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in doc["status"]["conditions"] if c["type"] == type_)


def events(testbed: Any, ns: str, name: str) -> list[tuple[str, str]]:
    found = testbed.kubectl_json(
        "get", "events", "-n", ns, "--field-selector",
        f"involvedObject.name={name},involvedObject.kind=FineTuneJob",
    )["items"]  # fmt: skip
    found.sort(key=lambda e: e.get("eventTime") or e.get("firstTimestamp") or "")
    return [(e["reason"], e["message"]) for e in found]


def test_a_model_outside_the_catalog_is_staged_then_planned_from_its_config(
    operator: Any,
) -> None:
    testbed, ns = operator.testbed, operator.namespace
    first = report(fetched=6_411_000_000)
    message = {"testbed.finetune.dev/staging-message": first.line().strip()}
    assert testbed.apply(job("first", message), "-n", ns).returncode == 0
    running = wait_phase(testbed, ns, "first", "Running")

    status = running["status"]
    assert status["staging"] == {
        "modelCommit": MODEL_COMMIT,
        "datasetCommit": DATASET_COMMIT,
        "bytes": 6_411_000_000,
        "fetchedBytes": 6_411_000_000,
        "seconds": 42,
        "cache": staging.DEFAULT_CLAIM,
        "model": {
            "modelType": "llama",
            "numLayers": 28,
            "hiddenSize": 3072,
            "numHeads": 24,
            "numKvHeads": 8,
            "headDim": 128,
            "intermediateSize": 8192,
            "vocabSize": 128256,
            "tieWordEmbeddings": True,
            "gatedMlp": True,
            "qkvBias": False,
        },
    }
    assert condition(running, "Staged")["status"] == "True"
    # Planned by the operator from the staged config (the planner's catalog lacks the model).
    assert condition(running, "Planned")["reason"] == "Planned"
    assert status["plan"]["world"] == 2
    told = [reason for reason, _ in events(testbed, ns, "first")]
    assert told[:4] == ["Staging", "Staged", "Planned", "Pending"], told

    # The trainer: pinned to the staged commits, offline, on the cache mounted read-only,
    # without the Hub token (staging alone downloads).
    config = testbed.kubectl_json("get", "configmap", "first-trainer", "-n", ns)
    assert f'"revision": "{MODEL_COMMIT}"' in config["data"]["config.json"]
    assert f'"revision": "{DATASET_COMMIT}"' in config["data"]["config.json"]
    (pod,) = testbed.kubectl_json(
        "get", "pods", "-n", ns, "-l", "training.kubeflow.org/job-name=first"
    )["items"]
    cache = next(v for v in pod["spec"]["volumes"] if v["name"] == "cache")
    assert cache["persistentVolumeClaim"] == {
        "claimName": staging.DEFAULT_CLAIM,
        "readOnly": True,
    }
    (container,) = pod["spec"]["containers"]
    assert {"name": "cache", "mountPath": "/cache", "readOnly": True} in container["volumeMounts"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["HF_HUB_OFFLINE"] == "1"
    assert "HF_TOKEN" not in env

    # A second job on the same model stages into the same cache claim: the operator made one
    # claim for the namespace, and staging found everything there (its report: 0 bytes fetched).
    again = {"testbed.finetune.dev/staging-message": report(fetched=0).line().strip()}
    assert testbed.apply(job("second", again), "-n", ns).returncode == 0
    second = wait_phase(testbed, ns, "second", "Running")
    assert second["status"]["staging"]["modelCommit"] == MODEL_COMMIT
    assert second["status"]["staging"]["fetchedBytes"] == 0
    claims = testbed.kubectl_json("get", "pvc", "-n", ns)["items"]
    assert [c["metadata"]["name"] for c in claims] == [staging.DEFAULT_CLAIM]
    staged_into = {
        j["metadata"]["name"]: next(
            v["persistentVolumeClaim"]["claimName"]
            for v in j["spec"]["template"]["spec"]["volumes"]
            if v["name"] == "cache"
        )
        for j in testbed.kubectl_json("get", "jobs", "-n", ns)["items"]
    }
    assert staged_into == {
        "first-staging": staging.DEFAULT_CLAIM,
        "second-staging": staging.DEFAULT_CLAIM,
    }


def test_a_bad_input_report_fails_the_job_with_its_message(operator: Any) -> None:
    testbed, ns = operator.testbed, operator.namespace
    why = (
        f"model {MODEL} has only pickle weights (pytorch_model.bin), which can run code when "
        "loaded: use a revision with safetensors weights (model.safetensors), or allow pickle "
        "weights explicitly"
    )
    annotations = {
        "testbed.finetune.dev/staging-exit-code": str(EXIT_BAD_INPUT),
        "testbed.finetune.dev/staging-message": StagingFailure(BAD_INPUT, why).line().strip(),
    }
    assert testbed.apply(job("pickled", annotations), "-n", ns).returncode == 0
    failed = wait_phase(testbed, ns, "pickled", "Failed")
    assert failed["status"]["failure"] == {"reason": "BadInput", "message": why}
    assert condition(failed, "Staged")["reason"] == "BadInput"
    assert "staging" not in failed["status"]

    # No retry can help: the Job failed at its first pod (its podFailurePolicy), and no trainer
    # exists.
    def job_failed() -> dict[str, Any] | None:
        staged = testbed.kubectl_json("get", "job", "pickled-staging", "-n", ns)["status"]
        conditions = {c["type"]: c for c in staged.get("conditions", [])}
        failed = conditions.get("Failed", {})
        return staged if failed.get("status") == "True" else None

    staged = testbed.wait_for(job_failed, timeout=30, desc="the staging Job to fail")
    assert staged["failed"] == 1
    assert {c["type"]: c for c in staged["conditions"]}["Failed"]["reason"] == "PodFailurePolicy"
    assert testbed.kubectl("get", "pytorchjob", "pickled", "-n", ns).returncode != 0
    assert ("BadInput", why) in events(testbed, ns, "pickled")
