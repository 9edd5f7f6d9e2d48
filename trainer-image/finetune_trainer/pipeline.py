"""Pipeline parallelism: cut a decoder-only causal LM into stages and drive them with a
``torch.distributed.pipelining`` schedule (GPipe, 1F1B, interleaved 1F1B).

The decoder layers are cut into p x v contiguous stages (p = pipeline degree, v = virtual stages
per rank, for interleaved 1F1B); rank r of the pipeline group owns stages r, r + p, ... Each stage
is a :class:`PipelineStageModule` holding the embeddings (first stage), its decoder layers, and the
final norm and LM head (last stage). Each stage is then parallelized within its rank (tensor
parallel, activation checkpointing, compile, FSDP) by the caller's ``parallelize_stage``:
:func:`finetune_trainer.parallelize.apply_plan` builds the mesh and passes it in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from finetune_trainer.config import PlanConfig
from finetune_trainer.errors import ConfigError
from finetune_trainer.loss import chunked_cross_entropy

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b")


@dataclass
class Pipeline:
    """This rank's stages and the schedule that drives them."""

    stages: list[nn.Module]
    schedule: Any
    group: dist.ProcessGroup
    #: Whether this rank holds the first stage (it feeds the token ids) and the last (it
    #: computes the loss).
    is_first: bool
    is_last: bool
    #: Set by the loop before each step: the factor each micro-batch's summed loss is scaled by.
    loss_scale: list[float] = field(default_factory=lambda: [1.0])
    #: This rank's parameters under the same names as in the whole model (checkpoints, export).
    parts: nn.Module = field(default_factory=nn.Module)


class PipelineStageModule(nn.Module):
    """A contiguous slice of a decoder-only causal LM: embeddings on the first stage, decoder
    layers, final norm and LM head on the last. ``forward(x, position_ids)`` takes token ids on
    the first stage and hidden states elsewhere; the last stage returns the final norm's output
    (the loss function applies the LM head to it in chunks: :mod:`finetune_trainer.loss`)."""

    def __init__(self, hf_model: nn.Module, layer_ids: list[int], first: bool, last: bool) -> None:
        super().__init__()
        base = hf_model.get_decoder()  # type: ignore[operator]
        self.config: Any = hf_model.config
        self.embed_tokens = base.embed_tokens if first else None
        self.layers = nn.ModuleDict({str(i): base.layers[i] for i in layer_ids})
        self.rotary_emb = base.rotary_emb
        self.norm = base.norm if last else None
        self.lm_head = hf_model.get_output_embeddings() if last else None  # type: ignore[operator]
        #: Set when the stage is tensor parallel: activations cross stages as sequence shards.
        self.tp_mesh: DeviceMesh | None = None

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import (  # noqa: PLC0415
            create_causal_mask,
            create_sliding_window_causal_mask,
        )

        if self.embed_tokens is not None:
            h = self.embed_tokens(x)
        elif self.tp_mesh is not None:
            # Stages pass plain tensors: the sequence shard of this TP rank.
            h = DTensor.from_local(x, self.tp_mesh, [Shard(1)], run_check=False)
        else:
            h = x
        mask_fn = (
            create_causal_mask
            if getattr(self.config, "sliding_window", None) is None
            else create_sliding_window_causal_mask
        )
        mask = mask_fn(
            config=self.config,
            inputs_embeds=h,
            attention_mask=None,
            past_key_values=None,
            position_ids=position_ids,
        )
        pos = self.rotary_emb(h, position_ids=position_ids)
        for layer in self.layers.values():
            h = layer(h, attention_mask=mask, position_ids=position_ids, position_embeddings=pos)
        if self.norm is not None:
            normed: torch.Tensor = self.norm(h)  # whole sequences (TP: gathered by its hook)
            return normed
        return h.to_local() if isinstance(h, DTensor) else h


def check_schedule(plan: PlanConfig) -> None:
    """The plan's schedule is one this module drives, with virtual stages only when interleaved."""
    if plan.pipeline_schedule not in SCHEDULES:
        raise ConfigError(
            f"pipeline schedule {plan.pipeline_schedule!r} is not one of {', '.join(SCHEDULES)}"
        )
    if (plan.pipeline_schedule == "interleaved-1f1b") != (plan.virtual_stages > 1):
        raise ConfigError("virtual stages > 1 go with the interleaved-1f1b schedule only")


def stage_ids(pp_rank: int, pp: int, v: int) -> list[int]:
    """Stages this rank owns: one, or v in loop order (r, r + p, ...)."""
    return [pp_rank + k * pp for k in range(v)]


def split_layers(num_layers: int, num_stages: int) -> list[list[int]]:
    """Consecutive layers per stage, as even as the count allows: when the stages do not divide
    the layers, the first ones take one layer more (the last stage also runs the LM head and
    the loss; the planner counts the same split, planner.memory.stage_layers)."""
    if num_stages > num_layers:
        raise ConfigError(
            f"{num_layers} decoder layers cannot fill {num_stages} pipeline stages (one layer"
            " each at least): choose fewer pipelineParallel x virtual stages"
        )
    per, extra = divmod(num_layers, num_stages)
    sizes = [per + (1 if s < extra else 0) for s in range(num_stages)]
    starts = [sum(sizes[:s]) for s in range(num_stages)]
    return [list(range(a, a + n)) for a, n in zip(starts, sizes, strict=True)]


def _loss_fn(pipe: Pipeline) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The last stage's loss: its LM head over the final norm's output, chunked (and
    vocabulary-parallel under TP) as in ``CausalLMLoss``, summed and scaled."""
    from finetune_trainer.data import IGNORE  # noqa: PLC0415 - keeps datasets out of this import

    heads = [st.lm_head for st in pipe.stages if isinstance(st, PipelineStageModule)]
    head = next((h for h in heads if h is not None), None)

    def loss(hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        assert head is not None, "the loss runs on the rank holding the last stage"
        summed = chunked_cross_entropy(
            hidden[:, :-1].flatten(0, 1), head, labels[:, 1:].flatten(), ignore_index=IGNORE
        )
        return summed * pipe.loss_scale[0]

    return loss


def build_pipeline(
    hf_model: nn.Module,
    plan: PlanConfig,
    mesh: DeviceMesh,
    device: torch.device,
    *,
    num_layers: int,
    parallelize_stage: Callable[[nn.Module], None],
) -> Pipeline:
    """This rank's stages of ``hf_model`` (``num_layers`` decoder layers) over the mesh's ``pp``
    dimension, each parallelized in place by ``parallelize_stage``, and their schedule."""
    from torch.distributed.pipelining import PipelineStage  # noqa: PLC0415
    from torch.distributed.pipelining.schedules import (  # noqa: PLC0415
        Schedule1F1B,
        ScheduleGPipe,
        ScheduleInterleaved1F1B,
    )

    pp, v = plan.pipeline_parallel, plan.virtual_stages
    pp_mesh = mesh["pp"]
    pp_rank = pp_mesh.get_local_rank()
    num_stages = pp * v
    parts = split_layers(num_layers, num_stages)
    mine = stage_ids(pp_rank, pp, v)
    stage_modules: list[nn.Module] = []
    stages: list[Any] = []
    for sid in mine:
        mod = PipelineStageModule(hf_model, parts[sid], sid == 0, sid == num_stages - 1)
        mod.to(device)
        if mesh["tp"].size() > 1:
            mod.tp_mesh = mesh["tp"]
        parallelize_stage(mod)
        stage_modules.append(mod)
        stages.append(PipelineStage(mod, sid, num_stages, device, group=pp_mesh.get_group()))
    pipe = Pipeline(
        stages=stage_modules,
        schedule=None,
        group=pp_mesh.get_group(),
        is_first=0 in mine,
        is_last=num_stages - 1 in mine,
        parts=_named_parts(stage_modules),
    )
    n_micro = plan.gradient_accumulation
    loss = _loss_fn(pipe)
    if plan.pipeline_schedule == "interleaved-1f1b":
        pipe.schedule = ScheduleInterleaved1F1B(
            stages, n_microbatches=n_micro, loss_fn=loss, scale_grads=False
        )
    else:
        cls = ScheduleGPipe if plan.pipeline_schedule == "gpipe" else Schedule1F1B
        pipe.schedule = cls(stages[0], n_microbatches=n_micro, loss_fn=loss, scale_grads=False)
    return pipe


def _named_parts(stages: list[nn.Module]) -> nn.Module:
    """A container with the stages' modules at their names in ``CausalLMLoss``
    (model.model.layers.N, model.model.embed_tokens, model.model.norm, model.lm_head), so state
    dicts line up."""
    root, hf, base = nn.Module(), nn.Module(), nn.Module()
    base.layers = nn.ModuleDict()
    for st in stages:
        assert isinstance(st, PipelineStageModule)
        base.layers.update(dict(st.layers.items()))
        if st.embed_tokens is not None:
            base.embed_tokens = st.embed_tokens
        if st.norm is not None:
            base.norm = st.norm
        if st.lm_head is not None:
            hf.lm_head = st.lm_head
    hf.model = base
    root.model = hf
    return root
