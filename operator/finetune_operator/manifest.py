"""Desired child objects of a FineTuneJob: the trainer ConfigMap and the Kubeflow PyTorchJob.

Pure builders: a typed job and its trainer config in, plain dicts out, ready for server-side
apply. Nothing here reads the cluster. Pure: no Kubernetes client, kopf or torch.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Any

from finetune_operator import api
from finetune_operator.queueing import QUEUE_LABEL, priority_labels
from finetune_operator.sources import claims, parse_source, pvc_mount_path
from finetune_trainer import names
from finetune_trainer.config import TrainerConfig
from finetune_trainer.planner import get_gpu

PYTORCHJOB_API_VERSION = "kubeflow.org/v1"
PYTORCHJOB_KIND = "PyTorchJob"
CONTAINER = names.CONTAINER
CONFIG_DIR = "/etc/finetune"
CONFIG_FILE = "config.json"
CACHE_DIR = "/cache"
#: Writable places of a staged trainer pod (its /cache is read-only): the datasets library's
#: cache (tokenized splits) and transformers' modules, on the pod's own /tmp.
DATASETS_CACHE = "/tmp/datasets"
MODULES_CACHE = "/tmp/hf-modules"
#: Where the model goes inside the pod when the job names no output storage (lost with the pod).
POD_OUTPUT_DIR = "/tmp/output"
METRICS_PORT = names.METRICS_PORT
#: The numeric user of the trainer image (Dockerfile).
TRAINER_UID = 1000
JOB_LABEL = names.JOB_LABEL
MANAGED_BY = "finetune-operator"
PLAN_ANNOTATION = f"{api.GROUP}/plan"
GPU_RESOURCE = "nvidia.com/gpu"
#: Node labels of NVIDIA GPU feature discovery (GFD): the product name and the GPUs per node.
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_COUNT_LABEL = "nvidia.com/gpu.count"


def config_map_name(job_name: str) -> str:
    return f"{job_name}-trainer"


def labels(job: api.FineTuneJob) -> dict[str, str]:
    """Labels on every child, so the operator and users can find them."""
    return {
        JOB_LABEL: job.name,
        "app.kubernetes.io/name": "finetune-trainer",
        "app.kubernetes.io/instance": job.name,
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }


def owner_reference(job: api.FineTuneJob) -> dict[str, Any]:
    """Makes the FineTuneJob the controller of a child: deleting it deletes the child."""
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "name": job.name,
        "uid": job.metadata.uid or "",
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(job: api.FineTuneJob, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": job.metadata.namespace,
        "labels": labels(job),
        "ownerReferences": [owner_reference(job)],
    }


def config_map(job: api.FineTuneJob, config: TrainerConfig) -> dict[str, Any]:
    """The ConfigMap that carries the trainer config into every pod."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(job, config_map_name(job.name)),
        "data": {CONFIG_FILE: config.to_json()},
    }


def _env(job: api.FineTuneJob, cache: str | None) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": names.ENV_JOB_NAME, "value": job.name},
        {"name": names.ENV_JOB_NAMESPACE, "value": job.metadata.namespace or ""},
        {"name": names.ENV_LOG_FORMAT, "value": "plain"},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if cache is not None:  # staged: load from the read-only cache, never from the network
        env += [
            {"name": "HF_HUB_OFFLINE", "value": "1"},
            {"name": "HF_DATASETS_OFFLINE", "value": "1"},
            {"name": "HF_DATASETS_CACHE", "value": DATASETS_CACHE},
            {"name": "HF_MODULES_CACHE", "value": MODULES_CACHE},
        ]
        return env  # staging did the download: the Hub token stays out of the trainer pods
    ref = job.spec.model.token_secret_ref
    if ref is not None:
        env.append(
            {
                "name": names.ENV_HF_TOKEN,
                "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}},
            }
        )
    return env


def _read_only_claims(job: api.FineTuneJob) -> set[str]:
    """Claims the job only reads (model, dataset) are mounted read-only."""
    spec = job.spec
    written = {
        parse_source(uri).claim
        for uri in (spec.checkpoint.storage, spec.output.storage if spec.output else None)
        if uri
    }
    return set(claims(spec)) - written


def _volumes(
    job: api.FineTuneJob, cache: str | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    cache_volume: dict[str, Any] = {"name": "cache", "emptyDir": {}}
    cache_mount: dict[str, Any] = {"name": "cache", "mountPath": CACHE_DIR}
    if cache is not None:  # the staged cache, read-only: staging alone writes it
        cache_volume = {
            "name": "cache",
            "persistentVolumeClaim": {"claimName": cache, "readOnly": True},
        }
        cache_mount = {**cache_mount, "readOnly": True}
    volumes: list[dict[str, Any]] = [
        {"name": "trainer-config", "configMap": {"name": config_map_name(job.name)}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        cache_volume,
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "trainer-config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        cache_mount,
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    # readOnly only where true: the API's typed clients drop a false one (omitempty), and a
    # controller that updates the child from its typed copy (Kueue unsuspending a TrainJob) then
    # changes a field it never meant to, which the TrainJob's immutability rule refuses.
    read_only = _read_only_claims(job)
    for i, claim in enumerate(c for c in claims(job.spec) if c != cache):
        volume = f"pvc-{i}"
        flag = {"readOnly": True} if claim in read_only else {}
        volumes.append({"name": volume, "persistentVolumeClaim": {"claimName": claim, **flag}})
        mounts.append({"name": volume, "mountPath": pvc_mount_path(claim), **flag})
    return volumes, mounts


_BINARY = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}


def canonical_quantity(text: str) -> str:
    """A resource quantity (spec.QUANTITY_PATTERN) in Kubernetes' canonical form, as the API
    writes it back ("1000m" -> "1", "2000" -> "2k", "1.5Gi" -> "1536Mi"): a controller that
    updates the child (Kueue) stores that form, and an apply of another spelling would change
    the child's spec back and forth."""
    found = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([A-Za-z]*)", text)
    if found is None:
        return text
    number, suffix = found.groups()
    if suffix in _BINARY:
        value = Fraction(number) * 1024 ** _BINARY[suffix]
        if value >= 1024 and value.denominator == 1:
            whole, power = int(value), 0
            while power < 6 and whole % 1024 == 0:
                whole, power = whole // 1024, power + 1
            return f"{whole}{['', 'Ki', 'Mi', 'Gi', 'Ti', 'Pi', 'Ei'][power]}"
    elif suffix in _DECIMAL:
        value = Fraction(number) * Fraction(10) ** _DECIMAL[suffix]
    else:
        return text
    nanos = math.ceil(value * 10**9)  # Kubernetes rounds up to the nano
    if nanos == 0:
        return "0"
    exponent = -9
    while exponent < 18 and nanos % 1000 == 0:
        nanos, exponent = nanos // 1000, exponent + 3
    unit = next(k for k, v in _DECIMAL.items() if v == exponent)
    return f"{nanos}{unit}"


def _resources(job: api.FineTuneJob) -> dict[str, Any]:
    res = job.spec.resources
    limits: dict[str, Any] = {}
    requests: dict[str, Any] = {}
    if res.gpu_type != "CPU":
        limits[GPU_RESOURCE] = canonical_quantity(str(res.gpus_per_node))
    for key, value in (("cpu", res.cpu), ("memory", res.memory)):
        if value is not None:
            limits[key] = canonical_quantity(value)
            requests[key] = canonical_quantity(value)
    out: dict[str, Any] = {"limits": limits}
    if requests:
        out["requests"] = requests
    return out


def _tolerations(job: api.FineTuneJob) -> list[dict[str, Any]]:
    given = [
        t.model_dump(by_alias=True, exclude_none=True) for t in job.spec.resources.tolerations or []
    ]
    if job.spec.resources.gpu_type != "CPU" and not any(
        t.get("key") == GPU_RESOURCE for t in given
    ):
        # GPU pools are tainted nvidia.com/gpu:NoSchedule; tolerating permits, never attracts.
        given.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    return given


def gpu_node_products(gpu_type: str) -> tuple[str, ...]:
    """The ``nvidia.com/gpu.product`` values of nodes with ``gpu_type`` GPUs (none for CPU)."""
    return () if gpu_type == "CPU" else get_gpu(gpu_type).node_products


def _affinity(job: api.FineTuneJob) -> dict[str, Any] | None:
    """Node affinity to the GPU type and count the job was planned for: the pods only go to nodes
    that GFD labels with one of that GPU's product names and at least ``gpusPerNode`` GPUs."""
    res = job.spec.resources
    if res.gpu_type is None:  # the controller infers it from the nodes before building pods
        raise ValueError(
            f"FineTuneJob {job.name}: spec.resources.gpuType must be resolved (inferred from the "
            "nodes) before its pods are built"
        )
    products = gpu_node_products(res.gpu_type)
    if not products:
        return None
    term = {
        "matchExpressions": [
            {"key": GPU_PRODUCT_LABEL, "operator": "In", "values": list(products)},
            {"key": GPU_COUNT_LABEL, "operator": "Gt", "values": [str(res.gpus_per_node - 1)]},
        ]
    }
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}
        }
    }


def pod_template(
    job: api.FineTuneJob, image: str, metrics_port: int = METRICS_PORT, cache: str | None = None
) -> dict[str, Any]:
    """The pod template shared by the master and the workers; ``cache`` is the claim staging
    filled (None: the job was not staged, and the pods get an empty cache of their own)."""
    volumes, mounts = _volumes(job, cache)
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": job.spec.image or image,
        "imagePullPolicy": "IfNotPresent",
        # torchrun reads PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR and
        # PET_MASTER_PORT, which training-operator injects.
        "command": ["torchrun", "-m", names.ENTRY_POINT],
        "args": ["--config", f"{CONFIG_DIR}/{CONFIG_FILE}"],
        "env": _env(job, cache),
        "ports": [{"name": "metrics", "containerPort": metrics_port, "protocol": "TCP"}],
        "resources": _resources(job),
        "volumeMounts": mounts,
        # The trainer writes its failure's cause to /dev/termination-log (one JSON line, read
        # back by status.py); a crash that wrote none leaves the log's tail there instead.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
        },
    }
    spec: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "tolerations": _tolerations(job),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": TRAINER_UID,
            "runAsGroup": TRAINER_UID,
            "fsGroup": TRAINER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "enableServiceLinks": False,
    }
    affinity = _affinity(job)
    if affinity is not None:
        spec["affinity"] = affinity
    if job.spec.resources.node_selector:
        spec["nodeSelector"] = dict(job.spec.resources.node_selector)
    if job.spec.scheduling and job.spec.scheduling.priority_class_name:
        spec["priorityClassName"] = job.spec.scheduling.priority_class_name
    extra = job.spec.pod_metadata
    pod_labels = {**((extra.labels or {}) if extra else {}), **labels(job)}
    annotations = {**((extra.annotations or {}) if extra else {})}
    annotations["kubectl.kubernetes.io/default-container"] = CONTAINER
    return {"metadata": {"labels": pod_labels, "annotations": annotations}, "spec": spec}


def _run_policy(job: api.FineTuneJob, suspend: bool | None) -> dict[str, Any]:
    rp = job.spec.run_policy
    policy: dict[str, Any] = {"cleanPodPolicy": "None", "backoffLimit": rp.backoff_limit}
    if suspend is not None:
        policy["suspend"] = suspend
    if rp.active_deadline_seconds is not None:
        policy["activeDeadlineSeconds"] = rp.active_deadline_seconds
    if rp.ttl_seconds_after_finished is not None:
        policy["ttlSecondsAfterFinished"] = rp.ttl_seconds_after_finished
    scheduling = job.spec.scheduling
    if scheduling and scheduling.gang_scheduling:
        sp: dict[str, Any] = {"minAvailable": job.spec.resources.num_nodes}
        if scheduling.priority_class_name:
            sp["priorityClass"] = scheduling.priority_class_name
        policy["schedulingPolicy"] = sp
    return policy


def queued(job: api.FineTuneJob) -> bool:
    """Whether the spec names a Kueue LocalQueue (Kueue may also queue a job that names none:
    one in a namespace with a LocalQueue named ``default``)."""
    return bool(job.spec.scheduling and job.spec.scheduling.queue_name)


def pytorch_job(
    job: api.FineTuneJob,
    *,
    image: str,
    plan_summary: str | None,
    exists: bool,
    kueue: bool = False,
    metrics_port: int = METRICS_PORT,
    cache: str | None = None,
) -> dict[str, Any]:
    """The PyTorchJob that runs the trainer: a master and numNodes-1 workers.

    Suspension: a job Kueue admits (its spec names a queue, or ``kueue``: the PyTorchJob that
    ``exists`` carries Kueue's queue label) is created suspended and its runPolicy.suspend is
    then left to Kueue, never applied again (a user's suspend deactivates its Workload
    instead). Any other job carries ``suspend: true`` while its spec asks for it and no
    ``suspend`` at all otherwise, so a suspension Kueue sets is never undone by an apply.
    ``cache`` is the claim staging filled, which the pods mount read-only (None: not staged).
    """
    suspend: bool | None = True if job.spec.run_policy.suspend else None
    if queued(job) or kueue:
        suspend = None if exists else True
    replicas: dict[str, Any] = {
        "Master": {
            "replicas": 1,
            "restartPolicy": "OnFailure",
            "template": pod_template(job, image, metrics_port, cache),
        }
    }
    if job.spec.resources.num_nodes > 1:
        replicas["Worker"] = {
            "replicas": job.spec.resources.num_nodes - 1,
            "restartPolicy": "OnFailure",
            "template": pod_template(job, image, metrics_port, cache),
        }
    meta = metadata(job, job.name)
    scheduling = job.spec.scheduling
    if scheduling is not None and scheduling.queue_name:
        meta["labels"][QUEUE_LABEL] = scheduling.queue_name
    meta["labels"].update(priority_labels(scheduling.priority if scheduling else None))
    if plan_summary:
        meta["annotations"] = {PLAN_ANNOTATION: plan_summary}
    return {
        "apiVersion": PYTORCHJOB_API_VERSION,
        "kind": PYTORCHJOB_KIND,
        "metadata": meta,
        "spec": {
            "nprocPerNode": str(job.spec.resources.gpus_per_node),
            "runPolicy": _run_policy(job, suspend),
            "pytorchReplicaSpecs": replicas,
        },
    }
