"""Efficiency factors of the time model: which are fitted, which are assumed.

FITTED (by `python bench/planner/run.py --fit`: a grid search for the least squares on log
tokens/s/GPU of the published configurations T1, T2, T8, T9, M1-M5, each evaluated at its
published plan; they are the ``ROWS`` of bench/planner/run.py, taken from torchtitan's Llama-3
benchmark tables and MosaicML llm-foundry's MPT benchmark table, with each row's source):
- GEMM_EFFICIENCY_MAX: achievable fraction of the sustained bf16 peak for large GEMMs, per GPU
  architecture (hopper fitted on T1, T2, M1-M5; ampere fitted on T8, T9).
- GEMM_HALF_TOKENS: micro-batch size (tokens x hidden/4096 per GPU) at which GEMM efficiency is
  half its maximum; efficiency(x) = max * x / (x + half). A saturating curve of the kind GEMM
  roofline measurements show; it is what makes larger micro-batches faster per token.
- ATTENTION_EFFICIENCY_RATIO: FlashAttention's efficiency relative to GEMMs. (It comes out low:
  it also absorbs whatever else grows with sequence length in the published runs.)
- COMM_EFFICIENCY_INTER: achieved fraction of the per-GPU NIC bandwidth for inter-node
  collectives; only T8/T9 (FSDP over 64 A100s at 25 GB/s per GPU) are communication-bound enough
  to inform it.

ASSUMED (not fitted; the rows carry no information about them):
- ada/blackwell/cpu efficiency: copied from hopper.
- COMM_EFFICIENCY_INTRA: NCCL ring bus bandwidth over NVLink as a fraction of the link bandwidth
  (nccl-tests all-gather on DGX H100 reach ~360 GB/s of 450 -> 0.8).
- latencies, CPU Adam bandwidth, memory overheads (2-4 GB of allocator and NCCL overhead, at most
  0.9 of HBM: the usual margins of public FSDP training reports, not fitted).
"""

from __future__ import annotations

from typing import Final

GEMM_EFFICIENCY_MAX: Final[dict[str, float]] = {
    "hopper": 0.57,  # fitted
    "ampere": 0.83,  # fitted
    "ada": 0.57,  # assumed = hopper
    "blackwell": 0.57,  # assumed = hopper
    "cpu": 0.57,  # assumed
}
GEMM_HALF_TOKENS: Final[float] = 2000.0  # fitted
ATTENTION_EFFICIENCY_RATIO: Final[float] = 0.3  # fitted

COMM_EFFICIENCY_INTRA: Final[float] = 0.8
COMM_EFFICIENCY_INTER: Final[float] = 1.0  # fitted (grid max; T8/T9 want >= 1)
LATENCY_INTRA_NODE_S: Final[float] = 10e-6  # per ring step (alpha of the alpha-beta model)
LATENCY_INTER_NODE_S: Final[float] = 20e-6
CPU_ADAM_BYTES_PER_S: Final[float] = 5e9  # torch CPU AdamW per rank, assumed
MEMORY_OVERHEAD_BYTES: Final[int] = 3 * 1024**3  # CUDA context, NCCL buffers, allocator (2-4 GB)
USABLE_MEMORY_FRACTION: Final[float] = 0.9

# Ranking premium (assumed): a pipelined plan must beat the others by this fraction of its step
# time to be chosen. Pipelining costs that the model leaves out -- schedule/launch overhead per
# stage action, FSDP overlap lost at stage boundaries, imbalance beyond the LM head -- are real
# but not measured by any calibration row, and they are of the order of the model's own error
# (~5-10%), so a plan only wins with PP when it is clearly better. Estimates are not changed.
PIPELINE_RANKING_PREMIUM: Final[float] = 0.05
INTERLEAVED_RANKING_PREMIUM: Final[float] = 0.02
USABLE_HOST_MEMORY_FRACTION: Final[float] = 0.8
