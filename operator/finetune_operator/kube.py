"""The only module that talks to the Kubernetes API.

Server-side apply under one field manager for children, merge patches for status, reads of the
PyTorchJob and its pods, and the master pod's metrics endpoint.
"""

from __future__ import annotations

import json
import socket
import urllib.request
from datetime import UTC, datetime
from typing import Any

from kubernetes import client, config
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import ConflictError, NotFoundError

from finetune_operator import api
from finetune_operator.manifest import PYTORCHJOB_API_VERSION, PYTORCHJOB_KIND

FIELD_MANAGER = "finetune-operator"
JOB_NAME_LABEL = "training.kubeflow.org/job-name"
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
#: Seconds a single API request may take before it is abandoned and retried by the handler.
REQUEST_TIMEOUT = 30


class WriteConflictError(Exception):
    """The object changed since it was read: read it again and recompute."""


def load_config() -> None:
    """In-cluster credentials when running in a pod, else the kubeconfig (KUBECONFIG)."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


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


class Kube:
    """A thin, synchronous client for what the operator needs."""

    def __init__(self, api_client: client.ApiClient | None = None) -> None:
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

    def events(self, namespace: str, name: str) -> list[dict[str, Any]]:
        """Events about the FineTuneJob ``name``, oldest first."""
        found = self._resource("v1", "Event").get(
            namespace=namespace,
            field_selector=f"involvedObject.name={name},involvedObject.kind={api.KIND}",
            _request_timeout=REQUEST_TIMEOUT,
        )
        items = [dict(e) for e in found.to_dict().get("items", [])]
        return sorted(items, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")

    def logs(self, namespace: str, pod: str, *, follow: bool, tail: int | None) -> Any:
        """The trainer container's log lines (an iterator of bytes when following).

        Raises LogsUnavailableError with the API server's reason when there is no log to read.
        """
        try:
            resp: Any = self._core.read_namespaced_pod_log(
                pod,
                namespace,
                container="pytorch",
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

    def pytorchjob(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get(PYTORCHJOB_API_VERSION, PYTORCHJOB_KIND, namespace, name)

    def pods(self, namespace: str, job_name: str) -> list[dict[str, Any]]:
        """The PyTorchJob's pods, as plain dicts with camelCase keys."""
        pods = self._resource("v1", "Pod").get(
            namespace=namespace,
            label_selector=f"{JOB_NAME_LABEL}={job_name}",
            _request_timeout=REQUEST_TIMEOUT,
        )
        return [dict(p) for p in pods.to_dict().get("items", [])]

    def replace_status(self, document: dict[str, Any], status: dict[str, Any]) -> None:
        """Write ``status`` over the FineTuneJob read as ``document``.

        Optimistic concurrency: the write carries the document's resourceVersion, so it fails
        with :class:`WriteConflictError` if the object changed since it was read.
        """
        resource = self._resource(api.API_VERSION, api.KIND)
        meta = document["metadata"]
        try:
            resource.status.replace(
                body={**document, "status": status},
                name=meta["name"],
                namespace=meta["namespace"],
                field_manager=FIELD_MANAGER,
                _request_timeout=REQUEST_TIMEOUT,
            )
        except ConflictError as exc:
            raise WriteConflictError(str(exc)) from None

    def event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """Record a Kubernetes Event about ``obj`` (what ``kubectl describe`` shows)."""
        meta = obj["metadata"]
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
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
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        self._core.create_namespaced_event(
            meta["namespace"],
            body,  # type: ignore[arg-type]  # the client accepts plain dicts
            _request_timeout=REQUEST_TIMEOUT,
        )

    @staticmethod
    def metrics(pod: dict[str, Any], port: int, timeout: float = 3.0) -> str | None:
        """The trainer's /metrics text from ``pod`` (None while it has no IP or does not answer)."""
        ip = pod.get("status", {}).get("podIP")
        if not ip:
            return None
        try:
            with urllib.request.urlopen(f"http://{ip}:{port}/metrics", timeout=timeout) as resp:
                return str(resp.read().decode("utf-8"))
        except (OSError, ValueError):
            return None
