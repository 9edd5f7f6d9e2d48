"""Summed next-token cross-entropy of the LM head, computed in chunks of target tokens so that
the logits of a whole micro-batch never exist at once, and on the vocabulary shards of a
column-parallel (tensor parallel) head without gathering them.

``chunked_cross_entropy(hidden, head, targets)`` equals
``cross_entropy(head(hidden).float(), targets, ignore_index=..., reduction="sum")`` in value and
gradients (tests/trainer/test_loss.py), computed as:

- **Chunks.** Rows (tokens) go through the head ``loss_chunk_tokens(V_local)`` at a time, the
  planner's rule (:func:`finetune_trainer.planner.memory.loss_chunk_tokens`): as many tokens as
  keep one chunk's logits at ``LOSS_CHUNK_LOGITS`` (2**26) elements, e.g. 523 tokens of
  Llama-3's 128,256-entry vocabulary, 4,185 under TP 8. A chunk's fp32 logits are then 256 MiB
  whatever the vocabulary and TP degree.
- **Backward by recomputation.** A custom autograd Function keeps only its inputs and one fp32
  log-sum-exp per token; its backward recomputes each chunk's logits, turns them into the
  logits' gradient in place (softmax - one-hot, times the incoming gradient) and accumulates the
  head's weight gradient in place (``addmm_``). Peak while a chunk is alive: its logits in the
  compute dtype and their fp32 copy (2 + 4 bytes per logit in bf16, 4 in fp32) -- then the
  gradient's cast back to the compute dtype (4 + 2). Measured with MemTracker on CPU under
  FakeTensorMode (Llama-3's head, h 4096, V 128,256, 8,192 tokens; bytes above the inputs,
  forward + backward): bf16 -- all logits at once 12,024 MiB (12.0 bytes per logit, the
  planner's unchunked charge), ``torch.utils.checkpoint`` per chunk 3,074 MiB (each chunk's
  autograd graph is rebuilt whole, and every chunk's weight gradient is summed out of place
  into a second V x h buffer), this Function 1,450 MiB (6.00 bytes per logit of one chunk plus
  the hidden and weight gradients); fp32 -- 12,024 / 6,148 / 2,396 MiB; a TP 8 shard
  (V 16,032) at 65,536 tokens in bf16 -- 12,024 / 1,662 / 1,023 MiB. Hence this Function.
  The recomputation costs one more head forward (2 h V FLOPs per target token, about 2% of an
  8B model's step).
- **Target selection.** With ``select_targets`` (the trainer), only rows whose target is not
  ``ignore_index`` go through the head (prompt, pad and document-start positions cost nothing);
  ``select_targets=False`` runs every row and masks the ignored ones (no data-dependent shapes:
  FakeTensorMode, tests/trainer/test_memory_model.py).
- **Vocabulary parallel.** When the head's weight is a DTensor sharded over the vocabulary
  (``Shard(0)`` on a 1-D tensor-parallel mesh, as ``parallelize.apply_tensor_parallel`` leaves
  it), each rank computes its shard's logits only: the row maximum is all-reduced (MAX) once
  per chunk, the sums of exponentials and the target logits (each held by one rank) once for
  all chunks (SUM), and in backward the hidden states' gradient (a partial sum over the
  shards) once, as
  Megatron-LM's vocab-parallel cross-entropy (Shoeybi et al. 2019, Sec. 3) does. The input
  ``hidden`` must be the same on every TP rank (the final norm's output gathered to the whole
  sequence).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from finetune_trainer.planner.memory import loss_chunk_tokens


def chunked_cross_entropy(
    hidden: torch.Tensor,
    head: nn.Module,
    targets: torch.Tensor,
    *,
    ignore_index: int,
    select_targets: bool = True,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Sum over rows of ``hidden`` (N, h) whose ``targets`` (N,) are not ``ignore_index`` of
    -log softmax(head(row))[target], as a float32 scalar (module docstring).

    ``head`` is the LM head (``nn.Linear``, its weight a tensor or a vocabulary-sharded DTensor);
    ``chunk_tokens`` overrides the planner's rule (tests).
    """
    full_weight = head.weight
    if not isinstance(full_weight, torch.Tensor):
        raise TypeError(f"the LM head {type(head).__name__} has no weight tensor")
    weight, group = _local_weight(full_weight)
    bias = getattr(head, "bias", None)
    if bias is not None:
        bias, _ = _local_weight(bias)
    vocab_start = 0
    if group is not None:
        full_vocab = int(full_weight.shape[0])
        per_rank = -(-full_vocab // dist.get_world_size(group))
        vocab_start = dist.get_rank(group) * per_rank
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        # what autocast would do to the head's matmul: both operands in the autocast dtype
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    rows = None
    if select_targets:
        rows = (targets != ignore_index).nonzero().squeeze(1)
    chunk = chunk_tokens or loss_chunk_tokens(int(weight.shape[0]))
    with torch.autocast(device_type, enabled=False):
        loss: torch.Tensor = _ChunkedHeadCrossEntropy.apply(
            hidden, weight, bias, targets, rows, ignore_index, chunk, group, vocab_start
        )
    return loss


def _local_weight(w: torch.Tensor) -> tuple[torch.Tensor, dist.ProcessGroup | None]:
    """This rank's rows of the head's weight (or bias) and the group its vocabulary is split
    over (None: all of it here)."""
    if not isinstance(w, DTensor):
        return w, None
    placements = tuple(w.placements)
    if all(isinstance(p, Replicate) for p in placements):
        return w.to_local(), None
    mesh = w.device_mesh
    # a tensor-parallel split (parallelize.MESH_DIMS names it "tp"), never FSDP's shards
    if mesh.ndim == 1 and placements == (Shard(0),) and mesh.mesh_dim_names in (None, ("tp",)):
        return w.to_local(), mesh.get_group()
    raise ValueError(
        f"the LM head's weight is laid out as {placements} on mesh {mesh}; the loss needs it "
        "whole or split over the vocabulary (Shard(0)) on the tensor-parallel mesh dimension"
    )


def _logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """One chunk's logits in fp32 (the compute-dtype product is freed at once)."""
    return nn.functional.linear(h, w, b).float()


class _ChunkedHeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        rows: torch.Tensor | None,
        ignore_index: int,
        chunk: int,
        group: dist.ProcessGroup | None,
        vocab_start: int,
    ) -> torch.Tensor:
        n = hidden.shape[0] if rows is None else rows.shape[0]
        tgt = targets if rows is None else targets.index_select(0, rows)
        local = tgt - vocab_start
        here = (tgt != ignore_index) & (local >= 0) & (local < weight.shape[0])
        local = torch.where(here, local, 0)
        top = torch.empty(n, dtype=torch.float32, device=hidden.device)
        sums = torch.empty_like(top)
        target_logit = torch.empty_like(top)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            z = _logits(_rows(hidden, rows, s, e), weight, bias)
            picked = z.gather(1, local[s:e, None]).squeeze(1)
            target_logit[s:e] = torch.where(here[s:e], picked, 0.0)
            top[s:e] = z.amax(1)
            if group is not None:  # the maximum over every shard, before exponentiating
                dist.all_reduce(top[s:e], dist.ReduceOp.MAX, group=group)
            sums[s:e] = z.sub_(top[s:e, None]).exp_().sum(1)
            del z
        if group is not None:  # every shard's sum and the one shard's target logit
            both = torch.stack([sums, target_logit])
            dist.all_reduce(both, group=group)
            sums, target_logit = both[0], both[1]
        lse = top + sums.log()
        valid = tgt != ignore_index
        per_token = torch.where(valid, lse - target_logit, 0.0)
        ctx.save_for_backward(hidden, weight, bias, rows, local, here, valid, lse)
        ctx.chunk, ctx.group = chunk, group
        return per_token.sum()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        hidden, weight, bias, rows, local, here, valid, lse = ctx.saved_tensors
        chunk, group = ctx.chunk, ctx.group
        n = lse.shape[0]
        scale = torch.where(valid, grad.float(), 0.0)[:, None]
        grad_hidden = torch.zeros_like(hidden) if rows is not None else torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[2] else None
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            h = _rows(hidden, rows, s, e)
            z = _logits(h, weight, bias)
            z.sub_(lse[s:e, None]).exp_()  # softmax over the whole vocabulary
            z.scatter_add_(1, local[s:e, None], -here[s:e, None].to(z.dtype))
            z.mul_(scale[s:e])
            g = z.to(weight.dtype)
            del z
            part = g @ weight
            if rows is None:
                grad_hidden[s:e] = part
            else:
                grad_hidden.index_copy_(0, rows[s:e], part)
            del part
            if grad_weight is not None:
                grad_weight.addmm_(g.t(), h)
            if grad_bias is not None:
                grad_bias += g.sum(0)
            del g  # before the next chunk's logits
        if group is not None:
            dist.all_reduce(grad_hidden, group=group)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None


def _rows(hidden: torch.Tensor, rows: torch.Tensor | None, s: int, e: int) -> torch.Tensor:
    return hidden[s:e] if rows is None else hidden.index_select(0, rows[s:e])
