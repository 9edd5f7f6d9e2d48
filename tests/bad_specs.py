"""The table of bad FineTuneJobs (shared by the unit, CRD and API-server tests).

Each entry changes the offline example in one way and names the field the error must name.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

DELETE = object()


@dataclass(frozen=True)
class Bad:
    id: str
    changes: dict[str, Any]  # dotted path -> new value (DELETE removes it)
    path: str  # the field the message must name
    says: str = ""  # a fragment the message must contain


def apply(document: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(document)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = doc
        for key in parents:
            node = node.setdefault(key, {})
        if value is DELETE:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return doc


H = "spec.hyperparameters"
P = "spec.parallelism"
R = "spec.resources"
D = "spec.dataset"

BAD: list[Bad] = [
    # sources
    Bad("hf-without-name", {"spec.model.source": "hf://"}, "spec.model.source", "hf://ORG/NAME"),
    Bad("unknown-scheme", {"spec.model.source": "s3://bucket/m"}, "spec.model.source"),
    Bad("unknown-builtin-model", {"spec.model.source": "builtin://gpt-9"}, "spec.model.source"),
    Bad("model-source-missing", {"spec.model.source": DELETE}, "spec.model.source", "required"),
    Bad("dtype-unknown", {"spec.model.dtype": "int8"}, "spec.model.dtype", "bfloat16"),
    Bad(
        "revision-twice",
        {"spec.model.source": "hf://org/m@main", "spec.model.revision": "v1"},
        "spec.model.revision",
        "not both",
    ),
    Bad(
        "token-for-builtin",
        {"spec.model.tokenSecretRef": {"name": "hf"}},
        "spec.model.tokenSecretRef",
        "hf://",
    ),
    Bad("dataset-hf-without-name", {f"{D}.source": "hf://"}, f"{D}.source"),
    Bad("dataset-relative-file", {f"{D}.source": "file://data.jsonl"}, f"{D}.source"),
    Bad("format-unknown", {f"{D}.format": "sharegpt"}, f"{D}.format", "alpaca"),
    Bad("seq-too-short", {f"{D}.maxSeqLength": 8}, f"{D}.maxSeqLength", "out of range"),
    Bad("seq-as-string", {f"{D}.maxSeqLength": "2048"}, f"{D}.maxSeqLength", "whole number"),
    Bad("packing-not-bool", {f"{D}.packing": "yes"}, f"{D}.packing"),
    Bad("eval-fraction-float", {f"{D}.evalFraction": 0.1}, f"{D}.evalFraction", "quotes"),
    Bad("eval-fraction-too-big", {f"{D}.evalFraction": "0.7"}, f"{D}.evalFraction", "0.5"),
    Bad(
        "eval-split-and-fraction",
        {f"{D}.evalSplit": "validation", f"{D}.evalFraction": "0.1"},
        f"{D}.evalFraction",
        "not both",
    ),
    Bad("column-unknown", {f"{D}.columns": {"prompt": "p"}}, f"{D}.columns.prompt", "unknown"),
    Bad("config-for-file", {f"{D}.source": "file:///d.jsonl", f"{D}.config": "x"}, f"{D}.config"),
    # method
    Bad("method-unknown", {"spec.method.type": "qlora"}, "spec.method.type", "lora"),
    Bad("lora-with-full", {"spec.method": {"type": "full", "lora": {"r": 8}}}, "spec.method.lora"),
    Bad(
        "lora-rank-zero", {"spec.method": {"type": "lora", "lora": {"r": 0}}}, "spec.method.lora.r"
    ),
    Bad(
        "lora-dropout-one",
        {"spec.method": {"type": "lora", "lora": {"dropout": "1.5"}}},
        "spec.method.lora.dropout",
    ),
    # hyperparameters
    Bad("epochs-and-steps", {f"{H}.epochs": 1}, f"{H}.epochs", "exactly one"),
    Bad("neither-epochs-nor-steps", {f"{H}.maxSteps": DELETE}, f"{H}.epochs", "exactly one"),
    Bad("lr-float", {f"{H}.learningRate": 2e-5}, f"{H}.learningRate", "quotes"),
    Bad("lr-word", {f"{H}.learningRate": "fast"}, f"{H}.learningRate", "decimal"),
    Bad(
        "dropout-word",
        {"spec.method": {"type": "lora", "lora": {"dropout": "x"}}},
        "spec.method.lora.dropout",
        "decimal",
    ),
    Bad("eval-fraction-word", {f"{D}.evalFraction": "some"}, f"{D}.evalFraction", "decimal"),
    Bad("lr-zero", {f"{H}.learningRate": "0"}, f"{H}.learningRate", "(0, 1]"),
    Bad("weight-decay-float", {f"{H}.weightDecay": 0.1}, f"{H}.weightDecay", "quotes"),
    Bad("gbs-zero", {f"{H}.globalBatchSize": 0}, f"{H}.globalBatchSize", "out of range"),
    Bad("gbs-negative", {f"{H}.globalBatchSize": -8}, f"{H}.globalBatchSize"),
    Bad("scheduler-unknown", {f"{H}.lrScheduler": "step"}, f"{H}.lrScheduler", "cosine"),
    Bad("warmup-too-long", {f"{H}.warmupSteps": 60}, f"{H}.warmupSteps", "below maxSteps"),
    # parallelism
    Bad(
        "manual-product-mismatch",
        {P: {"mode": "manual", "fsdp": 4}, f"{R}.gpusPerNode": 8},
        P,
        "must equal",
    ),
    Bad(
        "tp-crosses-nodes",
        {P: {"tensorParallel": 16}, f"{R}.numNodes": 2, f"{R}.gpusPerNode": 8},
        f"{P}.tensorParallel",
        "inside a node",
    ),
    Bad("degree-not-dividing", {P: {"fsdp": 3}, f"{R}.gpusPerNode": 8}, P, "divide"),
    Bad(
        "gbs-not-divisible",
        {P: {"mode": "manual", "fsdp": 8}, f"{R}.gpusPerNode": 8, f"{H}.globalBatchSize": 12},
        f"{H}.globalBatchSize",
        "multiple",
    ),
    Bad("ac-unknown", {P: {"activationCheckpointing": "some"}}, f"{P}.activationCheckpointing"),
    Bad("offload-on-cpu", {P: {"cpuOffload": True}}, f"{P}.cpuOffload", "GPUs"),
    Bad("tp-typo", {P: {"tensorParalel": 2}}, f"{P}.tensorParalel", "tensorParallel"),
    # resources
    Bad("gpus-zero", {f"{R}.gpusPerNode": 0}, f"{R}.gpusPerNode"),
    # one mistake, one message: the parallel-degree rules keep quiet about a world of 0 GPUs
    Bad("gpus-zero-with-degrees", {f"{R}.gpusPerNode": 0, P: {"fsdp": 2}}, f"{R}.gpusPerNode"),
    Bad("gpus-zero-manual", {f"{R}.gpusPerNode": 0, P: {"mode": "manual"}}, f"{R}.gpusPerNode"),
    Bad(
        "gpus-more-than-a-node-holds",
        {f"{R}.gpuType": "H100-80GB", f"{R}.gpusPerNode": 16},
        f"{R}.gpusPerNode",
        "gpusPerNode: 8",
    ),
    Bad("gpus-too-many", {f"{R}.gpusPerNode": 32}, f"{R}.gpusPerNode"),
    Bad("gpu-type-unknown", {f"{R}.gpuType": "RTX-4090"}, f"{R}.gpuType", "H100-80GB"),
    Bad("memory-word", {f"{R}.memory": "lots"}, f"{R}.memory", "quantity"),
    Bad("nodes-as-string", {f"{R}.numNodes": "2"}, f"{R}.numNodes"),
    Bad(
        "toleration-exists-with-value",
        {f"{R}.tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]},
        f"{R}.tolerations[0].value",
        "Exists",
    ),
    # checkpoint, output, policy, naming
    Bad("checkpoint-s3", {"spec.checkpoint.storage": "s3://b/c"}, "spec.checkpoint.storage"),
    Bad("keep-last-zero", {"spec.checkpoint.keepLast": 0}, "spec.checkpoint.keepLast"),
    Bad("resume-unknown", {"spec.checkpoint.resume": "always"}, "spec.checkpoint.resume"),
    Bad("output-without-storage", {"spec.output": {}}, "spec.output.storage", "required"),
    Bad(
        "checkpoint-equals-output",
        {"spec.checkpoint.storage": "file:///x", "spec.output.storage": "file:///x"},
        "spec.checkpoint.storage",
        "differ",
    ),
    Bad("backoff-negative", {"spec.runPolicy.backoffLimit": -1}, "spec.runPolicy.backoffLimit"),
    Bad("suspend-string", {"spec.runPolicy.suspend": "true"}, "spec.runPolicy.suspend"),
    Bad(
        "queue-uppercase", {"spec.scheduling": {"queueName": "Team_A"}}, "spec.scheduling.queueName"
    ),
    Bad("image-with-spaces", {"spec.image": "my image"}, "spec.image", "image"),
    Bad("unknown-spec-field", {"spec.gpus": 8}, "spec.gpus", "unknown"),
    Bad("name-too-long", {"metadata.name": "a" * 53}, "metadata.name", "63"),
    Bad("name-starts-with-digit", {"metadata.name": "7b-run"}, "metadata.name", "letter"),
]
