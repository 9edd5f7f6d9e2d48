"""Context parallelism: each sequence split over the plan's ``context_parallel`` ranks.

torch's ``context_parallel`` (``torch.distributed.tensor.experimental``) shards the micro-batch's
token buffers along the sequence in 2 x cp chunks, rank r taking chunks r and 2cp-1-r (the
load-balanced split: every rank gets the same share of the causal attention's work), and runs
each scaled-dot-product attention as ring attention over the cp ranks (keys and values
all-gathered, their gradients reduce-scattered). Everything else in the layer (norms, MLP,
projections) is per token and runs on the local chunk unchanged. The FSDP group of the plan is
fsdp x cp (:mod:`finetune_trainer.parallelize`): the cp ranks compute gradients of the same
parameters on different tokens, and FSDP's reduction sums them.

What the trainer changes for it, here:

- **Targets before the split.** The loss pairs each position with the next token; once the
  sequence is split the next token may live on another rank, so labels are shifted on the whole
  sequence first (:func:`split_ready`) and the loss (``CausalLMLoss``, ``shifted=True``) pairs
  position i with target i.
- **Equal chunks.** The sequence is padded (pad token, no target, positions counting on) to a
  multiple of 2 x cp.
- **Causal attention, no mask.** Ring attention knows only "causal": the model's attention is
  switched to :func:`ring_attention` (plain causal SDPA, keys and values repeated to the query
  heads), and its mask builder to none. So documents cannot be packed into one row (their
  boundaries would need a mask): under context parallelism the trainer does not pack
  (``packing_allowed``).
- **GPUs only.** torch's ring attention dispatches the CUDA attention kernels (flash, memory
  efficient, cuDNN); on CPU the attention op has no context-parallel rule, so a plan with
  context parallelism is refused on CPU before anything loads (:func:`check_device`). The
  planner never proposes it there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.nn import functional

from finetune_trainer.data import IGNORE
from finetune_trainer.errors import ConfigError

#: The attention and mask implementation name the trainer registers with transformers.
RING_ATTENTION = "finetune_ring"


def check_device(context_parallel: int, pipeline_parallel: int, device_type: str) -> None:
    """Refuse what the trainer cannot run: context parallelism on CPU, or with a pipeline."""
    if context_parallel <= 1:
        return
    if device_type != "cuda":
        raise ConfigError(
            f"the plan splits each sequence over {context_parallel} ranks (contextParallel), "
            "which needs GPUs: torch's ring attention has CUDA kernels only. Set "
            "spec.parallelism.contextParallel to 1 (the planner never chooses it on CPU)"
        )
    if pipeline_parallel > 1:
        raise ConfigError(
            "contextParallel cannot be combined with pipelineParallel in this trainer: set one "
            "of them to 1"
        )


def packing_allowed(context_parallel: int) -> bool:
    """Whether documents may be packed into one row (not under context parallelism: its ring
    attention cannot mask document boundaries)."""
    return context_parallel <= 1


def ring_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **_kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal scaled-dot-product attention, in transformers' attention-function form
    ((batch, heads, seq, dim) in, (batch, seq, heads, dim) out); inside ``context_parallel``
    torch runs it as ring attention. ``attention_mask`` is always None (the mask builder is
    switched off with it; packed rows are refused by :func:`split_ready`)."""
    from transformers.integrations.sdpa_attention import repeat_kv  # noqa: PLC0415

    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    out = functional.scaled_dot_product_attention(
        query,
        key,
        value,
        dropout_p=dropout if module.training else 0.0,
        is_causal=True,
        scale=scaling,
    )
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*_args: Any, **_kwargs: Any) -> None:
    return None


def use_ring_attention(model: nn.Module) -> None:
    """Switch a Hugging Face model to :func:`ring_attention` and no attention mask."""
    from transformers import AttentionInterface  # noqa: PLC0415
    from transformers.masking_utils import AttentionMaskInterface  # noqa: PLC0415

    AttentionInterface.register(RING_ATTENTION, ring_attention)
    AttentionMaskInterface.register(RING_ATTENTION, _no_mask)
    setter = getattr(model, "set_attn_implementation", None)
    if setter is None:
        raise ConfigError(
            f"{type(model).__name__} cannot switch its attention implementation: context "
            "parallelism needs a Hugging Face model with selectable attention"
        )
    setter(RING_ATTENTION)


def split_ready(
    batch: dict[str, torch.Tensor], context_parallel: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """The micro-batch as context parallelism splits it: ``targets`` (each position's next
    token, IGNORE where there is none) instead of ``labels``, and every tensor padded along the
    sequence to a multiple of 2 x cp (pad token, no target, positions counting on). Rows that
    pack several documents are refused (their boundaries would need a mask)."""
    ids, pos, labels = batch["input_ids"], batch["position_ids"], batch["labels"]
    if pos.shape[1] > 1 and bool((pos.diff(dim=1) != 1).any()):
        raise ConfigError(
            "a micro-batch packs several documents into one row, which context parallelism "
            "cannot mask (its ring attention is causal over the whole row): run with "
            "dataset packing off"
        )
    targets = functional.pad(labels[:, 1:], (0, 1), value=IGNORE)
    extra = -ids.shape[1] % (2 * context_parallel)
    if extra:
        ids = functional.pad(ids, (0, extra), value=pad_id)
        targets = functional.pad(targets, (0, extra), value=IGNORE)
        tail = pos[:, -1:] + 1 + torch.arange(extra, device=pos.device)
        pos = torch.cat([pos, tail], 1)
    return {"input_ids": ids, "position_ids": pos, "targets": targets}


@contextlib.contextmanager
def sequence_split(mesh: DeviceMesh, batch: dict[str, torch.Tensor]) -> Iterator[None]:
    """Inside: ``batch``'s tensors hold this rank's chunks (in place) and attention is ring
    attention over ``mesh`` (GPU only)."""
    from torch.distributed.tensor.experimental import context_parallel  # noqa: PLC0415

    buffers = [batch["input_ids"], batch["position_ids"], batch["targets"]]
    with context_parallel(
        mesh, buffers=buffers, buffer_seq_dims=[1, 1, 1], no_restore_buffers=set(buffers)
    ):
        yield
