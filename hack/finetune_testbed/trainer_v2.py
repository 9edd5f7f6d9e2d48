"""Kubeflow Trainer v2 and JobSet on the test bed (``up --trainer``): their objects and
configurations (pure functions).

Both run out of cluster like the training-operator and Kueue: built from their Go modules
(``sigs.k8s.io/jobset`` v0.11.1, ``github.com/kubeflow/trainer/v2`` v2.2.0), their CRDs,
ClusterRoles and webhook configurations read from those modules, each as its own ServiceAccount
(a token from the TokenRequest API), its webhooks served for real on loopback (the API server calls
``https://127.0.0.1:<port><path>`` with the test bed's webhook CA). Their own cert management is
off (``certManagement.enable: false`` / ``internalCertManagement.enable: false``): they are handed
the test bed's serving cert for 127.0.0.1 in their cert dir, and the webhook configurations carry
its CA. No leader election, no metrics servers.

A TrainJob makes a JobSet, the JobSet one batch Job per replicated job (the trainer's is named
``node``: Indexed, parallelism = completions = numNodes), the controller-manager's Job
controller the pods, which kwok runs on the GPU nodes through the same Stages as PyTorchJob pods
(hack/kwok/stages.yaml). None of Trainer's bundled ClusterTrainingRuntimes is installed: the
operator's chart ships its own.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from .manifests import Obj

TRAINER_VERSION = "v2.2.0"
TRAINER_MODULE = "github.com/kubeflow/trainer/v2"
TRAINER_NAMESPACE = "kubeflow-system"
TRAINER_SA = "kubeflow-trainer-controller-manager"
TRAINER_ROLE = "kubeflow-trainer-controller-manager"  # the module's ClusterRole, as named there
#: The names Trainer's main.go gives its webhook configurations.
TRAINER_VALIDATING = "validator.trainer.kubeflow.org"
TRAINER_MUTATING = "defaulter.trainer.kubeflow.org"

JOBSET_VERSION = "v0.11.1"
JOBSET_MODULE = "sigs.k8s.io/jobset"
JOBSET_NAMESPACE = "jobset-system"
JOBSET_SA = "jobset-controller-manager"
JOBSET_ROLE = "jobset-manager-role"
JOBSET_VALIDATING = "jobset-validating-webhook-configuration"
JOBSET_MUTATING = "jobset-mutating-webhook-configuration"

#: The trainer's replicated job and container (Trainer's ``constants.Node``), and the label
#: Trainer finds the trainer's replicated job by.
NODE = "node"
ANCESTOR_LABEL = "trainer.kubeflow.org/trainjob-ancestor-step"
# The labels JobSet and the Job controller put on the pods.
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
REPLICATED_JOB_LABEL = "jobset.sigs.k8s.io/replicatedjob-name"
JOB_INDEX_LABEL = "jobset.sigs.k8s.io/job-index"
COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"


def trainer_crd_files(src: Path) -> list[Path]:
    """TrainJob, TrainingRuntime and ClusterTrainingRuntime, as Trainer's module ships them."""
    return sorted((src / "manifests" / "base" / "crds").glob("trainer.kubeflow.org_*.yaml"))


def jobset_crd_files(src: Path) -> list[Path]:
    return sorted((src / "config" / "components" / "crd" / "bases").glob("*.yaml"))


#: A CEL rule of JobSet v0.11's CRD (also embedded in Trainer's runtime CRDs) that older API
#: servers (v1.31) cannot compile: it reads ``metadata.namespace`` of an embedded object template.
_UNCOMPILABLE_MESSAGE = "- message: namespace cannot be set for VolumeClaimPolicies"


def without_uncompilable_rule(crd_text: str) -> str | None:
    """The CRD's YAML without the ``x-kubernetes-validations`` lists that hold only that rule
    (None if it has none)."""
    lines = crd_text.splitlines(keepends=True)
    out: list[str] = []
    dropped = False
    i = 0
    while i < len(lines):
        line = lines[i]
        indent = len(line) - len(line.lstrip(" "))
        following = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if line.strip() == "x-kubernetes-validations:" and following.startswith(
            _UNCOMPILABLE_MESSAGE
        ):
            j = i + 2
            while j < len(lines) and len(lines[j]) - len(lines[j].lstrip(" ")) > indent:
                j += 1
            if j < len(lines) and lines[j].strip().startswith("- "):
                return None  # another rule in the same list: not the shape we know
            dropped = True
            i = j
            continue
        out.append(line)
        i += 1
    return "".join(out) if dropped else None


def crd_name(path: Path) -> str:
    """``trainer.kubeflow.org_trainjobs.yaml`` -> ``trainjobs.trainer.kubeflow.org``."""
    group, plural = path.stem.split("_", 1)
    return f"{plural}.{group}"


def trainer_role_file(src: Path) -> Path:
    return src / "manifests" / "base" / "rbac" / "role.yaml"


def jobset_role_file(src: Path) -> Path:
    return src / "config" / "components" / "rbac" / "role.yaml"


def trainer_webhook_file(src: Path) -> Path:
    return src / "manifests" / "base" / "webhook" / "manifests.yaml"


def jobset_webhook_file(src: Path) -> Path:
    return src / "config" / "components" / "webhook" / "manifests.yaml"


#: JobSet's kustomize patches limit its pod webhooks to the pods of JobSets.
_JOBSET_POD_SELECTOR = {
    "matchExpressions": [{"key": JOBSET_NAME_LABEL, "operator": "Exists"}]
}  # fmt: skip


def webhook_configuration(module_config: Obj, name: str, port: int, ca_pem: bytes) -> Obj:
    """One of a module's webhook configurations, named ``name``, each webhook called at
    ``https://127.0.0.1:<port><its path>`` with our CA; a webhook on pods only sees the pods of
    JobSets (as JobSet's kustomize patches have it)."""
    config: Obj = json.loads(json.dumps(module_config))
    config["metadata"] = {"name": name}
    for hook in config.get("webhooks") or []:
        path = hook["clientConfig"]["service"]["path"]
        hook["clientConfig"] = {
            "url": f"https://127.0.0.1:{port}{path}",
            "caBundle": base64.b64encode(ca_pem).decode(),
        }
        resources = {r for rule in hook.get("rules") or [] for r in rule.get("resources") or []}
        if "pods" in resources:
            hook["objectSelector"] = _JOBSET_POD_SELECTOR
    return config


def access_objects() -> list[Obj]:
    """The two namespaces, ServiceAccounts and ClusterRoleBindings (to the modules' roles)."""
    out: list[Obj] = []
    rbac = "rbac.authorization.k8s.io"
    for ns, sa, role in (
        (JOBSET_NAMESPACE, JOBSET_SA, JOBSET_ROLE),
        (TRAINER_NAMESPACE, TRAINER_SA, TRAINER_ROLE),
    ):
        out += [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": {"name": sa, "namespace": ns},
            },
            {
                "apiVersion": f"{rbac}/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": sa},
                "roleRef": {"apiGroup": rbac, "kind": "ClusterRole", "name": role},
                "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": ns}],
            },
        ]
    return out


def jobset_role(module_role: Obj) -> Obj:
    """JobSet's ``manager-role``, named as its kustomization names it."""
    return {**module_role, "metadata": {"name": JOBSET_ROLE}}


def jobset_configuration(webhook_port: int, probe_port: int, cert_dir: Path) -> str:
    """JobSet's ``--config`` (``config.jobset.x-k8s.io/v1alpha1``; JSON is YAML)."""
    config: dict[str, Any] = {
        "apiVersion": "config.jobset.x-k8s.io/v1alpha1",
        "kind": "Configuration",
        "health": {"healthProbeBindAddress": f"127.0.0.1:{probe_port}"},
        "metrics": {"bindAddress": "0"},
        "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
    }
    return json.dumps(config, indent=2) + "\n"


def trainer_configuration(webhook_port: int, probe_port: int) -> str:
    """Trainer's ``--config`` (``config.trainer.kubeflow.org/v1alpha1``). Its webhook server
    reads the certs from ``$TMPDIR/k8s-webhook-server/serving-certs`` (it has no cert-dir
    setting)."""
    config: dict[str, Any] = {
        "apiVersion": "config.trainer.kubeflow.org/v1alpha1",
        "kind": "Configuration",
        "health": {
            "healthProbeBindAddress": f"127.0.0.1:{probe_port}",
            "readinessEndpointName": "readyz",
            "livenessEndpointName": "healthz",
        },
        "metrics": {"bindAddress": "0", "secureServing": False},
        "webhook": {"host": "127.0.0.1", "port": webhook_port},
        "leaderElection": {"leaderElect": False},
        "certManagement": {"enable": False},
    }
    return json.dumps(config, indent=2) + "\n"


def probe_trainjob(runtime: str = "testbed-webhook-probe-absent") -> Obj:
    """A TrainJob whose ClusterTrainingRuntime does not exist: Trainer's validating webhook
    denies it (`up` dry-runs it to know the webhook is wired)."""
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": {"name": "testbed-webhook-probe", "namespace": "default"},
        "spec": {"runtimeRef": {"name": runtime}},
    }


#: Denied by JobSet's validating webhook (its success policy names a replicated job it does not
#: have): `up` dry-runs it to know JobSet's webhooks are wired.
INVALID_JOBSET: Obj = {
    "apiVersion": "jobset.x-k8s.io/v1alpha2",
    "kind": "JobSet",
    "metadata": {"name": "testbed-webhook-probe", "namespace": "default"},
    "spec": {
        "successPolicy": {"operator": "All", "targetReplicatedJobs": ["absent"]},
        "replicatedJobs": [
            {
                "name": "node",
                "replicas": 1,
                "template": {
                    "spec": {
                        "template": {
                            "spec": {
                                "restartPolicy": "Never",
                                "containers": [{"name": "node", "image": "busybox"}],
                            }
                        }
                    }
                },
            }
        ],
    },
}


def cluster_training_runtime(name: str, image: str = "busybox", gpus: int = 8) -> Obj:
    """A small torch ClusterTrainingRuntime (tests make their own; none is installed): one
    replicated job ``node`` (Trainer's ancestor label ``trainer``), container ``node``."""
    resources = {"limits": {"nvidia.com/gpu": str(gpus)}} if gpus else {}
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "ClusterTrainingRuntime",
        "metadata": {"name": name, "labels": {"trainer.kubeflow.org/framework": "torch"}},
        "spec": {
            "mlPolicy": {"numNodes": 1, "torch": {}},
            "template": {
                "spec": {
                    "replicatedJobs": [
                        {
                            "name": NODE,
                            "template": {
                                "metadata": {"labels": {ANCESTOR_LABEL: "trainer"}},
                                "spec": {
                                    "template": {
                                        "spec": {
                                            "restartPolicy": "Never",
                                            "tolerations": [
                                                {"key": "nvidia.com/gpu", "operator": "Exists"}
                                            ],
                                            "containers": [
                                                {
                                                    "name": NODE,
                                                    "image": image,
                                                    "resources": resources,
                                                }
                                            ],
                                        }
                                    }
                                },
                            },
                        }
                    ]
                }
            },
        },
    }
