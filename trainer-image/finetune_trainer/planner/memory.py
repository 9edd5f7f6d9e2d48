"""Peak memory per GPU of a candidate plan.

The peak is the largest of a few moments of a training step, each the sum of what is alive then
(bytes; P = parameters held by one pipeline stage, N = FSDP shard degree x TP degree t):

- Model states, full fine-tune with AdamW in mixed precision: 16 bytes/param (Rajbhandari et
  al. 2020, "ZeRO", Sec. 3.1). FSDP2 with fp32 sharded parameters and
  MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) keeps 4P/N params + 8P/N Adam
  moments all the time, and 4P/N sharded gradients once a backward has reduced them: during the
  first micro-batch's backward only the gradients reduced so far exist (none at the loss, all at
  the end); with gradient accumulation the previous micro-batches' gradients are resident
  throughout (ZeRO-3, Sec. 5.3). TP shards everything by t.
- LoRA: frozen base weights in bf16 (2P/N) + 16 bytes per trainable adapter parameter
  (r*(d_in+d_out) per adapted matrix, Hu et al. 2021); frozen weights get no gradients.
- CPU offload (FSDP2 CPUOffloadPolicy): sharded params, grads and optimizer states live in host
  memory; only the unsharded units below stay on the GPU.
- FSDP2 units as the trainer's ``apply_fsdp`` builds them: one unit per decoder layer and the
  root unit (embedding, final norm and LM head; the stage's own of these under PP). The root is
  gathered in bf16 (2 bytes/param) for the whole step (FSDP2 does not reshard the root after
  forward). Around a decoder layer's backward: its bf16 parameters, the next layer's prefetched
  all-gather (2 + 2) and the fp32 copy of the previous layer's gradient for the reduce-scatter
  (4): 8 bytes per layer parameter; at the loss only the last layer is gathered (it is not
  resharded after forward: backward needs it first), 2 bytes. The LM head's bf16 gradient
  (2 bytes/param) lives from the head's backward to the root's reduce-scatter at the end.
  planner-calibration.md, "FSDP2 ... transient".
- Activations per layer per token, counted tensor by tensor as Korthikanti et al. 2022
  ("Reducing Activation Recomputation in Large Transformer Models", Sec. 4) do, for the Hugging
  Face decoder layer the trainer runs (bf16 compute, no dropout, SDPA):
    none:      each RMSNorm saves its fp32 upcast input and its bf16 normalized output (6h);
               the two norm outputs feed the projections (2h each); attention saves q and the
               key/value heads repeated to the query width (Transformers repeats them whenever an
               attention mask is passed, which packing always does; the CPU kernel does the
               same) and its output (4 x 2q) plus an fp32 log-sum-exp per head (4a); o_proj's
               input is a contiguous copy of that output (2q); a gated MLP saves gate, SiLU(gate),
               up and their product (4 x 2f), a plain one its two f-wide tensors (2 x 2f):
               16h + 10q + 8f + 4a bytes  [Llama-3-8B: 54 h; FSDPMemTracker measures 53.8 h]
    selective: the trainer's per-op SAC policy (torchtitan's): the layer input (2h), the
               attention output and log-sum-exp (2q + 4a) and every second matmul output in
               order q, k, v, o, (gate), up, down, starting with the first.
    full:      2h (the layer input only, Korthikanti Sec. 5).
  While a checkpointed layer is recomputed in backward its whole "none" set is alive again; the
  backward of any layer also holds the gradients of two f-wide tensors (2 x 2f).
  Sequence parallelism shards all of them by t (Korthikanti Sec. 4.2.2: (sbh/t)*34).
- Pipeline in-flight micro-batches on the first stage (Narayanan et al. 2021, Sec. 2.2;
  Korthikanti Sec. 4.2.3): 1F1B min(p, m); GPipe m; interleaved 1F1B min(p, m)*(1+(p-1)/(p v)).
- Loss head (last stage): the final norm (6h) and the head's input (2h) per token, and per
  logit 12 bytes while the cross-entropy's backward runs: log-softmax keeps its fp32 output
  (4), and its incoming and outgoing fp32 gradients (4 + 4) are alive together (measured:
  planner-calibration.md, "Loss head", counts 10 at the forward); with a fused cross-entropy
  (e.g. flash-attn's CrossEntropyLoss, llm-foundry's `fused_crossentropy`) only the bf16
  logits, 2 bytes.
- Moments: "loss" (backward starts: every layer's activations, the loss head, the last layer
  gathered), "layer" (the first decoder layer's backward: every layer's activations, that
  layer's FSDP buffers, its recompute and gradients, the head's gradient), "end" (all sharded
  gradients reduced, the root's bf16 gradient and its fp32 reduce-scatter copy).
  Checked against FSDPMemTracker under FakeTensorMode in tests/trainer/test_memory_model.py.
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

LOSS_BYTES_PER_LOGIT = 4 + 4 + 4
FUSED_LOSS_BYTES_PER_LOGIT = 2
LOSS_HEAD_BYTES_PER_HIDDEN = 6 + 2  # final RMSNorm (fp32 input, bf16 output) + the head's input
ADAM_MIXED_BYTES_PER_PARAM = 16  # ZeRO Sec. 3.1: 2 + 2 + 12, FSDP2 fp32: 4 + 4 + 8
ADAM_RESIDENT_BYTES_PER_PARAM = 12  # fp32 parameters + two fp32 moments, without gradients
GRAD_BYTES_PER_PARAM = 4  # fp32 sharded gradients
LORA_FROZEN_BYTES_PER_PARAM = 2
UNSHARDED_BYTES_PER_PARAM = 2  # bf16 all-gathered parameters (or gradients)
LAYER_BACKWARD_BYTES_PER_PARAM_FULL = 2 + 2 + 4  # gathered, prefetched, fp32 reduce-scatter
LAYER_BACKWARD_BYTES_PER_PARAM_LORA = 2 + 2  # frozen weights: no gradient to reduce
ROOT_END_BYTES_PER_PARAM_FULL = (
    2 + 4
)  # bf16 gradient, its fp32 reduce-scatter copy (resharded first)


@dataclass(frozen=True, slots=True)
class MemoryBreakdown:
    """Bytes per GPU at the peak (the worst moment of the worst pipeline stage)."""

    model_states: float
    fsdp_buffers: float
    activations: float
    loss_head: float
    overhead: float
    stage: str  # "only", "first" or "last"
    host: float = 0.0  # bytes of host memory this rank needs (CPU offload)
    moment: str = "loss"  # "loss", "layer" or "end" (module docstring)

    @property
    def peak(self) -> float:
        return (
            self.model_states
            + self.fsdp_buffers
            + self.activations
            + self.loss_head
            + self.overhead
        )


def _matmul_outputs(model: ModelFacts) -> list[int]:
    """Widths of one decoder layer's matmul outputs in forward order."""
    mlp = [model.intermediate_size] * (2 if model.gated_mlp else 1)
    return [model.q_dim, model.kv_dim, model.kv_dim, model.hidden_size, *mlp, model.hidden_size]


def activation_bytes_per_token(model: ModelFacts, ac: Recompute) -> float:
    """Saved bytes per token per decoder layer (see module docstring)."""
    h, q, f = model.hidden_size, model.q_dim, model.intermediate_size
    lse = 4 * model.num_heads  # fp32 log-sum-exp per head
    if ac == "full":
        return 2.0 * h
    if ac == "selective":
        return 2.0 * (h + q + sum(_matmul_outputs(model)[::2])) + lse
    mlp_saved = 4 * f if model.gated_mlp else 2 * f
    return 2.0 * (8 * h + 5 * q + mlp_saved) + lse


def recompute_transient_bytes_per_token(model: ModelFacts, ac: Recompute) -> float:
    """Extra bytes per token while one layer is being recomputed in backward."""
    if ac == "none":
        return 0.0
    return activation_bytes_per_token(model, "none") - activation_bytes_per_token(model, ac)


def backward_working_bytes_per_token(model: ModelFacts) -> float:
    """Activation gradients alive inside a decoder layer's backward: two f-wide, bf16."""
    return 2.0 * 2 * model.intermediate_size


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


def root_params(model: ModelFacts, stage: str) -> tuple[int, int]:
    """(root unit parameters, LM head parameters) of a stage: what is not in a decoder layer."""
    head = model.vocab_size * model.hidden_size
    if stage == "first":
        return model.embedding_params, 0
    if stage == "last":
        return head + model.hidden_size, head
    return model.embedding_params + model.head_params + model.hidden_size, head


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


def _stage_moments(
    model: ModelFacts, workload: Workload, lay: Layout, stage: str
) -> list[MemoryBreakdown]:
    lora = workload.method == "lora"
    shard = lay.fsdp * lay.tp
    layers = model.num_layers // lay.pp
    first_p, last_p = stage_params(model, lay.pp)
    params = last_p if stage == "last" else first_p
    root, head = root_params(model, stage)
    layer = model.params_per_layer
    tokens = lay.mbs * workload.seq_len  # per micro-batch on this data-parallel rank
    sp_tokens = tokens / lay.tp  # sequence parallel shards activations by t
    k_first, k_last = in_flight_microbatches(lay)
    k = k_last if stage == "last" else k_first

    # model states: (resident during backward, after the backward's last reduce-scatter)
    if lora:
        adapters = float(lora_params(model, workload, layers))
        base = LORA_FROZEN_BYTES_PER_PARAM * params + ADAM_RESIDENT_BYTES_PER_PARAM * adapters
        grads = GRAD_BYTES_PER_PARAM * adapters
    else:
        base = float(ADAM_RESIDENT_BYTES_PER_PARAM * params)
        grads = float(GRAD_BYTES_PER_PARAM * params)
    during, after = (base + grads) / shard, (base + grads) / shard
    if lay.ga == 1:
        during = base / shard  # nothing reduced yet when the first backward starts
    host = 0.0
    if lay.offload:
        host, during, after = after, 0.0, 0.0

    act_tok = activation_bytes_per_token(model, lay.ac)
    if lora and lay.ac != "full":
        # adapters save their rank-r intermediate (the input x is shared with the base linear)
        n_targets = len(resolve_lora_targets(model, workload.lora_targets))
        act_tok += 2.0 * workload.lora_rank * n_targets
    saved = k * layers * act_tok * sp_tokens
    gathered_root = UNSHARDED_BYTES_PER_PARAM * root / lay.tp
    head_grad = 0.0 if lora else UNSHARDED_BYTES_PER_PARAM * head / lay.tp

    def moment(
        name: str, states: float, buffers: float, acts: float, loss: float
    ) -> MemoryBreakdown:
        return MemoryBreakdown(
            model_states=states,
            fsdp_buffers=buffers,
            activations=acts,
            loss_head=loss,
            overhead=float(cal.MEMORY_OVERHEAD_BYTES),
            stage=stage,
            host=host,
            moment=name,
        )

    per_layer = LAYER_BACKWARD_BYTES_PER_PARAM_LORA if lora else LAYER_BACKWARD_BYTES_PER_PARAM_FULL
    in_layer = (
        recompute_transient_bytes_per_token(model, lay.ac) + backward_working_bytes_per_token(model)
    ) * sp_tokens
    root_end = UNSHARDED_BYTES_PER_PARAM if lora else ROOT_END_BYTES_PER_PARAM_FULL
    moments = [
        moment("layer", during, gathered_root + head_grad + per_layer * layer / lay.tp,
               saved + in_layer, 0.0),
        moment("end", after, root_end * root / lay.tp, 0.0, 0.0),
    ]  # fmt: skip
    if stage != "first":
        per_logit = FUSED_LOSS_BYTES_PER_LOGIT if workload.fused_loss else LOSS_BYTES_PER_LOGIT
        final = LOSS_HEAD_BYTES_PER_HIDDEN * model.hidden_size * sp_tokens
        moments.append(
            moment("loss", during, gathered_root + UNSHARDED_BYTES_PER_PARAM * layer / lay.tp,
                   saved + final, float(per_logit) * tokens * model.vocab_size)
        )  # fmt: skip
    return moments


def estimate_memory(
    model: ModelFacts, gpu: GPUSpec, workload: Workload, lay: Layout
) -> MemoryBreakdown:
    """The peak: the largest moment of the worst stage (module docstring)."""
    stages = ("only",) if lay.pp == 1 else ("first", "last")
    moments = [m for stage in stages for m in _stage_moments(model, workload, lay, stage)]
    return max(moments, key=lambda m: m.peak)


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
