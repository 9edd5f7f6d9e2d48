"""Contract between the FineTuneJob spec and the trainer config.

Every leaf of the spec either reaches the trainer config (and the table below says where, and
checks the value arrives) or is declared operator-only (it shapes pods, not training). A new spec
field fails ``test_every_spec_field_is_accounted_for`` until someone decides which it is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from bad_specs import DELETE, apply
from finetune_operator import api
from finetune_operator.sources import claims, local_path
from finetune_operator.spec import FineTuneJobSpec
from finetune_operator.translate import to_trainer_config
from finetune_trainer.config import TrainerConfig
from helpers import EXAMPLES, load_yaml

Get = Callable[[TrainerConfig], Any]

#: spec path (under spec.) -> (a value to set, where it shows in the config, what it must be)
CARRIED: dict[str, tuple[Any, Get, Any]] = {
    "model.source": ("hf://org/m@abc", lambda c: (c.model.kind, c.model.name_or_path, c.model.revision), ("hf", "org/m", "abc")),
    "model.revision": ("v2", lambda c: c.model.revision, "v2"),
    "model.dtype": ("float32", lambda c: c.model.dtype, "float32"),
    "dataset.source": ("pvc://data/sets/a.jsonl", lambda c: (c.data.kind, c.data.name_or_path), ("local", "/mnt/pvc/data/sets/a.jsonl")),
    "dataset.config": ("3.0.0", lambda c: c.data.config_name, "3.0.0"),
    "dataset.split": ("train[:90%]", lambda c: c.data.split, "train[:90%]"),
    "dataset.evalSplit": ("validation", lambda c: c.data.eval_split, "validation"),
    "dataset.evalFraction": ("0.25", lambda c: c.data.eval_fraction, 0.25),
    "dataset.format": ("text", lambda c: (c.data.format, c.data.columns), ("text", {"text": "text"})),
    "dataset.columns.instruction": ("q", lambda c: c.data.columns["instruction"], "q"),
    "dataset.columns.input": ("ctx", lambda c: c.data.columns["input"], "ctx"),
    "dataset.columns.output": ("a", lambda c: c.data.columns["output"], "a"),
    "dataset.columns.article": ("doc", lambda c: c.data.columns.get("article"), None),  # alpaca reads no article
    "dataset.columns.summary": ("s", lambda c: c.data.columns.get("summary"), None),
    "dataset.columns.text": ("t", lambda c: c.data.columns.get("text"), None),
    "dataset.columns.messages": ("m", lambda c: c.data.columns.get("messages"), None),
    "dataset.maxSeqLength": (1024, lambda c: c.data.max_seq_length, 1024),
    "dataset.packing": (False, lambda c: c.data.packing, False),
    "dataset.preprocessingWorkers": (3, lambda c: c.data.num_proc, 3),
    "method.type": ("lora", lambda c: (c.method.type, c.method.lora is not None), ("lora", True)),
    "method.lora.r": (8, lambda c: c.method.lora and c.method.lora.r, 8),
    "method.lora.alpha": (64, lambda c: c.method.lora and c.method.lora.alpha, 64),
    "method.lora.dropout": ("0.1", lambda c: c.method.lora and c.method.lora.dropout, 0.1),
    "method.lora.targetModules": (["q_proj"], lambda c: c.method.lora and c.method.lora.target_modules, ("q_proj",)),
    "hyperparameters.epochs": (2, lambda c: (c.schedule.epochs, c.schedule.max_steps), (2, None)),
    "hyperparameters.maxSteps": (7, lambda c: c.schedule.max_steps, 7),
    "hyperparameters.globalBatchSize": (16, lambda c: c.schedule.global_batch_size, 16),
    "hyperparameters.learningRate": ("3e-4", lambda c: c.optim.learning_rate, 3e-4),
    "hyperparameters.lrScheduler": ("linear", lambda c: c.optim.lr_scheduler, "linear"),
    "hyperparameters.warmupSteps": (3, lambda c: c.optim.warmup_steps, 3),
    "hyperparameters.weightDecay": ("0.1", lambda c: c.optim.weight_decay, 0.1),
    "hyperparameters.maxGradNorm": ("0.5", lambda c: c.optim.max_grad_norm, 0.5),
    "hyperparameters.seed": (7, lambda c: c.schedule.seed, 7),
    "hyperparameters.evalEverySteps": (5, lambda c: c.schedule.eval_every_steps, 5),
    "parallelism.mode": ("manual", lambda c: c.parallelism.mode, "manual"),
    "parallelism.dataParallel": (1, lambda c: c.parallelism.data_parallel, 1),
    "parallelism.fsdp": (1, lambda c: c.parallelism.fsdp, 1),
    "parallelism.tensorParallel": (1, lambda c: c.parallelism.tensor_parallel, 1),
    "parallelism.contextParallel": (1, lambda c: c.parallelism.context_parallel, 1),
    "parallelism.pipelineParallel": (1, lambda c: c.parallelism.pipeline_parallel, 1),
    "parallelism.microBatchSize": (2, lambda c: c.parallelism.micro_batch_size, 2),
    "parallelism.activationCheckpointing": ("full", lambda c: c.parallelism.activation_checkpointing, "full"),
    "parallelism.cpuOffload": (False, lambda c: c.parallelism.cpu_offload, False),
    "resources.numNodes": (2, lambda c: c.hardware.num_nodes, 2),
    "resources.gpusPerNode": (2, lambda c: (c.hardware.procs_per_node, c.hardware.world_size), (2, 2)),
    "resources.gpuType": ("A100-80GB", lambda c: c.hardware.gpu_type, "A100-80GB"),
    "checkpoint.storage": ("pvc://ckpt/run1", lambda c: c.checkpoint.dir, "/mnt/pvc/ckpt/run1"),
    "checkpoint.everySteps": (9, lambda c: c.checkpoint.every_steps, 9),
    "checkpoint.keepLast": (1, lambda c: c.checkpoint.keep_last, 1),
    "checkpoint.resume": ("never", lambda c: c.checkpoint.resume, "never"),
    "output.storage": ("file:///models/out", lambda c: c.output_dir, "/models/out"),
    "model.tokenSecretRef.name": ("hf", lambda c: c.model.token_env, "HF_TOKEN"),
}  # fmt: skip

#: Spec leaves that shape the pods or the job's lifecycle, not the training run.
OPERATOR_ONLY = {
    "model.tokenSecretRef.key",  # the operator maps the Secret to HF_TOKEN
    "resources.cpu",
    "resources.memory",
    "resources.nodeSelector",
    "resources.tolerations",
    "scheduling.queueName",
    "scheduling.priority",
    "scheduling.priorityClassName",
    "scheduling.gangScheduling",
    "runPolicy.suspend",
    "runPolicy.activeDeadlineSeconds",
    "runPolicy.backoffLimit",
    "runPolicy.ttlSecondsAfterFinished",
    "runPolicy.startupDeadlineSeconds",  # recovery: the operator watches the pods
    "runPolicy.hangTimeoutSeconds",
    "runPolicy.maxRestarts",
    "runPolicy.maxReplans",
    "model.allowPickleWeights",  # staging flags: the staging Job's arguments
    "model.allowRemoteCode",
    "cache",  # the claim the operator mounts
    "podMetadata.labels",
    "podMetadata.annotations",
    "image",
}

#: Companion changes some values need to stay a valid spec (DELETE removes a field).
NEEDS = {
    "model.source": {"spec.model.tokenSecretRef": DELETE},
    "model.revision": {"spec.model.source": "hf://org/m"},
    "model.tokenSecretRef.name": {"spec.model.source": "hf://org/m"},
    "dataset.config": {"spec.dataset.source": "hf://org/d"},
    "dataset.evalSplit": {"spec.dataset.evalFraction": "0"},
    "method.lora.r": {"spec.method.type": "lora"},
    "method.lora.alpha": {"spec.method.type": "lora"},
    "method.lora.dropout": {"spec.method.type": "lora"},
    "method.lora.targetModules": {"spec.method.type": "lora"},
    "hyperparameters.epochs": {"spec.hyperparameters.maxSteps": DELETE},
    "parallelism.mode": {"spec.parallelism.fsdp": 1},
}


def _leaves(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    for name, field in model.model_fields.items():
        path = f"{prefix}{field.alias or name}"
        inner = api._model_of(field.annotation)
        if inner is not None and path not in {"resources.tolerations"}:
            yield from _leaves(inner, path + ".")
        else:
            yield path


def _config(document: dict[str, Any]) -> TrainerConfig:
    job = api.parse(document)
    return to_trainer_config(job.spec, name=job.name, default_output_dir="/tmp/out")


def _set(document: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    return apply(document, {f"spec.{path}": value, **NEEDS.get(path, {})})


def test_every_spec_field_is_accounted_for() -> None:
    leaves = set(_leaves(FineTuneJobSpec))
    assert leaves - CARRIED.keys() - OPERATOR_ONLY == set(), "decide: carried or operator-only"
    assert (CARRIED.keys() | OPERATOR_ONLY) - leaves == set(), "the table names a missing field"


@pytest.mark.parametrize("path", sorted(CARRIED))
def test_spec_value_reaches_the_trainer(path: str, tiny_job: dict[str, Any]) -> None:
    value, get, expected = CARRIED[path]
    assert get(_config(_set(tiny_job, path, value))) == expected


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_config_round_trips_as_json(path: Path, tmp_path: Path) -> None:
    config = _config(load_yaml(path))
    file = tmp_path / "config.json"
    file.write_text(config.to_json(), encoding="utf-8")
    assert TrainerConfig.load(file) == config


def test_reference_workload_translation() -> None:
    config = _config(load_yaml(Path("examples/llama3-8b-cnn-dailymail.yaml")))
    assert (config.model.kind, config.model.name_or_path) == ("hf", "meta-llama/Meta-Llama-3-8B")
    assert config.model.token_env == "HF_TOKEN"
    assert config.data.columns == {"article": "article", "summary": "highlights"}
    assert config.hardware.world_size == 16
    assert config.checkpoint.dir == "/mnt/pvc/finetune-checkpoints/llama3-8b-cnn-dailymail"


def test_claims_lists_every_pvc_once() -> None:
    spec = api.parse(load_yaml(Path("examples/mistral-7b-python-code.yaml"))).spec
    assert claims(spec) == ["finetune-checkpoints", "finetune-models"]


def test_local_path_refuses_remote_sources() -> None:
    with pytest.raises(ValueError, match="not a pvc:// or file://"):
        local_path("hf://org/name")


def test_output_defaults_when_unset(tiny_job: dict[str, Any]) -> None:
    doc = apply(tiny_job, {"spec.output": DELETE})
    assert _config(doc).output_dir == "/tmp/out"
