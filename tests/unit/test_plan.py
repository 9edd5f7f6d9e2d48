"""Planning a FineTuneJob: spec → planner → status.plan and the trainer's plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli import run

from bad_specs import DELETE, apply
from finetune_operator.api import parse
from finetune_operator.plan import PlanInfeasible, plan_config, plan_job, plan_status
from helpers import EXAMPLES, ROOT, load_yaml

#: A full fine-tune of Mistral-7B on one 40 GB GPU without offload cannot fit.
TOO_BIG = {
    "spec.resources.gpuType": "A100-40GB",
    "spec.resources.gpusPerNode": 1,
    "spec.parallelism": {"cpuOffload": False},
}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_is_planned_before_any_pod(path: Path) -> None:
    spec = parse(load_yaml(path)).spec
    result = plan_job(spec)
    assert result is not None
    status = plan_status(result)
    world = spec.resources.num_nodes * spec.resources.gpus_per_node
    assert status.world == world
    degrees = status.data_parallel * status.fsdp * status.tensor_parallel
    assert degrees * status.pipeline_parallel == world
    assert status.est_peak_memory_bytes_per_gpu > 0
    assert 0 < float(status.est_mfu) < 1
    config = plan_config(result)
    per_step = status.data_parallel * status.fsdp * config.micro_batch_size
    assert per_step * config.gradient_accumulation == spec.hyperparameters.global_batch_size


def test_status_plan_uses_the_documented_names() -> None:
    spec = parse(load_yaml(EXAMPLES[0])).spec
    result = plan_job(spec)
    assert result is not None
    wire = plan_status(result).model_dump(by_alias=True)
    assert {"estPeakMemoryBytesPerGPU", "estTokensPerSecond", "estMFU", "summary"} <= wire.keys()


def test_pinned_degrees_are_kept() -> None:
    job = load_yaml(ROOT / "examples" / "mistral-7b-python-code.yaml")
    job = apply(job, {"spec.parallelism": {"tensorParallel": 2}})
    result = plan_job(parse(job).spec)
    assert result is not None
    assert result.plan.tensor_parallel == 2


def test_a_job_that_cannot_fit_says_what_would() -> None:
    job = load_yaml(ROOT / "examples" / "mistral-7b-python-code.yaml")
    job = apply(job, TOO_BIG)
    with pytest.raises(PlanInfeasible) as info:
        plan_job(parse(job).spec)
    message = info.value.message
    assert "Would fit" in message
    assert "lora" in message.lower() or "GPUs" in message


def test_models_unknown_offline_are_left_to_the_trainer() -> None:
    job = load_yaml(ROOT / "examples" / "mistral-7b-python-code.yaml")
    job = apply(
        job, {"spec.model.source": "pvc://models/my-7b", "spec.model.tokenSecretRef": DELETE}
    )
    assert plan_job(parse(job).spec) is None


def test_finetune_plan_prints_the_choice_and_alternatives() -> None:
    result = run("plan", str(ROOT / "examples" / "mistral-7b-python-code.yaml"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("*  fsdp") for line in lines)
    assert sum(line[:1].isdigit() for line in lines) >= 2  # runners-up
    assert "tok/s/GPU" in result.stdout


def test_finetune_plan_exits_1_with_the_fix_when_nothing_fits(tmp_path: Path) -> None:
    job = load_yaml(ROOT / "examples" / "mistral-7b-python-code.yaml")
    job = apply(job, TOO_BIG)
    path = tmp_path / "big.yaml"
    path.write_text(json.dumps(job))  # JSON keeps decimal strings quoted, as kubectl needs
    result = run("plan", str(path))
    assert result.returncode == 1
    assert "no plan fits" in result.stderr
    assert "Would fit" in result.stderr


def test_pins_that_exclude_every_layout_get_a_message_not_a_crash() -> None:
    """Found by the property test: offload excludes PP, and a batch of 3 fits no other layout."""
    job = load_yaml(ROOT / "examples" / "tiny-local.yaml")
    job = apply(
        job,
        {
            "spec.resources": {"gpusPerNode": 8, "gpuType": "H100-80GB"},
            "spec.hyperparameters.globalBatchSize": 3,
            "spec.parallelism": {"cpuOffload": True},
        },
    )
    with pytest.raises(PlanInfeasible, match="Would fit: removing the fixed parallelism settings"):
        plan_job(parse(job).spec)


def test_context_parallelism_pinned_with_a_pipeline_gets_a_message_not_a_crash() -> None:
    job = load_yaml(ROOT / "examples" / "llama3-8b-cnn-dailymail.yaml")
    job = apply(
        job,
        {
            "spec.dataset.maxSeqLength": 32768,
            "spec.parallelism": {"contextParallel": 2, "pipelineParallel": 2},
        },
    )
    with pytest.raises(PlanInfeasible, match="context parallelism needs GPUs, no pipeline"):
        plan_job(parse(job).spec)
    job = apply(job, {"spec.parallelism": {"contextParallel": 2}})
    planned = plan_job(parse(job).spec)
    assert planned is not None
    assert planned.plan.context_parallel == 2
    assert planned.to_status()["contextParallel"] == 2


def test_each_distinct_job_shape_is_planned_once_with_the_same_answer() -> None:
    """The operator plans a job on every reconcile: the second time is the first's answer (the
    same object), a changed spec is planned anew, and an infeasible one says the same again."""
    job = parse(load_yaml(ROOT / "examples" / "mistral-7b-python-code.yaml"))
    first, again = plan_job(job.spec), plan_job(job.spec)
    assert first is not None
    assert again is first
    other = parse(apply(load_yaml(ROOT / "examples" / "mistral-7b-python-code.yaml"),
                        {"spec.parallelism": {"tensorParallel": 2}}))  # fmt: skip
    changed = plan_job(other.spec)
    assert changed is not None
    assert changed is not first
    assert changed.plan.tensor_parallel == 2
    too_big = parse(apply(load_yaml(ROOT / "examples" / "mistral-7b-python-code.yaml"), TOO_BIG))
    messages = []
    for _ in range(2):
        with pytest.raises(PlanInfeasible) as info:
            plan_job(too_big.spec)
        messages.append((info.value.message, info.value.suggestions))
    assert messages[0] == messages[1]
