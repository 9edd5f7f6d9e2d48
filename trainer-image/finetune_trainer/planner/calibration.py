"""Efficiency factors of the time model: which are fitted, which are assumed.

FITTED by `python bench/planner/run.py --fit`: least squares on log tokens/s/GPU of the published
configurations in bench/planner/published.toml (each row a public benchmark or paper: model,
GPUs, sequence, batch, layout, measured throughput, with its source), each evaluated at its
published layout; coordinate descent with a golden-section search per factor inside wide bounds
(a factor that ends at a bound is reported). The bench validates by leaving one source out at a
time and writes both numbers to bench/results/planner.json. The values below are the fit on all
16-bit rows that the time model can express (rows with context parallelism or uneven pipeline
stages are left out and listed there):
- GEMM_EFFICIENCY_MAX: achievable fraction of the sustained bf16 peak for large GEMMs, per GPU
  architecture (hopper: the H100 rows; ampere: the A100 rows).
- GEMM_HALF_FLOPS: per-GPU forward matmul FLOPs of one decoder layer for one micro-batch,
  2*(b*s)*P_layer/t, at which GEMM efficiency is half its maximum; efficiency(F) =
  max * F / (F + half), i.e. a fixed cost per layer pass (kernel launches, small ops) of
  half / (peak * max) seconds. The token dimension is not divided by TP (cost.py), so TP8 x
  micro-batch 1 of a 175B model (F ~ 1e12) runs near the maximum, as Megatron-LM measured.
  Only the Megatron-LM rows have GEMMs small enough to inform it: without them the fit drives it
  to its lower bound (bench JSON, fit_per_left_out_source).
- ATTENTION_EFFICIENCY_RATIO: FlashAttention's efficiency relative to GEMMs (also absorbs
  whatever else grows with sequence length in the published runs).
- ELEMENTWISE_BYTES_PER_HIDDEN: memory-bound bytes per token per unit of hidden width per layer
  (norms, activations, residual adds, rotary embeddings, casts between the GEMMs), moved at HBM
  bandwidth and sharded by TP; it is what makes small models (h = 2048) reach a lower fraction
  of peak than large ones at the same batch.
- COMM_EFFICIENCY_INTRA: achieved fraction of NVLink bandwidth for collectives inside a node
  (TP's per-layer all-gathers/reduce-scatters on the critical path are what informs it: the TP
  rows of Megatron-LM, NeMo Automodel and torchtitan). It comes out near 0.5, well below the
  ~0.8 bus bandwidth nccl-tests reach with large messages: TP's messages are small and each pays
  launch and synchronisation costs.
- PIPELINE_ACTION_OVERHEAD_S: fixed seconds per pipeline stage action (one chunk's forward or
  backward of one micro-batch: the schedule's send/receive handshakes and synchronisation),
  informed by the pipelined rows (Megatron-LM, Megatron-Core, NeMo Automodel's interleaved
  LoRA layouts, which measured 0.66-0.87x the speed of their FSDP x TP layouts).

ASSUMED (not fitted; the rows do not pin them down):
- ada/blackwell/cpu efficiency: copied from hopper (no rows).
- COMM_EFFICIENCY_INTER: fraction of the NICs' bandwidth NCCL rings reach across nodes, 0.8 as
  nccl-tests report. Across nodes a collective's rank sees g x the per-GPU NIC bandwidth when
  its group has g ranks in each node (cost.py); with that, no published row is bound by
  inter-node traffic and the fit cannot determine the factor: the bench records the error with
  it halved and doubled (fit_all_rows.assumed_profile). The rows' optimum lies above 1, beyond
  what the NICs can carry: the model over-counts the exposed cross-node traffic of a few runs
  (Megatron-Core's overlapped distributed optimizer), it does not mean the network is faster.
- latencies (alpha of the alpha-beta model, per ring step: NCCL's own tuning model uses ~14 us
  for an inter-node ring step with the Simple protocol), CPU Adam bandwidth, memory overheads
  (2-4 GB of allocator and NCCL overhead, at most 0.9 of HBM: the usual margins of public FSDP
  training reports, not fitted).

Known disagreement: Megatron-LM measured DeepSpeed ZeRO-3 for GPT-3 175B on 1,536 A100s at 44
TFLOP/s/GPU against 141 for TP8 x PP12 (Narayanan et al. 2021, Table 2). This model, which
charges FSDP's per-layer all-gathers and reduce-scatters at NCCL ring bandwidth and latency,
predicts ~3x that ZeRO-3 speed and ranks it first: those 2021 ZeRO-3 runs reached ~15 GB/s per
GPU, well below the per-GPU NIC; the FSDP rows measured since (torchtitan, IBM, MosaicML) need
several times more (tests/unit/planner/test_planner_calibration.py keeps it as a strict xfail).
"""

from __future__ import annotations

from typing import Final

GEMM_EFFICIENCY_MAX: Final[dict[str, float]] = {
    "hopper": 0.679,  # fitted
    "ampere": 0.824,  # fitted
    "ada": 0.679,  # assumed = hopper
    "blackwell": 0.679,  # assumed = hopper
    "cpu": 0.679,  # assumed = hopper
}
GEMM_HALF_FLOPS: Final[float] = 2.7e10  # fitted
ATTENTION_EFFICIENCY_RATIO: Final[float] = 0.31  # fitted
ELEMENTWISE_BYTES_PER_HIDDEN: Final[float] = 644.0  # fitted
PIPELINE_ACTION_OVERHEAD_S: Final[float] = 6.3e-3  # fitted

COMM_EFFICIENCY_INTRA: Final[float] = 0.55  # fitted
COMM_EFFICIENCY_INTER: Final[float] = 0.8  # assumed (not identified by the rows)
LATENCY_INTRA_NODE_S: Final[float] = 10e-6  # per ring step (alpha of the alpha-beta model)
LATENCY_INTER_NODE_S: Final[float] = 20e-6
CPU_ADAM_BYTES_PER_S: Final[float] = 5e9  # torch CPU AdamW per rank, assumed
MEMORY_OVERHEAD_BYTES: Final[int] = 3 * 1024**3  # CUDA context, NCCL buffers, allocator (2-4 GB)
USABLE_MEMORY_FRACTION: Final[float] = 0.9
USABLE_HOST_MEMORY_FRACTION: Final[float] = 0.8
