"""Automatic parallelism planner (pure Python: stdlib + pydantic; no torch, no Kubernetes).

from finetune_trainer.planner import Cluster, Workload, known_model, plan_parallelism
result = plan_parallelism(
    known_model("hf://mistralai/Mistral-7B-v0.3"),
    Cluster.of("H100-80GB", nodes=1, gpus_per_node=8),
    Workload(seq_len=2048, global_batch_size=64, method="full"),
)
result.summary   # 'fsdp8 mbs4 ga2 ac=none'
result.reason    # 'FSDP over 8 GPUs, micro-batch 4 ...: fits in 61 GiB of 80 GiB, ~... tok/s/GPU'
"""

from .api import estimate, plan_parallelism
from .explain import format_table, reason
from .hardware import GPU_CATALOG, Cluster, GPUSpec, get_gpu
from .layout import Layout
from .model import (
    KNOWN_CONFIGS,
    TINY_CONFIGS,
    ModelConfigError,
    ModelFacts,
    hf_config,
    is_known_model,
    known_model,
)
from .plan import Estimate, Plan, PlanInfeasible, PlanResult, RankedPlan
from .search import search, sweep, sweep_best
from .workload import Constraints, Workload

__all__ = [
    "GPU_CATALOG",
    "KNOWN_CONFIGS",
    "TINY_CONFIGS",
    "Cluster",
    "Constraints",
    "Estimate",
    "GPUSpec",
    "Layout",
    "ModelConfigError",
    "ModelFacts",
    "Plan",
    "PlanInfeasible",
    "PlanResult",
    "RankedPlan",
    "Workload",
    "estimate",
    "format_table",
    "get_gpu",
    "hf_config",
    "is_known_model",
    "known_model",
    "plan_parallelism",
    "reason",
    "search",
    "sweep",
    "sweep_best",
]
