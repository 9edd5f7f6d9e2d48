"""kopf wiring: thin handlers that hand each event to the controller.

Invalid specs are permanent errors (the API server's CEL rules normally stop them first); API
failures are temporary and retried. kopf keeps its progress in annotations under
``finetune.dev/`` and never writes undeclared status fields. The operator's :class:`Settings` are
read once, by :func:`run`, and reach the handlers through kopf's memo.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import kopf

from finetune_operator import (
    __version__,
    api,
    children,
    controller,
    oplog,
    pacing,
    queueing,
    staging,
    story,
    telemetry,
)
from finetune_operator.kube import EVENT_LANES, EventLanes, Kube, Scraper, load_config, server
from finetune_operator.objects import Child, Pod
from finetune_operator.settings import Settings, SettingsError
from finetune_trainer.names import JOB_LABEL, JOB_NAME_LABEL, JOBSET_NAME_LABEL

RESOURCE = (api.GROUP, api.VERSION, api.PLURAL)
T = TypeVar("T")
#: kopf's threads for the (synchronous) reconciles: mostly waiting on the API server. 16, not
#: 8: a burst of 200 new jobs got each its PyTorchJob in 0.8-0.9 s at p99 instead of 2.4 s on
#: the 2-core test bed (bench/operator/run.py, two runs each).
WORKERS = 16
#: Threads for the progress sweep's API work (status writes mostly). On the 2-core test bed,
#: 16 threads did worse than 4 (bench/operator/steady.py: the API server, already saturated,
#: timed requests out), so 4 until a bigger machine says otherwise.
PROGRESS_THREADS = 4
log = logging.getLogger("finetune_operator")


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """kopf's settings, and the Kubernetes client, into the memo that every handler gets (next
    to the operator's own Settings, which :func:`run` put there)."""
    # No handler needs a finalizer (progress is one operator-level sweep, not a timer per job,
    # which would force one: kopf issue #1074); kopf removes the one an older version added.
    settings.persistence.finalizer = f"{api.GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=api.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=api.GROUP, key="last-handled-configuration"
    )
    # After its own annotation patch, kopf waits for the watch to bring that version back before
    # it judges the next change (else it sees a stale copy as a new object and runs the create
    # handler again). On a busy API server the watch lags more than kopf's default 5 s
    # (bench/operator/steady.py: a fifth of 1,000 jobs reconciled twice).
    settings.persistence.consistency_timeout = 30
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    settings.posting.level = logging.WARNING  # our own Events tell the story; kopf's: errors
    settings.execution.max_workers = WORKERS
    load_config(connections=WORKERS + PROGRESS_THREADS + EVENT_LANES)
    memo.kube = Kube(child_kind=memo.settings.child)
    memo.events = EventLanes(memo.kube)
    memo.scraper = Scraper()
    memo.progress_pool = ThreadPoolExecutor(
        max_workers=PROGRESS_THREADS, thread_name_prefix="progress"
    )
    config: Settings = memo.settings
    namespaces = ",".join(memo.namespaces) or "all"
    log.info(
        "finetune-operator %s started: cluster %s, namespaces %s, trainer image %s",
        __version__,
        server(),
        namespaces,
        config.trainer_image,
        extra={
            "child": config.child.kind,
            "version": __version__,
            "cluster": server(),
            "namespaces": list(memo.namespaces),
            "trainer_image": config.trainer_image,
        },
    )


def _parse(body: kopf.Body) -> api.FineTuneJob:
    try:
        return api.parse_stored(dict(body))
    except api.SpecError as exc:
        raise kopf.PermanentError(f"invalid FineTuneJob: {exc}") from None


def _announce(memo: kopf.Memo, body: Any, outcomes: list[controller.Outcome]) -> None:
    """An Event and a log line for each phase transition, and the jobs-by-phase metric."""
    for outcome in outcomes:
        _announce_one(memo, body, outcome)


def _announce_one(memo: kopf.Memo, body: Any, outcome: controller.Outcome) -> None:
    key = f"{body['metadata'].get('namespace')}/{body['metadata'].get('name')}"
    telemetry.job_phase(key, outcome.after)
    story.announce(memo.events, dict(body), outcome)  # the Events are sent off this thread


def _reconcile(memo: kopf.Memo, job: api.FineTuneJob, body: Any) -> None:
    config: Settings = memo.settings
    with telemetry.timed():
        controller.reconcile(
            memo.kube,
            job,
            image=config.trainer_image,
            metrics_port=config.trainer_metrics_port,
            cache=config.cache,
            runtime=config.trainjob_runtime,
            on_write=lambda outcome: _announce_one(memo, body, outcome),
        )


@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
@kopf.on.update(*RESOURCE, field="spec")
def reconcile(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    _reconcile(memo, _parse(body), body)


@kopf.on.delete(*RESOURCE, optional=True)
def forget(body: kopf.Body, **_: Any) -> None:
    """Children go with their owner (garbage collection); only the metrics forget the job."""
    telemetry.job_phase(f"{body['metadata'].get('namespace')}/{body['metadata']['name']}", None)


def _refresh(
    memo: kopf.Memo,
    namespace: str,
    name: str,
    seen: Pod | None = None,
    workload: queueing.QueueView | None = None,
) -> None:
    kube: Kube = memo.kube
    document = kube.finetunejob(namespace, name)
    if document is None:
        return
    try:
        job = api.parse_stored(document)
    except api.SpecError:
        return  # the FineTuneJob's own handler reports it
    if workload is not None:
        refs = (job.status.pytorch_job, job.status.train_job) if job.status else ()
        if not any(ref is not None and ref.uid == workload.owner_uid for ref in refs):
            return  # not the Workload of this job's child
        controller.sync_workload(kube, job, workload)
    if controller.needs_child(job):  # re-planned: its child is made again
        _reconcile(memo, job, document)
        return
    with telemetry.timed():
        outcomes = controller.refresh(kube, job, seen)
    _announce(memo, document, outcomes)


@kopf.on.event("batch", "v1", "jobs", labels={staging.STAGING_LABEL: kopf.PRESENT})
def staging_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """The staging Job moved on (done, failed, retrying): move its FineTuneJob on."""
    meta = body["metadata"]
    document = memo.kube.finetunejob(meta["namespace"], meta["labels"][staging.STAGING_LABEL])
    if document is None:
        return
    try:
        job = api.parse_stored(document)
    except api.SpecError:
        return  # the FineTuneJob's own handler reports it
    if controller.staging_now(job):
        _reconcile(memo, job, document)


def child_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """The child moved on (registered by :func:`run` for each kind the cluster serves)."""
    meta = body["metadata"]
    _refresh(memo, meta["namespace"], meta["labels"][JOB_LABEL])


@kopf.on.event("", "v1", "pods", labels={JOB_LABEL: kopf.PRESENT})
def pod_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    meta = body["metadata"]
    _refresh(memo, meta["namespace"], meta["labels"][JOB_LABEL], seen=Pod.parse(body))


def workload_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Kueue moved a child on (quota reserved, admitted, evicted, preempted): tell it in the
    FineTuneJob's status, and keep a suspended job's Workload deactivated (registered by
    :func:`run` when Workloads are served and the operator may watch them)."""
    view = queueing.parse_workload(body)
    if view.owner_kind in children.BY_KIND and view.owner_name:
        _refresh(memo, view.namespace, view.owner_name, workload=view)


def _child_index(kind: children.ChildKind) -> Callable[..., dict[tuple[str, str], Child]]:
    def index(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[Any, Child]:
        """The children of one kind, by (namespace, name), from the watch the operator has
        anyway: the progress sweep reads them here, not with a GET per job per tick."""
        return {(namespace or "", name): kind.parse(dict(body))}

    return index


def _index_name(kind: children.ChildKind) -> str:
    return f"{kind.name}_children"


def _known_child(job: api.FineTuneJob, memo: kopf.Memo, indexes: dict[str, Any]) -> Child | None:
    """The job's child as the watch last saw it (None: not seen, or its kind is not watched)."""
    kind = controller.kind_of(memo.kube, job)
    index: kopf.Index[tuple[str, str], Child] | None = indexes.get(_index_name(kind))
    if index is None:
        return None
    return next(iter(index.get((job.metadata.namespace or "", job.name), ())), None)


def _child_pod(labels: kopf.Labels, **_: Any) -> bool:
    return JOB_NAME_LABEL in labels or JOBSET_NAME_LABEL in labels


@kopf.index("", "v1", "pods", labels={JOB_LABEL: kopf.PRESENT}, when=_child_pod)
def training_pods(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[tuple[str, str], Pod]:
    """The trainer pods of each child (a PyTorchJob's or a TrainJob's), by (namespace, child
    name), from the pods watch the operator has anyway: the progress sweep reads them here, not
    with a list per job per tick."""
    name = labels.get(JOB_NAME_LABEL) or labels.get(JOBSET_NAME_LABEL)
    return {(namespace or "", str(name)): Pod.parse(body)}


@kopf.index(*RESOURCE)
def finetunejobs(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    """Every FineTuneJob as last seen, by (namespace, name): what the progress sweep visits.
    Without its managedFields (half of a job's memory here, and nothing the operator reads; a
    status write without them leaves the stored ones as they are)."""
    meta = {k: v for k, v in body["metadata"].items() if k != "managedFields"}
    return {(namespace or "", name): {**body, "metadata": meta}}


async def _off_the_loop(memo: kopf.Memo, work: Callable[[], T]) -> T:
    """Run blocking API work of the progress sweep on its own threads (kopf's workers stay free
    for reconciles: a burst of new jobs is never queued behind progress)."""
    return await asyncio.get_running_loop().run_in_executor(memo.progress_pool, work)


async def progress(memo: kopf.Memo, body: dict[str, Any], indexes: Any) -> None:
    """One job's visit of the progress sweep: training progress from the master's metrics, and
    a level-triggered safety net.

    The pods come from the index, the metrics from the asynchronous Scraper (bounded, short
    timeouts: a master that does not answer costs the others nothing), and the status write
    from the progress threads."""
    try:
        job = api.parse_stored(body)
    except api.SpecError:
        return  # its reconcile handler reports it
    config: Settings = memo.settings
    # The nodes may tell its GPU type now; its staging pod may have ended (or be stuck); a
    # re-planned job waits for its child to be made again.
    if (
        controller.waits_for_gpu_type(job)
        or controller.staging_now(job)
        or controller.needs_child(job)
    ):
        await _off_the_loop(memo, lambda: _reconcile(memo, job, body))
        return
    outcomes: list[controller.Outcome] = []
    index: kopf.Index[tuple[str, str], Pod] = indexes["training_pods"]
    pods = list(index.get((job.metadata.namespace or "", job.name), ()))
    child = _known_child(job, memo, indexes)
    if controller.scraping(job):
        master = controller.master(pods)
        scraper: Scraper = memo.scraper
        text = await scraper.metrics(master, config.trainer_metrics_port) if master else None
        if text is not None:

            def scraped() -> list[controller.Outcome]:
                with telemetry.timed():
                    return controller.scrape_progress(memo.kube, job, pods, text, child)

            outcomes = await _off_the_loop(memo, scraped)
    if not outcomes:
        # the child and pods as the watches have them; none seen yet (or going): read them
        sight = (
            controller.Sight(child, tuple(pods))
            if child is not None and not child.deleting
            else None
        )

        def refreshed() -> list[controller.Outcome]:
            with telemetry.timed():
                return controller.refresh(memo.kube, job, sight=sight)

        outcomes = await _off_the_loop(memo, refreshed)
    if outcomes:
        await _off_the_loop(memo, lambda: _announce(memo, body, outcomes))


@kopf.on.startup()
async def start_progress(memo: kopf.Memo, **indexes: Any) -> None:
    """Start the progress sweep: every Settings.progress_interval seconds each FineTuneJob is
    visited once (:func:`progress`), the visits spread over the interval (pacing.sweep). The
    indexes kopf hands a startup handler are the live ones, filled as the watches run."""
    jobs: kopf.Index[tuple[str, str], dict[str, Any]] = indexes["finetunejobs"]

    def current() -> list[tuple[str, str]]:
        return list(jobs)

    async def visit(key: tuple[str, str]) -> None:
        body = next(iter(jobs.get(key, ())), None)
        if body is None or body.get("metadata", {}).get("deletionTimestamp"):
            return  # gone, or going
        await progress(memo, body, indexes)

    every = memo.settings.progress_interval
    memo.progress_sweep = asyncio.create_task(pacing.sweep(current, visit, every))


@kopf.on.cleanup()
async def close_scraper(memo: kopf.Memo, **_: Any) -> None:
    sweep: asyncio.Task[None] | None = getattr(memo, "progress_sweep", None)
    if sweep is not None:
        sweep.cancel()
    scraper: Scraper | None = getattr(memo, "scraper", None)
    if scraper is not None:
        await scraper.close()
    events: EventLanes | None = getattr(memo, "events", None)
    if events is not None:  # what is told is sent before the operator goes
        await asyncio.get_running_loop().run_in_executor(None, events.close)


def run(
    *,
    namespaces: list[str],
    metrics_port: int,
    health_port: int,
    log_format: oplog.LogFormat | None = None,
) -> None:
    """Run the operator until interrupted (one replica; no peering).

    Reads the Settings from the environment, once; exits with the reason if one is unusable.
    Logs at INFO to stderr: a start-up line, one line per phase transition, and every error
    (``log_format`` json: one JSON object a line; default: the Settings' log format).
    """
    try:
        config = Settings.from_env(os.environ)
    except SettingsError as exc:
        raise SystemExit(f"error: {exc}") from None
    oplog.configure(log_format or config.log_format)
    load_config()
    kube = Kube(child_kind=config.child)
    for kind in children.KINDS.values():
        if kind is config.child or kube.serves(kind):  # the chosen kind's watch, served or not
            group, version = kind.api_version.split("/")
            kopf.on.event(group, version, kind.plural, labels={JOB_LABEL: kopf.PRESENT})(
                child_changed
            )
            kopf.index(
                group, version, kind.plural, labels={JOB_LABEL: kopf.PRESENT}, id=_index_name(kind)
            )(_child_index(kind))
    if not kube.serves(config.child):
        log.warning(
            "%s is not served by this cluster: new FineTuneJobs wait for its CRD (install %s, "
            "or run the operator with child %s)",
            config.child.kind,
            "Kubeflow Trainer v2" if config.child.name == "trainjob" else "the training-operator",
            "pytorchjob" if config.child.name == "trainjob" else "trainjob",
        )
    if kube.can_watch_workloads(namespaces):
        group, version = queueing.WORKLOAD_API_VERSION.split("/")
        kopf.on.event(group, version, "workloads")(workload_changed)
        log.info("watching Kueue's Workloads: queued jobs tell Kueue's story in their status")
    telemetry.serve(metrics_port)
    kopf.run(
        standalone=True,
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=f"http://0.0.0.0:{health_port}/healthz",
        memo=kopf.Memo(settings=config, namespaces=namespaces),
    )
