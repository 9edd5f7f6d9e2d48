"""Memory formulas against hand-computed values."""

import pytest

from finetune_trainer.planner import Cluster, Workload, known_model
from finetune_trainer.planner.calibration import MEMORY_OVERHEAD_BYTES
from finetune_trainer.planner.layout import Layout
from finetune_trainer.planner.memory import (
    activation_bytes_per_token,
    estimate_memory,
    in_flight_microbatches,
)

LLAMA8 = known_model("meta-llama/Meta-Llama-3-8B")
H100 = Cluster.of("H100-80GB").gpu


def lay(**kw: object) -> Layout:
    base: dict[str, object] = {
        "dp": 1,
        "fsdp": 8,
        "tp": 1,
        "pp": 1,
        "schedule": "none",
        "v": 1,
        "mbs": 1,
        "ga": 1,
        "ac": "none",
        "offload": False,
    }
    base.update(kw)
    return Layout(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("model_id", "ac", "expected"),
    [
        # Llama-3-8B h=4096 q=4096 kv=1024 f=14336 a=32: 2*(4h+2q+2kv+4f) + 4a
        ("meta-llama/Meta-Llama-3-8B", "none", 2 * (16384 + 8192 + 2048 + 57344) + 128),
        # 2*(h + q + (q + 2kv + h + 2f + h)/2) + 4a
        ("meta-llama/Meta-Llama-3-8B", "selective", 2 * (8192 + 43008 / 2) + 128),
        ("meta-llama/Meta-Llama-3-8B", "full", 2 * 4096),
        # MPT-7B: plain MLP f=4h, MHA: 32h bytes (Korthikanti's 34h without dropout masks)
        ("mosaicml/mpt-7b", "none", 32 * 4096 + 128),
    ],
)
def test_activation_bytes_per_token(model_id: str, ac: str, expected: float) -> None:
    assert activation_bytes_per_token(known_model(model_id), ac) == expected  # type: ignore[arg-type]


def test_llama8b_fsdp8_by_hand() -> None:
    wl = Workload(seq_len=2048, global_batch_size=16)
    m = estimate_memory(LLAMA8, H100, wl, lay(mbs=2))
    tokens = 2 * 2048
    assert m.model_states == 16 * 8_030_261_248 / 8
    assert m.fsdp_buffers == 10 * 128256 * 4096  # embedding/head is the largest unit
    assert m.activations == (32 * 168064 + 4 * 4096) * tokens
    assert m.loss_head == 10 * tokens * 128256
    assert m.overhead == MEMORY_OVERHEAD_BYTES
    assert m.peak == pytest.approx(
        m.model_states + m.fsdp_buffers + m.activations + m.loss_head + m.overhead
    )


def test_fused_loss_and_tp_sharding() -> None:
    wl = Workload(seq_len=4096, global_batch_size=8, fused_loss=True)
    m = estimate_memory(LLAMA8, H100, wl, lay(fsdp=4, tp=2, mbs=1, ac="full"))
    tokens = 4096
    assert m.loss_head == 2 * tokens * 128256
    assert m.model_states == 16 * 8_030_261_248 / 8
    # full recompute: 2h per layer input + one layer's full activations, sharded by tp (SP)
    assert m.activations == pytest.approx((32 * 8192 + (168064 - 8192) + 4 * 4096) * tokens / 2)


def test_lora_and_offload_states() -> None:
    wl = Workload(seq_len=1024, global_batch_size=8, method="lora", lora_rank=16)
    m = estimate_memory(LLAMA8, H100, wl, lay())
    adapters = 32 * LLAMA8.lora_params_per_layer(16, wl.lora_targets)
    assert m.model_states == (2 * 8_030_261_248 + 16 * adapters) / 8
    assert m.fsdp_buffers == 4 * 128256 * 4096
    off = estimate_memory(
        LLAMA8, H100, Workload(seq_len=1024, global_batch_size=8), lay(offload=True)
    )
    assert off.model_states == 0


@pytest.mark.parametrize(
    ("schedule", "pp", "ga", "v", "first"),
    [
        ("none", 1, 4, 1, 1.0),
        ("gpipe", 4, 8, 1, 8.0),
        ("1f1b", 4, 8, 1, 4.0),
        ("1f1b", 4, 4, 1, 4.0),
        ("interleaved-1f1b", 4, 8, 2, 4.0 * (1 + 3 / 8)),
    ],
)
def test_pipeline_in_flight(schedule: str, pp: int, ga: int, v: int, first: float) -> None:
    f, last = in_flight_microbatches(lay(schedule=schedule, pp=pp, ga=ga, v=v, fsdp=2))
    assert f == pytest.approx(first)
    assert last == (ga if schedule == "gpipe" else 1.0)


def test_memory_monotone_in_microbatch_and_recompute() -> None:
    wl = Workload(seq_len=4096, global_batch_size=64)
    peaks = [estimate_memory(LLAMA8, H100, wl, lay(mbs=b, ga=8 // b)).peak for b in (1, 2, 4, 8)]
    assert peaks == sorted(peaks)
    by_ac = [
        estimate_memory(LLAMA8, H100, wl, lay(ac=a)).peak for a in ("none", "selective", "full")
    ]
    assert by_ac == sorted(by_ac, reverse=True)


def test_t1_peak_close_to_published() -> None:
    """torchtitan T1 (Llama-3.1-8B, FSDP8, mbs2, SAC, seq 8192) reported 82.4 GiB reserved."""
    gpu = Cluster.of("H100-96GB").gpu
    wl = Workload(seq_len=8192, global_batch_size=16)
    m = estimate_memory(known_model("meta-llama/Llama-3.1-8B"), gpu, wl, lay(mbs=2, ac="selective"))
    assert 0.8 * 82.4 <= m.peak / 1024**3 <= 1.05 * 82.4
