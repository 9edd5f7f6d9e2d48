"""Memory formulas against hand-computed values."""

import pytest

from finetune_trainer.planner import Cluster, ModelFacts, Workload, known_model, plan_parallelism
from finetune_trainer.planner.calibration import MEMORY_OVERHEAD_BYTES
from finetune_trainer.planner.layout import Layout
from finetune_trainer.planner.memory import (
    activation_bytes_per_token,
    estimate_memory,
    in_flight_microbatches,
    loss_chunk_tokens,
    loss_head_bytes,
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
        # Llama-3-8B h=4096 q=4096 kv=1024 f=14336 a=32, HF layer: 2*(8h + 5q + 4f) + 4a
        ("meta-llama/Meta-Llama-3-8B", "none", 2 * (32768 + 20480 + 57344) + 128),
        # input h, attention out q, every 2nd matmul output of q, k, v, o, gate, up, down
        ("meta-llama/Meta-Llama-3-8B", "selective", 2 * (4096 + 4096 + 4096 + 1024 + 14336 + 4096)
         + 128),
        ("meta-llama/Meta-Llama-3-8B", "full", 2 * 4096),
        # MPT-7B: plain MLP f=4h, MHA: 2*(8h + 5h + 2f) = 42h
        ("mosaicml/mpt-7b", "none", 42 * 4096 + 128),
    ],
)  # fmt: skip
def test_activation_bytes_per_token(model_id: str, ac: str, expected: float) -> None:
    assert activation_bytes_per_token(known_model(model_id), ac) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("model_id", "fused", "expected"),
    [
        # fused norms keep their bf16 input and output: 2 x 4h instead of 2 x 8h
        ("meta-llama/Meta-Llama-3-8B", ("norm",), 2 * (32768 + 20480 + 57344) + 128 - 8 * 4096),
        # + Liger SwiGLU (gate, up, product: 6f) + flash-attention with native GQA (4q + 4kv)
        ("meta-llama/Meta-Llama-3-8B", ("norm", "mlp", "attention"),
         8 * 4096 + (4 * 4096 + 4 * 1024) + 6 * 14336 + 128),
        # MPT-7B under llm-foundry (low-precision LayerNorm, flash attention): Korthikanti et
        # al.'s 34sbh less the two dropout masks, 32h (+ the log-sum-exp)
        ("mosaicml/mpt-7b", ("norm", "attention"), 32 * 4096 + 128),
    ],
)  # fmt: skip
def test_fused_kernels_save_fewer_activations(
    model_id: str, fused: tuple[str, ...], expected: float
) -> None:
    model = known_model(model_id)
    assert activation_bytes_per_token(model, "none", 1, fused) == expected  # type: ignore[arg-type]
    # recomputed layers keep what they kept: only the "none" set (and its recompute) changes
    for ac in ("selective", "full"):
        assert activation_bytes_per_token(model, ac, 1, fused) == activation_bytes_per_token(  # type: ignore[arg-type]
            model,
            ac,  # type: ignore[arg-type]
        )


def test_pure_bf16_states_and_bf16_reduction() -> None:
    """torchtune keeps parameters, gradients and AdamW moments in bf16 (8 bytes/param); FSDP1
    with a bf16 reduce dtype reduce-scatters the bf16 gradient itself (no fp32 copy)."""
    single = lay(fsdp=1)
    wl = Workload(seq_len=1024, global_batch_size=1)
    pure = wl.model_copy(update={"precision": "pure-bf16"})
    mixed_end = estimate_memory(LLAMA8, H100, wl, single, loss="fused")
    pure_end = estimate_memory(LLAMA8, H100, pure, single, loss="fused")
    assert pure_end.moment == mixed_end.moment == "end"
    assert mixed_end.model_states == 16 * P8B
    assert pure_end.model_states == 8 * P8B
    reduce16 = wl.model_copy(update={"reduce_dtype": "bf16"})
    f32 = estimate_memory(LLAMA8, H100, wl, lay(), loss="fused")
    b16 = estimate_memory(LLAMA8, H100, reduce16, lay(), loss="fused")
    assert f32.moment == b16.moment == "layer"
    assert f32.fsdp_buffers - b16.fsdp_buffers == 2 * LAYER8B  # the fp32 copy of a layer's grad
    assert f32.model_states == b16.model_states  # the sharded gradients stay fp32


LLAMA_3_2_3B = {
    "model_type": "llama", "hidden_size": 3072, "num_hidden_layers": 28,
    "num_attention_heads": 24, "num_key_value_heads": 8, "intermediate_size": 8192,
    "vocab_size": 128256, "hidden_act": "silu", "tie_word_embeddings": True,
}  # fmt: skip


@pytest.mark.parametrize(
    ("row", "measured_gib"),
    [
        # torchtune README, Llama-3.2-3B on one A100, pure bf16, packed 4096, torch.compile:
        # 'Peak Memory Active' (no CUDA context or NCCL buffers: our overhead is left out)
        ("TTU-3B-compile", 51.0),
        ("TTU-3B-chunkce", 42.9),
        ("TTU-3B-ac", 24.9),
    ],
)
def test_pure_bf16_peaks_match_torchtune(row: str, measured_gib: float) -> None:
    wl = Workload(
        seq_len=4096, global_batch_size=2, precision="pure-bf16", fused_kernels=("norm", "mlp"),
        loss="fused" if row != "TTU-3B-compile" else "unchunked",
    )  # fmt: skip
    model = ModelFacts.from_hf_config(LLAMA_3_2_3B, name="Llama-3.2-3B")
    m = estimate_memory(model, H100, wl, lay(fsdp=1, mbs=2, ac="full" if row == "TTU-3B-ac"
                                            else "none"))  # fmt: skip
    assert (m.peak - MEMORY_OVERHEAD_BYTES) / 1024**3 == pytest.approx(measured_gib, rel=0.10)


P8B = 8_030_261_248
LAYER8B = 218_112_000  # params of one Llama-3-8B decoder layer
HEAD8B = 128256 * 4096
ROOT8B = 2 * HEAD8B + 4096  # untied embedding + LM head + final norm
ACT8B = 221_312  # bytes/token/layer without recompute (above)


def test_llama8b_fsdp8_by_hand() -> None:
    """Unchunked, backward starting at the loss is the peak: every layer's activations and the
    logits."""
    wl = Workload(seq_len=2048, global_batch_size=16)
    m = estimate_memory(LLAMA8, H100, wl, lay(mbs=2), loss="unchunked")
    tokens = 2 * 2048
    assert m.moment == "loss"
    assert m.model_states == 12 * P8B / 8  # no gradient reduced yet (ga 1)
    assert m.fsdp_buffers == 2 * ROOT8B + 2 * LAYER8B  # root and the last layer gathered
    assert m.activations == (32 * ACT8B + 8 * 4096) * tokens
    assert m.loss_head == 12 * tokens * 128256
    assert m.overhead == MEMORY_OVERHEAD_BYTES
    assert m.peak == pytest.approx(
        m.model_states + m.fsdp_buffers + m.activations + m.loss_head + m.overhead
    )
    # with gradient accumulation the earlier micro-batches' gradients are resident
    ga = estimate_memory(
        LLAMA8, H100, Workload(seq_len=2048, global_batch_size=32), lay(mbs=2, ga=2),
        loss="unchunked",
    )  # fmt: skip
    assert ga.model_states == 16 * P8B / 8
    assert ga.peak - m.peak == pytest.approx(4 * P8B / 8)


def test_chunked_loss_head_by_hand() -> None:
    """The trainer's loss: one chunk of 2**26 logits (6 bytes each), the head input's bf16
    gradient and the head's bf16 weight gradient, all on the vocabulary shard under TP."""
    assert loss_chunk_tokens(128256) == 523  # 2**26 // 128256
    assert loss_chunk_tokens(128256 // 8) == 4185
    assert loss_chunk_tokens(2**27) == 1
    tokens = 65536
    assert loss_head_bytes(LLAMA8, tokens, 1, "chunked") == (
        6 * 523 * 128256 + 2 * 4096 * tokens + 2 * HEAD8B
    )
    assert loss_head_bytes(LLAMA8, tokens, 8, "chunked") == pytest.approx(
        6 * 4185 * 128256 / 8 + 2 * 4096 * tokens + 2 * HEAD8B / 8
    )
    assert loss_head_bytes(LLAMA8, tokens, 1, "chunked", head_trained=False) == (
        6 * 523 * 128256 + 2 * 4096 * tokens
    )
    # fewer tokens than a chunk: the chunk is the micro-batch
    assert loss_head_bytes(LLAMA8, 100, 1, "chunked") == 6 * 100 * 128256 + 2 * 4096 * 100 + (
        2 * HEAD8B
    )
    # vocabulary parallel: the unchunked and fused logits are divided by TP too
    assert loss_head_bytes(LLAMA8, tokens, 8, "unchunked") == 12 * tokens * 128256 / 8
    assert loss_head_bytes(LLAMA8, tokens, 2, "fused") == 2 * tokens * 128256 / 2
    # the default is the trainer's chunked loss, fused when the workload says so
    wl = Workload(seq_len=2048, global_batch_size=16)
    for kind, workload in (("chunked", wl), ("fused", wl.model_copy(update={"loss": "fused"}))):
        default = estimate_memory(LLAMA8, H100, workload, lay(mbs=8, ga=1))
        assert default == estimate_memory(LLAMA8, H100, wl, lay(mbs=8, ga=1), loss=kind)  # type: ignore[arg-type]
        assert default.peak < estimate_memory(LLAMA8, H100, wl, lay(mbs=8), loss="unchunked").peak


def test_long_context_fits_on_one_node() -> None:
    """Llama-3.1-8B at 64k tokens on 8 H100s (published) has a plan once the loss is chunked;
    with the whole micro-batch's logits (12 bytes each, 94 GiB at 64k) no layout fits."""
    model = known_model("meta-llama/Llama-3.1-8B")
    cluster = Cluster.of("H100-80GB", nodes=1, gpus_per_node=8)
    result = plan_parallelism(model, cluster, Workload(seq_len=65536, global_batch_size=8))
    assert result.estimate.fits
    assert result.estimate.peak_memory_bytes <= result.estimate.usable_memory_bytes
    assert loss_head_bytes(model, 65536, 1, "unchunked") > 80e9


def test_fused_loss_and_tp_sharding() -> None:
    """A fused loss and full recompute leave a decoder layer's backward as the peak."""
    wl = Workload(seq_len=4096, global_batch_size=8, loss="fused")
    m = estimate_memory(LLAMA8, H100, wl, lay(fsdp=4, tp=2, mbs=1, ga=2, ac="full"))
    tokens = 4096
    assert m.moment == "layer"
    assert m.loss_head == 0
    assert m.model_states == 16 * P8B / 8
    # root gathered, the head's gradient, the layer's gathered + prefetched + fp32 reduce-scatter
    assert m.fsdp_buffers == pytest.approx((2 * ROOT8B + 2 * HEAD8B + 8 * LAYER8B) / 2)
    # full recompute: 2h per layer input, one layer recomputed, two f-wide gradients, sharded
    # by tp except the two all-gathered norm outputs (2 x 2h) the projections keep
    recomputed = (ACT8B - 4 * 4096) / 2 + 4 * 4096
    assert m.activations == pytest.approx(
        (32 * 8192 / 2 + (recomputed - 8192 / 2) + 4 * 14336 / 2) * tokens
    )


def test_end_of_backward_when_activations_are_small() -> None:
    """Tiny micro-batches: the root's gradient reduce-scatter with every gradient reduced."""
    wl = Workload(seq_len=128, global_batch_size=8, loss="fused")
    m = estimate_memory(LLAMA8, H100, wl, lay(mbs=1, ac="full"))
    assert m.moment == "end"
    assert m.model_states == 16 * P8B / 8
    assert m.fsdp_buffers == (2 + 4) * ROOT8B
    assert m.activations == 0


def test_lora_and_offload_states() -> None:
    wl = Workload(seq_len=1024, global_batch_size=8, method="lora", lora_rank=16)
    m = estimate_memory(LLAMA8, H100, wl, lay())
    adapters = 32 * LLAMA8.lora_params_per_layer(16, wl.lora_targets)
    assert m.model_states == (2 * P8B + 12 * adapters) / 8
    ga = estimate_memory(LLAMA8, H100, wl.model_copy(update={"global_batch_size": 16}),
                         lay(ga=2))  # fmt: skip
    assert ga.model_states == (2 * P8B + 16 * adapters) / 8
    off = estimate_memory(
        LLAMA8, H100, Workload(seq_len=1024, global_batch_size=8), lay(offload=True)
    )
    assert off.model_states == 0
    assert off.host == 16 * P8B / 8


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
    m = estimate_memory(
        known_model("meta-llama/Llama-3.1-8B"), gpu, wl, lay(mbs=2, ac="selective"),
        loss="unchunked",  # torchtitan's loss at the time: the whole micro-batch's fp32 logits
    )  # fmt: skip
    assert 0.8 * 82.4 <= m.peak / 1024**3 <= 1.05 * 82.4


def test_a_pipelined_fsdp_stage_holds_its_gradients_and_parameters_unsharded() -> None:
    """torch's pipeline schedules turn FSDP's gradient sync and resharding off until the last
    micro-batch: the stage's fp32 gradients (4P/t) and bf16 parameters (2P/t) stay whole."""
    from finetune_trainer.planner.layout import Layout
    from finetune_trainer.planner.memory import estimate_memory, stage_params

    model = known_model("meta-llama/Meta-Llama-3-70B")
    gpu = Cluster.of("H100-80GB", nodes=4, gpus_per_node=8).gpu
    wl = Workload(seq_len=4096, global_batch_size=32)

    def peak(fsdp: int, pp: int) -> float:
        lay = Layout(dp=1, fsdp=fsdp, tp=8, pp=pp, schedule="1f1b" if pp > 1 else "none",
                     v=1, mbs=1, ga=32 // fsdp, ac="full", offload=False)  # fmt: skip
        return estimate_memory(model, gpu, wl, lay).model_states

    first, _ = stage_params(model, 4)
    # with FSDP the states grow by the unsharded fp32 gradients; without FSDP nothing changes
    sharded = 12 * first / (2 * 8) + 4 * first / 8
    assert peak(2, 4) == pytest.approx(sharded, rel=0.02)
    assert peak(1, 4) == pytest.approx(16 * first / 8, rel=0.02)


def test_deferred_gradient_sync_keeps_unsharded_gradients() -> None:
    """FSDP2 with set_requires_gradient_sync(False) accumulates the micro-batches' gradients
    unsharded in fp32 (4P/t per rank, on the GPU even with CPU offload) until the last one
    reduce-scatters them: no sharded gradients before that."""
    wl = Workload(seq_len=1024, global_batch_size=16)
    every = estimate_memory(LLAMA8, H100, wl, lay(ga=2))
    last = estimate_memory(LLAMA8, H100, wl, lay(ga=2, grad_sync="last"))
    assert every.model_states == 16 * P8B / 8
    assert last.model_states == 12 * P8B / 8 + 4 * P8B
    # one micro-batch, or a pipeline (its schedule defers anyway): nothing changes
    one = wl.model_copy(update={"global_batch_size": 8})
    assert estimate_memory(LLAMA8, H100, one, lay(grad_sync="last")) == estimate_memory(
        LLAMA8, H100, one, lay()
    )
    off = estimate_memory(LLAMA8, H100, wl, lay(ga=2, grad_sync="last", offload=True))
    assert off.model_states == 4 * P8B
    assert off.host == 16 * P8B / 8
