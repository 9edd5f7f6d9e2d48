"""kopf wiring: thin handlers that hand each event to the controller.

Invalid specs are permanent errors (the API server's CEL rules normally stop them first); API
failures are temporary and retried. kopf keeps its progress in annotations under
``finetune.dev/`` and never writes undeclared status fields.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import kopf

from finetune_operator import api, controller, telemetry
from finetune_operator.kube import Kube, load_config
from finetune_operator.manifest import JOB_LABEL, METRICS_PORT

DEFAULT_IMAGE = "finetune-trainer:0.1.0"
PROGRESS_INTERVAL = float(os.environ.get("FINETUNE_PROGRESS_INTERVAL", "15"))
RESOURCE = (api.GROUP, api.VERSION, api.PLURAL)


def trainer_image() -> str:
    return os.environ.get("FINETUNE_TRAINER_IMAGE", DEFAULT_IMAGE)


def trainer_metrics_port() -> int:
    """The port the trainer serves /metrics on (and the operator scrapes)."""
    return int(os.environ.get("FINETUNE_TRAINER_METRICS_PORT", str(METRICS_PORT)))


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.finalizer = f"{api.GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=api.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=api.GROUP, key="last-handled-configuration"
    )
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    settings.posting.level = logging.WARNING  # our own Events tell the story; kopf's: errors
    settings.execution.max_workers = 8
    load_config()
    memo.kube = Kube()


def _parse(body: kopf.Body) -> api.FineTuneJob:
    try:
        return api.parse(dict(body))
    except api.SpecError as exc:
        raise kopf.PermanentError(f"invalid FineTuneJob: {exc}") from None


def _announce(kube: Kube, body: Any, outcomes: list[controller.Outcome]) -> None:
    """An Event for each phase transition, and the jobs-by-phase metric."""
    for outcome in outcomes:
        _announce_one(kube, body, outcome)


def _announce_one(kube: Kube, body: Any, outcome: controller.Outcome) -> None:
    key = f"{body['metadata'].get('namespace')}/{body['metadata'].get('name')}"
    telemetry.job_phase(key, outcome.after)
    if outcome.before == outcome.after or outcome.after is None:
        return
    status = outcome.status
    if outcome.after == "Failed" and status.failure is not None:
        kube.event(body, "Warning", status.failure.reason, status.failure.message)
        return
    messages = {
        "Planned": status.plan.reason if status.plan else "the trainer will plan at start",
        "Pending": "PyTorchJob created; waiting for the pods",
        "Running": "training started",
        "Suspended": "suspended: the pods are stopped",
        "Succeeded": "training finished",
    }
    kube.event(body, "Normal", outcome.after, messages.get(outcome.after, outcome.after))


@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
@kopf.on.update(*RESOURCE, field="spec")
def reconcile(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    job = _parse(body)
    with telemetry.timed():
        outcomes = controller.reconcile(
            memo.kube, job, image=trainer_image(), metrics_port=trainer_metrics_port()
        )
    _announce(memo.kube, body, outcomes)


@kopf.on.delete(*RESOURCE, optional=True)
def forget(body: kopf.Body, **_: Any) -> None:
    """Children go with their owner (garbage collection); only the metrics forget the job."""
    telemetry.job_phase(f"{body['metadata'].get('namespace')}/{body['metadata']['name']}", None)


def _refresh(
    memo: kopf.Memo, namespace: str, name: str, seen: dict[str, Any] | None = None
) -> None:
    kube: Kube = memo.kube
    document = kube.finetunejob(namespace, name)
    if document is None:
        return
    try:
        job = api.parse(document)
    except api.SpecError:
        return  # the FineTuneJob's own handler reports it
    with telemetry.timed():
        outcomes = controller.refresh(kube, job, seen)
    _announce(kube, document, outcomes)


@kopf.on.event("kubeflow.org", "v1", "pytorchjobs", labels={JOB_LABEL: kopf.PRESENT})
def child_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    meta = body["metadata"]
    _refresh(memo, meta["namespace"], meta["labels"][JOB_LABEL])


@kopf.on.event("", "v1", "pods", labels={JOB_LABEL: kopf.PRESENT})
def pod_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    meta = body["metadata"]
    _refresh(memo, meta["namespace"], meta["labels"][JOB_LABEL], seen=dict(body))


@kopf.timer(*RESOURCE, interval=PROGRESS_INTERVAL, initial_delay=PROGRESS_INTERVAL)
def progress(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Training progress from the master's metrics, and a level-triggered safety net."""
    job = _parse(body)
    with telemetry.timed():
        outcomes = controller.scrape_progress(
            memo.kube, job, trainer_metrics_port()
        ) or controller.refresh(memo.kube, job)
    _announce(memo.kube, body, outcomes)


def run(*, namespaces: list[str], metrics_port: int, health_port: int) -> None:
    """Run the operator until interrupted (one replica; no peering)."""
    telemetry.serve(metrics_port)
    kopf.run(
        standalone=True,
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=f"http://0.0.0.0:{health_port}/healthz",
    )
