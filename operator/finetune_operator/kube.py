"""The only module that talks to the Kubernetes API.

Server-side apply under one field manager for children, merge patches for status, reads of the
PyTorchJob and its pods, and the master pod's metrics endpoint.
"""

from __future__ import annotations

import urllib.request
from typing import Any

from kubernetes import client, config
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import NotFoundError

from finetune_operator import api
from finetune_operator.manifest import PYTORCHJOB_API_VERSION, PYTORCHJOB_KIND

FIELD_MANAGER = "finetune-operator"
JOB_NAME_LABEL = "training.kubeflow.org/job-name"
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
#: Seconds a single API request may take before it is abandoned and retried by the handler.
REQUEST_TIMEOUT = 30


def load_config() -> None:
    """In-cluster credentials when running in a pod, else the kubeconfig (KUBECONFIG)."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


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

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Replace the FineTuneJob's status with ``status`` (a JSON merge patch of .status)."""
        resource = self._resource(api.API_VERSION, api.KIND)
        current = resource.get(name=name, namespace=namespace).to_dict().get("status") or {}
        removed = {k: None for k in current if k not in status}
        resource.status.patch(
            body={"status": {**removed, **status}},
            name=name,
            namespace=namespace,
            content_type="application/merge-patch+json",
            field_manager=FIELD_MANAGER,
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
