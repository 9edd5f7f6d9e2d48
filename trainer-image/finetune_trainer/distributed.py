"""The process group and the collectives the run's control flow needs (not the model's)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from finetune_trainer.distenv import DistEnv
from finetune_trainer.errors import ConfigError

T = TypeVar("T")


def init_distributed(env: DistEnv, collective_timeout_s: float) -> torch.device:
    """This rank's device (its GPU, or the CPU), with the process group started (NCCL on GPU,
    gloo on CPU) when the run is distributed. A collective that has not completed after
    ``collective_timeout_s`` raises (gloo) or aborts the process (NCCL's watchdog), so a lost
    rank ends the run instead of hanging it."""
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
        device = torch.device("cuda", env.local_rank)
    else:
        device = torch.device("cpu")
    if env.distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=collective_timeout_s))
    return device


def rank0_first(env: DistEnv, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 first (so caches fill once), then on the others; a ConfigError on
    rank 0 is raised on every rank instead of leaving them waiting."""
    if not dist.is_initialized() or env.world_size == 1:
        return fn()
    result: T | None = None
    error: list[str | None] = [None]
    if env.rank == 0:
        try:
            result = fn()
        except ConfigError as err:
            error = [str(err)]
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise ConfigError(error[0])
    if env.rank != 0:
        result = fn()
    assert result is not None
    return result


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is set on any rank, so every rank stops at the same step, whichever of
    them saw the signal."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def from_rank0(fn: Callable[[], T]) -> T:
    """``fn()`` computed on rank 0 and sent to every rank (a choice all ranks must share)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fn()
    box: list[T | None] = [fn() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    value = box[0]
    assert value is not None
    return value
