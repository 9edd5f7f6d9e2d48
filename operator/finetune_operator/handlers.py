"""kopf wiring: thin handlers that hand each event to the controller.

Invalid specs are permanent errors (the API server's CEL rules normally stop them first); API
failures are temporary and retried. kopf keeps its progress in annotations under
``finetune.dev/`` and never writes undeclared status fields. The operator's :class:`Settings` are
read once, by :func:`run`, and reach the handlers through kopf's memo.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import kopf

from finetune_operator import api, controller, telemetry
from finetune_operator.kube import Kube, load_config
from finetune_operator.objects import Pod
from finetune_operator.settings import Settings, SettingsError
from finetune_trainer.names import JOB_LABEL

RESOURCE = (api.GROUP, api.VERSION, api.PLURAL)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """kopf's settings, and the Kubernetes client, into the memo that every handler gets (next
    to the operator's own Settings, which :func:`run` put there)."""
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
    config: Settings = memo.settings
    with telemetry.timed():
        outcomes = controller.reconcile(
            memo.kube,
            job,
            image=config.trainer_image,
            metrics_port=config.trainer_metrics_port,
        )
    _announce(memo.kube, body, outcomes)


@kopf.on.delete(*RESOURCE, optional=True)
def forget(body: kopf.Body, **_: Any) -> None:
    """Children go with their owner (garbage collection); only the metrics forget the job."""
    telemetry.job_phase(f"{body['metadata'].get('namespace')}/{body['metadata']['name']}", None)


def _refresh(memo: kopf.Memo, namespace: str, name: str, seen: Pod | None = None) -> None:
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
    _refresh(memo, meta["namespace"], meta["labels"][JOB_LABEL], seen=Pod.parse(body))


def progress(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Training progress from the master's metrics, and a level-triggered safety net (a timer
    every Settings.progress_interval seconds, registered by :func:`run`)."""
    job = _parse(body)
    config: Settings = memo.settings
    with telemetry.timed():
        outcomes = controller.scrape_progress(
            memo.kube, job, config.trainer_metrics_port
        ) or controller.refresh(memo.kube, job)
    _announce(memo.kube, body, outcomes)


def run(*, namespaces: list[str], metrics_port: int, health_port: int) -> None:
    """Run the operator until interrupted (one replica; no peering).

    Reads the Settings from the environment, once; exits with the reason if one is unusable.
    """
    try:
        config = Settings.from_env(os.environ)
    except SettingsError as exc:
        raise SystemExit(f"error: {exc}") from None
    every = config.progress_interval
    kopf.timer(*RESOURCE, interval=every, initial_delay=every)(progress)
    telemetry.serve(metrics_port)
    kopf.run(
        standalone=True,
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=f"http://0.0.0.0:{health_port}/healthz",
        memo=kopf.Memo(settings=config),
    )
