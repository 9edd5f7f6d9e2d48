"""The compute dtype on a CPU, chosen by measuring both on this machine.

On a GPU bf16 is the fast path (tensor cores): FSDP's mixed precision or autocast computes in it.
On a CPU it depends on the chip, and on more than its flags: AMX computes bf16 matmuls several
times faster than fp32; AVX512-BF16 without AMX can be slower than fp32 once autocast's casts
are paid (on a 2-core Xeon with avx512_bf16 the trainer ran 1,240-1,448 tok/s under bf16
autocast and 1,812-2,083 tok/s without); without either, bf16 is emulated. So on a CPU the
trainer times the forward and backward of one linear layer of the model's width both ways, at
start-up, and keeps bf16 autocast only where it is clearly faster. Rank 0 measures and every
rank uses its choice (ranks must compute alike).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
from torch import nn

#: bf16 autocast is kept when it takes at most this fraction of fp32's time: it also costs
#: precision, so a tie goes to fp32.
KEEP_BF16_BELOW = 0.9


@dataclass(frozen=True)
class Choice:
    """The autocast dtype to use (None: fp32) and the times that chose it."""

    dtype: torch.dtype | None
    fp32_s: float
    autocast_s: float

    def describe(self) -> str:
        speed = self.fp32_s / self.autocast_s if self.autocast_s else 0.0
        if self.dtype is not None:
            return f"compute: bf16 autocast ({speed:.2f}x fp32's speed, measured on this CPU)"
        return f"compute: fp32 (bf16 autocast ran at {speed:.2f}x fp32's speed on this CPU)"


def time_linear(
    hidden: int,
    tokens: int,
    dtype: torch.dtype | None,
    reps: int,
    *,
    give_up_after: float = float("inf"),
) -> float:
    """Best seconds of forward + backward through ``Linear(hidden, 4 * hidden)`` on ``tokens``
    rows, under ``dtype`` autocast (None: fp32), after a small warm-up; stops early once one
    run takes longer than ``give_up_after`` (it has lost)."""
    gen = torch.Generator().manual_seed(0)
    layer = nn.Linear(hidden, 4 * hidden)
    x = torch.randn(tokens, hidden, generator=gen, requires_grad=True)

    def once(rows: torch.Tensor) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext():
            y = layer(rows)
        y.float().square().mean().backward()
        return time.perf_counter() - start

    once(x[:8])  # kernels and allocator warm up on a few rows
    best = float("inf")
    for _ in range(reps):
        best = min(best, once(x))
        if best > give_up_after:
            break
    return best


def choose_cpu_autocast(
    wanted: torch.dtype, hidden: int, *, tokens: int = 256, reps: int = 3
) -> Choice:
    """``wanted`` (bf16/fp16 autocast) if it is clearly faster than fp32 here, else None."""
    hidden = max(64, min(hidden, 512))  # the model's width, bounded: well under a second
    fp32 = time_linear(hidden, tokens, None, reps)
    autocast = time_linear(hidden, tokens, wanted, reps, give_up_after=fp32 / KEEP_BF16_BELOW)
    keep = autocast <= KEEP_BF16_BELOW * fp32
    return Choice(wanted if keep else None, fp32, autocast)
