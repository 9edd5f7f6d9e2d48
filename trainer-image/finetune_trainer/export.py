"""The final model, saved with ``save_pretrained`` in the model's dtype: what a run leaves behind.

Every rank takes part in gathering the trained weights (from FSDP shards, tensor-parallel slices
and pipeline stages); rank 0 writes them to a ``.tmp`` folder beside the output, then renames it,
so the output folder is either the previous model or the complete new one. A LoRA run's adapters
are merged into a fresh copy of the base model, so the export is a plain model.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from finetune_trainer.config import TrainerConfig
from finetune_trainer.distenv import DistEnv
from finetune_trainer.model_loading import DTYPES, load_model, wrap_lora


def export(
    cfg: TrainerConfig, env: DistEnv, module: torch.nn.Module, hf_model: Any, tok: Any
) -> Path:
    """Save the trained ``module`` (on every rank: a collective) as ``cfg.output_dir``, with the
    tokenizer; ``hf_model`` supplies the config (and, for LoRA, the adapters' placement)."""
    pipelined = cfg.plan is not None and cfg.plan.pipeline_parallel > 1
    opts = StateDictOptions(full_state_dict=True, cpu_offload=not pipelined)
    state: dict[str, Any] = dict(get_model_state_dict(module, options=opts))
    if pipelined:
        # Each pipeline rank holds its stages only: gather them all (rank 0 writes the model).
        state = {k: v.cpu() for k, v in state.items()}
        parts: list[dict[str, Any] | None] = [None] * env.world_size
        dist.all_gather_object(parts, state)
        state = {k: v for part in parts if part for k, v in part.items()}
    out = Path(cfg.output_dir).absolute()
    if env.rank == 0:
        dtype = DTYPES[cfg.model.dtype]
        state = {k.removeprefix("model."): v for k, v in state.items()}
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        if cfg.method.type == "lora":
            _save_merged_lora(cfg, state, tmp, dtype)
        else:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
            hf_model.config.dtype = dtype
            hf_model.save_pretrained(tmp, state_dict=state)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    if dist.is_initialized():
        dist.barrier()
    return out


def _save_merged_lora(
    cfg: TrainerConfig, state: dict[str, Any], tmp: Path, dtype: torch.dtype
) -> None:
    """LoRA: merge the adapters into a fresh copy of the base model and save that."""
    fresh = wrap_lora(cfg, load_model(cfg.model, seed=cfg.schedule.seed, dtype=torch.float32))
    fresh.get_base_model().load_state_dict(state)
    merged = fresh.merge_and_unload().to(dtype)
    merged.config.dtype = dtype
    merged.save_pretrained(tmp)
