"""The planner's peak memory per GPU against PyTorch's own accounting (FSDPMemTracker).

Real Llama-3-8B / Mistral-7B-v0.3 / Qwen2-1.5B configurations (8 decoder layers where the full
depth adds nothing but time), shaped on the meta device (wrapped with peft for LoRA, in the
dtype the trainer loads on a GPU), materialized as FakeTensors (no real memory) and
parallelized by the trainer's own ``parallelize`` (TP with sequence parallel -> activation
checkpointing -> FSDP2 with the GPU mixed-precision policy: fp32 sharded parameters, bf16
unsharded) on a fake process group that simulates 8 to 64 ranks from one CPU process.
``FSDPMemTracker`` works on CPU under FakeTensorMode; the device mesh's own tensors must stay
real, so the mesh is built and the model parallelized outside the fake mode.

How it is compared: the tracker's peak (largest total over the step, by category) against the
planner's peak minus its constant CUDA/NCCL overhead, within +-10%; the model states the
formulas claim exactly (sharded fp32 params + Adam moments, and the sharded gradients under
gradient accumulation) within 1%. Measured / predicted, torch 2.15, with the trainer's chunked
loss (one case per line of CASES): 0.99, 0.96, 1.00, 0.98 (TP 2), 0.94 (HSDP 2x4), 0.99 (LoRA,
dropout), 1.02 (LoRA, SAC), 0.94, 1.03 (FSDP 64), 1.01 (TP 4, SAC), 0.92 (Qwen2, tied
embeddings), 1.02 and 1.02 (the loss's backward is the predicted peak: FSDP 8, and TP 2 with
the vocabulary-parallel loss), 0.98 (deferred gradient sync: FSDP2's unsharded fp32 gradients
held between micro-batches, which the tracker does not attribute, are read from FSDP2's
parameters and added; they are exactly the 4 bytes per trained parameter / TP the planner
charges), 0.92 (LoRA on TP 2: each adapter split with its linear, one factor replicated), 0.97
and 0.98 (ZeRO-2: every decoder layer gathered from its forward to its backward; with deferred
sync also kept between micro-batches). With the old unchunked loss most cases peaked at the
loss and read 0.97-1.03; now a decoder layer's backward or the end of the step is the predicted
peak, and those moments include FSDP2's unsharded bf16 gradients, which the tracker does not
see (below), hence the lower ratios. Pipeline stages are not measured here (the schedules do
not run under the fake process group).

What the tracker does not see or the fake mode distorts:
- AdamW with ``foreach=True`` or ``fused=True`` on DTensors under FakeTensorMode is booked as
  ~30-44 GiB of "OptState" per rank whatever the shard degree (a fake-mode artefact, not real
  memory), so the optimizer runs ``foreach=False`` and its step is taken before tracking.
- The loss is the trainer's ``CausalLMLoss`` (chunked, vocabulary-parallel under TP:
  finetune_trainer/loss.py) with ``select_targets=False``: choosing the target rows has a
  data-dependent shape that FakeTensorMode rejects; every token is a target here.
- FSDP2's unsharded bf16 gradients are not attributed to a category, so the LM head's gradient
  and the root's end-of-backward buffers the planner charges are not checked here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import torch.distributed as dist  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily  # noqa: E402
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker  # noqa: E402
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType  # noqa: E402
from torch.distributed.fsdp import FSDPModule  # noqa: E402
from torch.testing._internal.distributed.fake_pg import FakeStore  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from conftest import trainer_config  # noqa: E402
from finetune_trainer.config import PlanConfig, TrainerConfig  # noqa: E402
from finetune_trainer.lm import CausalLMLoss  # noqa: E402
from finetune_trainer.model_loading import weights_dtype, wrap_lora  # noqa: E402
from finetune_trainer.parallelize import (  # noqa: E402
    apply_activation_checkpointing,
    build_mesh,
    parallelize,
)
from finetune_trainer.planner import (  # noqa: E402
    Cluster,
    ModelFacts,
    Plan,
    Workload,
    estimate,
    hf_config,
)
from finetune_trainer.planner.layout import Layout  # noqa: E402
from finetune_trainer.planner.memory import (  # noqa: E402
    estimate_memory,
    lora_params_per_tp_rank,
)

pytestmark = pytest.mark.trainer

SEQ = 2048
_ACTIVATION = _MemRefType.ACT
#: measured / predicted peak: the issue's +-10%.
PEAK_BAND = (0.90, 1.10)
STATES_TOLERANCE = 0.01


@dataclass(frozen=True)
class Case:
    model_id: str
    fsdp: int
    mbs: int
    ac: str
    tp: int = 1
    dp: int = 1  # HSDP replicas
    ga: int = 1
    layers: int = 8
    lora_dropout: float | None = None  # None: full fine-tune
    loss_peak: bool = False  # the planner's peak is the loss's backward (checked)
    sync: str = "every"  # gradient sync under accumulation: every micro-batch, or the last
    zero: int = 3  # 2: parameters kept gathered from forward to backward (ZeRO-2)

    @property
    def world(self) -> int:
        return self.dp * self.fsdp * self.tp

    def __str__(self) -> str:
        method = "full" if self.lora_dropout is None else f"lora(dropout {self.lora_dropout})"
        return (
            f"{self.model_id.split('/')[-1]} x{self.layers} dp{self.dp} fsdp{self.fsdp} "
            f"tp{self.tp} mbs{self.mbs} ga{self.ga} ac={self.ac} {method}"
            + (f" sync={self.sync}" if self.sync != "every" else "")
            + (" zero2" if self.zero == 2 else "")
        )

    def layout(self) -> Layout:
        return Layout(
            dp=self.dp, fsdp=self.fsdp, tp=self.tp, pp=1, schedule="none", v=1, mbs=self.mbs,
            ga=self.ga, ac=self.ac, offload=False, grad_sync=self.sync,  # type: ignore[arg-type]
            zero=self.zero,  # type: ignore[arg-type]
        )  # fmt: skip

    def plan_config(self) -> PlanConfig:
        return PlanConfig(
            data_parallel=self.dp,
            fsdp=self.fsdp,
            tensor_parallel=self.tp,
            pipeline_parallel=1,
            micro_batch_size=self.mbs,
            gradient_accumulation=self.ga,
            activation_checkpointing=self.ac,  # type: ignore[arg-type]
            gradient_sync=self.sync,  # type: ignore[arg-type]
            zero_stage=self.zero,  # type: ignore[arg-type]
        )


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _trainer_config(case: Case) -> TrainerConfig:
    """The trainer's config of this case on a GPU in bf16 (decides the weights' dtype)."""
    method: dict[str, Any] = {"type": "full"}
    if case.lora_dropout is not None:
        lora = {"r": 16, "alpha": 32, "dropout": case.lora_dropout, "target_modules": LORA_TARGETS}
        method = {"type": "lora", "lora": lora}
    doc = trainer_config(Path("model"), Path("run"), method=method)
    doc["model"]["dtype"] = "bfloat16"
    return TrainerConfig.model_validate(doc)


def _build(case: Case, cfg: dict[str, Any]) -> Any:
    """The Hugging Face model's shapes on the meta device, in the dtype the trainer loads on a
    GPU, wrapped with peft by the trainer's own ``wrap_lora`` for LoRA."""
    config = AutoConfig.for_model(**cfg)
    config._attn_implementation = "sdpa"
    tc = _trainer_config(case)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(config, dtype=weights_dtype(tc, torch.device("cuda")))
        if tc.method.lora is not None:
            hf = wrap_lora(tc, hf).get_base_model()
    return hf


def _measure(case: Case, cfg: dict[str, Any]) -> dict[str, float]:
    """Peak bytes per rank by FSDPMemTracker category, for one forward + backward.

    With ``ga`` > 1 the tracked micro-batch is the last one of an accumulation: the earlier
    ones' reduced gradients are resident, as they are in the trainer's loop.
    """
    dist.init_process_group("fake", rank=0, world_size=case.world, store=FakeStore())
    try:
        plan = case.plan_config()
        mesh = build_mesh(torch.device("cpu"), plan, case.world)
        hf = _build(case, cfg)
        # The mesh's own tensors are real; everything else becomes a FakeTensor.
        with FakeTensorMode(allow_non_fake_inputs=True):
            hf.to_empty(device="cpu")
            hf.tie_weights()
            model = CausalLMLoss(hf, select_targets=False)
            with unset_fake_temporarily():
                # the trainer's composition; device "cuda" selects the GPU mixed precision
                parallelize(model, plan, mesh, torch.device("cuda"), offload=False)
            trained = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(trained, lr=1e-4, foreach=False)
            ids = torch.randint(0, cfg["vocab_size"], (case.mbs, SEQ))
            pos = torch.arange(SEQ).expand(case.mbs, SEQ)
            model(ids, pos, ids)[0].backward()
            opt.step()  # Adam states now exist and are tracked from the start
            opt.zero_grad(set_to_none=True)
            # the loop's deferred sync: the earlier micro-batches keep unsharded gradients
            model.set_requires_gradient_sync(case.sync == "every")
            # ZeRO-2 with deferred sync: the loop keeps the parameters gathered in between
            model.set_reshard_after_backward(not (case.zero == 2 and case.sync == "last"))
            for _ in range(case.ga - 1):
                model(ids, pos, ids)[0].backward()
            model.set_requires_gradient_sync(True)
            model.set_reshard_after_backward(True)
            held = _deferred_gradient_bytes(model)
            tracker = FSDPMemTracker(model, opt)
            tracker.track_inputs((ids, pos, ids))
            with tracker:
                model(ids, pos, ids)[0].backward()
            snaps = tracker.get_tracker_snapshot("peak").values()
            peak = max(snaps, key=lambda s: s["Total"])
            out = {str(getattr(k, "value", k)): float(v) for k, v in peak.items()}
            out["Deferred Grad"] = held
            return out
    finally:
        dist.destroy_process_group()


def _deferred_gradient_bytes(model: Any) -> float:
    """Bytes of the unsharded gradients FSDP2 holds between micro-batches with gradient sync
    off (each parameter's unsharded ``.grad``, upcast to the reduce dtype): FSDPMemTracker
    does not attribute them, so they are read from FSDP2's own parameter objects."""
    total = 0.0
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        group = module._get_fsdp_state()._fsdp_param_group
        for fsdp_param in group.fsdp_params if group is not None else ():
            grad = getattr(fsdp_param, "_unsharded_param", None)
            grad = grad.grad if grad is not None else None
            if grad is not None:
                total += grad.numel() * grad.element_size()
    return total


CASES = [
    Case("meta-llama/Meta-Llama-3-8B", fsdp=8, mbs=1, ac="none", layers=32),
    Case("meta-llama/Meta-Llama-3-8B", fsdp=8, mbs=2, ac="full"),
    Case("meta-llama/Meta-Llama-3-8B", fsdp=8, mbs=2, ac="selective", ga=4),
    Case("meta-llama/Meta-Llama-3-8B", fsdp=4, tp=2, mbs=2, ac="none"),
    Case("meta-llama/Meta-Llama-3-8B", dp=2, fsdp=4, mbs=2, ac="selective"),
    Case("meta-llama/Meta-Llama-3-8B", fsdp=8, mbs=2, ac="none", lora_dropout=0.05),
    Case("meta-llama/Meta-Llama-3-8B", fsdp=8, mbs=4, ac="selective", ga=2, lora_dropout=0.0),
    Case("mistralai/Mistral-7B-v0.3", fsdp=8, mbs=2, ac="none"),
    Case("mistralai/Mistral-7B-v0.3", fsdp=64, mbs=1, ac="full", ga=2, layers=32),
    Case("mistralai/Mistral-7B-v0.3", fsdp=8, tp=4, mbs=4, ac="selective"),
    Case("Qwen/Qwen2-1.5B", fsdp=16, mbs=4, ac="selective", layers=28),
    # The chunked loss's own moment is the predicted peak (a small model, a large vocabulary):
    # one chunk's logits, the head's input gradient and the head's weight gradient; under TP
    # on the vocabulary shards (the loss is vocabulary parallel).
    Case("Qwen/Qwen2-0.5B", fsdp=8, mbs=2, ac="none", loss_peak=True),
    Case("Qwen/Qwen2-0.5B", fsdp=4, tp=2, mbs=1, ac="none", loss_peak=True),
    Case("Qwen/Qwen2-0.5B", fsdp=8, mbs=2, ac="selective", ga=2, sync="last"),
    # LoRA on TP-split linears: frozen weights split by TP, adapters split with them
    Case("meta-llama/Meta-Llama-3-8B", fsdp=4, tp=2, mbs=2, ac="selective", lora_dropout=0.0),
    # ZeRO-2: every decoder layer gathered in bf16 at the loss and the first layer's backward;
    # with deferred sync also kept between micro-batches, beside the unsharded gradients
    Case("meta-llama/Meta-Llama-3-8B", fsdp=8, mbs=2, ac="selective", zero=2),
    Case("Qwen/Qwen2-0.5B", fsdp=8, mbs=2, ac="selective", ga=2, sync="last", zero=2),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_peak_memory_matches_fsdp_mem_tracker(case: Case) -> None:
    cfg = hf_config(case.model_id)
    cfg["num_hidden_layers"] = case.layers
    measured = _measure(case, cfg)

    lora = case.lora_dropout is not None
    per_node = min(8, case.world)
    plan = Plan(
        model=ModelFacts.from_hf_config(cfg),
        cluster=Cluster.of("H100-80GB", nodes=case.world // per_node, gpus_per_node=per_node),
        workload=Workload(
            seq_len=SEQ,
            global_batch_size=case.dp * case.fsdp * case.mbs * case.ga,
            method="lora" if lora else "full",
            lora_targets=LORA_TARGETS,
            lora_dropout=case.lora_dropout or 0.0,
        ),
        data_parallel=case.dp,
        fsdp=case.fsdp,
        tensor_parallel=case.tp,
        micro_batch_size=case.mbs,
        gradient_accumulation=case.ga,
        activation_checkpointing=case.ac,  # type: ignore[arg-type]
        gradient_sync=case.sync,  # type: ignore[arg-type]
        zero_stage=case.zero,  # type: ignore[arg-type]
    )
    est = estimate(plan)
    predicted = est.peak_memory_bytes - est.memory_breakdown["overhead"]
    ratio = (measured["Total"] + measured["Deferred Grad"]) / predicted
    moment = estimate_memory(
        plan.model, plan.cluster.gpu, plan.workload, case.layout()
    ).moment  # which moment of the step the planner's peak is (memory.py docstring)
    print(f"{case}: measured/predicted {ratio:.3f} at {est.memory_breakdown}, moment {moment}")
    if case.loss_peak:
        assert moment == "loss"

    # The formulas' model states, exactly: the sharded parameters (fp32, or bf16 frozen LoRA
    # base weights) and both fp32 Adam moments of what is trained, always; the fp32 sharded
    # gradients once an earlier micro-batch of the accumulation has reduced them.
    # Per TP rank (HSDP replicas each hold a full set of shards), then split by FSDP. LoRA under
    # TP: adapters follow their linear's split, one factor of each replicated.
    n = plan.model.num_params / case.tp
    trained = n
    if lora:  # fp32 adapters on top of the bf16 frozen weights
        trained = lora_params_per_tp_rank(plan.model, plan.workload, case.layers, case.tp)
    params = 2 * n + 4 * trained if lora else 4 * n
    assert measured["Sharded Param"] == pytest.approx(params / case.fsdp, rel=STATES_TOLERANCE)
    assert measured["OptState"] == pytest.approx(8 * trained / case.fsdp, rel=STATES_TOLERANCE)
    if case.sync == "last":  # unsharded fp32 gradients of everything this rank trains
        assert measured["Deferred Grad"] == pytest.approx(4 * trained, rel=STATES_TOLERANCE)
    else:
        assert measured["Deferred Grad"] == 0
    if case.ga > 1 and case.sync == "every":
        assert measured["Sharded Grad"] == pytest.approx(
            4 * trained / case.fsdp, rel=STATES_TOLERANCE
        )
    assert PEAK_BAND[0] <= ratio <= PEAK_BAND[1], (ratio, measured, est.memory_breakdown)


def test_lora_base_weights_are_bf16_only_on_a_gpu() -> None:
    """What the LoRA case above measures is what the trainer loads: frozen weights in bf16 on a
    GPU (2 bytes each, as the planner counts), fp32 master weights everywhere else."""
    lora = _trainer_config(Case("meta-llama/Meta-Llama-3-8B", 8, 1, "none", lora_dropout=0.0))
    full = _trainer_config(Case("meta-llama/Meta-Llama-3-8B", 8, 1, "none"))
    assert weights_dtype(lora, torch.device("cuda")) == torch.bfloat16
    assert weights_dtype(lora, torch.device("cpu")) == torch.float32
    assert weights_dtype(full, torch.device("cuda")) == torch.float32
    fp32 = lora.model_copy(update={"model": lora.model.model_copy(update={"dtype": "float32"})})
    assert weights_dtype(fp32, torch.device("cuda")) == torch.float32


def test_selective_checkpointing_saves_the_same_every_step() -> None:
    """The SAC policy saves every second matmul counted from each layer call's first, so every
    step keeps the same tensors (a count carried over between calls flips which half is
    saved on every other step, and the memory with it)."""
    cfg = hf_config("meta-llama/Meta-Llama-3-8B")
    cfg["num_hidden_layers"] = 2
    config = AutoConfig.for_model(**cfg)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    saved = []
    with FakeTensorMode(allow_non_fake_inputs=True):
        hf.to_empty(device="cpu")
        model = CausalLMLoss(hf, select_targets=False)
        apply_activation_checkpointing(hf, "selective")
        ids = torch.randint(0, cfg["vocab_size"], (1, 256))
        pos = torch.arange(256).expand(1, 256)
        for _ in range(3):
            tracker = MemTracker()
            tracker.track_external(model)
            with tracker:
                loss = model(ids, pos, ids)[0]
                now = tracker.get_tracker_snapshot("current")
                saved.append(sum(d[_ACTIVATION] for d in now.values()))
                loss.backward()
            model.zero_grad(set_to_none=True)
    assert saved[0] > 0
    assert saved == [saved[0]] * 3
