"""Step time of a candidate plan.

T_step = (m - 1) * T_mb + T_mb,sync + bubble + T_optimizer    (gradients reduced on the last
         micro-batch only, ``grad_sync="last"``; m = micro-batches per step = ga)
T_step = m * T_mb,sync + bubble + T_optimizer                 (``grad_sync="every"``)
T_mb   = max(T_compute, T_collectives) + T_exposed + T_tp + T_pp + T_offload
(its efficiency factors fitted on the published configurations of bench/planner/published.toml,
see calibration.py). Sources of each term:
- FLOPs per token: 6N for forward+backward (Kaplan et al. 2020, "Scaling Laws for Neural Language
  Models", Sec. 2.1) plus attention 12*L*h*s (PaLM, Chowdhery et al. 2022, App. B), of which a
  causal FlashAttention kernel executes half. Full recompute adds one forward: 8N + 16*L*h*s
  (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters using
  Megatron-LM", Sec. 5.1 / eq. 3). Selective (per-op SAC) recomputes every second matmul: +1N.
  LoRA skips the frozen weights' weight-gradient GEMMs: 4N (NeMo's reported LoRA TFLOPs match it).
- T_compute = GEMM FLOPs / (peak * eta_gemm) + attention FLOPs / (peak * eta_attn). eta_gemm
  depends on the size of the GEMMs one GPU runs, measured as the FLOPs of one decoder layer's
  forward matmuls for one micro-batch on one GPU: 2 * (b*s) * P_layer / t. The token dimension
  M = b*s is NOT divided by t: under sequence parallelism the column-parallel GEMMs run on the
  all-gathered full sequence and the row-parallel ones produce it (Korthikanti et al. 2022,
  Sec. 4.2.2); TP shards the weight's N (column) or K (row) dimension. The curve saturates:
  eta = eta_max * F / (F + F_half), i.e. a fixed per-layer cost (kernel launches, small
  memory-bound ops between the GEMMs) of F_half / (peak * eta_max) seconds per layer pass.
  Memory-bound element-wise work between the GEMMs adds a fitted number of bytes per token per
  unit of hidden width per layer at HBM bandwidth (sharded by TP, repeated by recompute).
- Collectives, ring alpha-beta model (Thakur et al. 2005; NCCL): all-gather / reduce-scatter move
  (n-1)/n * M bytes per rank, all-reduce 2(n-1)/n * M, plus alpha per ring step for every
  collective (one per FSDP unit). Across nodes a rank of a group with g ranks per node sees g
  NICs' bandwidth (one NCCL ring per NIC, see ``_bw``).
- FSDP / ZeRO-3: all-gather params in forward and again in backward (bf16) every micro-batch,
  reduce-scatter grads (fp32) on every micro-batch or only the last (``Layout.grad_sync``) =
  1.5x DDP's volume per synchronised micro-batch (Rajbhandari et al. 2020, Sec. 7); it overlaps
  with compute except the first all-gather and the last reduction.
- ZeRO-2 (``Layout.zero == 2``, FSDP2 reshard_after_forward=False): one all-gather per
  micro-batch (forward; backward finds the parameters still gathered), or, with gradients
  reduced on the last micro-batch only, one per step: the trainer then keeps the parameters
  gathered between micro-batches, as ZeRO-1 / Megatron's distributed optimizer do (their
  published rows are planned as this: reduce-scatter the gradients once, all-gather the updated
  parameters once).
- HSDP / DDP: + all-reduce of the shard's fp32 gradients across replicas, with the reduce-scatter.
- TP with sequence parallelism: per layer 2 all-gathers + 2 reduce-scatters of b*s*h in forward and
  the same in backward (Korthikanti et al. 2022, Sec. 4.2.2; without SP: 4 all-reduces, the same
  volume), on the critical path (hidden behind the GEMMs only with ``Layout.tp_overlap``, which
  published Megatron-Core runs used and the trainer does not); full recompute repeats the
  forward ones.
- CP (context parallelism, torch's context_parallel with its default all-gather rotation):
  each rank computes 1/cp of every sequence's tokens (load-balanced causal chunks: the same
  attention FLOPs per token); per layer the keys and values of the whole sequence are
  all-gathered in forward and their gradients reduce-scattered in backward (again in a full
  recompute), on the critical path; FSDP's group is fsdp x cp.
- PP: b*s*h/t activations forward and gradients backward per stage boundary per micro-batch, v
  times with interleaving; bubble (p-1)/v micro-batch slots of the slowest stage (Narayanan et
  al. 2021, Sec. 2.2); each stage action (a chunk's forward or backward of one micro-batch) pays
  a fitted fixed overhead. Gradients of a pipelined stage are reduced once per step
  (torch.distributed.pipelining's stages defer FSDP/DDP gradient sync to the last micro-batch, as
  Megatron-LM does).
- Optimizer: AdamW is memory bound: reads param, grad, m, v (16 B) and writes param, m, v (12 B)
  per fp32 param (counted; half of it with pure-bf16 states); on the CPU with offload.
- Published runs that reduced gradients in bf16 (``Workload.reduce_dtype``) move 2 bytes per
  gradient instead of 4.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import calibration as cal
from .hardware import Cluster, GPUSpec
from .layout import Layout
from .memory import lora_params, stage_layers, stage_params
from .model import ModelFacts
from .workload import Workload

ADAM_BYTES_PER_PARAM = 16 + 12
PURE_BF16_ADAM_BYTES_PER_PARAM = 8 + 6  # the same reads and writes, all bf16 (torchtune)


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


def gemm_efficiency(gpu: GPUSpec, flops_per_gemm: float) -> float:
    """Fraction of peak one GPU reaches on matmuls of this many FLOPs per layer pass."""
    top = cal.GEMM_EFFICIENCY_MAX[gpu.architecture]
    return top * flops_per_gemm / (flops_per_gemm + cal.GEMM_HALF_FLOPS)


def layer_gemm_flops(model: ModelFacts, tokens: float, tp: int) -> float:
    """Forward matmul FLOPs of one decoder layer for one micro-batch on one GPU (module doc)."""
    return 2.0 * tokens * model.params_per_layer / tp


def _ring_time(
    n: int, nbytes: float, bw: float, latency: float, factor: float, calls: int = 1
) -> float:
    """factor*(n-1)/n*M bytes at bw, split over ``calls`` collectives (one per FSDP unit), each
    paying alpha*(n-1)*factor ring-step latency (factor 1: AG/RS, 2: all-reduce)."""
    if n <= 1:
        return 0.0
    return factor * (n - 1) / n * nbytes / bw + latency * (n - 1) * factor * calls


def _bw(cluster: Cluster, stride: int, size: int) -> tuple[float, float]:
    """(bytes/s per rank, latency per ring step) of a collective over ``size`` ranks that are
    ``stride`` apart in the rank order (pp, dp, fsdp, tp; TP innermost).

    Inside a node: NVLink. Across nodes, every GPU has its own NIC and NCCL runs one ring per
    NIC; a ring only leaves a node once, so a group with g ranks in each node moves its data
    over g NICs at once and a rank sees g x the per-GPU NIC bandwidth (what nccl-tests reports
    as bus bandwidth on multi-node DGX systems), at most NVLink's.
    """
    gpu, gpn = cluster.gpu, cluster.gpus_per_node
    if stride * size <= gpn:
        return gpu.intra_node_bandwidth * cal.COMM_EFFICIENCY_INTRA, cal.LATENCY_INTRA_NODE_S
    per_node = max(1, min(size, gpn // stride)) if stride < gpn else 1
    bw = min(per_node * gpu.inter_node_bandwidth, gpu.intra_node_bandwidth)
    return bw * cal.COMM_EFFICIENCY_INTER, cal.LATENCY_INTER_NODE_S


def compute_time(model: ModelFacts, gpu: GPUSpec, workload: Workload, lay: Layout) -> float:
    """Seconds of one micro-batch's forward + backward on the slowest (last) stage."""
    lora = workload.method == "lora"
    s = workload.seq_len
    tokens = lay.mbs * s // lay.cp  # this rank's share of the micro-batch's tokens
    layers = stage_layers(model.num_layers, lay.pp, lay.v)[0]  # the rank with the most layers
    h, q = model.hidden_size, model.q_dim
    layer_fwd = 2.0 * model.params_per_layer  # FLOPs/token, 2 per MAC
    head_fwd = 2.0 * model.vocab_size * h
    passes = 2.0 if lora else 3.0  # fwd + bwd(input) [+ bwd(weight)]
    per_layer = passes * layer_fwd
    if lora:
        per_layer += 6.0 * lora_params(model, workload, 1)
    if lay.ac == "selective":
        per_layer += 0.5 * layer_fwd
    elif lay.ac == "full":
        per_layer += layer_fwd
    # causal: half of 4*L*h*s per token; under CP each rank's tokens still attend to s/2 keys
    # on average (load-balanced chunks), so per token it is the same
    attn_fwd = 2.0 * layers * q * s
    attn = 3.0 * attn_fwd + (attn_fwd if lay.ac == "full" else 0.0)
    # memory-bound element-wise work between the GEMMs (norms, activations, residuals, rotary
    # embeddings, casts): bytes per token per unit of hidden width, sharded by TP/SP, repeated
    # by recompute like the GEMMs
    elementwise = layers * cal.ELEMENTWISE_BYTES_PER_HIDDEN * h * per_layer / (passes * layer_fwd)
    peak = gpu.peak_flops
    eta_layer = gemm_efficiency(gpu, layer_gemm_flops(model, tokens, lay.tp))
    eta_head = gemm_efficiency(gpu, 2.0 * tokens * model.vocab_size * h / lay.tp)
    eta_a = cal.GEMM_EFFICIENCY_MAX[gpu.architecture] * cal.ATTENTION_EFFICIENCY_RATIO
    # the chunked loss (the trainer's) recomputes the head's forward in its backward
    head_passes = passes + (1.0 if workload.loss == "chunked" else 0.0)
    per_token = (
        layers * per_layer / eta_layer + head_passes * head_fwd / eta_head + attn / eta_a
    ) / peak
    return tokens / lay.tp * (per_token + elementwise / gpu.hbm_bandwidth)


def estimate_time(
    model: ModelFacts, cluster: Cluster, workload: Workload, lay: Layout
) -> TimeBreakdown:
    gpu = cluster.gpu
    lora = workload.method == "lora"
    tokens = lay.mbs * workload.seq_len // lay.cp  # this rank's tokens per micro-batch
    layers_per_stage = stage_layers(model.num_layers, lay.pp, lay.v)[0]
    h = model.hidden_size
    t_compute = compute_time(model, gpu, workload, lay)

    # ---- FSDP / HSDP / DDP collectives ------------------------------------------------------
    _, last_p = stage_params(model, lay.pp, lay.v)
    p_tp = last_p / lay.tp  # params this TP rank holds before FSDP sharding
    shard = lay.shard  # FSDP over fsdp x cp
    fsdp_bw, fsdp_lat = _bw(cluster, lay.tp, shard)
    n_units = layers_per_stage + 2
    ag_pass = _ring_time(shard, 2.0 * p_tp, fsdp_bw, fsdp_lat, 1.0, n_units)  # every unit once
    passes = 2 if lay.zero == 3 else 1  # all-gathers per micro-batch (forward [+ backward])
    trained = lora_params(model, workload, layers_per_stage) if lora else last_p
    # reduced in fp32 (the trainer), or bf16 (FSDP1 PURE / bfSixteen, pure bf16 states)
    bf16_reduce = workload.reduce_dtype == "bf16" or workload.precision == "pure-bf16"
    grads = (2.0 if bf16_reduce else 4.0) * trained / lay.tp
    rs = _ring_time(shard, grads, fsdp_bw, fsdp_lat, 1.0, n_units)
    rep_bw, rep_lat = _bw(cluster, lay.tp * shard, lay.dp)
    allreduce = _ring_time(lay.dp, grads / shard, rep_bw, rep_lat, 2.0, n_units)
    reduce = rs + allreduce

    # ---- tensor parallel (sequence parallel) -------------------------------------------------
    t_tp = 0.0
    if lay.tp > 1:
        n_coll = 8 + (4 if lay.ac == "full" else 0)
        act_bytes = 2.0 * tokens * h
        tp_bw, tp_lat = _bw(cluster, 1, lay.tp)
        t_tp = n_coll * layers_per_stage * _ring_time(lay.tp, act_bytes, tp_bw, tp_lat, 1.0)
        if lay.tp_overlap:  # hidden behind the GEMMs it feeds, as far as they last
            t_tp = max(0.0, t_tp - t_compute)

    # ---- context parallel: keys and values of the other ranks' chunks ---------------------
    t_cp = 0.0
    if lay.cp > 1:
        # torch's context_parallel all-gathers each layer's keys and values (the whole
        # sequence's, bf16) before its attention and reduce-scatters their gradients in
        # backward; full recompute gathers them again. On the critical path.
        kv_bytes = 2 * 2.0 * lay.mbs * workload.seq_len * model.kv_dim / lay.tp
        cp_bw, cp_lat = _bw(cluster, lay.tp, lay.cp)
        n_coll = 2 + (1 if lay.ac == "full" else 0)
        t_cp = n_coll * layers_per_stage * _ring_time(lay.cp, kv_bytes, cp_bw, cp_lat, 1.0)

    # ---- pipeline p2p ----------------------------------------------------------------------
    t_pp = 0.0
    if lay.pp > 1:
        # point to point: one NIC per GPU once neighbouring stages sit in different nodes
        pp_bw, pp_lat = _bw(cluster, max(lay.dp * shard * lay.tp, cluster.gpus_per_node), 2)
        t_pp = lay.v * 2 * (2.0 * tokens * h / lay.tp / pp_bw + pp_lat)
        # each stage action (one chunk's forward or backward of one micro-batch) also pays a
        # fixed cost: the schedule's send/receive handshakes and synchronisation
        t_pp += lay.v * 2 * cal.PIPELINE_ACTION_OVERHEAD_S

    # ---- CPU offload: sharded fp32 params host->device twice, fp32 grads back ------------------
    t_off = 0.0
    if lay.offload:
        moved = (2 * 4.0 * p_tp + grads) / shard
        t_off = moved / gpu.host_bandwidth

    fixed = t_tp + t_cp + t_pp + t_off

    def micro_batch(comm: float, gathers: int = passes) -> float:
        """One micro-batch whose collectives (``gathers`` all-gather passes and ``comm``)
        overlap its compute, except the first all-gather and the last reduction (one FSDP
        unit's worth each)."""
        ag = gathers * ag_pass
        return max(t_compute, ag + comm) + (ag_pass * min(gathers, 1) + comm) / n_units + fixed

    deferred = lay.grad_sync == "last" or lay.pp > 1
    # ZeRO-2 with deferred sync: gathered on the first micro-batch, kept for the others
    later = 0 if lay.zero == 2 and deferred else passes
    t_mb = micro_batch(0.0, later)  # no gradient reduction
    if lay.ga == 1:
        slots = micro_batch(reduce)
        bubble = 0.0
    elif deferred:  # reduce during the last micro-batch
        slots = micro_batch(0.0) + (lay.ga - 2) * t_mb + micro_batch(reduce, later)
        bubble = (lay.pp - 1) / lay.v * t_mb
    else:
        slots = lay.ga * micro_batch(reduce)
        bubble = (lay.pp - 1) / lay.v * micro_batch(reduce)
    per_param = (
        PURE_BF16_ADAM_BYTES_PER_PARAM
        if workload.precision == "pure-bf16"
        else (ADAM_BYTES_PER_PARAM)
    )
    opt_bytes = per_param * trained / (lay.tp * shard)
    t_opt = opt_bytes / (cal.CPU_ADAM_BYTES_PER_S if lay.offload else gpu.hbm_bandwidth)
    step = slots + bubble + t_opt
    return TimeBreakdown(
        compute=lay.ga * t_compute,
        comm_exposed=slots - lay.ga * t_compute,
        bubble=bubble,
        optimizer=t_opt,
        step=step,
    )
