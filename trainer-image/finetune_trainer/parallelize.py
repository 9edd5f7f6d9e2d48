"""Apply a parallel plan to the model: the only module that builds device meshes.

The order is fixed, as in torchtitan's ``parallelize_llama``:

1. **Pipeline split** (pipeline degree p > 1): :mod:`finetune_trainer.pipeline` cuts the decoder
   layers into stages and builds the schedule; steps 2-5 then apply to each stage of this rank.
2. **Tensor parallel** (t > 1) from the model config's ``base_model_tp_plan`` ("colwise" ->
   ``ColwiseParallel``, "rowwise" -> ``RowwiseParallel``) through DTensor ``parallelize_module``,
   with **sequence parallelism** (Korthikanti et al. 2022, Sec. 4.2.2): the norms run on
   sequence shards (``SequenceParallel``), attention and MLP inputs are all-gathered
   (``PrepareModuleInput``) and their output projections reduce-scatter back to sequence shards.
   The embedding and LM head are split over the vocabulary; the final norm's output is
   all-gathered so the loss sees whole sequences. The trainer's loss
   (:mod:`finetune_trainer.loss`) reads the head's vocabulary shard (its weight, a ``Shard(0)``
   DTensor) and computes a vocabulary-parallel, chunked cross-entropy: the logits are never
   gathered. Only a direct call of the head (the one-line API, where Hugging Face's own loss
   needs whole logits) returns them replicated.
3. **Activation checkpointing** per decoder layer: none; selective = torchtitan's per-op policy
   (save every second matmul output and the attention output, recompute the rest -- what the
   planner's memory model assumes); full = keep only the layer input.
4. **torch.compile** per decoder layer, when the caller asks for it (``compile_layers``: the
   trainer config's ``parallelism.compile``; off by default).
5. **FSDP2** ``fully_shard`` per decoder layer plus the root, over the data-parallel mesh: 1-D
   (fsdp) or 2-D (dp replicate x fsdp shard = HSDP). The plan's ``zero_stage`` 3 reshards a
   layer after its forward (ZeRO-3); 2 keeps it gathered until its backward (ZeRO-2,
   ``reshard_after_forward=False``). A ZeRO-1 layout (replicated parameters and gradients,
   optimizer states sharded: DDP + ``ZeroRedundancyOptimizer``) is not offered: that optimizer
   takes plain tensors (not the DTensors TP and FSDP2 make), and ZeRO-2 holds less (sharded
   gradients) for the same communication volume. Parameters stay fp32 (the optimizer's master
   copy); on GPU they are gathered in bf16 and gradients reduced in fp32. CPU offload is FSDP2's
   ``CPUOffloadPolicy``.

LoRA (peft) is applied by the caller before :func:`apply_plan`; its frozen base weights and
trainable adapters are sharded by FSDP like any other parameters. Under tensor parallelism a
peft-wrapped linear's ``base_layer`` takes the linear's style and its adapters follow the split
(as NeMo's LoRA does): for a column-parallel linear, A (r x in) is replicated and B (out x r)
column-parallel, so each rank adds its own output columns; for a row-parallel one, A is
row-parallel (its r-wide output all-reduced: small) and B replicated, its output split over the
sequence like the base layer's reduce-scattered output. With pipeline parallelism each stage
holds its layers' adapters (the stages are cut from the peft-wrapped model); the frozen
embeddings make the first stage's input need no gradient, as its token ids do not anyway.

**Context parallelism** (cp > 1, GPU only): the model's attention becomes causal ring attention
(:mod:`finetune_trainer.context`; the loop splits each micro-batch's sequences over the cp
ranks), and FSDP shards over fsdp x cp (one flattened mesh dimension): the cp ranks hold
different tokens of the same sequences, so their gradients are summed like data-parallel ones.

Rank order, outer to inner: pp, dp, fsdp, cp, tp (tensor parallel ranks are neighbours, so they
share a node; context-parallel ranks come next).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from finetune_trainer.config import PlanConfig
from finetune_trainer.context import check_device, use_ring_attention
from finetune_trainer.errors import ConfigError
from finetune_trainer.pipeline import Pipeline, build_pipeline, check_schedule

MESH_DIMS = ("pp", "dp", "fsdp", "cp", "tp")


@dataclass
class AppliedPlan:
    """The plan as applied on this rank: its mesh, the data-parallel group it reads data for,
    and its pipeline part (what :func:`apply_plan` returns and the loop reads)."""

    world_size: int
    dp_size: int
    dp_rank: int
    mesh: DeviceMesh | None
    tp_size: int = 1
    #: Ranks each sequence is split over (context parallelism; the mesh's "cp" dimension).
    cp_size: int = 1
    pp_size: int = 1
    pp_rank: int = 0
    #: Pipeline only: this rank's stage modules and the schedule that drives them.
    pipeline: Pipeline | None = None
    #: Reduce gradients on every micro-batch ("every") or only the last ("last"; the loop
    #: turns FSDP2's gradient sync off for the others). Pipelines always reduce on the last.
    gradient_sync: str = "every"
    #: 3: FSDP reshards parameters after each layer's forward; 2: keeps them gathered until its
    #: backward (and, with gradient_sync "last", the loop keeps them between micro-batches).
    zero_stage: int = 3


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    layers = _layers_container(model)[1]
    return list(layers.values() if isinstance(layers, nn.ModuleDict) else layers)


def _layers_container(model: nn.Module) -> tuple[nn.Module, nn.ModuleList | nn.ModuleDict]:
    """The module holding ``layers`` (the HF base model, or a pipeline stage) and the layers."""
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, nn.ModuleList | nn.ModuleDict) and len(layers) > 0:
            return module, layers
    raise ConfigError(
        f"cannot find the decoder layers of {type(model).__name__} to shard: the trainer "
        "supports decoder-only models whose layers are a ModuleList named 'layers' "
        "(Llama, Mistral, Qwen2 and similar)"
    )


def check_plan(plan: PlanConfig | None, world_size: int) -> None:
    if plan is None:
        return
    if plan.world_size != world_size:
        raise ConfigError(
            f"the plan covers {plan.world_size} ranks but {world_size} are "
            "running: make numNodes x gpusPerNode match the plan (or use --nproc)"
        )
    if plan.pipeline_parallel > 1:
        check_schedule(plan)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    check_device(plan.context_parallel, plan.pipeline_parallel, device)


def build_mesh(device: torch.device, plan: PlanConfig | None, world_size: int) -> DeviceMesh:
    """The 5-D mesh (pp, dp, fsdp, cp, tp); without a plan, FSDP over every rank."""
    if plan is None:
        shape = (1, 1, world_size, 1, 1)
    else:
        shape = (
            plan.pipeline_parallel,
            plan.data_parallel,
            plan.fsdp,
            plan.context_parallel,
            plan.tensor_parallel,
        )
    return init_device_mesh(device.type, shape, mesh_dim_names=MESH_DIMS)


def data_parallel_rank(plan: PlanConfig | None, rank: int, world_size: int) -> tuple[int, int]:
    """(dp size, dp rank) of global ``rank`` in the (pp, dp, fsdp, cp, tp) row-major layout:
    the cp and tp ranks of a data-parallel rank read the same rows."""
    if plan is None:
        return world_size, rank
    size = plan.data_parallel * plan.fsdp
    return size, (rank // (plan.tensor_parallel * plan.context_parallel)) % size


def data_parallel_coords(mesh: DeviceMesh) -> tuple[int, int]:
    """(dp size, dp rank) over the flattened dp x fsdp dimensions."""
    dp, fsdp = mesh["dp"], mesh["fsdp"]
    size = dp.size() * fsdp.size()
    return size, dp.get_local_rank() * fsdp.size() + fsdp.get_local_rank()


# -- tensor parallel -----------------------------------------------------------------------------
def _hf_config(model: nn.Module) -> Any:
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "num_attention_heads"):
            return cfg
    raise ConfigError(f"{type(model).__name__} has no Hugging Face config to read a TP plan from")


def tp_plan(config: Any, tp: int) -> dict[str, ParallelStyle]:
    """DTensor styles for one decoder layer (relative names), with sequence parallelism."""
    base = getattr(config, "base_model_tp_plan", None)
    if not base:
        raise ConfigError(
            f"{type(config).__name__} has no base_model_tp_plan: this architecture cannot run "
            "with tensor parallelism; set tensorParallel to 1"
        )
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    if heads % tp or kv % tp:
        raise ConfigError(
            f"tensor parallel {tp} does not divide {heads} attention heads and {kv} kv heads"
        )
    styles: dict[str, ParallelStyle] = {}
    for pattern, kind in base.items():
        if not pattern.startswith("layers.*."):
            continue
        name = pattern.removeprefix("layers.*.")
        if kind == "colwise":
            styles[name] = ColwiseParallel()
        elif kind == "rowwise":
            styles[name] = RowwiseParallel(output_layouts=Shard(1), use_local_output=False)
        else:
            raise ConfigError(
                f"the TP plan of {type(config).__name__} uses {kind!r} for {pattern}, which the "
                "trainer does not apply: set tensorParallel to 1"
            )
    parents = {name.rsplit(".", 1)[0] for name in styles if "." in name}
    for parent in sorted(parents):
        if parent.endswith("attn"):
            styles[parent] = PrepareModuleInput(
                input_kwarg_layouts={"hidden_states": Shard(1)},
                desired_input_kwarg_layouts={"hidden_states": Replicate()},
                use_local_output=True,
            )
        else:
            styles[parent] = PrepareModuleInput(
                input_layouts=(Shard(1),),
                desired_input_layouts=(Replicate(),),
                use_local_output=True,
            )
    return styles


class _Replicated(ParallelStyle):
    """Parameters replicated over the TP mesh (DTensors, so the gradient norm and FSDP see one
    mesh) and a whole (replicated) input; the output local (LoRA's A of a column-parallel
    linear), or split over the sequence as a ``Shard(1)`` DTensor (``sequence_output``: LoRA's
    B of a row-parallel linear, added to the base layer's reduce-scattered output)."""

    def __init__(self, *, sequence_output: bool = False) -> None:
        super().__init__()
        self.sequence_output = sequence_output

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def replicate(_name: str, mod: nn.Module, mesh: DeviceMesh) -> None:
            for key, param in list(mod.named_parameters(recurse=False)):
                local = DTensor.from_local(param, mesh, [Replicate()], run_check=False)
                mod.register_parameter(key, nn.Parameter(local, param.requires_grad))

        def inputs(_mod: nn.Module, args: Any, mesh: DeviceMesh) -> Any:
            return tuple(
                DTensor.from_local(a, mesh, [Replicate()], run_check=False)
                if isinstance(a, torch.Tensor) and not isinstance(a, DTensor)
                else a
                for a in args
            )

        def output(_mod: nn.Module, out: Any, mesh: DeviceMesh) -> Any:
            if not isinstance(out, DTensor):
                return out
            return out.redistribute(mesh, [Shard(1)]) if self.sequence_output else out.to_local()

        return distribute_module(module, device_mesh, replicate, inputs, output)


def lora_tp_styles(layer: nn.Module, styles: dict[str, ParallelStyle]) -> dict[str, ParallelStyle]:
    """``styles`` with each peft-wrapped linear's style moved to its ``base_layer`` and its
    adapters split to match (module docstring); other entries unchanged."""
    out: dict[str, ParallelStyle] = {}
    for name, style in styles.items():
        module = layer.get_submodule(name)
        adapters_a = getattr(module, "lora_A", None)
        if not hasattr(module, "base_layer") or not isinstance(adapters_a, nn.ModuleDict):
            out[name] = style
            continue
        out[f"{name}.base_layer"] = style
        for key in adapters_a:
            a, b = f"{name}.lora_A.{key}", f"{name}.lora_B.{key}"
            if isinstance(style, ColwiseParallel):
                out[a], out[b] = _Replicated(), ColwiseParallel()
            elif isinstance(style, RowwiseParallel):
                out[a] = RowwiseParallel(output_layouts=Replicate())  # r wide: all-reduced
                out[b] = _Replicated(sequence_output=True)
            else:
                raise ConfigError(f"LoRA on {name} under tensor parallelism is not supported")
    return out


def _gather_sequence(_m: nn.Module, _args: Any, out: Any) -> Any:
    return out.full_tensor() if isinstance(out, DTensor) else out


def apply_tensor_parallel(container: nn.Module, config: Any, tp_mesh: DeviceMesh) -> None:
    """TP + SP over ``tp_mesh`` for a module holding (some of) embed_tokens, layers, norm,
    lm_head."""
    tp = tp_mesh.size()
    per_layer = tp_plan(config, tp)
    # frozen parameters (LoRA's base model) stay frozen: SequenceParallel re-creates the norms'
    # weights as new, trainable parameters
    frozen = {name for name, p in container.named_parameters() if not p.requires_grad}
    for layer in decoder_layers(container):
        plan = dict(per_layer)
        for name, _child in layer.named_children():
            if "norm" in name:
                plan[name] = SequenceParallel()
        parallelize_module(layer, tp_mesh, lora_tp_styles(layer, plan))
    ends = {n.rsplit(".", 1)[-1]: m for n, m in container.named_modules()}
    embed, head = ends.get("embed_tokens"), ends.get("lm_head")
    tied = embed is not None and head is not None and head.weight is embed.weight
    for name, module in container.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "embed_tokens":
            parallelize_module(
                module,
                tp_mesh,
                RowwiseParallel(
                    input_layouts=Replicate(), output_layouts=Shard(1), use_local_output=False
                ),
            )
        elif leaf == "norm" and not isinstance(module, nn.ModuleDict):
            parallelize_module(module, tp_mesh, SequenceParallel())
            module.register_forward_hook(_gather_sequence)
        elif leaf == "lm_head":
            # Weight split over the vocabulary (Shard(0)): finetune_trainer.loss works on this
            # rank's rows; the replicated output only serves callers of head(x) (one-line API).
            parallelize_module(
                module,
                tp_mesh,
                ColwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
            )
    if tied and embed is not None and head is not None:
        # Both styles split the (vocabulary, hidden) weight over its rows, Shard(0), each into a
        # new parameter: share the embedding's again, as the model ties them.
        head.weight = embed.weight
    for name, param in container.named_parameters():
        if name in frozen:
            param.requires_grad_(False)


# -- activation checkpointing --------------------------------------------------------------------
def _sac_save_ops() -> set[Any]:
    aten = torch.ops.aten
    ops = {aten.mm.default, aten.max.default}
    for name in (
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    ):
        op = getattr(aten, name, None)
        if op is not None:
            ops.add(op.default)
    return ops


def _selective_context_fn() -> Callable[[], Any]:
    """torchtitan's op-level SAC: save attention and every second matmul, recompute the rest.

    The matmul count restarts with every call (a layer's forward and its recompute), so each
    step saves the same tensors: the 1st, 3rd, ... matmul of the layer.
    """
    from torch.utils.checkpoint import (  # noqa: PLC0415
        CheckpointPolicy,
        create_selective_checkpoint_contexts,
    )

    save = _sac_save_ops()
    mm = torch.ops.aten.mm.default

    def contexts() -> Any:
        counts: dict[str, int] = defaultdict(int)

        def policy(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> Any:
            key = "recompute" if ctx.is_recompute else "forward"
            if func == mm:
                counts[key] += 1
            keep = func in save and not (func == mm and counts[key] % 2 == 0)
            return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE

        return create_selective_checkpoint_contexts(policy)  # type: ignore[no-untyped-call]

    return contexts


def _checkpointed(forward: Callable[..., Any], context_fn: Any, *args: Any, **kwargs: Any) -> Any:
    from torch.utils.checkpoint import checkpoint  # noqa: PLC0415

    if context_fn is None:
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, context_fn=context_fn, **kwargs)


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Recompute each decoder layer's activations in backward: ``selective`` keeps the
    attention output and every second matmul output, ``full`` only the layer input.

    The layer's ``forward`` is wrapped in place, so parameter names (checkpoints) do not change.
    """
    if mode == "none":
        return
    if mode not in ("selective", "full"):
        raise ConfigError(f"unknown activation checkpointing mode {mode!r}")
    for layer in decoder_layers(model):
        context_fn = _selective_context_fn() if mode == "selective" else None
        layer.forward = partial(_checkpointed, layer.forward, context_fn)


def compile_decoder_layers(model: nn.Module) -> None:
    """``torch.compile`` each decoder layer (in place: parameter names do not change)."""
    for layer in decoder_layers(model):
        layer.compile()


# -- FSDP ----------------------------------------------------------------------------------------
def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    device: torch.device,
    *,
    offload: bool,
    reshard_last: bool = False,
    keep_gathered: bool = False,
) -> None:
    """``fully_shard`` each decoder layer and the root. ``keep_gathered`` (the plan's
    zero_stage 2): no layer is resharded after its forward, so its parameters stay gathered
    until its backward has run (ZeRO-2: one all-gather per micro-batch; gradients and optimizer
    states stay sharded)."""
    if device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    policy = CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload else OffloadPolicy()
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        # The last layer's parameters are needed again at once by backward: keep them gathered.
        fully_shard(
            layer,
            mesh=mesh,
            mp_policy=mp,
            offload_policy=policy,
            reshard_after_forward=not keep_gathered and (reshard_last or i < len(layers) - 1),
        )
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=policy)


# -- putting it together ---------------------------------------------------------------------------
def shard_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The mesh FSDP runs on: the shard group (fsdp, with the cp ranks: one flattened dimension)
    and, for HSDP, the replicas (dp) outside it."""
    if mesh["cp"].size() == 1:
        return mesh["dp", "fsdp"] if mesh["dp"].size() > 1 else mesh["fsdp"]
    flat = mesh["fsdp", "cp"]._flatten("fsdp_cp")
    return mesh["dp", "fsdp_cp"] if mesh["dp"].size() > 1 else flat


def parallelize(
    model: nn.Module,
    plan: PlanConfig | None,
    mesh: DeviceMesh,
    device: torch.device,
    *,
    offload: bool,
    pipelined: bool = False,
    compile_layers: bool = False,
) -> None:
    """Tensor parallel -> activation checkpointing -> compile -> FSDP/HSDP, on ``mesh``."""
    if mesh["tp"].size() > 1:
        apply_tensor_parallel(model, _hf_config(model), mesh["tp"])
    apply_activation_checkpointing(model, plan.activation_checkpointing if plan else "none")
    if compile_layers:
        compile_decoder_layers(model)
    dp_mesh = shard_mesh(mesh)
    if dp_mesh.size() > 1 or offload:
        apply_fsdp(
            model,
            dp_mesh,
            device,
            offload=offload,
            reshard_last=pipelined,
            keep_gathered=plan is not None and plan.zero_stage == 2,
        )


def apply_plan(
    model: nn.Module,
    *,
    world_size: int,
    rank: int,
    device: torch.device,
    plan: PlanConfig | None,
    hf_model: nn.Module | None = None,
    compile_layers: bool = False,
) -> AppliedPlan:
    """Parallelize ``model`` in place for this rank and say how data is split.

    ``model`` is the training module (wrapping ``hf_model``). With pipeline parallelism the
    result's ``pipeline`` holds this rank's stages (built from ``hf_model``), and only those are
    trained. ``compile_layers`` compiles each decoder layer with ``torch.compile``.
    """
    check_plan(plan, world_size)
    if world_size == 1:
        apply_activation_checkpointing(model, plan.activation_checkpointing if plan else "none")
        if compile_layers:
            compile_decoder_layers(model)
        return AppliedPlan(world_size=1, dp_size=1, dp_rank=0, mesh=None)
    mesh = build_mesh(device, plan, world_size)
    dp_size, dp_rank = data_parallel_coords(mesh)
    offload = plan is not None and plan.cpu_offload
    applied = AppliedPlan(
        world_size=world_size,
        dp_size=dp_size,
        dp_rank=dp_rank,
        mesh=mesh,
        tp_size=mesh["tp"].size(),
        cp_size=mesh["cp"].size(),
        pp_size=mesh["pp"].size(),
        pp_rank=mesh["pp"].get_local_rank(),
        gradient_sync=plan.gradient_sync if plan is not None else "every",
        zero_stage=plan.zero_stage if plan is not None else 3,
    )
    if plan is not None and plan.pipeline_parallel > 1:
        if hf_model is None:
            raise ConfigError("pipeline parallelism needs the Hugging Face model to split")
        applied.pipeline = build_pipeline(
            hf_model,
            plan,
            mesh,
            device,
            num_layers=len(decoder_layers(hf_model)),
            parallelize_stage=partial(
                parallelize,
                plan=plan,
                mesh=mesh,
                device=device,
                offload=offload,
                pipelined=True,
                compile_layers=compile_layers,
            ),
        )
        return applied
    if applied.cp_size > 1:
        use_ring_attention(hf_model if hf_model is not None else model)
    parallelize(model, plan, mesh, device, offload=offload, compile_layers=compile_layers)
    return applied


def trained_module(model: nn.Module, applied: AppliedPlan) -> nn.Module:
    """The module whose parameters this rank trains (and checkpoints): ``model``, or with a
    pipeline this rank's stages under the same parameter names."""
    return applied.pipeline.parts if applied.pipeline is not None else model
