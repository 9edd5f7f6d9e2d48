"""Reconcile one FineTuneJob: plan, apply the desired children, observe, write status.

Level-based and idempotent: every call computes the desired state from the spec and what the
cluster shows, so a retry, a missed event or an operator restart converges to the same place.
Kubernetes calls go through :class:`finetune_operator.kube.Kube`; everything else is pure.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from finetune_operator import api, manifest
from finetune_operator.kube import REPLICA_TYPE_LABEL, Kube, WriteConflictError
from finetune_operator.plan import PlanInfeasible, plan_config, plan_job, plan_status
from finetune_operator.progress import parse_checkpoint, parse_progress
from finetune_operator.status import (
    TERMINAL,
    FineTuneJobStatus,
    Observed,
    PlanStatus,
    derive,
    refine_failure,
)
from finetune_operator.translate import to_trainer_config

#: Where the model goes inside the pod when the job names no output storage.
POD_OUTPUT_DIR = f"{manifest.CACHE_DIR}/output"


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Outcome:
    """What one reconcile did: the phase before and after, and the status written (if any)."""

    before: str | None
    after: str | None
    status: FineTuneJobStatus
    changed: bool


#: Attempts at a status write that races with another writer before giving up (kopf retries).
ATTEMPTS = 5
Compute = Callable[[api.FineTuneJob], FineTuneJobStatus]


def _write(kube: Kube, job: api.FineTuneJob, compute: Compute) -> Outcome | None:
    """Compute the status from ``job`` and write it if it changed.

    On a conflict (someone wrote in between), read the job again and recompute: the status is
    always derived from a fresh read, never merged into a stale one.
    """
    for _ in range(ATTEMPTS):
        before = job.status
        status = compute(job)
        if status == before:
            return Outcome(before.phase if before else None, status.phase, status, False)
        wire = status.model_dump(by_alias=True, exclude_none=True, mode="json")
        try:
            kube.replace_status(job.to_document(), wire)
        except WriteConflictError:
            fresh = kube.finetunejob(job.metadata.namespace or "", job.name)
            if fresh is None:
                return None  # deleted meanwhile
            job = api.parse(fresh)
            continue
        return Outcome(before.phase if before else None, status.phase, status, True)
    raise WriteConflictError(f"status of {job.name} kept changing under us; will retry")


def _observe(
    kube: Kube, job: api.FineTuneJob, plan: PlanStatus | None, seen: dict[str, Any] | None = None
) -> Observed:
    """What the cluster shows now; ``seen`` is a pod from an event (it may be gone already, and
    its last state is often the only record of why a container died)."""
    ns = job.metadata.namespace or ""
    child = kube.pytorchjob(ns, job.name)
    listed = kube.pods(ns, job.name) if child is not None else []
    names = {p["metadata"]["name"] for p in listed}
    if seen is not None and seen["metadata"]["name"] not in names:
        listed.append(seen)
    pods = tuple(listed)
    return Observed(
        generation=job.metadata.generation,
        suspend_requested=job.spec.run_policy.suspend and not manifest.queued(job),
        plan=plan,
        child=child,
        pods=pods,
        previous_failure=job.status.failure if job.status else None,
    )


def reconcile(
    kube: Kube, job: api.FineTuneJob, *, image: str, metrics_port: int = manifest.METRICS_PORT
) -> list[Outcome]:
    """Make the cluster match ``job``: plan (status first), apply ConfigMap and PyTorchJob, then
    write the observed status. Returns each status write, in order."""
    if job.status is not None and job.status.phase in TERMINAL:
        return []  # never recreate children of a finished job
    generation = job.metadata.generation
    try:
        result = plan_job(job.spec)
    except PlanInfeasible as exc:
        infeasible = Observed(generation, False, plan_error=exc.message)
        return _written(_write(kube, job, lambda j: derive(infeasible, j.status, now())))
    plan = plan_status(result) if result else None
    outcomes: list[Outcome | None] = []
    if job.status is None or job.status.plan != plan:  # status.plan before any pod exists
        planned = Observed(generation, False, plan=plan)
        first = _write(kube, job, lambda j: derive(planned, j.status, now()))
        outcomes.append(first)
        if first is not None:
            job = job.model_copy(update={"status": first.status})
    config = to_trainer_config(
        job.spec,
        name=job.name,
        default_output_dir=POD_OUTPUT_DIR,
        plan=plan_config(result) if result else None,
        metrics_port=metrics_port,
    )
    ns = job.metadata.namespace or ""
    exists = kube.pytorchjob(ns, job.name) is not None
    kube.apply(manifest.config_map(job, config))
    summary = result.summary if result else None
    kube.apply(
        manifest.pytorch_job(
            job, image=image, plan_summary=summary, exists=exists, metrics_port=metrics_port
        )
    )
    outcomes.append(_write(kube, job, lambda j: derive(_observe(kube, j, plan), j.status, now())))
    return _written(*outcomes)


def _written(*outcomes: Outcome | None) -> list[Outcome]:
    return [o for o in outcomes if o is not None]


def refresh(kube: Kube, job: api.FineTuneJob, seen: dict[str, Any] | None = None) -> list[Outcome]:
    """Update status from the children without changing them (on a child or pod event)."""
    if job.status is None:
        return []
    if job.status.phase in TERMINAL:  # only a late pod can still tell why it failed
        if seen is None:
            return []
        final = job.status
        return _written(_write(kube, job, lambda j: refine_failure(j.status or final, [seen])))

    def compute(j: api.FineTuneJob) -> FineTuneJobStatus:
        plan = j.status.plan if j.status else None
        return derive(_observe(kube, j, plan, seen), j.status, now())

    return _written(_write(kube, job, compute))


def scrape_progress(
    kube: Kube, job: api.FineTuneJob, metrics_port: int = manifest.METRICS_PORT
) -> list[Outcome]:
    """Read progress from the master pod's metrics into status.progress (while Running)."""
    status = job.status
    if status is None or status.phase != "Running":
        return []
    pods = kube.pods(job.metadata.namespace or "", job.name)
    master = next(
        (p for p in pods if p["metadata"].get("labels", {}).get(REPLICA_TYPE_LABEL) == "master"),
        None,
    )
    text = kube.metrics(master, metrics_port) if master else None
    progress = parse_progress(text, now()) if text else None
    if progress is None or text is None:
        return []
    update: dict[str, object] = {"progress": progress}
    saved = parse_checkpoint(text, job.spec.checkpoint.storage)
    if saved is not None:
        update["checkpoint"] = saved

    def with_progress(j: api.FineTuneJob) -> FineTuneJobStatus:
        return (j.status or FineTuneJobStatus()).model_copy(update=update)

    return _written(_write(kube, job, with_progress))
