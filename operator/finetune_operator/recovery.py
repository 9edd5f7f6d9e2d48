"""Recovery decisions: when a job that does not start fails, when a job that stopped stepping is
restarted or given up, and which plan a job that ran out of memory runs next.

Pure functions of typed inputs (the :mod:`finetune_operator.objects` views, the spec's
:class:`~finetune_operator.spec.RunPolicy`, status parts) and ``now``; the controller acts on
what they return (fails the job, deletes the gang's pods, applies the new plan's ConfigMap and
PyTorchJob) and records it in status. No Kubernetes client, kopf or torch.

How a restarted or re-planned job resumes: the trainer starts from the newest *complete*
checkpoint under spec.checkpoint.storage (``step-N/`` with its ``COMPLETE`` marker; a save that
was cut short stays a ``.tmp`` folder and is never read). The checkpoint is written with
torch.distributed.checkpoint keyed by parameter name, so it loads into another layout of the
same model and method: DCP reshards the saved tensors to the new FSDP/tensor-parallel degrees
and pipeline split, and the global batch (hence the data position) is the same in every plan
the planner offers for the job. Where a plan change cannot resume (the training method
differs, or the job keeps no checkpoints), the run starts over from step 0 and the controller
says so in the Event (:func:`resume_note`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from pydantic import ValidationError

from finetune_operator.objects import Child, Pod
from finetune_operator.plan import constraints, model_facts, plan_config, plan_status, workload
from finetune_operator.spec import FineTuneJobSpec, RunPolicy
from finetune_operator.status import Failure, PlanStatus, pod_problem
from finetune_trainer.config import PlanConfig
from finetune_trainer.planner import (
    Cluster,
    ModelFacts,
    PlanInfeasible,
    PlanResult,
    RankedPlan,
    plan_parallelism,
    reason,
)

# ---------------------------------------------------------------------------------------------
# Startup deadline
# ---------------------------------------------------------------------------------------------

#: Failure reason of a job whose pod did not start within runPolicy.startupDeadlineSeconds.
STARTUP_DEADLINE_EXCEEDED = "StartupDeadlineExceeded"


def _seconds(since: datetime, now: datetime) -> float:
    return (now - since).total_seconds()


def why_not_running(pod: Pod) -> str:
    """The pod's own account of why it is not running: a container's waiting reason and
    message (ImagePullBackOff, an init container that does not finish), else the scheduler's
    (Unschedulable and its message), else what little the phase says."""
    for cs in (*pod.init_container_statuses, *pod.container_statuses):
        waiting = cs.state.waiting
        if waiting is not None and waiting.reason:
            where = "init container" if cs in pod.init_container_statuses else "container"
            image = f" (image {cs.image})" if cs.image else ""
            detail = f": {waiting.message}" if waiting.message else ""
            return f"{where} {cs.name}{image} waits with {waiting.reason}{detail}"
    scheduled = pod.condition("PodScheduled")
    if scheduled is not None and scheduled.status == "False":
        detail = f": {scheduled.message}" if scheduled.message else ""
        return f"not scheduled ({scheduled.reason or 'no reason given'}){detail}"
    if scheduled is None:
        return "not scheduled yet (no scheduler has looked at it)"
    return "scheduled but its containers have not started (no reason given)"


def startup_failure(pods: Sequence[Pod], deadline_seconds: int, now: datetime) -> Failure | None:
    """The job's failure when one of its pods is still not running ``deadline_seconds`` after it
    was created (runPolicy.startupDeadlineSeconds); None while every pod runs or is in time.

    Counted per pod from its creation: a pod re-created by a restart has the whole deadline
    again, and a queued job (suspended by Kueue: no pods) is not starting. Of several late pods,
    the one waiting longest is named, with its own message (:func:`why_not_running`). Pods that
    ended (Succeeded, Failed) or are being deleted are not starting either.
    """
    late = [
        p
        for p in pods
        if p.phase == "Pending"
        and not p.deleting
        and p.created is not None
        and _seconds(p.created, now) >= deadline_seconds
    ]
    if not late:
        return None
    pod = min(late, key=lambda p: p.created or now)
    assert pod.created is not None
    waited = int(_seconds(pod.created, now))
    return Failure(
        reason=STARTUP_DEADLINE_EXCEEDED,
        message=(
            f"pod {pod.name} has not started {waited} s after it was created "
            f"(runPolicy.startupDeadlineSeconds is {deadline_seconds}): {why_not_running(pod)}"
        ),
        pod=pod.name,
    )


# ---------------------------------------------------------------------------------------------
# Hang detection
# ---------------------------------------------------------------------------------------------

#: Failure reason of a job that stopped stepping after its restarts were spent.
HUNG = "Hung"
#: The hang timeout, when left out, is this many step times...
HANG_STEP_TIMES = 10
#: ...and never less than this (a checkpoint save or an evaluation takes a while).
HANG_FLOOR_SECONDS = 300
#: Before the first step is seen (the model loads, the first step compiles), left out.
FIRST_STEP_SECONDS = 1800


@dataclass(frozen=True)
class StepClock:
    """The trainer's step and since when it has stood there (the first scrape that saw it)."""

    step: int
    since: datetime


def observe_step(previous: StepClock | None, step: int, now: datetime) -> StepClock:
    """The clock after a scrape that read ``step``: it restarts whenever the step changes (a
    step backwards too: a restarted run resumes from an earlier checkpoint)."""
    if previous is not None and previous.step == step:
        return previous
    return StepClock(step, now)


def step_seconds(step: int, total_steps: int | None, eta_seconds: int | None) -> float | None:
    """The trainer's mean step time, from the progress it reports (the ETA is the steps left
    times the mean step duration); None while it cannot be told."""
    if total_steps is None or eta_seconds is None or total_steps <= step:
        return None
    return eta_seconds / (total_steps - step)


def hang_timeout(
    policy: RunPolicy, seconds_per_step: float | None, *, stepped: bool = True
) -> float:
    """Seconds without a new step after which the job counts as hung: runPolicy's
    hangTimeoutSeconds when set; else HANG_STEP_TIMES step times, at least HANG_FLOOR_SECONDS,
    or FIRST_STEP_SECONDS while the run has not stepped yet (or the step time is unknown)."""
    if policy.hang_timeout_seconds is not None:
        return float(policy.hang_timeout_seconds)
    if not stepped or seconds_per_step is None:
        return float(FIRST_STEP_SECONDS)
    return max(HANG_STEP_TIMES * seconds_per_step, float(HANG_FLOOR_SECONDS))


def running_since(
    child: Child | None, pods: Sequence[Pod], restarted: datetime | None = None
) -> datetime | None:
    """When the current gang began running: the latest of the child's Running condition,
    its pods' start times and the operator's last restart of it (``restarted``). None while it
    is not running: no Running condition, or one of its pods is not Running (being re-created,
    pending): a gang that is not all up cannot step, and is the startup deadline's business."""
    since = child.since("Running") if child is not None else None
    live = [p for p in pods if not p.deleting]
    if since is None or not live or any(p.phase != "Running" for p in live):
        return None
    starts = [p.started for p in live if p.started is not None]
    return max([since, *starts, *([restarted] if restarted is not None else [])])


@dataclass(frozen=True)
class Restart:
    """Restart the gang: delete the training pods (the PyTorchJob re-creates them, they resume
    from the last complete checkpoint). ``restarts`` counts this one."""

    restarts: int
    message: str


def hang_decision(
    clock: StepClock | None,
    running_since: datetime | None,
    policy: RunPolicy,
    restarts_done: int,
    seconds_per_step: float | None,
    now: datetime,
) -> Restart | Failure | None:
    """What to do about a running job's progress: None (it steps, or is within its timeout),
    a :class:`Restart` (it has not stepped for the hang timeout and restarts are left), or the
    ``Hung`` failure (runPolicy.maxRestarts spent).

    ``clock`` is the step last read from the trainer and since when; ``running_since`` is when
    the current pods started running (the PyTorchJob's Running condition, or the newest master
    pod's start): the quiet time counts from the later of the two, so a restarted gang has the
    whole timeout to load the model and take its first step again. A job that is not running
    (``running_since`` None) is never hung.
    """
    if running_since is None:
        return None
    stepped = clock is not None and clock.since >= running_since
    since = max(clock.since, running_since) if clock is not None else running_since
    timeout = hang_timeout(policy, seconds_per_step, stepped=stepped)
    quiet = _seconds(since, now)
    if quiet < timeout:
        return None
    where = f"at step {clock.step}" if clock is not None else "before its first step"
    derived = "" if policy.hang_timeout_seconds is not None else ", derived from the step time"
    what = (
        f"no training progress for {int(quiet)} s ({where}; hang timeout {int(timeout)} s"
        f"{derived}, runPolicy.hangTimeoutSeconds)"
    )
    if restarts_done >= policy.max_restarts:
        return Failure(
            reason=HUNG,
            message=(
                f"{what}; the {policy.max_restarts} restart(s) runPolicy.maxRestarts allows are "
                "spent: see the trainer's logs for where it stopped (a collective that never "
                "completes, storage that does not answer)"
            ),
        )
    n = restarts_done + 1
    return Restart(
        restarts=n,
        message=(
            f"{what}: restarting the training pods ({n} of {policy.max_restarts} restarts, "
            "runPolicy.maxRestarts); they resume from the last complete checkpoint"
        ),
    )


# ---------------------------------------------------------------------------------------------
# Re-plan after out-of-memory
# ---------------------------------------------------------------------------------------------

#: Failure reasons that mean the plan asked for more memory than the machine had: the kubelet's
#: OOM kill (host memory) and the trainer's CUDA out-of-memory (GPU memory).
OUT_OF_MEMORY: frozenset[str] = frozenset({"OOMKilled", "GPUOutOfMemory"})
#: A new plan must predict at least this share less peak GPU memory than the one that failed.
REPLAN_MARGIN = 0.10
#: Candidates the planner ranks for a re-plan (the fastest first).
REPLAN_CANDIDATES = 64


#: Failures the operator decides (the PyTorchJob itself may still run): the job's pods are
#: stopped when it fails with one of them.
VERDICTS: frozenset[str] = frozenset({STARTUP_DEADLINE_EXCEEDED, HUNG, *OUT_OF_MEMORY})


def out_of_memory(failure: Failure | None) -> bool:
    """Whether ``failure`` is an out-of-memory one (what a re-plan can help)."""
    return failure is not None and failure.reason in OUT_OF_MEMORY


def out_of_memory_in(pods: Sequence[Pod], since: datetime | None = None) -> Failure | None:
    """The out-of-memory end (OOMKilled, or the trainer's GPUOutOfMemory) of a container of
    ``pods``, counting only pods created at or after ``since`` (the current attempt's start: a
    late event about a pod of an earlier plan does not re-plan the new one)."""
    for pod in pods:
        if since is not None and pod.created is not None and pod.created < since:
            continue
        found = pod_problem([pod])
        if out_of_memory(found):
            return found
    return None


@dataclass(frozen=True)
class Replan:
    """The plan to run next: its status.plan, the trainer's plan, and what to tell."""

    result: PlanResult
    plan: PlanStatus
    config: PlanConfig
    #: The Event's message: which plan failed how, the new one and its headroom, how it resumes.
    message: str


def candidates(
    spec: FineTuneJobSpec, facts: ModelFacts | None = None, top: int = REPLAN_CANDIDATES
) -> list[RankedPlan]:
    """The plans that fit the job, the fastest first (the planner's best, then its runners-up),
    honouring the degrees the spec pins. Raises PlanInfeasible (nothing fits, or the spec's
    GPUs are not a machine the planner knows)."""
    res = spec.resources
    facts = facts or model_facts(spec)
    if facts is None or res.gpu_type is None:
        raise PlanInfeasible("the model is not known offline: the trainer plans it")
    try:
        cluster = Cluster.of(res.gpu_type, nodes=res.num_nodes, gpus_per_node=res.gpus_per_node)
    except ValidationError as exc:
        raise PlanInfeasible(f"spec.resources: {exc}") from None
    result = plan_parallelism(facts, cluster, workload(spec), constraints(spec), top_k=top)
    return [RankedPlan(plan=result.plan, estimate=result.estimate), *result.alternatives]


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def choose(
    ranked: Sequence[RankedPlan], failed: PlanStatus, tried: Sequence[str], cause: str
) -> RankedPlan | None:
    """The fastest of ``ranked`` that is not one of the plans ``tried`` (their summaries) and
    predicts a peak at least REPLAN_MARGIN lower than ``failed``'s. After a host OOM kill
    (``cause`` OOMKilled), plans that newly offload to host memory are passed over."""
    ceiling = failed.est_peak_memory_bytes_per_gpu * (1.0 - REPLAN_MARGIN)
    for candidate in ranked:
        if candidate.summary in tried or candidate.estimate.peak_memory_bytes > ceiling:
            continue
        if cause == "OOMKilled" and candidate.plan.cpu_offload and not failed.cpu_offload:
            continue
        return candidate
    return None


def resume_note(failed: PlanStatus, chosen: PlanStatus, checkpoints: bool) -> str:
    """How the run continues under ``chosen``: from the last complete checkpoint (DCP
    reshards it to the new layout) or, where it cannot, from the start, and why."""
    if not checkpoints:
        return "it starts over from step 0: the job keeps no checkpoints (spec.checkpoint)"
    if failed.method != chosen.method:
        return (
            f"it starts over from step 0: a {failed.method} checkpoint does not load into a "
            f"{chosen.method} run"
        )

    def degrees(p: PlanStatus) -> tuple[int, ...]:
        return (
            p.data_parallel, p.fsdp, p.context_parallel, p.tensor_parallel, p.pipeline_parallel
        )  # fmt: skip

    same = degrees(failed) == degrees(chosen)
    if same:
        return "it resumes from the last complete checkpoint (same sharding)"
    return (
        "it resumes from the last complete checkpoint, which torch.distributed.checkpoint "
        "reshards to the new layout"
    )


def replan(
    spec: FineTuneJobSpec,
    failed: PlanStatus,
    cause: Failure,
    tried: Sequence[PlanStatus],
    replans_done: int,
    facts: ModelFacts | None = None,
) -> Replan | Failure:
    """After ``cause`` (an out-of-memory failure) under the plan ``failed``: the plan to run next,
    or the job's failure when no re-plan is left or possible.

    The next plan is the fastest the planner ranks for the job that was not ``tried`` before
    and predicts at least REPLAN_MARGIN less peak memory per GPU than ``failed`` (the model
    under-counted what this job needs, so the headroom is what matters). At most
    runPolicy.maxReplans re-plans (``replans_done`` so far); a manual plan is the user's and is
    never changed; a model the planner does not know offline is planned by the trainer, which
    the operator cannot re-plan. The failure keeps ``cause``'s reason and says why it stops.
    """
    policy = spec.run_policy

    def stop(why: str) -> Failure:
        return cause.model_copy(update={"message": f"{cause.message}; {why}"})

    if replans_done >= policy.max_replans:
        done = f"after {replans_done} re-plan(s)" if replans_done else "with re-planning off"
        return stop(
            f"no re-plan left {done} (runPolicy.maxReplans is {policy.max_replans}): set "
            "parallelism.microBatchSize 1 and activationCheckpointing full, add GPUs, or use "
            "method lora"
        )
    if spec.parallelism.mode == "manual":
        return stop(
            "parallelism.mode is manual, so the operator does not re-plan: lower "
            "parallelism.microBatchSize, set activationCheckpointing full, or use mode auto"
        )
    try:
        ranked = candidates(spec, facts)
    except PlanInfeasible as exc:
        return stop(f"the operator cannot re-plan: {exc.message}")
    summaries = [p.summary for p in (*tried, failed)]
    chosen = choose(ranked, failed, summaries, cause.reason)
    if chosen is None:
        return stop(
            f"no other plan predicts {REPLAN_MARGIN:.0%} less than the "
            f"{_gib(failed.est_peak_memory_bytes_per_gpu)} per GPU of {failed.summary}: lower "
            "dataset.maxSeqLength or globalBatchSize, add GPUs, or use method lora"
        )
    result = PlanResult(
        plan=chosen.plan,
        estimate=chosen.estimate,
        reason=(
            f"re-planned after {cause.reason} with {failed.summary}: "
            f"{reason(chosen.plan, chosen.estimate)}"
        ),
        mode="auto",
        candidates_evaluated=len(ranked),
    )
    status = plan_status(result)
    resumes = resume_note(failed, status, spec.checkpoint.storage is not None)
    return Replan(
        result=result,
        plan=status,
        config=plan_config(result),
        message=(
            f"{cause.reason} with plan {failed.summary} (predicted "
            f"{_gib(failed.est_peak_memory_bytes_per_gpu)} per GPU): re-planned as "
            f"{status.summary} (predicted {_gib(status.est_peak_memory_bytes_per_gpu)}), "
            f"re-plan {replans_done + 1} of {policy.max_replans}; {resumes}"
        ),
    )


def plan_config_of(plan: PlanStatus) -> PlanConfig:
    """The trainer's plan for a recorded status.plan (a re-planned job runs its last attempt's
    plan, not the one the spec would plan afresh)."""
    return PlanConfig(**plan.model_dump(include=set(PlanConfig.model_fields)))
