"""The only module that talks to the Kubernetes API.

Server-side apply under one field manager for children; status written by replacing it through
the status subresource, guarded by the resourceVersion it was computed from; reads of
FineTuneJobs, of the child (PyTorchJob or TrainJob) and its pods, of the staging Job, its pods
and its cache claim
(parsed here into :mod:`finetune_operator.objects` and :mod:`finetune_operator.staging`); Events;
pod logs; the GPU product labels of nodes; and the master pod's metrics endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import zlib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import aiohttp
from kubernetes import client, config
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import (
    ConflictError,
    ForbiddenError,
    NotFoundError,
    ResourceNotFoundError,
)

from finetune_operator import api, staging
from finetune_operator.children import PYTORCHJOB_CHILD, ChildKind
from finetune_operator.controller import Cluster, WriteConflictError
from finetune_operator.gputype import PRODUCT_LABEL
from finetune_operator.objects import Child, Event, Pod
from finetune_operator.queueing import (
    JOB_UID_LABEL,
    SUSPENDED_BY_USER,
    WORKLOAD_API_VERSION,
    WORKLOAD_KIND,
    QueueView,
    workload_of,
)

FIELD_MANAGER = "finetune-operator"
#: Holds runPolicy.suspend of a queued child as Kueue has it (:meth:`Kube.release_suspend`).
SUSPEND_MANAGER = "finetune-operator-kueue"
#: Seconds a single API request may take before it is abandoned and retried by the handler.
REQUEST_TIMEOUT = 30
#: Threads that record Events (EventLanes).
EVENT_LANES = 2
log = logging.getLogger("finetune_operator")
#: Trainer metrics requests in flight at once, and the seconds one may take (Scraper).
SCRAPE_CONCURRENCY = 64
SCRAPE_TIMEOUT = 2.0


def load_config(connections: int | None = None) -> None:
    """In-cluster credentials when running in a pod, else the kubeconfig (KUBECONFIG); with
    ``connections``, a connection pool that size (one per thread that calls the API: the
    default, 5 per CPU, makes a thread beyond it open and drop a TLS connection per request)."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    if connections is not None:
        settings = client.Configuration.get_default_copy()
        settings.connection_pool_maxsize = max(connections, settings.connection_pool_maxsize)
        client.Configuration.set_default(settings)


def server() -> str:
    """The API server the loaded configuration talks to."""
    return str(client.Configuration.get_default_copy().host)


def current_namespace() -> str:
    """The namespace of the kubeconfig's current context (as kubectl uses), else default."""
    try:
        _, context = config.list_kube_config_contexts()
    except (config.ConfigException, OSError):
        return "default"
    return str(context.get("context", {}).get("namespace") or "default")


class LogsUnavailableError(Exception):
    """The API server could not give a pod's log (no such pod yet, or its node did not answer)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _api_reason(exc: client.ApiException) -> str:
    """The ``message`` of a Kubernetes Status body, else the HTTP reason."""
    try:
        return str(json.loads(exc.body or "{}").get("message") or exc.reason)
    except ValueError:
        return str(exc.body or exc.reason)


def _without(mapping: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if k != key}


class Kube:
    """A thin, synchronous client for what the operator and the CLI need (it is the controller's
    :class:`~finetune_operator.controller.Cluster`)."""

    def __init__(
        self, api_client: client.ApiClient | None = None, child_kind: ChildKind = PYTORCHJOB_CHILD
    ) -> None:
        #: The kind of child the operator makes for new jobs (Settings.child).
        self.child_kind = child_kind
        self._client = api_client or client.ApiClient()
        self._dynamic = DynamicClient(self._client)
        self._core = client.CoreV1Api(self._client)

    def _resource(self, api_version: str, kind: str) -> Any:
        return self._dynamic.resources.get(api_version=api_version, kind=kind)

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply ``obj`` (idempotent; we own the fields we set)."""
        resource = self._resource(obj["apiVersion"], obj["kind"])
        applied = resource.server_side_apply(
            body=obj,
            namespace=obj["metadata"].get("namespace"),
            field_manager=FIELD_MANAGER,
            force_conflicts=True,
            _request_timeout=REQUEST_TIMEOUT,
        )
        return dict(applied.to_dict())

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            found = self._resource(api_version, kind).get(
                name=name, namespace=namespace, _request_timeout=REQUEST_TIMEOUT
            )
        except NotFoundError:
            return None
        return dict(found.to_dict())

    def finetunejob(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get(api.API_VERSION, api.KIND, namespace, name)

    def finetunejobs(self, namespace: str | None) -> list[dict[str, Any]]:
        """Every FineTuneJob in ``namespace`` (all namespaces when None)."""
        found = self._resource(api.API_VERSION, api.KIND).get(
            namespace=namespace, _request_timeout=REQUEST_TIMEOUT
        )
        return [dict(item) for item in found.to_dict().get("items", [])]

    def events(self, namespace: str, uid: str) -> list[Event]:
        """Events about the object with ``uid`` (not an earlier one of the same name, as
        ``kubectl describe`` selects them), in the order they were recorded."""
        found = self._resource("v1", "Event").get(
            namespace=namespace,
            field_selector=f"involvedObject.uid={uid}",
            _request_timeout=REQUEST_TIMEOUT,
        )
        events = [Event.parse(e) for e in found.to_dict().get("items", [])]
        return sorted(events, key=Event.order)

    def logs(
        self, namespace: str, pod: str, container: str, *, follow: bool, tail: int | None
    ) -> Any:
        """The trainer container's log lines (an iterator of bytes when following).

        Raises LogsUnavailableError with the API server's reason when there is no log to read.
        """
        try:
            resp: Any = self._core.read_namespaced_pod_log(
                pod,
                namespace,
                container=container,
                follow=follow,
                tail_lines=tail,
                _preload_content=False,
            )
        except client.ApiException as exc:
            raise LogsUnavailableError(int(exc.status or 0), _api_reason(exc)) from exc
        if not 200 <= resp.status < 300:  # not raised by the client without preloading
            raise LogsUnavailableError(
                resp.status, _api_reason(client.ApiException(http_resp=resp))
            )
        return resp

    def child(self, kind: ChildKind, namespace: str, name: str) -> Child | None:
        found = self.get(kind.api_version, kind.kind, namespace, name)
        return None if found is None else kind.parse(found)

    def serves(self, kind: ChildKind) -> bool:
        """Whether the API server serves ``kind`` (its CRD is installed)."""
        try:
            self._resource(kind.api_version, kind.kind)
        except ResourceNotFoundError:
            return False
        return True

    def delete_pods(self, kind: ChildKind, namespace: str, job_name: str) -> None:
        """Delete the child's pods (a gang restart: its controller makes new ones)."""
        for pod in self.pods(kind, namespace, job_name):
            try:
                self._core.delete_namespaced_pod(
                    pod.name, namespace, _request_timeout=REQUEST_TIMEOUT
                )
            except client.ApiException as exc:
                if exc.status != 404:
                    raise

    def delete_child(self, kind: ChildKind, namespace: str, name: str) -> None:
        """Delete the child (its pods go with it: background propagation)."""
        with contextlib.suppress(NotFoundError):
            self._resource(kind.api_version, kind.kind).delete(
                name=name,
                namespace=namespace,
                body={"propagationPolicy": "Background"},
                _request_timeout=REQUEST_TIMEOUT,
            )

    def suspend_child(self, kind: ChildKind, namespace: str, name: str) -> None:
        """Suspend the child (its controller deletes its pods)."""
        with contextlib.suppress(NotFoundError):
            self._resource(kind.api_version, kind.kind).patch(
                name=name,
                namespace=namespace,
                body=kind.suspend_body(True),
                content_type="application/merge-patch+json",
                _request_timeout=REQUEST_TIMEOUT,
            )

    def release_suspend(self, kind: ChildKind, namespace: str, child: Child) -> None:
        """Share the suspend of a child Kueue admits with a second field manager, holding
        its current value: the operator's later applies, which leave it out, then leave it as
        Kueue has it (a field only the operator owned would go back to its default, false)."""
        if FIELD_MANAGER not in child.suspend_owners:
            return
        self._resource(kind.api_version, kind.kind).server_side_apply(
            body={
                "apiVersion": kind.api_version,
                "kind": kind.kind,
                "metadata": {"name": child.name, "namespace": namespace},
                **kind.suspend_body(child.suspended),
            },
            namespace=namespace,
            field_manager=SUSPEND_MANAGER,
            _request_timeout=REQUEST_TIMEOUT,
        )

    def workload(self, namespace: str, job_uid: str) -> QueueView | None:
        """The Workload Kueue made for the job ``job_uid`` (None: none yet, Kueue is not
        installed, or the operator may not read Workloads: the chart's kueue.enabled)."""
        try:
            found = self._resource(WORKLOAD_API_VERSION, WORKLOAD_KIND).get(
                namespace=namespace,
                label_selector=f"{JOB_UID_LABEL}={job_uid}",
                _request_timeout=REQUEST_TIMEOUT,
            )
        except (ResourceNotFoundError, ForbiddenError):
            return None
        return workload_of(found.to_dict().get("items", []), job_uid)

    def set_workload_active(self, namespace: str, name: str, active: bool) -> None:
        with contextlib.suppress(NotFoundError):
            self._resource(WORKLOAD_API_VERSION, WORKLOAD_KIND).patch(
                name=name,
                namespace=namespace,
                body={
                    "metadata": {"annotations": {SUSPENDED_BY_USER: None if active else "true"}},
                    "spec": {"active": active},
                },
                content_type="application/merge-patch+json",
                _request_timeout=REQUEST_TIMEOUT,
            )

    def can_watch_workloads(self, namespaces: list[str]) -> bool:
        """Whether Kueue's Workloads are served and the operator may list and watch them in
        ``namespaces`` (every namespace when empty; the chart grants it with kueue.enabled)."""
        try:
            self._resource(WORKLOAD_API_VERSION, WORKLOAD_KIND)
        except ResourceNotFoundError:
            return False
        review = client.AuthorizationV1Api(self._client)
        group = WORKLOAD_API_VERSION.split("/")[0]
        for namespace in namespaces or [""]:
            for verb in ("list", "watch"):
                attributes = {"group": group, "resource": "workloads", "verb": verb}
                if namespace:
                    attributes["namespace"] = namespace
                answer = review.create_self_subject_access_review(
                    {"spec": {"resourceAttributes": attributes}},  # type: ignore[arg-type]
                    _request_timeout=REQUEST_TIMEOUT,
                )
                if answer.status is None or not answer.status.allowed:
                    return False
        return True

    def pods(self, kind: ChildKind, namespace: str, job_name: str) -> list[Pod]:
        """The child's pods (those with its controller's label naming it)."""
        pods = self._resource("v1", "Pod").get(
            namespace=namespace,
            label_selector=f"{kind.pod_label}={job_name}",
            _request_timeout=REQUEST_TIMEOUT,
        )
        return [Pod.parse(p) for p in pods.to_dict().get("items", [])]

    def staging_job(self, namespace: str, name: str) -> staging.StagingJob | None:
        found = self.get("batch/v1", "Job", namespace, name)
        return None if found is None else staging.StagingJob.parse(found)

    def staging_pods(self, namespace: str, job_name: str) -> list[Pod]:
        """The pods of the FineTuneJob ``job_name``'s staging Job (by the staging label)."""
        pods = self._resource("v1", "Pod").get(
            namespace=namespace,
            label_selector=f"{staging.STAGING_LABEL}={job_name}",
            _request_timeout=REQUEST_TIMEOUT,
        )
        return [Pod.parse(p) for p in pods.to_dict().get("items", [])]

    def claim(self, namespace: str, name: str) -> staging.ClaimView | None:
        found = self.get("v1", "PersistentVolumeClaim", namespace, name)
        return None if found is None else staging.ClaimView.parse(found)

    def missing_claims(self, namespace: str, claims: list[str]) -> list[str]:
        """Those of the PersistentVolumeClaims ``claims`` that do not exist in ``namespace``."""
        found = self._resource("v1", "PersistentVolumeClaim").get(
            namespace=namespace, _request_timeout=REQUEST_TIMEOUT
        )
        present = {item["metadata"]["name"] for item in found.to_dict().get("items", [])}
        return [c for c in claims if c not in present]

    def gpu_node_products(self, node_selector: Mapping[str, str]) -> list[str]:
        """The ``nvidia.com/gpu.product`` label of each node that has one and matches
        ``node_selector`` (one value per node; the API server does the selecting)."""
        selector = ",".join([PRODUCT_LABEL, *(f"{k}={v}" for k, v in node_selector.items())])
        found = self._resource("v1", "Node").get(
            label_selector=selector, _request_timeout=REQUEST_TIMEOUT
        )
        return [
            item["metadata"]["labels"][PRODUCT_LABEL] for item in found.to_dict().get("items", [])
        ]

    def replace_status(self, document: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
        """Write ``status`` over the FineTuneJob read as ``document``; the object as written.

        Optimistic concurrency: the write carries the document's resourceVersion, so it fails
        with :class:`WriteConflictError` if the object changed since it was read.
        """
        resource = self._resource(api.API_VERSION, api.KIND)
        meta = document["metadata"]
        try:
            written = resource.status.replace(
                # without managedFields: the server keeps its own (ours may be one write old)
                body={**document, "metadata": _without(meta, "managedFields"), "status": status},
                name=meta["name"],
                namespace=meta["namespace"],
                field_manager=FIELD_MANAGER,
                _request_timeout=REQUEST_TIMEOUT,
            )
        except ConflictError as exc:
            raise WriteConflictError(str(exc)) from None
        return dict(written.to_dict())

    def event(
        self,
        obj: dict[str, Any],
        type_: str,
        reason: str,
        message: str,
        moment: datetime | None = None,
    ) -> None:
        """Record a Kubernetes Event about ``obj`` (what ``kubectl describe`` shows) that
        happened at ``moment`` (None: now)."""
        meta = obj["metadata"]
        moment = moment or datetime.now(UTC)
        stamp = moment.strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": obj.get("apiVersion", api.API_VERSION),
                "kind": obj.get("kind", api.KIND),
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": FIELD_MANAGER},
            "reportingComponent": FIELD_MANAGER,
            "reportingInstance": socket.gethostname(),
            # eventTime keeps microseconds: events written within one second keep their order
            "eventTime": moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "action": reason,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        self._core.create_namespaced_event(
            meta["namespace"],
            body,  # type: ignore[arg-type]  # the client accepts plain dicts
            _request_timeout=REQUEST_TIMEOUT,
        )


class EventLanes:
    """Records Events off the caller's thread, so that a reconcile's worker is free once the
    status is written (a burst of new jobs waits on fewer requests each). Each object's Events
    keep their order (one lane, one thread, per object by uid); each is stamped when it is told,
    not when it is sent. An Event that cannot be recorded is logged and dropped: it is never a
    reason to run a reconcile again. :meth:`close` sends what is queued, then stops."""

    def __init__(self, kube: Kube, lanes: int = EVENT_LANES) -> None:
        self._kube = kube
        self._lanes = [
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"events-{i}")
            for i in range(lanes)
        ]

    def event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        meta = obj.get("metadata", {})
        key = str(meta.get("uid") or f"{meta.get('namespace')}/{meta.get('name')}")
        lane = self._lanes[zlib.crc32(key.encode()) % len(self._lanes)]
        lane.submit(self._send, obj, type_, reason, message, datetime.now(UTC))

    def _send(
        self, obj: dict[str, Any], type_: str, reason: str, message: str, moment: datetime
    ) -> None:
        try:
            self._kube.event(obj, type_, reason, message, moment)
        except Exception as exc:  # an Event is told once, at best
            meta = obj.get("metadata", {})
            log.warning(
                "could not record Event %s on %s/%s: %s",
                reason,
                meta.get("namespace"),
                meta.get("name"),
                exc,
            )

    def close(self) -> None:
        for lane in self._lanes:
            lane.shutdown(wait=True)


class Scraper:
    """Reads trainers' /metrics (the master pods' ``<podIP>:<port>``) for the progress sweep,
    asynchronously: at most ``concurrency`` requests at once, each given up after ``timeout``
    seconds, so a pod that does not answer holds one slot for that long and no thread at all.
    Make it inside the event loop that uses it."""

    def __init__(self, concurrency: int = SCRAPE_CONCURRENCY, timeout: float = SCRAPE_TIMEOUT):
        self._slots = asyncio.Semaphore(concurrency)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def metrics(self, pod: Pod, port: int) -> str | None:
        """The /metrics text ``pod`` serves on ``port``; None while it has no IP, or when it
        does not answer in time (or with an error)."""
        if not pod.pod_ip:
            return None
        host = f"[{pod.pod_ip}]" if ":" in pod.pod_ip else pod.pod_ip  # IPv6
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        async with self._slots:
            try:
                async with self._session.get(f"http://{host}:{port}/metrics") as resp:
                    if resp.status != 200:
                        return None
                    return await resp.text()
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
                return None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


if TYPE_CHECKING:  # mypy checks that Kube is all the controller needs from Kubernetes
    _CLUSTER: Cluster = Kube()
