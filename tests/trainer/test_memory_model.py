"""The planner's peak memory per GPU against PyTorch's own accounting (FSDPMemTracker).

Real Llama-3-8B / Mistral-7B-v0.3 / Qwen2-1.5B configurations (8 decoder layers where the full
depth adds nothing but time), built under FakeTensorMode (no real memory), sharded with the
trainer's own ``apply_fsdp`` (the GPU mixed-precision policy: fp32 sharded parameters, bf16
unsharded) and ``apply_activation_checkpointing`` on a fake process group that simulates 8, 16
or 64 ranks from one CPU process. ``FSDPMemTracker`` works on CPU under FakeTensorMode; the
mesh must be built outside the fake mode.

How it is compared: the tracker's peak (largest total over the step, by category) against the
planner's peak minus its constant CUDA/NCCL overhead, within +-10%; the model states the
formulas claim exactly (sharded fp32 params + Adam moments, and the sharded gradients under
gradient accumulation) within 1%. Measured / predicted, torch 2.15: Llama-3-8B 32 layers fsdp8
mbs1 none 0.99, 8 layers mbs2 full 1.00, mbs2 ga4 selective 1.00; Mistral-7B 8 layers mbs2 none
0.99, 32 layers fsdp64 ga2 full 1.03; Qwen2-1.5B (tied embeddings) fsdp16 mbs4 selective 0.97.

What the tracker does not see or the fake mode distorts:
- AdamW with ``foreach=True`` or ``fused=True`` on DTensors under FakeTensorMode is booked as
  ~30-44 GiB of "OptState" per rank whatever the shard degree (a fake-mode artefact, not real
  memory), so the optimizer runs ``foreach=False`` and its step is taken before tracking.
- The loss is the trainer's ``CausalLMLoss`` without the boolean target mask (``hidden[keep]``
  has a data-dependent shape that FakeTensorMode rejects); every token is a target.
- FSDP2's unsharded bf16 gradients are not attributed to a category, so the LM head's gradient
  and the root's end-of-backward buffers the planner charges are not checked here.
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")

import torch.distributed as dist  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.testing._internal.distributed.fake_pg import FakeStore  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from finetune_trainer.lm import CausalLMLoss  # noqa: E402
from finetune_trainer.parallelize import apply_activation_checkpointing, apply_fsdp  # noqa: E402
from finetune_trainer.planner import (  # noqa: E402
    Cluster,
    ModelFacts,
    Plan,
    Workload,
    estimate,
    hf_config,
)

pytestmark = pytest.mark.trainer

SEQ = 2048
#: measured / predicted peak: the issue's +-10%.
PEAK_BAND = (0.90, 1.10)
STATES_TOLERANCE = 0.01


class _AllTargetsLoss(CausalLMLoss):
    """``CausalLMLoss`` with every token a target (no data-dependent boolean indexing)."""

    def forward(  # type: ignore[override]
        self, input_ids: Any, position_ids: Any, labels: Any
    ) -> tuple[Any, Any]:
        decoder = self.model.get_decoder()  # type: ignore[no-untyped-call]
        out = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        head = self.model.get_output_embeddings()  # type: ignore[no-untyped-call]
        logits = head(out.last_hidden_state[:, :-1]).float()
        targets = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), reduction="sum"
        )
        return loss, targets.numel()


def _measure(cfg: dict[str, Any], world: int, mbs: int, ac: str, ga: int) -> dict[str, float]:
    """Peak bytes per rank by FSDPMemTracker category, for one forward + backward.

    With ``ga`` > 1 the tracked micro-batch is the last one of an accumulation: the earlier
    ones' reduced gradients are resident, as they are in the trainer's loop.
    """
    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    try:
        mesh = init_device_mesh("cpu", (world,))
        with FakeTensorMode():
            config = AutoConfig.for_model(**cfg)
            config._attn_implementation = "sdpa"
            model = _AllTargetsLoss(AutoModelForCausalLM.from_config(config, dtype=torch.float32))
            apply_activation_checkpointing(model, ac)
            # device "cuda" selects the GPU mixed-precision policy; the mesh stays on CPU
            apply_fsdp(model, mesh, torch.device("cuda"), offload=False)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
            ids = torch.randint(0, config.vocab_size, (mbs, SEQ))
            pos = torch.arange(SEQ).expand(mbs, SEQ)
            model(ids, pos, ids)[0].backward()
            opt.step()  # Adam states now exist and are tracked from the start
            opt.zero_grad(set_to_none=True)
            for _ in range(ga - 1):
                model(ids, pos, ids)[0].backward()
            tracker = FSDPMemTracker(model, opt)
            tracker.track_inputs((ids, pos, ids))
            with tracker:
                model(ids, pos, ids)[0].backward()
            snaps = tracker.get_tracker_snapshot("peak").values()
            peak = max(snaps, key=lambda s: s["Total"])
            return {str(getattr(k, "value", k)): float(v) for k, v in peak.items()}
    finally:
        dist.destroy_process_group()


CASES = [
    # model, world (FSDP degree), micro-batch, recompute, gradient accumulation, layers
    ("meta-llama/Meta-Llama-3-8B", 8, 1, "none", 1, 32),
    ("meta-llama/Meta-Llama-3-8B", 8, 2, "full", 1, 8),
    ("meta-llama/Meta-Llama-3-8B", 8, 2, "selective", 4, 8),
    ("mistralai/Mistral-7B-v0.3", 8, 2, "none", 1, 8),
    ("mistralai/Mistral-7B-v0.3", 64, 1, "full", 2, 32),
    ("Qwen/Qwen2-1.5B", 16, 4, "selective", 1, 28),
]


@pytest.mark.parametrize(("model_id", "world", "mbs", "ac", "ga", "layers"), CASES)
def test_peak_memory_matches_fsdp_mem_tracker(
    model_id: str, world: int, mbs: int, ac: str, ga: int, layers: int
) -> None:
    cfg = hf_config(model_id)
    cfg["num_hidden_layers"] = layers
    measured = _measure(cfg, world, mbs, ac, ga)

    plan = Plan(
        model=ModelFacts.from_hf_config(cfg),
        cluster=Cluster.of("H100-80GB", nodes=world // 8, gpus_per_node=8),
        workload=Workload(seq_len=SEQ, global_batch_size=world * mbs * ga),
        data_parallel=1,
        fsdp=world,
        micro_batch_size=mbs,
        gradient_accumulation=ga,
        activation_checkpointing=ac,  # type: ignore[arg-type]
    )
    est = estimate(plan)
    predicted = est.peak_memory_bytes - est.memory_breakdown["overhead"]
    ratio = measured["Total"] / predicted
    print(f"{model_id} x{layers} fsdp{world} mbs{mbs} ga{ga} ac={ac}: measured/predicted "
          f"{ratio:.3f} at {est.memory_breakdown}")  # fmt: skip

    # The formulas' model states, exactly: fp32 shards of the parameters and both Adam moments
    # (12 B/param / N) always; the fp32 sharded gradients (4 B/param / N) once an earlier
    # micro-batch of the accumulation has reduced them.
    n = plan.model.num_params
    assert measured["Sharded Param"] + measured["OptState"] == pytest.approx(
        12 * n / world, rel=STATES_TOLERANCE
    )
    if ga > 1:
        assert measured["Sharded Grad"] == pytest.approx(4 * n / world, rel=STATES_TOLERANCE)
    assert PEAK_BAND[0] <= ratio <= PEAK_BAND[1], (ratio, measured, est.memory_breakdown)
