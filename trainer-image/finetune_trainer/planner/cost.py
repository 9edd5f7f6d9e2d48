"""Step time of a candidate plan.

T_step = m * T_mb + bubble + T_optimizer          (m = micro-batches per step = ga)
T_mb   = max(T_compute, T_fsdp) + T_fsdp_exposed + T_tp + T_pp + T_offload
(its efficiency factors fitted on the published rows of bench/planner/run.py, see
calibration.py). Sources of each term:
- FLOPs per token: 6N for forward+backward (Kaplan et al. 2020, "Scaling Laws for Neural Language
  Models", Sec. 2.1) plus attention 12*L*h*s (PaLM, Chowdhery et al. 2022, App. B), of which a
  causal FlashAttention kernel executes half. Full recompute adds one forward: 8N + 16*L*h*s
  (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters using
  Megatron-LM", Sec. 5.1 / eq. 3). Selective (per-op SAC) recomputes every second matmul: +1N.
  LoRA skips the frozen weights' weight-gradient GEMMs: 4N (NeMo's reported LoRA TFLOPs match it).
- T_compute = GEMM FLOPs / (peak * eta_gemm(micro-batch)) + attention FLOPs / (peak * eta_attn),
  eta fitted on the published rows (calibration.py).
- Collectives, ring alpha-beta model (Thakur et al. 2005; NCCL): all-gather / reduce-scatter move
  (n-1)/n * M bytes per rank, all-reduce 2(n-1)/n * M.
- FSDP / ZeRO-3: all-gather params in forward and again in backward (bf16) and reduce-scatter
  grads (fp32), 3 passes = 1.5x DDP (Rajbhandari et al. 2020, Sec. 7), every micro-batch; it
  overlaps with compute except the first all-gather and the last reduce-scatter.
- HSDP: + all-reduce of the shard's fp32 gradients across replicas (overlapped the same way).
- TP with sequence parallelism: per layer 2 all-gathers + 2 reduce-scatters of b*s*h in forward and
  the same in backward (Korthikanti et al. 2022, Sec. 4.2.2), on the critical path; full recompute
  repeats the forward ones.
- PP: b*s*h/t activations forward and gradients backward per stage boundary per micro-batch, v
  times with interleaving; bubble (p-1)/v micro-batch slots (Narayanan et al. 2021, Sec. 2.2).
- Optimizer: AdamW is memory bound: reads param, grad, m, v (16 B) and writes param, m, v (12 B)
  per fp32 param (counted); on the CPU with offload.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import calibration as cal
from .hardware import Cluster, GPUSpec
from .layout import Layout
from .memory import lora_params, stage_params
from .model import ModelFacts
from .workload import Workload

ADAM_BYTES_PER_PARAM = 16 + 12


@dataclass(frozen=True, slots=True)
class TimeBreakdown:
    """Seconds per optimizer step."""

    compute: float  # all micro-batches, at fitted efficiency
    comm_exposed: float  # collectives not hidden behind compute
    bubble: float
    optimizer: float
    step: float


def model_flops_per_token(model: ModelFacts, seq_len: int, method: str) -> float:
    """FLOPs per token for MFU: 6N + 12*L*h*s (full) or 4N + 12*L*h*s (LoRA)."""
    n = 4.0 if method == "lora" else 6.0
    return n * model.flop_params + 12.0 * model.num_layers * model.q_dim * seq_len


def gemm_efficiency(gpu: GPUSpec, tokens: float, hidden: int, tp: int) -> float:
    x = tokens * hidden / (tp * 4096.0)
    return cal.GEMM_EFFICIENCY_MAX[gpu.architecture] * x / (x + cal.GEMM_HALF_TOKENS)


def _ring_time(n: int, nbytes: float, bw: float, latency: float, factor: float) -> float:
    """factor*(n-1)/n*M bytes at bw, alpha*(n-1) latency (factor 1: AG/RS, 2: all-reduce)."""
    if n <= 1:
        return 0.0
    return factor * (n - 1) / n * nbytes / bw + latency * (n - 1) * factor


def _bw(cluster: Cluster, spans_nodes: bool) -> tuple[float, float]:
    gpu = cluster.gpu
    if spans_nodes:
        return gpu.inter_node_bandwidth * cal.COMM_EFFICIENCY_INTER, cal.LATENCY_INTER_NODE_S
    return gpu.intra_node_bandwidth * cal.COMM_EFFICIENCY_INTRA, cal.LATENCY_INTRA_NODE_S


def estimate_time(
    model: ModelFacts, cluster: Cluster, workload: Workload, lay: Layout
) -> TimeBreakdown:
    gpu = cluster.gpu
    gpn = cluster.gpus_per_node
    lora = workload.method == "lora"
    s = workload.seq_len
    tokens = lay.mbs * s
    layers_per_stage = model.num_layers // lay.pp
    h, q = model.hidden_size, model.q_dim

    # ---- compute per micro-batch, slowest stage (the one with the LM head) ----------------
    layer_fwd = 2.0 * model.params_per_layer * layers_per_stage  # FLOPs/token, 2 per MAC
    head_fwd = 2.0 * model.vocab_size * h
    passes = 2.0 if lora else 3.0  # fwd + bwd(input) [+ bwd(weight)]
    gemm = passes * (layer_fwd + head_fwd)
    if lora:
        n_lora = lora_params(model, workload, layers_per_stage)
        gemm += 6.0 * n_lora
    if lay.ac == "selective":
        gemm += 0.5 * layer_fwd
    elif lay.ac == "full":
        gemm += layer_fwd
    attn_fwd = 2.0 * layers_per_stage * q * s  # causal: half of 4*L*h*s
    attn = 3.0 * attn_fwd + (attn_fwd if lay.ac == "full" else 0.0)
    eta_g = gemm_efficiency(gpu, tokens, h, lay.tp)
    eta_a = cal.GEMM_EFFICIENCY_MAX[gpu.architecture] * cal.ATTENTION_EFFICIENCY_RATIO
    peak = gpu.peak_flops
    t_compute = tokens / lay.tp * (gemm / (peak * eta_g) + attn / (peak * eta_a))

    # ---- FSDP / HSDP collectives per micro-batch --------------------------------------------
    _, last_p = stage_params(model, lay.pp)
    p_tp = last_p / lay.tp  # params this TP rank holds before FSDP sharding
    fsdp_bw, fsdp_lat = _bw(cluster, lay.tp * lay.fsdp > gpn)
    n_units = layers_per_stage + 2
    if lora:
        ag = 2 * _ring_time(lay.fsdp, 2.0 * p_tp, fsdp_bw, fsdp_lat, 1.0)
        grads = 4.0 * lora_params(model, workload, layers_per_stage) / lay.tp
    else:
        ag = 2 * _ring_time(lay.fsdp, 2.0 * p_tp, fsdp_bw, fsdp_lat, 1.0)
        grads = 4.0 * p_tp
    rs = _ring_time(lay.fsdp, grads, fsdp_bw, fsdp_lat, 1.0)
    rep_bw, rep_lat = _bw(cluster, lay.tp * lay.fsdp * lay.dp > gpn)
    allreduce = _ring_time(lay.dp, grads / lay.fsdp, rep_bw, rep_lat, 2.0)
    t_fsdp = ag + rs + allreduce
    t_fsdp_exposed = (ag / 2 + rs + allreduce) / n_units  # first all-gather, last reductions

    # ---- tensor parallel (sequence parallel) -------------------------------------------------
    t_tp = 0.0
    if lay.tp > 1:
        n_coll = 8 + (4 if lay.ac == "full" else 0)
        act_bytes = 2.0 * tokens * h
        tp_bw, tp_lat = _bw(cluster, False)
        t_tp = n_coll * layers_per_stage * _ring_time(lay.tp, act_bytes, tp_bw, tp_lat, 1.0)

    # ---- pipeline p2p ----------------------------------------------------------------------
    t_pp = 0.0
    if lay.pp > 1:
        pp_bw, pp_lat = _bw(cluster, lay.world > gpn)
        t_pp = lay.v * 2 * (2.0 * tokens * h / lay.tp / pp_bw + pp_lat)

    # ---- CPU offload: sharded fp32 params host->device twice, fp32 grads back ------------------
    t_off = 0.0
    if lay.offload:
        moved = (2 * 4.0 * p_tp + grads) / lay.fsdp
        t_off = moved / gpu.host_bandwidth

    t_mb = max(t_compute, t_fsdp) + t_fsdp_exposed + t_tp + t_pp + t_off
    bubble = (lay.pp - 1) / lay.v * t_mb
    trainable = lora_params(model, workload, layers_per_stage) if lora else last_p
    opt_bytes = ADAM_BYTES_PER_PARAM * trainable / (lay.tp * lay.fsdp)
    t_opt = opt_bytes / (cal.CPU_ADAM_BYTES_PER_S if lay.offload else gpu.hbm_bandwidth)
    step = lay.ga * t_mb + bubble + t_opt
    comm_exposed = lay.ga * (t_mb - t_compute)
    return TimeBreakdown(
        compute=lay.ga * t_compute,
        comm_exposed=comm_exposed,
        bubble=bubble,
        optimizer=t_opt,
        step=step,
    )
