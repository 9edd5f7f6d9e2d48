"""On a CPU the trainer computes in bf16 only where it measured bf16 faster than fp32."""

from __future__ import annotations

import pytest
import torch

from finetune_trainer.model_loading import autocast_dtype
from finetune_trainer.precision import KEEP_BF16_BELOW, choose_cpu_autocast, time_linear


def test_the_choice_follows_the_measurement_on_this_cpu() -> None:
    choice = choose_cpu_autocast(torch.bfloat16, hidden=128, tokens=64, reps=2)
    assert choice.fp32_s > 0
    assert choice.autocast_s > 0
    faster = choice.autocast_s <= KEEP_BF16_BELOW * choice.fp32_s
    assert choice.dtype == (torch.bfloat16 if faster else None)
    said = choice.describe()
    assert said.startswith("compute: bf16 autocast" if faster else "compute: fp32")
    assert f"{choice.fp32_s / choice.autocast_s:.2f}x" in said


def test_a_losing_dtype_is_not_timed_to_the_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once one run is slower than the winner needs, the measurement stops (start-up stays
    short on CPUs that only emulate bf16)."""
    calls = []
    real = torch.nn.Linear.forward

    def counted(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return real(self, x)

    monkeypatch.setattr(torch.nn.Linear, "forward", counted)
    time_linear(64, 32, None, reps=5, give_up_after=0.0)
    assert calls == [8, 32]  # the warm-up on a few rows, then one timed run


def test_the_run_asks_for_bf16_on_cpu_and_leaves_the_verdict_to_the_measurement() -> None:
    cpu = torch.device("cpu")
    assert autocast_dtype("bfloat16", cpu, sharded=True) == torch.bfloat16
    assert autocast_dtype("float32", cpu, sharded=False) is None
    assert autocast_dtype("bfloat16", torch.device("cuda"), sharded=True) is None  # FSDP's own
