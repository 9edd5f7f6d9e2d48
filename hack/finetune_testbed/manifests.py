"""The objects ``up`` creates in the cluster, and kwok's configuration (pure functions)."""

from __future__ import annotations

import base64
import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .settings import HACK

Obj = dict[str, Any]

WEBHOOK_CONFIG_NAME = "validator.training-operator.kubeflow.org"
WEBHOOK_SECRET_NAME = "training-operator-webhook-cert"
PYTORCHJOB_CRD = "pytorchjobs.kubeflow.org"
GPU_ZONES = ("testbed-a", "testbed-b")

#: What `kubectl logs` of any training container prints on this test bed (kwok serves the file).
TRAINER_LOG_LINES = (
    "[testbed] the trainer log of a kwok pod (kwok runs no containers)",
    "step 1/2 (50%) loss 10.4206 lr 0.00e+00 464 tok/s eta 0:00:01",
    "step 2/2 (100%) loss 10.3129 lr 1.50e-03 1,796 tok/s eta 0:00:00",
)

#: Denied by the training-operator's webhook (its container is not named `pytorch`): `up` uses a
#: server-side dry run of it to know the webhook is wired.
INVALID_PYTORCHJOB: Obj = {
    "apiVersion": "kubeflow.org/v1",
    "kind": "PyTorchJob",
    "metadata": {"name": "testbed-webhook-probe", "namespace": "default"},
    "spec": {
        "pytorchReplicaSpecs": {
            "Master": {
                "replicas": 1,
                "restartPolicy": "Never",
                "template": {"spec": {"containers": [{"name": "not-pytorch", "image": "busybox"}]}},
            }
        }
    },
}


def pytorchjob_crd(training_operator_src: Path) -> Path:
    """The PyTorchJob CRD as the training-operator module ships it."""
    return training_operator_src / "manifests/base/crds/kubeflow.org_pytorchjobs.yaml"


def training_operator_role(training_operator_src: Path) -> Path:
    """The training-operator's ClusterRole as its module ships it."""
    return training_operator_src / "manifests/base/rbac/role.yaml"


def as_list(objs: list[Obj]) -> str:
    """One JSON ``List`` document for ``kubectl apply -f``."""
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": objs})


def training_operator_objects(pki: Path, webhook_port: int) -> list[Obj]:
    """Its namespace, ServiceAccount and ClusterRoleBinding, its webhook's cert Secret (which its
    cert rotator adopts) and the ValidatingWebhookConfiguration that points at loopback."""

    def b64(name: str) -> str:
        return base64.b64encode((pki / name).read_bytes()).decode()

    sa = {"kind": "ServiceAccount", "name": "training-operator", "namespace": "kubeflow"}
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kubeflow"}},
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "training-operator", "namespace": "kubeflow"},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "training-operator"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "training-operator",
            },
            "subjects": [sa],
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {"name": WEBHOOK_SECRET_NAME, "namespace": "kubeflow"},
            "data": {
                "ca.crt": b64("webhook-ca.crt"),
                "ca.key": b64("webhook-ca.key"),
                "tls.crt": b64("webhook.crt"),
                "tls.key": b64("webhook.key"),
            },
        },
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingWebhookConfiguration",
            "metadata": {
                "name": WEBHOOK_CONFIG_NAME,
                "labels": {"control-plane": "kubeflow-training-operator"},
            },
            "webhooks": [
                {
                    "name": "validator.pytorchjob.training-operator.kubeflow.org",
                    "admissionReviewVersions": ["v1"],
                    "clientConfig": {
                        "url": (
                            f"https://127.0.0.1:{webhook_port}/validate-kubeflow-org-v1-pytorchjob"
                        ),
                        "caBundle": b64("webhook-ca.crt"),
                    },
                    "failurePolicy": "Fail",
                    "sideEffects": "None",
                    "timeoutSeconds": 10,
                    "rules": [
                        {
                            "apiGroups": ["kubeflow.org"],
                            "apiVersions": ["v1"],
                            "operations": ["CREATE", "UPDATE"],
                            "resources": ["pytorchjobs"],
                        }
                    ],
                }
            ],
        },
    ]


@dataclass(frozen=True)
class GpuPool:
    """What NVIDIA GPU feature discovery says about the nodes of one GPU type."""

    product: str  # nvidia.com/gpu.product
    family: str  # nvidia.com/gpu.family
    memory_mib: int  # nvidia.com/gpu.memory
    instance_type: str  # node.kubernetes.io/instance-type


H100 = GpuPool("NVIDIA-H100-80GB-HBM3", "hopper", 81559, "gpu-8x-h100-80gb")
A100 = GpuPool("NVIDIA-A100-SXM4-40GB", "ampere", 40960, "gpu-8x-a100-40gb")


def nodes(gpu_nodes: int, a100_nodes: int = 0, pod_network: str = "") -> list[Obj]:
    """``kwok-gpu-<i>`` (8 H100-80GB each), ``kwok-a100-<i>`` (8 A100-40GB each), zones
    alternating, and one ``kwok-cpu-0``; with ``pod_network``, each node's pod CIDR is the
    next /24 of it (kwok gives a pod the next free address of its node's pod CIDR)."""
    out = [gpu_node(f"kwok-gpu-{i}", GPU_ZONES[i % 2]) for i in range(gpu_nodes)]
    out += [gpu_node(f"kwok-a100-{i}", GPU_ZONES[i % 2], A100) for i in range(a100_nodes)]
    out.append(cpu_node("kwok-cpu-0"))
    if pod_network:
        for i, node in enumerate(out):
            cidr = node_pod_cidr(pod_network, i)
            node["spec"] = {**node["spec"], "podCIDR": cidr, "podCIDRs": [cidr]}
    return out


def pod_network(second_octet: int) -> str:
    """A pod network of the test bed: ``127.<second_octet>.0.0/16``. Every address of
    127.0.0.0/8 is this machine's own (Linux routes the whole /8 to ``lo``), so a fake pod's IP
    can be bound and reached here without root or any network set-up. The API server takes
    loopback pod IPs (it checks only that they are IPs); EndpointSlices and Endpoints refuse
    them, so the controller-manager warns (``FailedToUpdateEndpointSlices``) about the Services
    of such pods: nothing on the test bed uses those."""
    if not 1 <= second_octet <= 254:
        raise ValueError(
            f"second octet {second_octet} is not 1-254 (127.0.x.x is the control plane's)"
        )
    return f"127.{second_octet}.0.0/16"


def node_pod_cidr(network: str, index: int) -> str:
    """The ``index``-th node's /24 of the /16 ``network`` (from the second /24 on)."""
    net = ipaddress.ip_network(network)
    subnets = list(net.subnets(new_prefix=24))
    return str(subnets[index + 1])


def gpu_node(name: str, zone: str, pool: GpuPool = H100) -> Obj:
    """A node as the NVIDIA GPU operator labels one of a real 8-GPU pool, tainted for GPU pods."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                "finetune.dev/testbed": "true",
                "node.kubernetes.io/instance-type": pool.instance_type,
                "topology.kubernetes.io/region": "testbed",
                "topology.kubernetes.io/zone": zone,
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": pool.product,
                "nvidia.com/gpu.family": pool.family,
                "nvidia.com/gpu.count": "8",
                "nvidia.com/gpu.memory": str(pool.memory_mib),
                "nvidia.com/gpu.machine": "testbed-gpu-node",
                "nvidia.com/cuda.driver.major": "550",
                "nvidia.com/cuda.runtime.major": "12",
                "nvidia.com/mig.capable": "true",
            },
        },
        "spec": {"taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]},
        "status": {
            "allocatable": {
                "cpu": "188",
                "memory": "1980Gi",
                "ephemeral-storage": "7Ti",
                "pods": "110",
                "nvidia.com/gpu": "8",
            },
            "capacity": {
                "cpu": "192",
                "memory": "2048Gi",
                "ephemeral-storage": "7Ti",
                "pods": "110",
                "nvidia.com/gpu": "8",
            },
        },
    }


def cpu_node(name: str) -> Obj:
    """A 16-CPU node without GPUs (and without the GPU taint)."""
    n = gpu_node(name, GPU_ZONES[0])
    labels = {k: v for k, v in n["metadata"]["labels"].items() if not k.startswith("nvidia.com/")}
    labels["node.kubernetes.io/instance-type"] = "cpu-16x"
    n["metadata"]["labels"] = labels
    n["spec"] = {}
    n["status"] = {
        "allocatable": {"cpu": "16", "memory": "62Gi", "ephemeral-storage": "500Gi", "pods": "110"},
        "capacity": {"cpu": "16", "memory": "64Gi", "ephemeral-storage": "500Gi", "pods": "110"},
    }
    return n


def kwok_config(pod_run_seconds: float, trainer_log: Path, images: tuple[str, ...]) -> str:
    """kwok's ``--config``: our pod Stages (hack/kwok/stages.yaml, the default run time and the
    registry's repositories ``images`` filled in) and a ClusterLogs that serves ``trainer_log``
    as every ``pytorch`` (PyTorchJob) and ``node`` (TrainJob) container's log."""
    run_ms = int(pod_run_seconds * 1000)
    text = (HACK / "kwok" / "stages.yaml").read_text()
    text = text.replace("__DEFAULT_RUN_MS__", str(run_ms)).replace("__DEFAULT_RUN__", f"{run_ms}ms")
    text = text.replace("__KNOWN_IMAGES_JQ__", json.dumps(list(images)))
    text = text.replace("__KNOWN_IMAGES_TPL__", "(list " + " ".join(f'"{i}"' for i in images) + ")")
    logs = {
        "apiVersion": "kwok.x-k8s.io/v1alpha1",
        "kind": "ClusterLogs",
        "metadata": {"name": "trainer-logs"},
        "spec": {
            "selector": {},
            "logs": [{"containers": ["pytorch", "node"], "logsFile": str(trainer_log)}],
        },
    }
    return text + "\n---\n" + json.dumps(logs) + "\n"


def trainer_log() -> str:
    """TRAINER_LOG_LINES in the CRI log format kwok reads: ``<RFC 3339 time> <stream> F <line>``."""
    return "".join(
        f"2026-01-01T00:00:{i:02d}.000000000Z stdout F {line}\n"
        for i, line in enumerate(TRAINER_LOG_LINES)
    )
