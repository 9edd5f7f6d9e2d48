"""One optimizer step and one evaluation, over whatever parallel plan the model runs under.

The loss is summed over target tokens and divided by the number of target tokens in the whole
global batch (all micro-batches on all ranks), so the step is the same whether the batch is
packed or padded, accumulated or not, on one rank or many.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from datasets import Dataset
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn import functional

from finetune_trainer.context import sequence_split, split_ready
from finetune_trainer.data import IGNORE, StepSampler, collate, rows_at
from finetune_trainer.parallelize import AppliedPlan
from finetune_trainer.pipeline import Pipeline

Batch = dict[str, torch.Tensor]


def lr_lambda(kind: str, warmup: int, total: int) -> Any:
    """Multiplier of the base learning rate at each step (as transformers' schedules)."""

    def f(step: int) -> float:
        if step < warmup:
            return step / warmup
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))

    return f


def make_optimizer(
    model: nn.Module, lr: float, weight_decay: float, device: torch.device
) -> torch.optim.AdamW:
    """AdamW (fused on GPU); no weight decay on norms and biases."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if device.type == "cuda":
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    return torch.optim.AdamW(groups, lr=lr, foreach=True)


@dataclass
class StepResult:
    step: int
    loss: float
    grad_norm: float
    lr: float
    tokens: int
    seconds: float
    wait_seconds: float
    #: False when the loss or gradient norm was not finite and the update was skipped.
    updated: bool = True


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


class Loop:
    def __init__(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        sampler: StepSampler,
        train: Dataset,
        device: torch.device,
        *,
        pad_id: int,
        autocast: torch.dtype | None,
        max_grad_norm: float,
        parallel: AppliedPlan | None = None,
        seq_len: int | None = None,
    ) -> None:
        """``module`` is the training module (``CausalLMLoss``), or with a pipeline the
        container of this rank's stages (``parallel.pipeline.parts``); ``parallel`` is the plan
        as applied on this rank (none: one rank); ``seq_len`` is the length every pipeline
        micro-batch is padded to (stage shapes are fixed)."""
        self.module = module
        self.pipeline: Pipeline | None = parallel.pipeline if parallel is not None else None
        self.seq_len = seq_len
        world = parallel.world_size if parallel is not None else 1
        dp = parallel.dp_size if parallel is not None else 1
        #: Ranks that read the same rows (TP and PP peers): global sums are divided by it.
        self.readers = world // dp
        #: Ranks that compute the same loss (TP peers).
        self.loss_copies = parallel.tp_size if parallel is not None else 1
        #: Context parallelism: the mesh each micro-batch's sequences are split over (its ranks
        #: sum partial losses and, in FSDP's group, gradients).
        self.cp_mesh = (
            parallel.mesh["cp"]
            if parallel is not None and parallel.mesh is not None and parallel.cp_size > 1
            else None
        )
        self.cp = parallel.cp_size if parallel is not None else 1
        #: Reduce gradients on the last micro-batch only (the plan's gradient_sync "last").
        self.defer_sync = parallel is not None and parallel.gradient_sync == "last"
        #: ZeRO-2 with deferred sync: parameters stay gathered from the first micro-batch's
        #: forward to the last one's backward (one all-gather per step, as ZeRO-1 does).
        self.keep_gathered = self.defer_sync and parallel is not None and parallel.zero_stage == 2
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.sampler = sampler
        self.train = train
        self.device = device
        self.pad_id = pad_id
        self.autocast = autocast
        self.max_grad_norm = max_grad_norm
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self._next: tuple[int, Future[list[Batch]]] | None = None

    # -- data -------------------------------------------------------------------------------
    def _load(self, step: int) -> list[Batch]:
        pin = self.device.type == "cuda"
        out = []
        for idx in self.sampler.micro_batches(step):
            b = collate(rows_at(self.train, idx), self.pad_id)
            out.append({k: v.pin_memory() if pin else v for k, v in b.items()})
        return out

    def _batches(self, step: int) -> list[Batch]:
        if self._next is not None and self._next[0] == step:
            batches = self._next[1].result()
        else:
            batches = self._load(step)
        self._next = (step + 1, self._pool.submit(self._load, step + 1))
        return [{k: v.to(self.device, non_blocking=True) for k, v in b.items()} for b in batches]

    def _ctx(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    @contextlib.contextmanager
    def _forward(self, b: Batch) -> Iterator[tuple[Any, Any]]:
        """(loss summed over targets, targets) of micro-batch ``b``; a backward belongs inside
        the block (under context parallelism the sequence stays split until it has run)."""
        if self.cp_mesh is None:
            with self._ctx():
                out = self.module(b["input_ids"], b["position_ids"], b["labels"])
            yield out
            return
        part = split_ready(b, self.cp, self.pad_id)
        with self._ctx(), sequence_split(self.cp_mesh, part):
            yield self.module(
                part["input_ids"], part["position_ids"], part["targets"], shifted=True
            )

    # -- training ---------------------------------------------------------------------------
    def step(self, step: int) -> StepResult:
        start = time.perf_counter()
        self.module.train()
        batches = self._batches(step)
        wait = time.perf_counter() - start
        local = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
        counts = _all_reduce(torch.tensor([float(local)], device=self.device))
        global_tokens = max(float(counts.item()) / self.readers, 1.0)
        # FSDP averages gradients over its group (dp x fsdp x cp ranks): undo that average
        scale = self.sampler.dp_size * self.cp / global_tokens
        if self.pipeline is not None:
            total = self._pipeline_step(batches, scale)
        else:
            total = torch.zeros((), device=self.device)
            # FSDP2 reduces each micro-batch's gradients (the plan's gradient_sync "every"), or
            # only the last one's ("last": the others accumulate unsharded fp32 gradients,
            # as the planner's memory model counts)
            sync = getattr(self.module, "set_requires_gradient_sync", None)
            reshard = getattr(self.module, "set_reshard_after_backward", None)
            last = len(batches) - 1
            for i, b in enumerate(batches):
                if sync is not None:
                    sync(not self.defer_sync or i == last)
                if reshard is not None and self.keep_gathered:
                    reshard(i == last)
                with self._forward(b) as (loss_sum, _n):
                    (loss_sum * scale).backward()
                total += loss_sum.detach().float()
        norm = self._clip()
        lr = float(self.optimizer.param_groups[0]["lr"])
        summed = float(_all_reduce(total.reshape(1)).item()) / self.loss_copies
        loss = summed / global_tokens
        # Every rank sees the same global loss and norm, so all skip or all step.
        updated = math.isfinite(loss) and math.isfinite(norm)
        if updated:  # a NaN/inf gradient would poison the weights and Adam's moments
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        real_tokens = sum(int((b["input_ids"] != self.pad_id).sum()) for b in batches)
        real = _all_reduce(torch.tensor([float(real_tokens)], device=self.device))
        tokens = int(real.item()) // self.readers
        seconds = time.perf_counter() - start
        return StepResult(step + 1, loss, norm, lr, tokens, seconds, wait, updated)

    def _clip(self) -> float:
        """Clip the global gradient norm (over every shard, TP slice and pipeline stage)."""
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads, 2.0)
            if isinstance(norm, DTensor):
                norm = norm.full_tensor()
            squared = norm.detach().float().reshape(1) ** 2
        else:
            squared = torch.zeros(1, device=self.device)
        if self.pipeline is not None:
            dist.all_reduce(squared, group=self.pipeline.group)
        total = float(squared.sqrt().item())
        coef = self.max_grad_norm / (total + 1e-6)
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
        return total

    def _pad(self, batches: list[Batch]) -> list[Batch]:
        """Pipeline stages have fixed shapes: pad every micro-batch to ``seq_len``."""
        length = self.seq_len or max(b["input_ids"].shape[1] for b in batches)
        out = []
        for b in batches:
            extra = length - b["input_ids"].shape[1]
            if extra < 0:
                raise ValueError(f"a micro-batch is longer than {length} tokens")
            ids = functional.pad(b["input_ids"], (0, extra), value=self.pad_id)
            labels = functional.pad(b["labels"], (0, extra), value=IGNORE)
            pos = b["position_ids"]
            tail = pos[:, -1:] + 1 + torch.arange(extra, device=pos.device)
            out.append(
                {"input_ids": ids, "labels": labels, "position_ids": torch.cat([pos, tail], 1)}
            )
        return out

    def _pipeline_step(self, batches: list[Batch], scale: float) -> torch.Tensor:
        pipe = self.pipeline
        assert pipe is not None
        batches = self._pad(batches)
        pipe.loss_scale[0] = scale
        losses: list[torch.Tensor] = []
        with self._ctx():
            pipe.schedule.step(
                losses=losses,
                arg_mbs=[(b["input_ids"],) for b in batches] if pipe.is_first else None,
                kwarg_mbs=[{"position_ids": b["position_ids"]} for b in batches],
                target_mbs=[b["labels"] for b in batches] if pipe.is_last else None,
                return_outputs=False,
            )
        if not losses:
            return torch.zeros((), device=self.device)
        return torch.stack([x.detach().float() for x in losses]).sum() / scale

    @torch.no_grad()
    def evaluate(self, ds: Dataset, micro_batch_size: int) -> float | None:
        """Mean loss per target token over ``ds``, split over ranks (every rank runs the same
        number of forwards, as sharded models need)."""
        if len(ds) == 0:
            return None
        self.module.eval()
        if self.pipeline is not None:
            return self._pipeline_evaluate(ds, micro_batch_size)
        rank, size = self.sampler.dp_rank, self.sampler.dp_size
        mine = list(range(rank, len(ds), size))
        per_rank = math.ceil(len(ds) / size)
        total = torch.zeros(2, device=self.device)
        for i in range(0, per_rank, micro_batch_size):
            idx = mine[i : i + micro_batch_size]
            rows = rows_at(ds, idx) if idx else rows_at(ds, [0])
            b = {k: v.to(self.device) for k, v in collate(rows, self.pad_id).items()}
            if not idx:
                b["labels"].fill_(IGNORE)
            with self._forward(b) as (loss_sum, n):
                total += torch.stack([loss_sum.float(), n.float()])
        total = _all_reduce(total)
        return float(total[0] / total[1].clamp(min=1))

    def _pipeline_evaluate(self, ds: Dataset, micro_batch_size: int) -> float:
        """As :meth:`evaluate`, in rounds of the schedule's micro-batch count."""
        pipe = self.pipeline
        assert pipe is not None
        n = pipe.schedule._n_microbatches
        rank, size = self.sampler.dp_rank, self.sampler.dp_size
        mine = list(range(rank, len(ds), size))
        per_round = n * micro_batch_size
        rounds = math.ceil(math.ceil(len(ds) / size) / per_round)
        total = torch.zeros(2, device=self.device)
        for r in range(rounds):
            batches = []
            for i in range(n):
                start = r * per_round + i * micro_batch_size
                idx = mine[start : start + micro_batch_size]
                # Fixed stage shapes: fill the micro-batch with row 0, masked out of the loss.
                filler = [0] * (micro_batch_size - len(idx))
                b = collate(rows_at(ds, idx + filler), self.pad_id)
                b["labels"][len(idx) :] = IGNORE
                batches.append({k: v.to(self.device) for k, v in b.items()})
            batches = self._pad(batches)
            targets = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
            pipe.loss_scale[0] = 1.0
            losses: list[torch.Tensor] = []
            with self._ctx():
                pipe.schedule.eval(
                    losses=losses,
                    arg_mbs=[(b["input_ids"],) for b in batches] if pipe.is_first else None,
                    kwarg_mbs=[{"position_ids": b["position_ids"]} for b in batches],
                    target_mbs=[b["labels"] for b in batches] if pipe.is_last else None,
                )
            loss = sum(float(x) for x in losses)
            total += torch.tensor([loss / self.loss_copies, targets / self.readers])
        total = _all_reduce(total)
        return float(total[0] / total[1].clamp(min=1))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
