"""Reconcile one FineTuneJob: plan, apply the desired children, observe, write status.

Level-based and idempotent: every call computes the desired state from the spec and what the
cluster shows, so a retry, a missed event or an operator restart converges to the same place.
Kubernetes calls go through :class:`finetune_operator.kube.Kube`; everything else is pure.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from finetune_operator import api, manifest
from finetune_operator.kube import REPLICA_TYPE_LABEL, Kube
from finetune_operator.plan import PlanInfeasible, plan_config, plan_job, plan_status
from finetune_operator.progress import parse_progress
from finetune_operator.status import TERMINAL, FineTuneJobStatus, Observed, PlanStatus, derive
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


def _write(kube: Kube, job: api.FineTuneJob, status: FineTuneJobStatus) -> Outcome:
    before = job.status
    changed = status != before
    if changed:
        wire = status.model_dump(by_alias=True, exclude_none=True, mode="json")
        kube.patch_status(job.metadata.namespace or "", job.name, wire)
    return Outcome(before.phase if before else None, status.phase, status, changed)


def _observe(kube: Kube, job: api.FineTuneJob, plan: PlanStatus | None) -> Observed:
    ns = job.metadata.namespace or ""
    child = kube.pytorchjob(ns, job.name)
    pods = tuple(kube.pods(ns, job.name)) if child is not None else ()
    return Observed(
        generation=job.metadata.generation,
        suspend_requested=job.spec.run_policy.suspend and not manifest.queued(job),
        plan=plan,
        child=child,
        pods=pods,
        previous_failure=job.status.failure if job.status else None,
    )


def reconcile(kube: Kube, job: api.FineTuneJob, *, image: str) -> Outcome:
    """Make the cluster match ``job``: plan, apply ConfigMap and PyTorchJob, then write status."""
    previous = job.status
    if previous is not None and previous.phase in TERMINAL:
        return Outcome(previous.phase, previous.phase, previous, False)  # never recreate children
    try:
        result = plan_job(job.spec)
    except PlanInfeasible as exc:
        observed = Observed(job.metadata.generation, False, plan_error=exc.message)
        return _write(kube, job, derive(observed, previous, now()))
    config = to_trainer_config(
        job.spec,
        name=job.name,
        default_output_dir=POD_OUTPUT_DIR,
        plan=plan_config(result) if result else None,
    )
    ns = job.metadata.namespace or ""
    exists = kube.pytorchjob(ns, job.name) is not None
    kube.apply(manifest.config_map(job, config))
    kube.apply(
        manifest.pytorch_job(
            job, image=image, plan_summary=result.summary if result else None, exists=exists
        )
    )
    plan = plan_status(result) if result else None
    return _write(kube, job, derive(_observe(kube, job, plan), previous, now()))


def refresh(kube: Kube, job: api.FineTuneJob) -> Outcome:
    """Update status from the children without changing them (on a child or pod event)."""
    previous = job.status
    if previous is None or previous.phase in TERMINAL:
        phase = previous.phase if previous else None
        return Outcome(phase, phase, previous or FineTuneJobStatus(), False)
    observed = _observe(kube, job, previous.plan)
    return _write(kube, job, derive(observed, previous, now()))


def scrape_progress(kube: Kube, job: api.FineTuneJob) -> Outcome | None:
    """Read progress from the master pod's metrics into status.progress (while Running)."""
    status = job.status
    if status is None or status.phase != "Running":
        return None
    pods = kube.pods(job.metadata.namespace or "", job.name)
    master = next(
        (p for p in pods if p["metadata"].get("labels", {}).get(REPLICA_TYPE_LABEL) == "master"),
        None,
    )
    text = kube.metrics(master, manifest.METRICS_PORT) if master else None
    progress = parse_progress(text, now()) if text else None
    if progress is None:
        return None
    return _write(kube, job, status.model_copy(update={"progress": progress}))
