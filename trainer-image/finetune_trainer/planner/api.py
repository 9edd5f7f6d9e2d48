"""plan(): the planner's entry point (auto search or manual validation)."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import ValidationError

from .explain import reason
from .hardware import GB, Cluster, GiB
from .memory import usable_host_memory, usable_memory
from .model import ModelFacts
from .plan import Estimate, Plan, PlanInfeasible, PlanResult, RankedPlan
from .search import NEAR_TIE, Candidate, SearchResult, evaluate, search, to_estimate
from .suggest import suggestions
from .workload import Constraints, Workload

Mode = Literal["auto", "manual"]


def estimate(plan: Plan) -> Estimate:
    """Memory and time estimates for a given (validated) plan."""
    c = evaluate(plan.model, plan.cluster, plan.workload, plan.layout())
    return to_estimate(plan.model, plan.cluster, plan.workload, c)


def _ranked(model: ModelFacts, cluster: Cluster, workload: Workload, c: Candidate) -> RankedPlan:
    return RankedPlan(
        plan=Plan.from_layout(model, cluster, workload, c.layout),
        estimate=to_estimate(model, cluster, workload, c),
    )


def _what(model: ModelFacts, cluster: Cluster, workload: Workload) -> str:
    return (
        f"{model.name} {workload.method} fine-tune (seq {workload.seq_len}, global batch "
        f"{workload.global_batch_size}) on {cluster.describe()}"
    )


def _fixed(con: Constraints) -> str:
    set_ = {k: v for k, v in con.model_dump().items() if v is not None}
    return ", ".join(f"{k}={v}" for k, v in set_.items())


def _infeasible(
    model: ModelFacts, cluster: Cluster, workload: Workload, con: Constraints, res: SearchResult
) -> PlanInfeasible:
    usable = usable_memory(cluster.gpu) / GiB
    closest = _ranked(model, cluster, workload, res.closest) if res.closest else None
    what = _what(model, cluster, workload)
    if not con.is_empty():
        what += f" with {_fixed(con)}"
    no_layout = res.structures == 0 or res.closest is None  # e.g. every layout excluded by a pin
    if no_layout:
        head = (
            f"no valid parallel layout for {what}: the global batch must split evenly over the "
            f"data-parallel ranks (dp*fsdp = world/(tp*pp*cp)), TP must divide the heads "
            f"({model.num_heads}/{model.num_kv_heads} kv) and fit a node, PP stages cannot "
            f"outnumber the {model.num_layers} layers (CPU offload excludes pipeline parallelism;"
            f" context parallelism needs GPUs, no pipeline and a sequence that splits into"
            f" 2 x contextParallel equal chunks)"
        )
    else:
        assert closest is not None
        assert res.closest is not None
        peak = closest.estimate.peak_memory_bytes / GiB
        host_node = res.closest.memory.host * cluster.gpus_per_node
        if peak > usable:
            need = f"{peak:.1f} GiB per GPU of {usable:.1f} GiB usable"
        else:
            need = (
                f"{host_node / GB:,.0f} GB of host memory per node for CPU offload, of "
                f"{usable_host_memory(cluster.gpu) / GB:,.0f} GB usable"
            )
        head = f"{what} does not fit: the closest candidate ({closest.plan.summary}) needs {need}"
    fixes = suggestions(model, cluster, workload, con, no_layout=no_layout)
    msg = head + (". Would fit: " + ", or ".join(fixes) if fixes else ". Nothing tried fits.")
    return PlanInfeasible(msg, tuple(fixes), closest)


def _result(
    model: ModelFacts,
    cluster: Cluster,
    workload: Workload,
    res: SearchResult,
    *,
    top_k: int,
    notes: tuple[str, ...],
    t0: float,
) -> PlanResult:
    assert res.best is not None
    best = _ranked(model, cluster, workload, res.best)
    alts = tuple(_ranked(model, cluster, workload, c) for c in res.ranked[1 : top_k + 1])
    text = reason(best.plan, best.estimate)
    fastest = min(res.ranked, key=Candidate.key)
    if fastest is not res.best:
        faster = _ranked(model, cluster, workload, fastest)
        gain = best.estimate.step_time_s / faster.estimate.step_time_s - 1
        text += (
            f"; chosen over {faster.plan.summary}, {gain:.1%} faster by the model (under "
            f"{NEAR_TIE:.0%}, within its error), for fewer moving parts"
        )
    return PlanResult(
        plan=best.plan,
        estimate=best.estimate,
        alternatives=alts,
        reason=text if not notes else f"{notes[0]} {text}",
        notes=notes,
        mode="auto",
        candidates_evaluated=res.evaluated,
        planning_seconds=time.perf_counter() - t0,
    )


def _manual(
    model: ModelFacts, cluster: Cluster, workload: Workload, con: Constraints, t0: float
) -> PlanResult:
    world = cluster.world
    tp = con.tensor_parallel or 1
    pp = con.pipeline_parallel or 1
    cp = con.context_parallel or 1
    rest = world // (tp * pp * cp) if world % (tp * pp * cp) == 0 else 0
    if con.fsdp is None and con.data_parallel is None:
        dp, fs = 1, rest
    elif con.fsdp is None:
        dp = con.data_parallel or 1
        fs = rest // dp if rest % dp == 0 else 0
    else:
        fs = con.fsdp
        dp = con.data_parallel or (rest // fs if rest % fs == 0 else 0)
    mbs = con.micro_batch_size or 1
    sched = con.pipeline_schedule or ("1f1b" if pp > 1 else "none")
    v = con.virtual_stages or (2 if sched == "interleaved-1f1b" else 1)
    gbs = workload.global_batch_size
    what = _what(model, cluster, workload)
    if rest == 0 or dp * fs != rest:  # rest = world / (tp*pp*cp): the degrees cover the world
        raise PlanInfeasible(
            f"manual plan for {what} is invalid: dataParallel*fsdp*contextParallel*"
            f"tensorParallel*pipelineParallel must equal the {world} GPUs"
        )
    if gbs % (dp * fs * mbs):
        raise PlanInfeasible(
            f"manual plan for {what} is invalid: globalBatchSize {gbs} is not a multiple of "
            f"dataParallel*fsdp*microBatchSize = {dp * fs * mbs}"
        )
    ga = gbs // (dp * fs * mbs)
    try:
        plan = Plan(
            model=model,
            cluster=cluster,
            workload=workload,
            data_parallel=dp,
            fsdp=fs,
            tensor_parallel=tp,
            context_parallel=cp,
            pipeline_parallel=pp,
            pipeline_schedule=sched,
            virtual_stages=v,
            micro_batch_size=mbs,
            gradient_accumulation=ga,
            activation_checkpointing=con.activation_checkpointing or "none",
            cpu_offload=bool(con.cpu_offload),
        )
    except ValidationError as err:
        problems = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in err.errors())
        raise PlanInfeasible(f"manual plan for {what} is invalid: {problems}") from None
    est = estimate(plan)
    if not est.fits:
        hint = ""
        try:
            auto = plan_parallelism(model, cluster, workload)
            hint = f"; the automatic planner would choose {auto.summary}"
        except PlanInfeasible as inf:
            hint = f"; {inf.message}"
        raise PlanInfeasible(
            f"manual plan {plan.summary} needs {est.peak_memory_bytes / GiB:.1f} GiB per GPU of "
            f"{est.usable_memory_bytes / GiB:.1f} GiB usable on {cluster.gpu.name}{hint}",
            closest=RankedPlan(plan=plan, estimate=est),
        )
    return PlanResult(
        plan=plan,
        estimate=est,
        reason="manual: " + reason(plan, est),
        mode="manual",
        candidates_evaluated=1,
        planning_seconds=time.perf_counter() - t0,
    )


def plan_parallelism(
    model: ModelFacts,
    cluster: Cluster,
    workload: Workload,
    constraints: Constraints | None = None,
    *,
    mode: Mode = "auto",
    top_k: int = 4,
    allow_lora_fallback: bool = False,
) -> PlanResult:
    """Choose (auto) or validate (manual) a parallelization plan.

    auto: the fastest plan under the cost model that fits in memory, honouring any fields fixed in
    `constraints`. manual: the plan given by `constraints` (unset degrees: tp = pp = 1, the rest
    FSDP; micro-batch 1; no recompute), validated and estimated. Raises PlanInfeasible with
    what would fit. With allow_lora_fallback, a full fine-tune that fits nowhere is planned as
    LoRA and the result says so in its reason and notes.
    """
    t0 = time.perf_counter()
    con = constraints or Constraints()
    if mode == "manual":
        return _manual(model, cluster, workload, con, t0)
    res = search(model, cluster, workload, con, keep=top_k + 1)
    if res.best is not None:
        return _result(model, cluster, workload, res, top_k=top_k, notes=(), t0=t0)
    if allow_lora_fallback and workload.method == "full":
        lora = workload.model_copy(update={"method": "lora"})
        res_l = search(model, cluster, lora, con, keep=top_k + 1)
        if res_l.best is not None:
            full_closest = res.closest
            need = (
                f" (smallest full plan needs {full_closest.memory.peak / GiB:.0f} GiB per GPU)"
                if full_closest
                else ""
            )
            note = f"Full fine-tune does not fit{need}; planned LoRA r={lora.lora_rank} instead."
            return _result(model, cluster, lora, res_l, top_k=top_k, notes=(note,), t0=t0)
    raise _infeasible(model, cluster, workload, con, res)
