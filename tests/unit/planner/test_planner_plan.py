"""The Plan object: impossible combinations cannot be constructed."""

from typing import Any

import pytest
from pydantic import ValidationError

from finetune_trainer.planner import Cluster, Plan, Workload, known_model

TINY = known_model("tiny-llama")  # 4 layers, 8 heads, 4 kv heads, ffn 688
LLAMA8 = known_model("meta-llama/Meta-Llama-3-8B")


def make(
    model: Any = TINY, nodes: int = 1, gpn: int = 8, gbs: int = 16, method: str = "full", **kw: Any
) -> Plan:
    base: dict[str, Any] = {
        "data_parallel": 1,
        "fsdp": 8,
        "micro_batch_size": 1,
        "gradient_accumulation": 2,
    }
    base.update(kw)
    return Plan(
        model=model,
        cluster=Cluster.of("CPU", nodes=nodes, gpus_per_node=gpn),
        workload=Workload(seq_len=128, global_batch_size=gbs, method=method),
        **base,
    )


INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("product != world", {"fsdp": 4}, "world size"),
    (
        "tp crosses the node",
        {"nodes": 2, "gpn": 4, "fsdp": 1, "tensor_parallel": 8, "gradient_accumulation": 16},
        "GPUs per node",
    ),
    (
        "tp does not divide kv heads",
        {"fsdp": 1, "tensor_parallel": 8, "gradient_accumulation": 16},
        "kv heads",
    ),
    (
        "more stages than layers",  # uneven stages are planned (3 on 4 layers), empty ones not
        {
            "gpn": 2,
            "fsdp": 1,
            "pipeline_parallel": 2,
            "pipeline_schedule": "interleaved-1f1b",
            "virtual_stages": 3,
            "gbs": 4,
            "micro_batch_size": 1,
            "gradient_accumulation": 4,
        },
        "layers",
    ),
    ("global batch mismatch", {"gradient_accumulation": 3}, "globalBatchSize"),
    ("schedule without pp", {"pipeline_schedule": "1f1b"}, "schedule"),
    ("pp without schedule", {"fsdp": 4, "pipeline_parallel": 2, "gbs": 8}, "schedule"),
    (
        "too few micro-batches",
        {
            "fsdp": 2,
            "pipeline_parallel": 4,
            "pipeline_schedule": "1f1b",
            "gbs": 4,
            "micro_batch_size": 1,
            "gradient_accumulation": 2,
        },
        "micro-batches",
    ),
    (
        "interleaved needs chunks",
        {
            "fsdp": 4,
            "pipeline_parallel": 2,
            "pipeline_schedule": "interleaved-1f1b",
            "gbs": 8,
            "gradient_accumulation": 2,
        },
        "virtual",
    ),
    (
        "interleave must divide layers",
        {
            "fsdp": 4,
            "pipeline_parallel": 2,
            "pipeline_schedule": "interleaved-1f1b",
            "virtual_stages": 4,
            "gbs": 8,
            "gradient_accumulation": 2,
        },
        "layers",
    ),
    (
        "offload with pp",
        {
            "fsdp": 4,
            "pipeline_parallel": 2,
            "pipeline_schedule": "1f1b",
            "gbs": 8,
            "cpu_offload": True,
        },
        "cpuOffload",
    ),
    ("zero2 with offload", {"fsdp": 8, "zero_stage": 2, "cpu_offload": True}, "zeroStage 2"),
    ("zero degree", {"fsdp": 0}, "greater than"),
]


@pytest.mark.parametrize(("kw", "match"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_plans_cannot_be_built(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        make(**kw)


VALID: list[tuple[dict[str, Any], str]] = [
    ({}, "fsdp8 mbs1 ga2 ac=none"),
    (
        {
            "data_parallel": 2,
            "fsdp": 4,
            "gbs": 16,
            "micro_batch_size": 2,
            "gradient_accumulation": 1,
            "activation_checkpointing": "selective",
        },
        "dp2 fsdp4 mbs2 ga1 ac=selective",
    ),
    ({"fsdp": 4, "tensor_parallel": 2, "gbs": 8}, "fsdp4 tp2 mbs1 ga2 ac=none"),
    (
        {"method": "lora", "fsdp": 4, "tensor_parallel": 2, "gbs": 8},
        "fsdp4 tp2 mbs1 ga2 ac=none lora",
    ),
    ({"fsdp": 8, "zero_stage": 2}, "fsdp8 mbs1 ga2 ac=none zero2"),
    (
        {
            "fsdp": 4,
            "pipeline_parallel": 2,
            "pipeline_schedule": "interleaved-1f1b",
            "virtual_stages": 2,
            "gbs": 8,
        },
        "fsdp4 pp2(interleaved-1f1bx2) mbs1 ga2 ac=none",
    ),
    ({"cpu_offload": True, "activation_checkpointing": "full"}, "fsdp8 mbs1 ga2 ac=full offload"),
    ({"method": "lora"}, "fsdp8 mbs1 ga2 ac=none lora"),
    (
        {
            "method": "lora",
            "fsdp": 4,
            "pipeline_parallel": 2,
            "pipeline_schedule": "1f1b",
            "gbs": 8,
        },
        "fsdp4 pp2(1f1b) mbs1 ga2 ac=none lora",
    ),
]


@pytest.mark.parametrize(("kw", "summary"), VALID)
def test_valid_plans_and_summary(kw: dict[str, Any], summary: str) -> None:
    p = make(**kw)
    assert p.summary == summary
    assert p.data_parallel * p.fsdp * p.tensor_parallel * p.pipeline_parallel == p.world
    assert p.sequence_parallel == (p.tensor_parallel > 1)
    assert Plan.from_layout(p.model, p.cluster, p.workload, p.layout()) == p


def test_plan_is_frozen() -> None:
    p = make()
    with pytest.raises(ValidationError):
        p.fsdp = 4  # type: ignore[misc]


def test_plan_round_trips_json() -> None:
    p = make(fsdp=4, tensor_parallel=2, gbs=8)
    assert Plan.model_validate_json(p.model_dump_json()) == p


def test_uneven_pipeline_stages_are_plans() -> None:
    """3 stages on TINY's 4 layers: 2 + 1 + 1 (the trainer's split, memory.stage_layers)."""
    from finetune_trainer.planner.memory import stage_layers

    plan = make(gpn=3, fsdp=1, pipeline_parallel=3, pipeline_schedule="1f1b", gbs=4,
                gradient_accumulation=4)  # fmt: skip
    assert plan.pipeline_parallel == 3
    assert stage_layers(4, 3) == (2, 1)
    assert stage_layers(126, 8) == (16, 15)  # Llama-3.1-405B on 8 stages
    assert stage_layers(126, 8, 2) == (16, 15)  # 16 stages: 14 of 8 layers, 2 of 7
    assert stage_layers(80, 4, 5) == (20, 20)
