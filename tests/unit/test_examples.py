"""Every example is a valid FineTuneJob for both the typed model and the generated CRD."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from crdcheck import crd_failures
from finetune_operator.api import FineTuneJob, parse
from helpers import EXAMPLES, load_yaml


def test_the_reference_workloads_and_the_offline_job_are_examples() -> None:
    names = {p.stem for p in EXAMPLES}
    assert {"mistral-7b-python-code", "llama3-8b-cnn-dailymail", "tiny-local"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_parses(path: Path) -> None:
    job = parse(load_yaml(path))
    assert isinstance(job, FineTuneJob)
    assert job.name == path.stem


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_accepted_by_generated_crd(path: Path, committed_crd: dict[str, Any]) -> None:
    assert crd_failures(committed_crd, load_yaml(path)) == []


def test_reference_workload_shapes() -> None:
    mistral = parse(load_yaml(Path("examples/mistral-7b-python-code.yaml"))).spec
    assert mistral.model.source == "hf://mistralai/Mistral-7B-v0.3"
    assert mistral.dataset.source == "hf://iamtarun/python_code_instructions_18k_alpaca"
    assert (mistral.dataset.format, mistral.method.type) == ("alpaca", "full")
    assert (mistral.resources.num_nodes, mistral.resources.gpus_per_node) == (1, 8)

    llama = parse(load_yaml(Path("examples/llama3-8b-cnn-dailymail.yaml"))).spec
    assert llama.model.source == "hf://meta-llama/Meta-Llama-3-8B"
    assert (llama.dataset.config, llama.dataset.format) == ("3.0.0", "summarization")
    assert (llama.resources.num_nodes, llama.resources.gpus_per_node) == (2, 8)

    tiny = parse(load_yaml(Path("examples/tiny-local.yaml"))).spec
    assert tiny.model.source.startswith("builtin://")
    assert tiny.dataset.source.startswith("builtin://")
    assert tiny.resources.gpu_type == "CPU"


def test_defaults_are_filled_in(tiny_job: dict[str, Any]) -> None:
    spec = parse(tiny_job).spec
    assert spec.parallelism.mode == "auto"
    assert spec.run_policy.backoff_limit == 3
    assert spec.checkpoint.resume == "auto"
    assert spec.method.type == "full"
