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
- LoRA: frozen base weights in bf16 (2P/N; the trainer loads them so on GPU) + 16 bytes per
  trainable adapter parameter (r*(d_in+d_out) per adapted matrix, Hu et al. 2021); frozen
  weights get no gradients. Activations: each adapter keeps its rank-r intermediate (2r), the
  frozen norm weights need no normalized output (-2 x 2h), and with dropout every adapter keeps
  its own dropped copy of its input and the mask (3 d_in). Under selective SAC the adapters'
  A and B matmuls join the every-second-matmul count (and dropout is recomputed). Under TP each
  adapter is split with its linear, one of its two factors replicated
  (``lora_params_per_tp_rank``).
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
  (FSDP2's transient unsharded parameters of the current and prefetched unit, as measured with
  FSDPMemTracker.)
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
  Published runs of other frameworks are judged by what their kernels keep
  (``Workload.fused_kernels``; the trainer runs none of them): a fused norm keeps its bf16
  input instead of the fp32 upcast and the normalized value (8h for the two norms instead of
  16h), a fused gated activation keeps gate, up and their product (6f instead of 8f),
  flash-attention on the (batch, seq, heads, dim) layout keeps q, k and v at their own widths
  and no output copy (4q + 4kv instead of 10q). MPT under llm-foundry (fused norm + flash):
  32h, Korthikanti et al.'s 34sbh less the two dropout masks.
  While a checkpointed layer is recomputed in backward its whole "none" set is alive again; the
  backward of any layer also holds the gradients of two f-wide tensors (2 x 2f).
  Tensor + sequence parallelism shards them by t (Korthikanti Sec. 4.2.2: (sbh/t)*34) except
  what DTensor keeps at the full sequence: the all-gathered norm outputs the column-parallel
  projections save (2 x 2h; Megatron re-gathers them in backward, PyTorch keeps them) and the
  row-parallel outputs (o_proj, down_proj) before their reduce-scatter when SAC saves them.
- Pipeline in-flight micro-batches on the first stage (Narayanan et al. 2021, Sec. 2.2;
  Korthikanti Sec. 4.2.3): 1F1B min(p, m); GPipe m; interleaved 1F1B min(p, m)*(1+(p-1)/(p v)).
  PyTorch's schedules run an FSDP stage's backward without gradient sync or resharding until its
  last micro-batch, so a pipelined FSDP stage also holds its gradients unsharded in fp32
  (4P/t) and its parameters gathered in bf16 (2P/t) through the step.
- Deferred gradient sync (``Layout.grad_sync == "last"``, no pipeline): FSDP2 with
  ``set_requires_gradient_sync(False)`` accumulates the micro-batches' gradients unsharded in
  its reduce dtype (fp32, 4P/t) until the last micro-batch reduce-scatters them (no sharded
  gradients before then); parameters are resharded after each backward as usual.
- ZeRO-2 (``Layout.zero == 2``; FSDP2 ``reshard_after_forward=False``): no decoder layer is
  resharded after its forward, so at the loss and at the first layer's backward every layer of
  the stage is gathered in bf16 (2 bytes per layer parameter), and nothing is prefetched; each
  layer is resharded after its own backward. With deferred gradient sync the trainer keeps them
  gathered between micro-batches too (which adds nothing to the peak: these moments already hold
  them). Published ZeRO-1/2 runs (Megatron's distributed optimizer, DeepSpeed ZeRO-1/2) are
  judged as this with deferred sync: replicated bf16 parameters, unsharded gradients, sharded
  fp32 master copy and moments.
- Loss head (last stage): the final norm (6h, sequence parallel) and the head's input (2h, the
  full sequence on every TP rank: each holds a vocabulary shard of the column-parallel head)
  per token, then the cross-entropy, counted as the trainer computes it
  (finetune_trainer/loss.py), on V/t logits per token under TP (vocabulary parallel, never
  gathered):
    chunked (the trainer): chunks of loss_chunk_tokens(V/t) tokens, LOSS_CHUNK_LOGITS (2**26)
               logits each; its backward recomputes one chunk at a time, alive together: the
               chunk's bf16 logits and their fp32 copy, or the fp32 gradient and its bf16 cast
               (6 bytes per logit of ONE chunk: 384 MiB whatever the vocabulary, TP and
               sequence), the hidden states' bf16 gradient (2h per token) and, full fine-tune,
               the head's bf16 weight gradient (2 bytes per head parameter / t), accumulated in
               place from the first chunk on. Measured with MemTracker under FakeTensorMode:
               6.00 bytes per chunk logit (tests/trainer/test_loss.py).
    unchunked: 12 bytes per logit of the whole micro-batch while the cross-entropy's backward
               runs: log-softmax keeps its fp32 output (4), and its incoming and outgoing fp32
               gradients (4 + 4) are alive together (measured; at the forward it is 10: 2 bf16 +
               4 fp32 upcast + 4 gradient). What torchtitan's published runs did (loss_parallel
               under TP divides it by t).
    fused:     a fused cross-entropy (flash-attn's CrossEntropyLoss, llm-foundry's
               `fused_crossentropy`) keeps only the bf16 logits, 2 bytes per logit.
  ``Workload.loss`` selects the kind (default: the trainer's chunked loss) (``estimate_memory``
  takes ``loss="unchunked"`` for published rows that did not chunk).
- Moments: "loss" (backward starts: every layer's activations, the loss head, the last layer
  gathered), "layer" (the first decoder layer's backward: every layer's activations, that
  layer's FSDP buffers, its recompute and gradients, the head's gradient), "end" (all sharded
  gradients reduced, the root's bf16 gradient and its fp32 reduce-scatter copy).
  Checked against FSDPMemTracker under FakeTensorMode in tests/trainer/test_memory_model.py.
- Pure bf16 states (``Workload.precision == "pure-bf16"``, torchtune): parameters, gradients
  and both moments in bf16, 8 bytes/param. A bf16 gradient reduction (``reduce_dtype``, FSDP1
  MixedPrecision PURE / bfSixteen) reduce-scatters the bf16 gradient itself: no fp32 copy of a
  layer's or the root's gradient (the sharded gradient stays fp32).
- CPU offload also needs the node's host RAM to hold every local rank's sharded states
  (at most USABLE_HOST_MEMORY_FRACTION of it: pinned buffers, the OS and data loaders need the
  rest).
- Context parallelism (``Layout.cp``; torch's context_parallel, load-balanced causal ring
  attention): each rank holds 1/cp of every sequence, so activations, the loss head and the
  per-token working memory count tokens = mbs x seq / cp; FSDP shards the parameters over
  fsdp x cp; a layer's ring attention adds its travelling key/value chunks and their gradients
  (``ring_attention_bytes``).
- Overhead: CUDA context, NCCL buffers and allocator slack, a constant (calibration.py).
Feasible when peak <= USABLE_MEMORY_FRACTION x capacity.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import calibration as cal
from .hardware import GPUSpec
from .layout import Layout
from .model import ModelFacts, resolve_lora_targets
from .workload import FusedKernel, LossKind, Recompute, Workload

#: The trainer's chunked loss (finetune_trainer/loss.py): logits per chunk, whatever the
#: vocabulary shard (256 MiB of fp32).
LOSS_CHUNK_LOGITS = 2**26
CHUNKED_LOSS_BYTES_PER_LOGIT = 2 + 4  # one chunk: bf16 logits + fp32 copy (or gradient + cast)
HIDDEN_GRAD_BYTES_PER_HIDDEN = 2  # the chunked loss's bf16 gradient of the head's input
LOSS_BYTES_PER_LOGIT = 4 + 4 + 4  # unchunked: fp32 log-softmax output, its two gradients
FUSED_LOSS_BYTES_PER_LOGIT = 2
FINAL_NORM_BYTES_PER_HIDDEN = 6  # final RMSNorm: fp32 input, bf16 output (sequence parallel)
HEAD_INPUT_BYTES_PER_HIDDEN = 2  # the LM head's input, gathered to the full sequence under TP
# Mixed-precision AdamW, 16 bytes/param (ZeRO Sec. 3.1: 2 + 2 + 12; FSDP2 fp32: 4 + 4 + 8), in
# what is always resident and the gradients that come and go:
ADAM_RESIDENT_BYTES_PER_PARAM = 12  # fp32 parameters + two fp32 moments
GRAD_BYTES_PER_PARAM = 4  # fp32 sharded gradients
PURE_BF16_RESIDENT_BYTES_PER_PARAM = 2 + 2 + 2  # bf16 parameters and moments (torchtune)
PURE_BF16_GRAD_BYTES_PER_PARAM = 2
LORA_FROZEN_BYTES_PER_PARAM = 2
UNSHARDED_BYTES_PER_PARAM = 2  # bf16 all-gathered parameters (or gradients)
LAYER_BACKWARD_BYTES_PER_PARAM_FULL = 2 + 2 + 4  # gathered, prefetched, fp32 reduce-scatter
LAYER_BACKWARD_BYTES_PER_PARAM_LORA = 2 + 2  # frozen weights: no gradient to reduce
ROOT_END_BYTES_PER_PARAM_FULL = (
    2 + 4
)  # bf16 gradient, its fp32 reduce-scatter copy (resharded first)


def state_bytes_per_param(workload: Workload) -> tuple[int, int]:
    """(always resident, gradient) bytes per trained parameter: mixed precision keeps fp32
    parameters, moments and gradients; pure bf16 (torchtune) keeps all of them in bf16."""
    if workload.precision == "pure-bf16":
        return PURE_BF16_RESIDENT_BYTES_PER_PARAM, PURE_BF16_GRAD_BYTES_PER_PARAM
    return ADAM_RESIDENT_BYTES_PER_PARAM, GRAD_BYTES_PER_PARAM


def loss_chunk_tokens(vocab_local: int) -> int:
    """Tokens per chunk of the trainer's loss: as many as keep a chunk at LOSS_CHUNK_LOGITS
    logits of this rank's vocabulary shard (at least one)."""
    return max(1, LOSS_CHUNK_LOGITS // vocab_local)


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


MATMUL_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROWWISE = ("o_proj", "down_proj")  # under TP their local output is full-sequence, h wide


def _matmul_outputs(
    model: ModelFacts, tp: int = 1, adapted: tuple[str, ...] = (), rank: int = 0
) -> list[float]:
    """Bytes per token of one decoder layer's matmul outputs on one rank, in forward order; an
    adapted linear is followed by its LoRA A (rank wide) and B (as wide as the linear)."""
    widths: list[float] = []
    for name in MATMUL_ORDER:
        shape = model.linear_shapes.get(name)
        if shape is None:
            continue
        widths.append(2.0 * shape[1] / (1 if name in ROWWISE else tp))
        if name in adapted:
            widths += [2.0 * rank, 2.0 * shape[1]]
    return widths


def activation_bytes_per_token(
    model: ModelFacts, ac: Recompute, tp: int = 1, fused: tuple[FusedKernel, ...] = ()
) -> float:
    """Saved bytes per token per decoder layer on one rank (see module docstring); ``fused``
    are the fused kernels a published run used instead of the trainer's eager ops."""
    h, q, f = model.hidden_size, model.q_dim, model.intermediate_size
    lse = 4 * model.num_heads  # fp32 log-sum-exp per head
    if ac == "full":
        return 2.0 * h / tp
    if ac == "selective":
        return (2.0 * (h + q) + lse) / tp + sum(_matmul_outputs(model, tp)[::2])
    # per norm: eager keeps its fp32 upcast input (4h), the bf16 normalized value the weight
    # multiplies (2h) and its output (2h, the projections' input); a fused norm its bf16
    # input (2h) and the output
    norms = 2 * (4.0 * h if "norm" in fused else 8.0 * h)
    # fused: q, k and v at their own widths and the output, read in place by o_proj; eager:
    # k and v repeated to the query width, and a contiguous copy of the output
    attn = 4.0 * q + 4.0 * model.kv_dim if "attention" in fused else 10.0 * q
    if not model.gated_mlp:
        mlp = 4.0 * f  # activation input and output
    elif "mlp" in fused:
        mlp = 6.0 * f  # gate, up (the fused activation's inputs) and the product
    else:
        mlp = 8.0 * f  # gate, SiLU(gate), up, product
    # the two norm outputs the projections read are all-gathered to the full sequence under SP
    gathered = 2 * 2.0 * h
    return (norms + attn + mlp + lse - gathered) / tp + gathered


def lora_activation_bytes_per_token(model: ModelFacts, workload: Workload, ac: Recompute) -> float:
    """What LoRA adds to (or spares from) a layer's saved bytes per token (module docstring)."""
    if ac == "full":
        return 0.0
    targets = tuple(resolve_lora_targets(model, workload.lora_targets))
    r = workload.lora_rank
    if ac == "selective":  # the adapters' matmuls join the every-second count
        with_adapters = sum(_matmul_outputs(model, 1, targets, r)[::2])
        return with_adapters - sum(_matmul_outputs(model)[::2])
    extra = 2.0 * r * len(targets)  # each adapter's rank-r intermediate
    if "norm" not in workload.fused_kernels:  # frozen eager norm weights: no normalized value
        extra -= 2 * 2.0 * model.hidden_size
    if workload.lora_dropout > 0:
        extra += 3.0 * sum(model.linear_shapes[t][0] for t in targets)  # dropped input + mask
    return extra


def recompute_transient_bytes_per_token(
    model: ModelFacts, ac: Recompute, tp: int = 1, fused: tuple[FusedKernel, ...] = ()
) -> float:
    """Extra bytes per token while one layer is being recomputed in backward."""
    if ac == "none":
        return 0.0
    return activation_bytes_per_token(model, "none", tp, fused) - activation_bytes_per_token(
        model, ac, tp, fused
    )


def backward_working_bytes_per_token(model: ModelFacts, tp: int = 1) -> float:
    """Activation gradients alive inside a decoder layer's backward: two f-wide, bf16."""
    return 2.0 * 2 * model.intermediate_size / tp


#: Context parallelism's ring attention on one rank, per local token: in forward the key and
#: value chunk received next while the current one is used (2 x 2 kv bf16); in backward also
#: the key and value gradients travelling with them, in fp32 (2 x 2 x 4 kv).
RING_ATTENTION_BYTES_PER_KV = 2 * 2 * 2 + 2 * 2 * 4


def ring_attention_bytes(model: ModelFacts, tokens: int, tp: int) -> float:
    """Transient bytes of context parallelism's ring attention in a layer's backward, for this
    rank's ``tokens`` (its share of the sequence), kv heads split by TP."""
    return RING_ATTENTION_BYTES_PER_KV * model.kv_dim / tp * tokens


def stage_layers(num_layers: int, pp: int, v: int = 1) -> tuple[int, int]:
    """(first rank, last rank) decoder layers. The trainer splits the layers into pp x v stages
    of consecutive layers, the first ``num_layers % (pp * v)`` stages one layer longer
    (finetune_trainer/pipeline.py split_layers); rank r runs stages r, r + pp, ...: the first
    rank holds the most layers, the last rank (with the LM head) the fewest."""
    stages = pp * v
    per, extra = divmod(num_layers, stages)

    def rank(r: int) -> int:
        return sum(per + (1 if s < extra else 0) for s in range(r, stages, pp))

    return rank(0), rank(pp - 1)


def stage_params(model: ModelFacts, pp: int, v: int = 1) -> tuple[int, int]:
    """(first stage, last stage) parameters. With pp = 1 both are the whole model.

    A tied LM head needs its own copy of the embedding on the last stage when pp > 1.
    """
    if pp == 1:
        return model.num_params, model.num_params
    first_layers, last_layers = stage_layers(model.num_layers, pp, v)
    first = model.embedding_params + first_layers * model.params_per_layer
    last = last_layers * model.params_per_layer + model.hidden_size
    return first, last + model.vocab_size * model.hidden_size


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


def lora_params_per_tp_rank(model: ModelFacts, workload: Workload, layers: int, tp: int) -> float:
    """Adapter parameters one TP rank holds (before FSDP sharding): the trainer splits each
    adapter with its linear (parallelize.lora_tp_styles): a column-parallel linear's A
    (r x d_in) is replicated and its B (d_out x r) split, a row-parallel one's A split and its B
    replicated."""
    r = workload.lora_rank
    per_layer = 0.0
    for name in resolve_lora_targets(model, workload.lora_targets):
        d_in, d_out = model.linear_shapes[name]
        if name in ROWWISE:
            per_layer += r * (d_in / tp + d_out)
        else:
            per_layer += r * (d_in + d_out / tp)
    return layers * per_layer


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


def loss_head_bytes(
    model: ModelFacts, tokens: int, tp: int, loss: LossKind, *, head_trained: bool = True
) -> float:
    """Bytes the cross-entropy adds when the loss's backward starts, on one rank, for
    ``tokens`` tokens of a micro-batch (module docstring): beyond the final norm and the head's
    input, which are counted as activations."""
    vocab = model.vocab_size / tp
    if loss == "fused":
        return FUSED_LOSS_BYTES_PER_LOGIT * tokens * vocab
    if loss == "unchunked":
        return LOSS_BYTES_PER_LOGIT * tokens * vocab
    chunk = min(tokens, loss_chunk_tokens(-(-model.vocab_size // tp)))
    head_grad = UNSHARDED_BYTES_PER_PARAM * model.vocab_size * model.hidden_size / tp
    return (
        CHUNKED_LOSS_BYTES_PER_LOGIT * chunk * vocab
        + HIDDEN_GRAD_BYTES_PER_HIDDEN * model.hidden_size * tokens
        + (head_grad if head_trained else 0.0)
    )


def _stage_moments(
    model: ModelFacts, workload: Workload, lay: Layout, stage: str, loss: LossKind
) -> list[MemoryBreakdown]:
    lora = workload.method == "lora"
    shard = lay.shard * lay.tp  # FSDP over fsdp x cp, then TP
    first_layers, last_layers = stage_layers(model.num_layers, lay.pp, lay.v)
    layers = last_layers if stage == "last" else first_layers
    first_p, last_p = stage_params(model, lay.pp, lay.v)
    params = last_p if stage == "last" else first_p
    root, head = root_params(model, stage)
    layer = model.params_per_layer
    # per micro-batch on this rank: its data-parallel rank's sequences, its cp-th of each
    tokens = lay.mbs * workload.seq_len // lay.cp
    k_first, k_last = in_flight_microbatches(lay)
    k = k_last if stage == "last" else k_first

    # model states during the backward, and after its last reduce-scatter
    resident, grad_bytes = state_bytes_per_param(workload)
    if lora:  # adapters per TP rank (some replicated), frozen weights split by TP
        adapters = lay.tp * lora_params_per_tp_rank(model, workload, layers, lay.tp)
        base = LORA_FROZEN_BYTES_PER_PARAM * params + resident * adapters
        grads = grad_bytes * adapters
    else:
        base = float(resident * params)
        grads = float(grad_bytes * params)
    after = (base + grads) / shard
    # the first micro-batch's backward has reduced nothing yet; later ones find gradients
    during = base / shard if lay.ga == 1 else after
    kept = 0.0
    if lay.pp > 1 and lay.shard > 1:
        # torch's pipeline schedule runs an FSDP stage's backward with gradient sync and
        # resharding off until the last micro-batch: its gradients accumulate unsharded in fp32
        # and its bf16 parameters stay gathered (pipelining/stage.py, backward_maybe_with_nosync)
        during = base / shard + grads / lay.tp
        kept = UNSHARDED_BYTES_PER_PARAM * params / lay.tp
    unsharded = 0.0
    if lay.pp == 1 and lay.grad_sync == "last" and lay.ga > 1 and lay.shard * lay.dp > 1:
        # FSDP2 with set_requires_gradient_sync(False) (DDP's no_sync alike) accumulates each
        # micro-batch's gradients unsharded, in the reduce dtype, on the GPU (with CPU offload
        # too) until the last one reduces them; parameters are still resharded after backward
        unsharded = grads / lay.tp
        during = base / shard + unsharded
    host = 0.0
    if lay.offload:
        host, during, after = after, unsharded, 0.0

    act_tok = activation_bytes_per_token(model, lay.ac, lay.tp, workload.fused_kernels)
    transient_tok = recompute_transient_bytes_per_token(
        model, lay.ac, lay.tp, workload.fused_kernels
    )
    if lora:
        act_tok += lora_activation_bytes_per_token(model, workload, lay.ac)
        transient_tok += lora_activation_bytes_per_token(
            model, workload, "none"
        ) - lora_activation_bytes_per_token(model, workload, lay.ac)
    saved = k * layers * act_tok * tokens
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

    # a bf16 reduction (FSDP1 PURE / bfSixteen, pure bf16) reduce-scatters the bf16 gradient
    # itself: no fp32 copy of it
    bf16_reduce = workload.reduce_dtype == "bf16" or workload.precision == "pure-bf16"
    if lora:
        per_layer, root_end = LAYER_BACKWARD_BYTES_PER_PARAM_LORA, UNSHARDED_BYTES_PER_PARAM
    elif bf16_reduce:
        per_layer = LAYER_BACKWARD_BYTES_PER_PARAM_FULL - 2
        root_end = ROOT_END_BYTES_PER_PARAM_FULL - 4
    else:
        per_layer, root_end = LAYER_BACKWARD_BYTES_PER_PARAM_FULL, ROOT_END_BYTES_PER_PARAM_FULL
    in_layer = (transient_tok + backward_working_bytes_per_token(model, lay.tp)) * tokens
    if lay.cp > 1:
        in_layer += ring_attention_bytes(model, tokens, lay.tp)
    # the decoder layers' bf16 parameters gathered at the loss and at the first layer's backward:
    # the last layer (ZeRO-3; plus the next one prefetched in backward), or all of them (ZeRO-2)
    at_loss = UNSHARDED_BYTES_PER_PARAM * layer / lay.tp
    at_layer = per_layer * layer / lay.tp
    if lay.zero == 2 and lay.pp == 1 and lay.shard > 1:
        at_loss = UNSHARDED_BYTES_PER_PARAM * layers * layer / lay.tp
        at_layer = at_loss + (per_layer - 2 * UNSHARDED_BYTES_PER_PARAM) * layer / lay.tp
    moments = [
        moment("layer", during, kept + gathered_root + head_grad + at_layer,
               saved + in_layer, 0.0),
        moment("end", after, root_end * root / lay.tp, 0.0, 0.0),
    ]  # fmt: skip
    if stage != "first":
        final = (FINAL_NORM_BYTES_PER_HIDDEN / lay.tp + HEAD_INPUT_BYTES_PER_HIDDEN) * (
            model.hidden_size * tokens
        )
        moments.append(
            moment("loss", during,
                   kept + gathered_root + at_loss,
                   saved + final, loss_head_bytes(model, tokens, lay.tp, loss,
                                                  head_trained=not lora))
        )  # fmt: skip
    return moments


def estimate_memory(
    model: ModelFacts,
    gpu: GPUSpec,
    workload: Workload,
    lay: Layout,
    *,
    loss: LossKind | None = None,
) -> MemoryBreakdown:
    """The peak: the largest moment of the worst stage (module docstring). ``loss`` is how the
    cross-entropy is computed: by default ``workload.loss`` (the trainer's chunked loss unless the
    workload says otherwise)."""
    kind: LossKind = loss or workload.loss
    stages = ("only",) if lay.pp == 1 else ("first", "last")
    moments = [m for stage in stages for m in _stage_moments(model, workload, lay, stage, kind)]
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
