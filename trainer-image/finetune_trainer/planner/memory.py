"""Peak memory per GPU of a candidate plan.

Formulas (bytes; P = parameters held by one pipeline stage, N = FSDP shard degree, t = TP):
- Model states, full fine-tune with AdamW in mixed precision: 16 bytes/param (Rajbhandari et
  al. 2020, "ZeRO", Sec. 3.1). FSDP2 with fp32 sharded parameters and
  MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) keeps 4P/N params + 4P/N grads +
  8P/N Adam moments = 16P/N (ZeRO-3, Sec. 5.3); TP shards weights further by t.
- LoRA: frozen base weights in bf16 (2P/(N t)) + 16 bytes per trainable adapter parameter
  (r*(d_in+d_out) per adapted matrix, Hu et al. 2021).
- CPU offload (FSDP2 CPUOffloadPolicy): sharded params, grads and optimizer states live in host
  memory; only the transient unsharded units below stay on the GPU.
- Transient FSDP buffers: the unsharded bf16 parameters of the current and the prefetched unit
  (2 x 2 bytes/param), the unit's unsharded bf16 gradient (2) and its fp32 copy for the
  reduce-scatter (4): 10 bytes per param of the largest unit (a decoder layer, or the
  embedding / LM head) -- planner-calibration.md, "FSDP2 ... transient".
- Activations per layer per token, 16-bit, counted tensor by tensor in the way of Korthikanti et
  al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", Sec. 4), for a
  block without dropout and with FlashAttention (no s x s tensors; the output and an fp32
  logsumexp per head are saved instead):
    none:      2*(4h + 2q + 2kv + 4f)  gated MLP (SwiGLU)  [Llama-3-8B: ~41 h bytes]
               2*(4h + 2q + 2kv + 2f)  plain MLP          [q=kv=h, f=4h: 32 h = Korthikanti's 34
                                                             without the two dropout masks]
    selective: torchtitan's per-op SAC policy: save the block input, the attention output and
               every second matmul output, recompute the rest (norms, activations, rope and
               the other matmuls): 2*(h + q + (q + 2kv + h + mlp_up + h)/2)
    full:      2h (the layer input only, Korthikanti Sec. 5), plus one layer's activations
               while that layer is recomputed in backward.
  Sequence parallelism shards all of them by t (Korthikanti Sec. 4.2.2: (sbh/t)*34).
- Pipeline in-flight micro-batches on the first stage (Narayanan et al. 2021, Sec. 2.2;
  Korthikanti Sec. 4.2.3): 1F1B min(p, m); GPipe m; interleaved 1F1B min(p, m)*(1+(p-1)/(p v)).
- Loss head (last stage): logits s*b*V*(2 bf16 + 4 fp32 upcast + 4 fp32 grad) bytes
  (planner-calibration.md, "Loss head"); with a fused cross-entropy (e.g. flash-attn's
  CrossEntropyLoss, llm-foundry's default `fused_crossentropy`) only the bf16 logits, 2 bytes.
- CPU offload also needs the node's host RAM to hold every local rank's sharded states
  (at most USABLE_HOST_MEMORY_FRACTION of it: pinned buffers, the OS and data loaders need the
  rest).
- Overhead: CUDA context, NCCL buffers and allocator slack, a constant (calibration.py).
Feasible when peak <= USABLE_MEMORY_FRACTION x capacity.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import calibration as cal
from .hardware import GPUSpec
from .layout import Layout
from .model import ModelFacts, resolve_lora_targets
from .workload import Recompute, Workload

LOSS_BYTES_PER_LOGIT = 2 + 4 + 4
FUSED_LOSS_BYTES_PER_LOGIT = 2
ADAM_MIXED_BYTES_PER_PARAM = 16  # ZeRO Sec. 3.1: 2 + 2 + 12, FSDP2 fp32: 4 + 4 + 8
LORA_FROZEN_BYTES_PER_PARAM = 2
FSDP_TRANSIENT_BYTES_PER_PARAM_FULL = 2 * 2 + 2 + 4
FSDP_TRANSIENT_BYTES_PER_PARAM_LORA = 2 * 2


@dataclass(frozen=True, slots=True)
class MemoryBreakdown:
    """Bytes per GPU at the peak (the worst pipeline stage)."""

    model_states: float
    fsdp_buffers: float
    activations: float
    loss_head: float
    overhead: float
    stage: str  # "only", "first" or "last"
    host: float = 0.0  # bytes of host memory this rank needs (CPU offload)

    @property
    def peak(self) -> float:
        return (
            self.model_states
            + self.fsdp_buffers
            + self.activations
            + self.loss_head
            + self.overhead
        )


def activation_bytes_per_token(model: ModelFacts, ac: Recompute) -> float:
    """Saved bytes per token per decoder layer (see module docstring)."""
    h, q, kv, f = model.hidden_size, model.q_dim, model.kv_dim, model.intermediate_size
    lse = 4 * model.num_heads  # FlashAttention's fp32 logsumexp per head
    if ac == "full":
        return 2.0 * h
    mlp_up = 2 * f if model.gated_mlp else f
    if ac == "selective":
        mm_outputs = q + 2 * kv + h + mlp_up + h
        return 2.0 * (h + q + mm_outputs / 2) + lse
    mlp_saved = 4 * f if model.gated_mlp else 2 * f
    return 2.0 * (4 * h + 2 * q + 2 * kv + mlp_saved) + lse


def recompute_transient_bytes_per_token(model: ModelFacts, ac: Recompute) -> float:
    """Extra bytes per token while one layer is being recomputed in backward."""
    if ac == "none":
        return 0.0
    return activation_bytes_per_token(model, "none") - activation_bytes_per_token(model, ac)


def stage_params(model: ModelFacts, pp: int) -> tuple[int, int]:
    """(first stage, last stage) parameters. With pp = 1 both are the whole model.

    A tied LM head needs its own copy of the embedding on the last stage when pp > 1.
    """
    if pp == 1:
        return model.num_params, model.num_params
    layers = model.num_layers // pp * model.params_per_layer
    first = model.embedding_params + layers
    last = layers + model.hidden_size + model.vocab_size * model.hidden_size
    return first, last


def lora_params(model: ModelFacts, workload: Workload, layers: int) -> int:
    return layers * model.lora_params_per_layer(workload.lora_rank, workload.lora_targets)


def in_flight_microbatches(lay: Layout) -> tuple[float, float]:
    """(first stage, last stage) micro-batches whose activations are held at the peak."""
    if lay.pp == 1:
        return 1.0, 1.0
    if lay.schedule == "gpipe":
        return float(lay.ga), float(lay.ga)
    k = float(min(lay.pp, lay.ga))
    if lay.schedule == "interleaved-1f1b":
        return k * (1 + (lay.pp - 1) / (lay.pp * lay.v)), 1.0
    return k, 1.0


def estimate_memory(
    model: ModelFacts, gpu: GPUSpec, workload: Workload, lay: Layout
) -> MemoryBreakdown:
    lora = workload.method == "lora"
    shard = lay.fsdp * lay.tp
    layers_per_stage = model.num_layers // lay.pp
    first_p, last_p = stage_params(model, lay.pp)
    tokens = lay.mbs * workload.seq_len  # per micro-batch on this data-parallel rank
    sp_tokens = tokens / lay.tp  # sequence parallel shards activations by t
    act_tok = activation_bytes_per_token(model, lay.ac)
    if lora and lay.ac != "full":
        # adapters save their rank-r intermediate (the input x is shared with the base linear)
        n_targets = len(resolve_lora_targets(model, workload.lora_targets))
        act_tok += 2.0 * workload.lora_rank * n_targets
    transient_tok = recompute_transient_bytes_per_token(model, lay.ac)
    k_first, k_last = in_flight_microbatches(lay)
    lora_p = lora_params(model, workload, layers_per_stage) if lora else 0

    unit_layer = model.params_per_layer
    unit_emb = model.embedding_params
    unit_head = model.vocab_size * model.hidden_size

    best: MemoryBreakdown | None = None
    stages = ("only",) if lay.pp == 1 else ("first", "last")
    for stage in stages:
        params = first_p if stage != "last" else last_p
        if lora:
            states = (LORA_FROZEN_BYTES_PER_PARAM * params + 16.0 * lora_p) / shard
        else:
            states = ADAM_MIXED_BYTES_PER_PARAM * params / shard
        host = 0.0
        if lay.offload:
            states, host = 0.0, states
        if stage == "only":
            unit = max(unit_layer, unit_emb, unit_head)
        elif stage == "first":
            unit = max(unit_layer, unit_emb)
        else:
            unit = max(unit_layer, unit_head)
        per_param = (
            FSDP_TRANSIENT_BYTES_PER_PARAM_LORA if lora else FSDP_TRANSIENT_BYTES_PER_PARAM_FULL
        )
        buffers = per_param * unit / lay.tp
        k = k_last if stage == "last" else k_first
        acts = (k * layers_per_stage * act_tok + transient_tok) * sp_tokens
        loss = 0.0
        if stage != "first":
            acts += 4.0 * model.hidden_size * sp_tokens  # final norm input and output
            per_logit = FUSED_LOSS_BYTES_PER_LOGIT if workload.fused_loss else LOSS_BYTES_PER_LOGIT
            loss = float(per_logit) * tokens * model.vocab_size
        mb = MemoryBreakdown(
            model_states=states,
            fsdp_buffers=float(buffers),
            activations=acts,
            loss_head=loss,
            overhead=float(cal.MEMORY_OVERHEAD_BYTES),
            stage=stage,
            host=host,
        )
        if best is None or mb.peak > best.peak:
            best = mb
    assert best is not None
    return best


def usable_memory(gpu: GPUSpec) -> float:
    return cal.USABLE_MEMORY_FRACTION * gpu.memory_bytes


def usable_host_memory(gpu: GPUSpec) -> float:
    return cal.USABLE_HOST_MEMORY_FRACTION * gpu.host_memory_bytes


def overcommit(mem: MemoryBreakdown, gpu: GPUSpec, gpus_per_node: int) -> float:
    """Needed / usable for the tighter of GPU memory and (with offload) host memory; <= 1 fits."""
    return max(mem.peak / usable_memory(gpu), mem.host * gpus_per_node / usable_host_memory(gpu))


def fits(mem: MemoryBreakdown, gpu: GPUSpec, gpus_per_node: int) -> bool:
    """GPU peak within the usable fraction; with offload, the node's ranks' states in host RAM."""
    return overcommit(mem, gpu, gpus_per_node) <= 1.0
