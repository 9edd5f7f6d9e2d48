"""Reconcile one FineTuneJob: plan, apply the desired children, observe, write status.

Level-based and idempotent: every call computes the desired state from the spec and what the
cluster shows, so a retry, a missed event or an operator restart converges to the same place.
Kubernetes calls go through :class:`Cluster`, the little the controller needs from Kubernetes
(:class:`finetune_operator.kube.Kube` is the real one); everything else is pure.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from finetune_operator import api, children, manifest, recovery, sources, staging
from finetune_operator.children import ChildKind
from finetune_operator.gputype import NotInferred, infer_gpu_type, with_gpu_type
from finetune_operator.objects import Child, Pod, parse_time
from finetune_operator.plan import PlanInfeasible, plan_config, plan_job, plan_status
from finetune_operator.queueing import QueueView
from finetune_operator.scrape import parse_checkpoint, parse_progress
from finetune_operator.status import (
    TERMINAL,
    Failure,
    FineTuneJobStatus,
    GpuAsk,
    InferredGpuType,
    Observed,
    PlanStatus,
    Progress,
    StagingStatus,
    StagingWait,
    derive,
    failed,
    refine_failure,
    replanned,
    restarted,
)
from finetune_operator.translate import to_trainer_config
from finetune_trainer.config import PlanConfig, TrainerConfig
from finetune_trainer.staging_report import StagingReport

#: Where the model goes inside the pod when the job names no output storage.
POD_OUTPUT_DIR = manifest.POD_OUTPUT_DIR


class WriteConflictError(Exception):
    """The object changed since it was read: read it again and recompute."""


class Cluster(Protocol):
    """What the controller needs from Kubernetes."""

    def finetunejob(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The FineTuneJob document as stored now; None if it is gone."""

    #: The kind of child the operator makes for a job that has none yet (its setting).
    child_kind: ChildKind

    def child(self, kind: ChildKind, namespace: str, name: str) -> Child | None:
        """The child of kind ``kind`` named ``name``; None if there is none."""

    def pods(self, kind: ChildKind, namespace: str, job_name: str) -> list[Pod]:
        """The pods of the child ``job_name`` of kind ``kind``."""

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create or update ``obj`` (server-side apply); the object as stored."""

    def replace_status(self, document: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
        """Write ``status`` over the FineTuneJob read as ``document``; the object as stored.

        Raises WriteConflictError if the object changed since ``document`` was read.
        """

    def missing_claims(self, namespace: str, claims: list[str]) -> list[str]:
        """Those of the PersistentVolumeClaims ``claims`` that do not exist in ``namespace``."""

    def gpu_node_products(self, node_selector: Mapping[str, str]) -> list[str]:
        """The ``nvidia.com/gpu.product`` label of each node that has one and whose labels
        match ``node_selector`` (one value per node)."""

    def staging_job(self, namespace: str, name: str) -> staging.StagingJob | None:
        """The batch Job ``name``; None if there is none."""

    def staging_pods(self, namespace: str, job_name: str) -> list[Pod]:
        """The staging pods of the FineTuneJob ``job_name``."""

    def claim(self, namespace: str, name: str) -> staging.ClaimView | None:
        """The PersistentVolumeClaim ``name``; None if there is none."""

    def delete_pods(self, kind: ChildKind, namespace: str, job_name: str) -> None:
        """Delete the pods of the child ``job_name`` (its controller makes new ones, which
        resume from the last complete checkpoint)."""

    def delete_child(self, kind: ChildKind, namespace: str, name: str) -> None:
        """Delete the child ``name``; its pods go with it."""

    def suspend_child(self, kind: ChildKind, namespace: str, name: str) -> None:
        """Suspend the child ``name``: its controller deletes its pods."""

    def workload(self, namespace: str, job_uid: str) -> QueueView | None:
        """The Kueue Workload of the child whose uid is ``job_uid``; None while there is none
        (or Kueue is not installed, or the operator may not read Workloads)."""

    def set_workload_active(self, namespace: str, name: str, active: bool) -> None:
        """Set the Workload's spec.active: false stops Kueue admitting it (and evicts it if
        admitted) and marks it queueing.SUSPENDED_BY_USER; true lets it queue again."""

    def release_suspend(self, kind: ChildKind, namespace: str, child: Child) -> None:
        """Make the suspend of ``child`` (a child Kueue admits) stay as it is when the
        operator's later applies leave it out: nothing when the operator does not own it."""


def now() -> str:
    return stamp(datetime.now(UTC))


def stamp(moment: datetime) -> str:
    """``moment`` as status writes times (RFC 3339, seconds, UTC)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Outcome:
    """What one status write did: the phase before and after, the status, whether it changed,
    and the job as it now stands (its resourceVersion is the one the write left)."""

    before: str | None
    after: str | None
    status: FineTuneJobStatus
    changed: bool
    job: api.FineTuneJob
    #: The status before the write (what a restart or a re-plan is told against).
    previous: FineTuneJobStatus | None = None


#: Attempts at a status write that races with another writer before giving up (kopf retries).
ATTEMPTS = 5
Compute = Callable[[api.FineTuneJob], FineTuneJobStatus]


def _write(kube: Cluster, job: api.FineTuneJob, compute: Compute) -> Outcome | None:
    """Compute the status from ``job`` and write it if it changed.

    On a conflict (someone wrote in between), read the job again and recompute: the status is
    always derived from a fresh read, never merged into a stale one. After ATTEMPTS conflicts in a
    row, raise WriteConflictError (kopf retries the handler). None if the job was deleted.
    """
    for _ in range(ATTEMPTS):
        before = job.status
        status = compute(job)
        phase = before.phase if before else None
        if status == before:
            return Outcome(phase, status.phase, status, False, job, before)
        wire = status.model_dump(by_alias=True, exclude_none=True, mode="json")
        try:
            written = kube.replace_status(job.to_document(), wire)
        except WriteConflictError:
            fresh = kube.finetunejob(job.metadata.namespace or "", job.name)
            if fresh is None:
                return None  # deleted meanwhile
            job = api.parse_stored(fresh)
            continue
        version = written.get("metadata", {}).get("resourceVersion")
        meta = job.metadata.model_copy(update={"resource_version": version})
        return Outcome(
            phase,
            status.phase,
            status,
            True,
            job.model_copy(update={"status": status, "metadata": meta}),
            before,
        )
    raise WriteConflictError(f"status of {job.name} kept changing under us; will retry")


@dataclass(frozen=True)
class Sight:
    """The job's child and its pods, read once for everything one status write derives."""

    child: Child | None
    pods: tuple[Pod, ...]


def look(
    kube: Cluster, job: api.FineTuneJob, seen: Pod | None = None, *, made: Child | None = None
) -> Sight:
    """The job's child (``made``: the one just applied, as the API server returned it; its
    pods are yet to come) and its pods; ``seen`` is a pod from an event (it may be gone already,
    and its last state is often the only record of why a container died). A child on its way
    out (an earlier plan's) is none."""
    if made is not None:
        return Sight(made, ())
    ns = job.metadata.namespace or ""
    kind = kind_of(kube, job)
    child = kube.child(kind, ns, job.name)
    if child is None or child.deleting:
        return Sight(None, ())
    listed = kube.pods(kind, ns, job.name)
    if seen is not None and seen.name not in {p.name for p in listed}:
        listed.append(seen)
    return Sight(child, tuple(listed))


def _observe(
    kube: Cluster,
    job: api.FineTuneJob,
    plan: PlanStatus | None,
    inferred: InferredGpuType | None,
    sight: Sight,
    staging: StagingStatus | None = None,
) -> Observed:
    """What the cluster shows now (the child and pods as ``sight`` saw them)."""
    ns = job.metadata.namespace or ""
    child, pods = sight.child, sight.pods
    claims = sources.claims(job.spec)
    missing = kube.missing_claims(ns, claims) if claims else []
    queue = kube.workload(ns, child.uid) if child is not None and child.queue_name else None
    late = None
    if child is not None and not child.suspended:
        deadline = job.spec.run_policy.startup_deadline_seconds
        late = recovery.startup_failure(pods, deadline, datetime.now(UTC))
    return Observed(
        startup_failure=late,
        gpu=gpu_ask(job, inferred),
        inferred_gpu_type=inferred,
        generation=job.metadata.generation,
        suspend_requested=job.spec.run_policy.suspend,
        plan=plan,
        child=child,
        queue=queue,
        pods=pods,
        previous_failure=job.status.failure if job.status else None,
        missing_claims=tuple(missing),
        staging=staging,
    )


def kind_of(kube: Cluster, job: api.FineTuneJob) -> ChildKind:
    """The kind of the job's child: the one its status records, else the operator's."""
    return children.of(job.status, kube.child_kind)


def gpu_ask(job: api.FineTuneJob, inferred: InferredGpuType | None = None) -> GpuAsk | None:
    """The GPU type and count the job's pods ask nodes for (None for CPU jobs, and while the
    GPU type is not known)."""
    res = job.spec.resources
    gpu_type = res.gpu_type or (inferred.gpu_type if inferred else None)
    if gpu_type is None:
        return None
    products = manifest.gpu_node_products(gpu_type)
    if not products:
        return None
    return GpuAsk(gpu_type, res.gpus_per_node, products, bool(res.node_selector))


def recorded_gpu_type(job: api.FineTuneJob) -> InferredGpuType | None:
    """The GPU type status records as inferred from the nodes, while the spec leaves it out."""
    if job.spec.resources.gpu_type is not None or job.status is None:
        return None
    return job.status.inferred_gpu_type


def waits_for_gpu_type(job: api.FineTuneJob) -> bool:
    """Whether the job has no GPU type yet (left out, and not inferred from the nodes): only
    :func:`reconcile` moves it on (it infers again, e.g. once the nodes are labelled)."""
    return job.spec.resources.gpu_type is None and recorded_gpu_type(job) is None


def resolve_gpu_type(kube: Cluster, job: api.FineTuneJob) -> InferredGpuType | NotInferred | None:
    """None when the spec names its GPU type. Else the type status records (a job keeps the GPUs
    it was planned for, whatever nodes come and go), or the one the nodes show now."""
    res = job.spec.resources
    if res.gpu_type is not None:
        return None
    recorded = recorded_gpu_type(job)
    if recorded is not None:
        return recorded
    selector = res.node_selector or {}
    return infer_gpu_type(kube.gpu_node_products(selector), node_selector=bool(selector))


def _unheard(_: Outcome) -> None:
    pass


def staging_now(job: api.FineTuneJob) -> bool:
    """Whether the job is staging: :func:`reconcile` moves it on (on its staging Job's events,
    and on the progress sweep), :func:`refresh` leaves it alone."""
    return job.status is not None and job.status.phase == "Staging"


def _before_children(job: api.FineTuneJob) -> bool:
    """Whether only :func:`reconcile` may write the job's status: it is staging, or is still to
    be staged (e.g. its gpuType was just set) and has no trainer yet."""
    status = job.status
    if status is None or staging_now(job):
        return True
    return (
        staging.needed(job.spec)
        and status.staging is None
        and status.pytorch_job is None
        and status.train_job is None
    )


def _stage(
    kube: Cluster,
    job: api.FineTuneJob,
    resolved: api.FineTuneJob,
    config: TrainerConfig,
    *,
    image: str,
    cache: staging.CacheSettings,
) -> StagingStatus | Observed:
    """Run the staging Job of ``resolved`` (create its cache claim, ConfigMap and Job as
    needed) and read it back: what it staged once it is done, else what to write meanwhile
    (why it waits, or why it failed)."""
    generation = job.metadata.generation
    ns = job.metadata.namespace or ""
    claim = staging.cache_claim(resolved.spec)
    found = kube.claim(ns, claim.name)
    if found is None and claim.managed:
        kube.apply(staging.cache_pvc(ns, claim, cache))
    problem = staging.cache_problem(claim, found)
    if problem is not None:
        return Observed(generation, False, staging_wait=problem)
    current = kube.staging_job(ns, staging.job_name(job.name))
    if current is None:
        kube.apply(manifest.config_map(resolved, config))
        kube.apply(staging.staging_job(resolved, image=image, claim=claim))
    pods = kube.staging_pods(ns, job.name) if current is not None else []
    seen = staging.progress(job.name, current, pods, claim)
    if isinstance(seen, StagingWait):
        return Observed(generation, False, staging_wait=seen)
    if isinstance(seen, StagingReport):
        recorded = staging.staging_status(seen, claim)
        if isinstance(recorded, StagingStatus):
            return recorded
        seen = recorded
    return Observed(generation, False, staging_failure=seen)


def _announced(
    kube: Cluster,
    job: api.FineTuneJob,
    observed: Observed,
    on_write: Callable[[Outcome], None],
) -> Outcome | None:
    written = _write(kube, job, lambda j: derive(observed, j.status, now()))
    if written is not None:
        on_write(written)
    return written


def reconcile(
    kube: Cluster,
    job: api.FineTuneJob,
    *,
    image: str,
    metrics_port: int = manifest.METRICS_PORT,
    cache: staging.CacheSettings = staging.DEFAULT_CACHE,
    runtime: str = children.Inputs.runtime,
    on_write: Callable[[Outcome], None] = _unheard,
) -> list[Outcome]:
    """Make the cluster match ``job``: stage (the staging Job fills the cache and reads the
    model's config.json; phase Staging until it is done), plan (status first), apply ConfigMap
    and the child (children.py), then write the observed status. Returns each status write, in
    order;
    ``on_write`` hears of each as soon as it is written (before the children exist, for the
    first), so that what it tells (Events) comes before what the children's own handlers tell."""
    if job.status is not None and job.status.phase in TERMINAL:
        return []  # never recreate children of a finished job
    generation = job.metadata.generation
    inferred = resolve_gpu_type(kube, job)
    if isinstance(inferred, NotInferred):  # waits until spec.resources.gpuType is set
        waiting = Observed(generation, False, gpu_type_error=inferred.message)
        return _written(_announced(kube, job, waiting, on_write))
    spec = with_gpu_type(job.spec, inferred.gpu_type) if inferred else job.spec
    resolved = job.model_copy(update={"spec": spec})  # what the pods run as
    config = to_trainer_config(
        spec, name=job.name, default_output_dir=POD_OUTPUT_DIR, metrics_port=metrics_port
    )
    staged = job.status.staging if job.status else None
    just_staged: StagingStatus | None = None
    # Staged once: never again, never a newer commit. A job whose trainer runs already (made by
    # an operator that did not stage) is left as it runs.
    started = job.status is not None and (
        job.status.pytorch_job is not None or job.status.train_job is not None
    )
    if staging.needed(spec) and staged is None and not started:
        seen = _stage(kube, job, resolved, config, image=image, cache=cache)
        if isinstance(seen, Observed):
            return _written(_announced(kube, job, seen, on_write))
        staged = just_staged = seen
    attempts = job.status.attempts if job.status else None
    plan: PlanStatus | None
    if attempts:  # re-planned after running out of memory: the last attempt's plan stays
        plan = attempts[-1].plan
        trainer_plan: PlanConfig | None = recovery.plan_config_of(plan)
    else:
        try:
            result = plan_job(spec, staging.model_facts(staged, spec.model.source))
        except PlanInfeasible as exc:
            message = f"{inferred.message}: {exc.message}" if inferred else exc.message
            infeasible = Observed(
                generation,
                False,
                plan_error=message,
                inferred_gpu_type=inferred,
                staging=just_staged,
            )
            return _written(_announced(kube, job, infeasible, on_write))
        plan = plan_status(result) if result else None
        trainer_plan = plan_config(result) if result else None
    outcomes: list[Outcome | None] = []
    # status.staging, status.plan (and the inferred GPU type) are written with the child, in one
    # write after it is applied; on their own first only where no child is made now (refused,
    # unfit, or an earlier plan's still going), so that status always says what was planned.
    planned = Observed(
        generation, False, plan=plan, inferred_gpu_type=inferred, staging=just_staged
    )
    unrecorded = (
        job.status is None
        or just_staged is not None
        or job.status.plan != plan
        or job.status.inferred_gpu_type != inferred
    )

    def record_plan() -> None:
        nonlocal job
        if not unrecorded:
            return
        first = _announced(kube, job, planned, on_write)
        outcomes.append(first)
        if first is not None:
            job = first.job

    if trainer_plan is not None:
        config = config.model_copy(update={"plan": trainer_plan})
    if staged is not None:
        config = staging.pinned(config, staged)
    ns = job.metadata.namespace or ""
    kind = kind_of(kube, job)
    unfit = kind.unsupported(resolved)
    if unfit is not None:
        record_plan()
        verdict = Failure(reason="UnsupportedByChild", message=unfit)
        last = _write(kube, job, lambda j: failed(j.status or FineTuneJobStatus(), verdict, now()))
        if last is not None:
            on_write(last)
        return _written(*outcomes, last)
    child = kube.child(kind, ns, job.name)
    if child is not None and child.deleting:  # an earlier plan's: made anew once it is gone
        record_plan()
        return _written(*outcomes)
    inputs = children.Inputs(
        image=image,
        plan_summary=plan.summary if plan else None,
        exists=child is not None,
        kueue=child is not None and bool(child.queue_name),
        metrics_port=metrics_port,
        cache=staged.cache if staged is not None else None,
        runtime=runtime,
    )
    try:
        kube.apply(manifest.config_map(resolved, config))
        applied = kube.apply(kind.build(resolved, inputs))
    except Exception:
        # refused (a webhook, a policy, a missing CRD): status says what was planned, and the
        # error (retried) what went wrong
        with contextlib.suppress(Exception):
            record_plan()
        raise
    made = kind.parse(applied)
    _leave_to_kueue(kube, job, kind, made)
    fresh = made if child is None else None  # a child just made has no pods yet: none to list

    def observed(j: api.FineTuneJob) -> FineTuneJobStatus:
        sight = look(kube, j, made=fresh if j is job else None)
        return derive(_observe(kube, j, plan, inferred, sight, just_staged), j.status, now())

    last = _write(kube, job, observed)
    if last is not None:
        on_write(last)
    return _written(*outcomes, last)


def _leave_to_kueue(kube: Cluster, job: api.FineTuneJob, kind: ChildKind, child: Child) -> None:
    """A child Kueue admits (labelled with a queue, by the operator or by Kueue's defaulting):
    its suspend is Kueue's from now on, and the user's spec.runPolicy.suspend reaches
    Kueue as its Workload's spec.active (once Kueue has made the Workload)."""
    if not child.queue_name:
        return
    ns = job.metadata.namespace or ""
    kube.release_suspend(kind, ns, child)
    view = kube.workload(ns, child.uid)
    if view is not None:
        sync_workload(kube, job, view)


def sync_workload(kube: Cluster, job: api.FineTuneJob, view: QueueView) -> None:
    """Deactivate the Workload of a job its user suspended, and activate it again when they
    resume it: Kueue then neither admits it nor fights the operator over the child's suspend.
    A Workload Kueue deactivated itself (past its requeuing limit) stays so. Nothing once the
    job has ended."""
    if job.status is not None and job.status.phase in TERMINAL:
        return
    if job.spec.run_policy.suspend and view.active:
        kube.set_workload_active(view.namespace, view.name, False)
    elif not job.spec.run_policy.suspend and not view.active and view.suspended_by_user:
        kube.set_workload_active(view.namespace, view.name, True)


def _written(*outcomes: Outcome | None) -> list[Outcome]:
    return [o for o in outcomes if o is not None]


def needs_child(job: api.FineTuneJob) -> bool:
    """Whether the job was re-planned and waits for :func:`reconcile` to make its child
    again (once the earlier plan's is gone)."""
    status = job.status
    return (
        status is not None
        and status.phase == "Planned"
        and bool(status.attempts)
        and status.pytorch_job is None
        and status.train_job is None
    )


def stop_child(kube: Cluster, job: api.FineTuneJob) -> None:
    """Stop the pods of a job that failed while its child had not (the operator's own
    verdict: a startup deadline, a hang, out of memory with no re-plan left): suspend the
    child, so its controller deletes them. A failed child whose controller may run it again
    (ChildKind.reruns_failed: a TrainJob) is suspended too. Idempotent; nothing for a child
    that succeeded, is suspended or is going."""
    ns = job.metadata.namespace or ""
    kind = kind_of(kube, job)
    child = kube.child(kind, ns, job.name)
    if child is None or child.deleting or child.suspended:
        return
    ended = set(child.true_conditions())
    if "Succeeded" in ended or ("Failed" in ended and not kind.reruns_failed):
        return
    kube.suspend_child(kind, ns, job.name)


def refresh(
    kube: Cluster, job: api.FineTuneJob, seen: Pod | None = None, sight: Sight | None = None
) -> list[Outcome]:
    """Update status from the children without changing them (on a child or pod event); an
    out-of-memory end re-plans the job (runPolicy.maxReplans), and a job that failed by the
    operator's verdict has its pods stopped. ``sight``: the child and pods as the caller's
    watches have them (None: read them here)."""
    if job.status is None:
        return []
    if job.status.phase in TERMINAL:  # only a late pod can still tell why it failed
        failure = job.status.failure
        verdict = failure is not None and failure.reason in recovery.VERDICTS
        if job.status.phase == "Failed" and (verdict or kind_of(kube, job).reruns_failed):
            stop_child(kube, job)  # again, should the operator have stopped before it did
        # the pod of an event, or (the sweep's visit) the pods as the watch has them: a pod
        # event that raced the child's end leaves the reason to the next visit, at no request
        pods = [seen] if seen is not None else list(sight.pods) if sight is not None else []
        final = job.status
        if not pods or refine_failure(final, pods) is final:
            return []
        return _written(_write(kube, job, lambda j: refine_failure(j.status or final, pods)))
    if waits_for_gpu_type(job) or _before_children(job) or needs_child(job):
        return []  # no children yet: reconcile says why, and moves it on
    if sight is None:
        sight = look(kube, job, seen)
    cause = _out_of_memory(job, sight)
    if cause is not None and job.status.plan is not None:
        acted = _replan(kube, job, cause)
        if acted is not None:
            return acted

    def compute(j: api.FineTuneJob) -> FineTuneJobStatus:
        if j.status is not None and (waits_for_gpu_type(j) or _before_children(j)):
            return j.status  # reconcile moved it back meanwhile (a fresh read after a conflict)
        plan = j.status.plan if j.status else None
        seen_now = sight if j is job and sight else look(kube, j, seen)  # fresh read: look again
        return derive(_observe(kube, j, plan, recorded_gpu_type(j), seen_now), j.status, now())

    outcomes = _written(_write(kube, job, compute))
    if any(o.after == "Failed" for o in outcomes):
        stop_child(kube, job)
    return outcomes


def _out_of_memory(job: api.FineTuneJob, sight: Sight) -> Failure | None:
    """An out-of-memory end of a pod of the current attempt (None: none)."""
    if sight.child is None:
        return None
    attempts = job.status.attempts if job.status else None
    since = parse_time(attempts[-1].time) if attempts else None
    return recovery.out_of_memory_in(sight.pods, since)


def _replan(kube: Cluster, job: api.FineTuneJob, cause: Failure) -> list[Outcome] | None:
    """Re-plan a job that ran out of memory: record the attempt and delete the child
    (:func:`reconcile` makes it again with the new plan; its pods resume from the last complete
    checkpoint). A job re-planned before that has no re-plan left fails at once, with the
    reason, and its pods are stopped. None (nothing done) for a first out-of-memory no re-plan
    can help (a manual plan, a model the trainer plans, re-planning off, no plan with more
    headroom): the child's backoffLimit decides, as for any other crash."""
    status = job.status
    assert status is not None
    assert status.plan is not None
    inferred = recorded_gpu_type(job)
    spec = with_gpu_type(job.spec, inferred.gpu_type) if inferred else job.spec
    attempts = status.attempts or []
    decision = recovery.replan(
        spec,
        status.plan,
        cause,
        [a.plan for a in attempts],
        max(0, len(attempts) - 1),
        staging.model_facts(status.staging, spec.model.source),
    )
    ns = job.metadata.namespace or ""
    if isinstance(decision, Failure):
        if not attempts:
            return None
        verdict = decision
        written = _write(kube, job, lambda j: failed(j.status or status, verdict, now()))
        stop_child(kube, job)
        return _written(written)
    chosen = decision
    written = _write(
        kube,
        job,
        lambda j: replanned(j.status or status, chosen.plan, cause.reason, chosen.message, now()),
    )
    if written is not None:
        kube.delete_child(kind_of(kube, job), ns, job.name)
    return _written(written)


def _step_clock(progress: Progress | None) -> recovery.StepClock | None:
    since = parse_time(progress.step_since) if progress is not None else None
    if progress is None or since is None:
        return None
    return recovery.StepClock(progress.step, since)


def master(pods: Sequence[Pod]) -> Pod | None:
    """The pod of node rank 0 among a child's pods (the one whose metrics tell progress)."""
    return next((p for p in pods if p.rank_zero), None)


def scraping(job: api.FineTuneJob) -> bool:
    """Whether the job's progress is read from its master's metrics (it is Running)."""
    return job.status is not None and job.status.phase == "Running"


def scrape_progress(
    kube: Cluster,
    job: api.FineTuneJob,
    pods: Sequence[Pod],
    text: str | None,
    child: Child | None = None,
) -> list[Outcome]:
    """Write the progress the master pod's metrics ``text`` tells into status.progress (while
    Running; ``pods`` are the job's pods, as the caller's watch has them), and act on a hang: no
    new step for runPolicy.hangTimeoutSeconds restarts the pods (their new ones resume from the
    last complete checkpoint), within runPolicy.maxRestarts; then the job fails Hung. Only a
    master that answers is judged: a trainer whose metrics cannot be read (``text`` None: a
    network policy, no metrics port, no answer in time) is never called hung. ``child``: the
    child as the caller's watch has it (None: read it here)."""
    status = job.status
    if status is None or not scraping(job) or text is None:
        return []
    ns = job.metadata.namespace or ""
    moment = datetime.now(UTC)
    progress = parse_progress(text, stamp(moment))
    if child is None:
        child = kube.child(kind_of(kube, job), ns, job.name)
    running = recovery.running_since(child, pods, parse_time(status.last_restart_time))
    clock = _step_clock(status.progress)
    if progress is not None:
        if clock is not None and running is not None and clock.since < running:
            clock = None  # a step of the gang before: this one's count starts now
        clock = recovery.observe_step(clock, progress.step, moment)
        progress = progress.model_copy(update={"step_since": stamp(clock.since)})
    update: dict[str, object] = {}
    if progress is not None:
        update["progress"] = progress
    saved = parse_checkpoint(text, job.spec.checkpoint.storage)
    if saved is not None:
        update["checkpoint"] = saved
    seconds = (
        recovery.step_seconds(progress.step, progress.total_steps, progress.eta_seconds)
        if progress is not None
        else None
    )
    decision = recovery.hang_decision(
        clock, running, job.spec.run_policy, status.restarts or 0, seconds, moment
    )

    def scraped(j: api.FineTuneJob) -> FineTuneJobStatus:
        current = (j.status or FineTuneJobStatus()).model_copy(update=update)
        if isinstance(decision, recovery.Restart):
            return restarted(current, decision.restarts, decision.message, stamp(moment))
        if isinstance(decision, Failure):
            return failed(current, decision, stamp(moment))
        return current

    if not update and decision is None:
        return []
    outcomes = _written(_write(kube, job, scraped))
    if outcomes and outcomes[-1].changed:
        if isinstance(decision, recovery.Restart):
            kube.delete_pods(kind_of(kube, job), ns, job.name)
        elif isinstance(decision, Failure):
            stop_child(kube, job)
    return outcomes
