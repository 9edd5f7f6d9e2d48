"""Human-readable reasons and tables."""

from __future__ import annotations

from .hardware import GiB
from .plan import Estimate, Plan, PlanResult, RankedPlan

# GPU architectures with fp8 tensor cores (Hopper, Ada, Blackwell). The trainer computes in bf16:
# on these the reason says so, since fp8 could be faster (not planned or measured yet).
FP8_ARCHITECTURES = frozenset({"hopper", "ada", "blackwell"})
_AC_WORDS = {"none": "no recompute", "selective": "selective recompute", "full": "full recompute"}


def describe_parallelism(plan: Plan) -> str:
    parts: list[str] = []
    # the context-parallel ranks shard parameters with the FSDP ranks (one group, fsdp x cp)
    dp, fs = plan.data_parallel, plan.fsdp * plan.context_parallel
    if dp > 1 and fs > 1:
        parts.append(f"HSDP ({dp} replicas x FSDP over {fs} GPUs)")
    elif fs > 1:
        parts.append(f"FSDP over {fs} GPUs")
    elif dp > 1:
        parts.append(f"data parallel over {dp} GPUs")
    if plan.context_parallel > 1:
        parts.append(f"context parallel {plan.context_parallel} (ring attention)")
    if plan.tensor_parallel > 1:
        parts.append(f"tensor parallel {plan.tensor_parallel} with sequence parallel")
    if plan.pipeline_parallel > 1:
        sched: str = plan.pipeline_schedule
        if plan.virtual_stages > 1:
            sched += f", {plan.virtual_stages} chunks per rank"
        parts.append(f"pipeline of {plan.pipeline_parallel} stages ({sched})")
    if not parts:
        parts.append("one GPU")
    return ", ".join(parts)


def reason(plan: Plan, est: Estimate) -> str:
    """E.g. 'FSDP over 8 GPUs, micro-batch 2, selective recompute: fits in 61 GiB of 80 GiB,
    ~5,900 tok/s/GPU (MFU 41%)'."""
    mb = f"micro-batch {plan.micro_batch_size}"
    if plan.gradient_accumulation > 1:
        mb += f" x {plan.gradient_accumulation} accumulation steps"
    bits = [describe_parallelism(plan), mb, _AC_WORDS[plan.activation_checkpointing]]
    if plan.cpu_offload:
        bits.append("CPU offload")
    if plan.workload.method == "lora":
        bits.append(f"LoRA r={plan.workload.lora_rank}")
    cap = est.memory_capacity_bytes / GiB
    fp8 = "; bf16, fp8 not used" if plan.cluster.gpu.architecture in FP8_ARCHITECTURES else ""
    return (
        f"{', '.join(bits)}: fits in {est.peak_memory_bytes / GiB:.0f} GiB of {cap:.0f} GiB, "
        f"~{est.tokens_per_s_per_gpu:,.0f} tok/s/GPU (MFU {est.mfu:.0%}{fp8})"
    )


def _row(rank: str, rp: RankedPlan) -> list[str]:
    e = rp.estimate
    return [
        rank,
        rp.plan.summary,
        f"{e.peak_memory_bytes / GiB:.1f}",
        f"{e.step_time_s:.2f}",
        f"{e.tokens_per_s_per_gpu:,.0f}",
        f"{e.mfu:.1%}",
    ]


def format_table(result: PlanResult) -> str:
    """The chosen plan and its alternatives as a fixed-width table (for `finetune plan`)."""
    head = ["", "plan", "peak GiB", "step s", "tok/s/GPU", "MFU"]
    rows = [_row("*", RankedPlan(plan=result.plan, estimate=result.estimate))]
    rows += [_row(str(i + 2), alt) for i, alt in enumerate(result.alternatives)]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [
        "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=False))
        )
        for r in [head, *rows]
    ]
    return "\n".join([*lines, "", result.reason, *result.notes])
