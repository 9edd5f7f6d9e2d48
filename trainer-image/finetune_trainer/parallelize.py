"""Apply a parallel plan to the model: the only module that builds device meshes.

Today: FSDP2 (``fully_shard``) data parallelism over every rank, one FSDP unit per decoder layer
plus the root (embeddings, final norm, LM head). Parameters stay fp32 (the optimizer's master
copy); on GPU FSDP gathers them in bf16 and reduces gradients in fp32. Tensor and pipeline
parallelism plug in here later through :func:`apply_plan`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)

from finetune_trainer.config import PlanConfig
from finetune_trainer.errors import ConfigError


@dataclass(frozen=True)
class Layout:
    """Where this rank sits: the data-parallel group it reads data for."""

    world_size: int
    dp_size: int
    dp_rank: int
    mesh: DeviceMesh | None


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return list(layers)
    raise ConfigError(
        f"cannot find the decoder layers of {type(model).__name__} to shard: the trainer "
        "supports decoder-only models whose layers are a ModuleList named 'layers' "
        "(Llama, Mistral, Qwen2 and similar)"
    )


def check_plan(plan: PlanConfig | None, world_size: int) -> None:
    if plan is None:
        return
    if plan.tensor_parallel > 1 or plan.pipeline_parallel > 1:
        raise ConfigError(
            f"the plan asks for tensor parallel {plan.tensor_parallel} and pipeline parallel "
            f"{plan.pipeline_parallel}, which this trainer version does not apply yet: set "
            "parallelism.tensorParallel and pipelineParallel to 1 (or leave mode auto)"
        )
    planned = plan.data_parallel * plan.fsdp * plan.tensor_parallel * plan.pipeline_parallel
    if planned != world_size:
        raise ConfigError(
            f"the plan covers {planned} ranks but {world_size} are "
            "running: make numNodes x gpusPerNode match the plan (or use --nproc)"
        )


def apply_plan(
    model: nn.Module,
    *,
    world_size: int,
    rank: int,
    device: torch.device,
    plan: PlanConfig | None,
) -> Layout:
    """Shard ``model`` in place for this rank and say how data is split."""
    check_plan(plan, world_size)
    if world_size == 1:
        return Layout(world_size=1, dp_size=1, dp_rank=0, mesh=None)
    mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("dp",))
    if device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    offload = CPUOffloadPolicy() if plan is not None and plan.cpu_offload else OffloadPolicy()
    layers = _decoder_layers(model)
    for i, layer in enumerate(layers):
        # The last layer's parameters are needed again at once by backward: keep them gathered.
        fully_shard(
            layer,
            mesh=mesh,
            mp_policy=mp,
            offload_policy=offload,
            reshard_after_forward=i < len(layers) - 1,
        )
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload)
    return Layout(world_size=world_size, dp_size=world_size, dp_rank=rank, mesh=mesh)


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Recompute layer activations in backward (selective is treated as full for now)."""
    if mode == "none":
        return
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if enable is None:
        raise ConfigError(f"{type(model).__name__} does not support activation checkpointing")
    enable(gradient_checkpointing_kwargs={"use_reentrant": False})
