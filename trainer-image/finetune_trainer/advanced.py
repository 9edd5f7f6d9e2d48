"""The one line: ``finetune_trainer.enable_advanced_parallelization()``.

Put it at the top of an ordinary single-device training script (``from_pretrained``, a
``DataLoader``, ``AdamW``, ``loss.backward(); optim.step()``) and start the script with
``torchrun --nproc-per-node N script.py``. With no other change:

- the process group is initialised (NCCL on GPU, gloo on CPU) and each rank takes its GPU;
- ``from_pretrained`` (any Hugging Face model class, ``AutoModelForCausalLM`` included) loads the
  model, asks the planner for a data/tensor-parallel plan for this model, world size and GPU
  (FSDP / HSDP, tensor parallel with sequence parallelism, activation checkpointing, CPU
  offload) and applies it with :func:`finetune_trainer.parallelize.apply_plan`;
- ``DataLoader`` gives each data-parallel rank its share of every batch (``batch_size`` stays the
  global batch of the single-device script, so the steps are the same; tensor-parallel peers get
  the same rows);
- ``model.to(...)`` / ``model.cuda()`` are no-ops on the parallelized model (it is already on its
  device); ``AdamW`` works unchanged on the sharded (DTensor) parameters.

What it cannot do:

- **Pipeline parallelism**: a plain ``loss = model(...).loss; loss.backward()`` loop cannot drive
  a pipeline schedule, so plans are restricted to pipeline degree 1. Models that need pipeline
  parallelism need the built-in trainer (``python -m finetune_trainer.train``).
- Gradient accumulation and gradient clipping stay as the script writes them; ranks average
  gradients of their own mean losses, so a script whose batches have a different number of target
  tokens per rank (padding) gets a slightly different average than on one device.
- Only the model loaded through ``from_pretrained`` after this call is parallelized
  (``from_config`` models are not), and only ``DataLoader`` s over map-style datasets without a
  custom sampler are sharded. The loss each rank sees is that of its own share of the batch.
- Outside torchrun (one process) it does nothing.

Knobs (keyword arguments, or environment variables for scripts that must stay unchanged; read
once, when :func:`enable_advanced_parallelization` is called): ``seq_len`` (``FINETUNE_SEQ_LEN``,
default min(2048, max positions)), ``global_batch_size`` (``FINETUNE_GLOBAL_BATCH``, default 8 per
rank), ``gpu_type`` (``FINETUNE_GPU_TYPE``, default H100-80GB on GPU, CPU otherwise), fixed plan
fields as JSON in ``FINETUNE_PARALLELISM`` (e.g. ``{"tensor_parallel": 2}``) and ``compile``
(``FINETUNE_COMPILE=1``: ``torch.compile`` each decoder layer).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from finetune_trainer.config import PlanConfig
from finetune_trainer.parallelize import apply_plan, data_parallel_rank

_STATE: dict[str, Any] = {"enabled": False, "plan": None}


@dataclass(frozen=True)
class Options:
    """The knobs, from keyword arguments or else the environment, read once at the call."""

    seq_len: int | None = None
    global_batch_size: int | None = None
    gpu_type: str | None = None
    #: Plan fields to fix, e.g. {"tensor_parallel": 2}.
    parallelism: dict[str, Any] = field(default_factory=dict)
    compile: bool = False

    @classmethod
    def read(cls, kwargs: dict[str, Any], environ: dict[str, str]) -> Options:
        unknown = set(kwargs) - set(cls.__dataclass_fields__)
        if unknown:
            raise TypeError(
                f"unknown options {sorted(unknown)} (known: {sorted(cls.__dataclass_fields__)})"
            )
        compile_env = environ.get("FINETUNE_COMPILE", "0") == "1"
        return cls(
            seq_len=int(kwargs.get("seq_len") or environ.get("FINETUNE_SEQ_LEN") or 0) or None,
            global_batch_size=int(
                kwargs.get("global_batch_size") or environ.get("FINETUNE_GLOBAL_BATCH") or 0
            )
            or None,
            gpu_type=kwargs.get("gpu_type") or environ.get("FINETUNE_GPU_TYPE") or None,
            parallelism=dict(
                kwargs.get("parallelism") or json.loads(environ.get("FINETUNE_PARALLELISM", "{}"))
            ),
            compile=bool(kwargs["compile"]) if "compile" in kwargs else compile_env,
        )


def _device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _plan_for(model: nn.Module, world: int, device: torch.device, opts: Options) -> PlanConfig:
    from finetune_trainer.planner import (  # noqa: PLC0415
        Cluster,
        Constraints,
        ModelFacts,
        Workload,
        plan_parallelism,
    )

    config: Any = model.config
    cfg = config.to_dict()
    facts = ModelFacts.from_hf_config(cfg, name=getattr(config, "name_or_path", None))
    seq = opts.seq_len or min(2048, int(cfg.get("max_position_embeddings") or 2048))
    gbs = opts.global_batch_size or 8 * world
    gpu = opts.gpu_type or ("H100-80GB" if device.type == "cuda" else "CPU")
    local = _STATE["local_world"]
    fixed = dict(opts.parallelism)
    fixed["pipeline_parallel"] = 1  # a plain loop cannot drive a pipeline schedule
    fixed["context_parallel"] = 1  # nor split its sequences over ranks (ring attention)
    result = plan_parallelism(
        facts,
        Cluster.of(gpu, nodes=max(1, world // local), gpus_per_node=local),
        # a user's script computes Hugging Face's own loss: every logit upcast to fp32
        Workload(seq_len=seq, global_batch_size=gbs, method="full", loss="unchunked"),
        Constraints(**fixed),
    )
    plan = PlanConfig(**{name: getattr(result.plan, name) for name in PlanConfig.model_fields})
    if dist.get_rank() == 0:
        print(f"[finetune] plan: {result.summary} -- {result.reason}", file=sys.stderr, flush=True)
    return plan


def _parallelize(model: nn.Module, opts: Options) -> nn.Module:
    world, rank = dist.get_world_size(), dist.get_rank()
    device = _STATE["device"]
    plan = _plan_for(model, world, device, opts)
    if device.type == "cuda":
        model.to(device)
    apply_plan(
        model, world_size=world, rank=rank, device=device, plan=plan, compile_layers=opts.compile
    )
    _STATE["plan"] = plan

    def _stay(self: nn.Module, *_args: Any, **_kwargs: Any) -> nn.Module:
        return self

    # The sharded model already lives on its device: the script's .to()/.cuda() leave it there.
    model.to = functools.partial(_stay, model)  # type: ignore[method-assign]
    model.cuda = functools.partial(_stay, model)  # type: ignore[method-assign]
    return model


def _patch_from_pretrained(opts: Options) -> None:
    from transformers import PreTrainedModel  # noqa: PLC0415

    original = PreTrainedModel.from_pretrained.__func__  # type: ignore[attr-defined]
    if getattr(original, "_finetune_patched", False):
        return

    @functools.wraps(original)
    def from_pretrained(cls: type, *args: Any, **kwargs: Any) -> Any:
        model = original(cls, *args, **kwargs)
        if isinstance(model, nn.Module) and hasattr(model, "get_decoder"):
            return _parallelize(model, opts)
        return model

    from_pretrained._finetune_patched = True  # type: ignore[attr-defined]
    PreTrainedModel.from_pretrained = classmethod(from_pretrained)  # type: ignore[assignment,method-assign]


def _patch_dataloader() -> None:
    from torch.utils.data import DataLoader, DistributedSampler  # noqa: PLC0415

    original = DataLoader.__init__
    if getattr(original, "_finetune_patched", False):
        return

    @functools.wraps(original)
    def patched_init(
        self: Any,
        dataset: Any,
        batch_size: int | None = 1,
        shuffle: bool | None = None,
        sampler: Any = None,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        plan: PlanConfig | None = _STATE["plan"]
        world = dist.get_world_size()
        size, rank = data_parallel_rank(plan, dist.get_rank(), world)
        shardable = (
            sampler is None
            and not args
            and kwargs.get("batch_sampler") is None
            and hasattr(dataset, "__len__")
            and not isinstance(dataset, torch.utils.data.IterableDataset)
            and batch_size is not None
            and batch_size % size == 0
        )
        if shardable and size > 1:
            sampler = DistributedSampler(
                dataset,
                num_replicas=size,
                rank=rank,
                shuffle=bool(shuffle),
                drop_last=bool(kwargs.get("drop_last", False)),
            )
            batch_size, shuffle = (batch_size or 1) // size, None
        original(self, dataset, batch_size, shuffle, sampler, *args, **kwargs)

    patched_init._finetune_patched = True  # type: ignore[attr-defined]
    DataLoader.__init__ = patched_init  # type: ignore[method-assign]


def enable_advanced_parallelization(**options: Any) -> None:
    """Make this single-device script run planned data/tensor parallelism under torchrun.

    Call it once, before the model is loaded. Options: ``seq_len``, ``global_batch_size``,
    ``gpu_type``, ``parallelism`` (dict of plan fields to fix, e.g. ``{"tensor_parallel": 2}``),
    ``compile`` (bool).
    See the module docstring for what it changes and what it cannot do (pipeline parallelism).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or _STATE["enabled"]:
        return
    opts = Options.read(options, dict(os.environ))
    device = _device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=30)
        )
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    _STATE.update(enabled=True, device=device, local_world=local_world)
    _patch_from_pretrained(opts)
    _patch_dataloader()
