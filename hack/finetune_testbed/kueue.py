"""Kueue on the test bed (``up --kueue``): its objects and configuration (pure functions).

Kueue v0.17.0 runs out of cluster like the training-operator: built from its Go module, its CRDs,
ClusterRole and webhook configurations read from that module's ``config/components``, its
webhooks served for real on loopback (the API server calls ``https://127.0.0.1:<port>``, with a
CA of ours that Kueue's cert rotator adopts), as the ServiceAccount
``kueue-system/kueue-controller-manager`` (a token from the TokenRequest API, so RBAC sees Kueue
as itself). On top of it, the queues the tests use: a ResourceFlavor for the H100 nodes, the
ClusterQueue ``gpus`` and two WorkloadPriorityClasses; LocalQueues are made per namespace
(``local_queue``).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from .manifests import H100, Obj

VERSION = "v0.17.0"
MODULE = "sigs.k8s.io/kueue"
NAMESPACE = "kueue-system"
SERVICE_ACCOUNT = "kueue-controller-manager"
#: The Secret Kueue's cert rotator keeps (it adopts ours: CA for ``kueue-ca``, serving cert for
#: the webhook Service's DNS name, to which we add 127.0.0.1).
WEBHOOK_SECRET = "kueue-webhook-server-cert"
WEBHOOK_SERVICE = "kueue-webhook-service"
WEBHOOK_DNS = f"{WEBHOOK_SERVICE}.{NAMESPACE}.svc"
CA_NAME = "kueue-ca"
MUTATING = "kueue-mutating-webhook-configuration"
VALIDATING = "kueue-validating-webhook-configuration"
CLUSTER_ROLE = "kueue-manager-role"
#: Kueue's integrations we enable. v0.17 knows ``trainer.kubeflow.org/trainjob`` too (Kubeflow
#: Trainer v2); Kueue sets its controller up once the TrainJob CRD is served.
FRAMEWORKS = ("kubeflow.org/pytorchjob", "trainer.kubeflow.org/trainjob")
#: The resources whose webhooks we install: Kueue's own and those of the enabled integrations.
#: (Kueue's module lists webhooks for every integration, pods and Deployments included; calling
#: those for frameworks that are off would only put Kueue in the path of every pod.)
WEBHOOK_RESOURCES = frozenset(
    {"clusterqueues", "cohorts", "resourceflavors", "workloads", "pytorchjobs", "trainjobs"}
)
#: CRDs that Kueue serves in two versions, converted by its webhook (``/convert``).
CONVERTED_CRDS = ("localqueues", "clusterqueues", "workloads", "cohorts", "multikueueclusters")

# The queues of the test bed.
CLUSTER_QUEUE = "gpus"
FLAVOR = "h100-80gb"
GPU_QUOTA = 16  # the two H100 nodes
LOW, HIGH = "low", "high"  # WorkloadPriorityClasses
PRIORITIES = {LOW: 100, HIGH: 1000}
#: waitForPodsReady: short for tests (Kueue's defaults are 5 min and a 60 s backoff base).
PODS_READY_TIMEOUT_SECONDS = 20
REQUEUE_BACKOFF_BASE_SECONDS = 2
REQUEUE_BACKOFF_MAX_SECONDS = 10


def crd_files(src: Path) -> list[Path]:
    """Kueue's CRDs as its module ships them (``config/components/crd/bases``)."""
    return sorted((src / "config" / "components" / "crd" / "bases").glob("*.yaml"))


def crd_name(path: Path) -> str:
    """``kueue.x-k8s.io_workloads.yaml`` -> ``workloads.kueue.x-k8s.io``."""
    group, plural = path.stem.split("_", 1)
    return f"{plural}.{group}"


def cluster_role_file(src: Path) -> Path:
    return src / "config" / "components" / "rbac" / "role.yaml"


def webhook_file(src: Path) -> Path:
    return src / "config" / "components" / "webhook" / "manifests.yaml"


def yaml_documents(text: str) -> list[str]:
    """The non-empty documents of a multi-document YAML file."""
    docs = []
    for doc in ("\n" + text).split("\n---"):
        body = "\n".join(line for line in doc.splitlines() if not line.startswith("#"))
        if body.strip():
            docs.append(doc.lstrip("\n"))
    return docs


def conversion_patch(webhook_port: int, ca_pem: bytes) -> Obj:
    """A merge patch for a CRD of CONVERTED_CRDS: Kueue's conversion webhook on loopback (the
    module's ``crd/patches/webhook_in_*.yaml``, with a URL instead of a Service)."""
    return {
        "spec": {
            "conversion": {
                "strategy": "Webhook",
                "webhook": {
                    "clientConfig": {
                        "url": f"https://127.0.0.1:{webhook_port}/convert",
                        "caBundle": base64.b64encode(ca_pem).decode(),
                    },
                    "conversionReviewVersions": ["v1"],
                },
            }
        }
    }


def cluster_role(module_role: Obj) -> Obj:
    """The module's ``manager-role``, named as Kueue's kustomization names it."""
    return {**module_role, "metadata": {"name": CLUSTER_ROLE}}


def webhook_configuration(module_config: Obj, webhook_port: int, ca_pem: bytes) -> Obj:
    """One of the module's two webhook configurations: only the webhooks of WEBHOOK_RESOURCES,
    each called at ``https://127.0.0.1:<port><its path>`` with our CA, named with ``kueue-``."""
    config: Obj = json.loads(json.dumps(module_config))
    name = config["metadata"]["name"]
    config["metadata"] = {"name": f"kueue-{name}"}
    kept = []
    for hook in config.get("webhooks") or []:
        resources = {r for rule in hook.get("rules") or [] for r in rule.get("resources") or []}
        if not resources & WEBHOOK_RESOURCES:
            continue
        path = hook["clientConfig"]["service"]["path"]
        hook["clientConfig"] = {
            "url": f"https://127.0.0.1:{webhook_port}{path}",
            "caBundle": base64.b64encode(ca_pem).decode(),
        }
        kept.append(hook)
    config["webhooks"] = kept
    return config


def access_objects(pki: Path) -> list[Obj]:
    """Namespace, ServiceAccount, its ClusterRoleBinding (to CLUSTER_ROLE), the Secret of the
    webhook certs and a Role to read and update it (the module's ``manager-secrets-role``)."""

    def b64(name: str) -> str:
        return base64.b64encode((pki / name).read_bytes()).decode()

    sa = {"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": NAMESPACE}
    meta = {"namespace": NAMESPACE}
    rbac = "rbac.authorization.k8s.io"
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": SERVICE_ACCOUNT, **meta},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "kueue-manager-rolebinding"},
            "roleRef": {"apiGroup": rbac, "kind": "ClusterRole", "name": CLUSTER_ROLE},
            "subjects": [sa],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "kueue-manager-secrets-role", **meta},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["secrets"],
                    "verbs": ["get", "list", "update", "watch"],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "kueue-manager-secrets-rolebinding", **meta},
            "roleRef": {"apiGroup": rbac, "kind": "Role", "name": "kueue-manager-secrets-role"},
            "subjects": [sa],
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {"name": WEBHOOK_SECRET, **meta},
            "data": {
                "ca.crt": b64("kueue-ca.crt"),
                "ca.key": b64("kueue-ca.key"),
                "tls.crt": b64("kueue-webhook.crt"),
                "tls.key": b64("kueue-webhook.key"),
            },
        },
    ]  # fmt: skip


def token_request(seconds: int = 365 * 24 * 3600) -> Obj:
    return {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {"expirationSeconds": seconds},
    }


def configuration(webhook_port: int, probe_port: int, cert_dir: Path) -> str:
    """Kueue's ``--config`` (``config.kueue.x-k8s.io/v1beta2``; JSON is YAML).

    Only the jobs labelled with a queue are Kueue's (``manageJobsWithoutQueueName: false``);
    ``waitForPodsReady`` evicts a job whose pods are not all ready in
    PODS_READY_TIMEOUT_SECONDS and requeues it after a short backoff; the webhook server and the
    health probes on loopback; no metrics server, no visibility API server, no leader election.
    """
    config: dict[str, Any] = {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": NAMESPACE,
        "manageJobsWithoutQueueName": False,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{probe_port}"},
        "metrics": {"bindAddress": "0"},
        "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {
            "enable": True,
            "webhookServiceName": WEBHOOK_SERVICE,
            "webhookSecretName": WEBHOOK_SECRET,
        },
        "waitForPodsReady": {
            "timeout": f"{PODS_READY_TIMEOUT_SECONDS}s",
            "recoveryTimeout": f"{PODS_READY_TIMEOUT_SECONDS}s",
            "blockAdmission": False,
            "requeuingStrategy": {
                "timestamp": "Eviction",
                "backoffBaseSeconds": REQUEUE_BACKOFF_BASE_SECONDS,
                "backoffMaxSeconds": REQUEUE_BACKOFF_MAX_SECONDS,
            },
        },
        "integrations": {"frameworks": list(FRAMEWORKS)},
        "featureGates": {"VisibilityOnDemand": False},
    }
    return json.dumps(config, indent=2) + "\n"


def queue_objects() -> list[Obj]:
    """ResourceFlavor FLAVOR (the H100 nodes: their product label and GPU taint), ClusterQueue
    CLUSTER_QUEUE (GPU_QUOTA GPUs, the nodes' CPUs and memory; a job of higher priority preempts
    lower ones), WorkloadPriorityClasses LOW and HIGH."""
    kueue = "kueue.x-k8s.io/v1beta2"
    flavor = {
        "apiVersion": kueue,
        "kind": "ResourceFlavor",
        "metadata": {"name": FLAVOR},
        "spec": {
            "nodeLabels": {"nvidia.com/gpu.product": H100.product},
            "nodeTaints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}],
        },
    }
    quota = [
        {"name": "cpu", "nominalQuota": "376"},
        {"name": "memory", "nominalQuota": "3960Gi"},
        {"name": "nvidia.com/gpu", "nominalQuota": GPU_QUOTA},
    ]
    queue = {
        "apiVersion": kueue,
        "kind": "ClusterQueue",
        "metadata": {"name": CLUSTER_QUEUE},
        "spec": {
            "namespaceSelector": {},
            "queueingStrategy": "BestEffortFIFO",
            "preemption": {"withinClusterQueue": "LowerPriority"},
            "resourceGroups": [
                {
                    "coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
                    "flavors": [{"name": FLAVOR, "resources": quota}],
                }
            ],
        },
    }
    priorities = [
        {
            "apiVersion": kueue,
            "kind": "WorkloadPriorityClass",
            "metadata": {"name": name},
            "value": value,
            "description": f"{name} priority (test bed)",
        }
        for name, value in PRIORITIES.items()
    ]
    return [flavor, queue, *priorities]


def local_queue(namespace: str, name: str = "default", cluster_queue: str = CLUSTER_QUEUE) -> Obj:
    """A LocalQueue of ``namespace`` feeding ``cluster_queue``."""
    return {
        "apiVersion": "kueue.x-k8s.io/v1beta2",
        "kind": "LocalQueue",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"clusterQueue": cluster_queue},
    }


#: Denied by Kueue's ClusterQueue webhook (a negative quota): `up` dry-runs it to know the
#: webhook is wired.
INVALID_CLUSTER_QUEUE: Obj = {
    "apiVersion": "kueue.x-k8s.io/v1beta2",
    "kind": "ClusterQueue",
    "metadata": {"name": "testbed-webhook-probe"},
    "spec": {
        "resourceGroups": [
            {
                "coveredResources": ["cpu"],
                "flavors": [{"name": "x", "resources": [{"name": "cpu", "nominalQuota": "-1"}]}],
            }
        ]
    },
}
