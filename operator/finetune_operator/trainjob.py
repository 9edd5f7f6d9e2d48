"""The TrainJob child (Kubeflow Trainer v2): the desired TrainJob of a FineTuneJob, and the
ClusterTrainingRuntime it references (the chart ships it; ``runtime`` builds the same object for
the chart's test and the golden file).

The runtime holds what every trainer pod shares (container ``node`` running torchrun on our
trainer, its metrics port, restart policy and budget); each TrainJob brings its own image,
command, environment, GPUs and nodes through ``spec.trainer``, and the rest of the pod the
PyTorchJob path builds (volumes, mounts, security contexts, tolerations, affinity, node selector,
labels) through one ``runtimePatches`` entry of ours. Pure: no Kubernetes client, kopf or torch.
"""

from __future__ import annotations

from typing import Any

from finetune_operator import api
from finetune_operator.manifest import (
    CONFIG_DIR,
    CONFIG_FILE,
    MANAGED_BY,
    METRICS_PORT,
    PLAN_ANNOTATION,
    metadata,
    pod_template,
    queued,
)
from finetune_operator.queueing import QUEUE_LABEL, priority_labels
from finetune_trainer import names

API_VERSION = "trainer.kubeflow.org/v1alpha1"
KIND = "TrainJob"
RUNTIME_KIND = "ClusterTrainingRuntime"
#: The ClusterTrainingRuntime the chart installs (its trainJob.runtimeName value).
DEFAULT_RUNTIME = "finetune-trainer"
#: The replicated job and container Trainer v2's torch plugin configures (PET_* variables).
NODE = names.TRAINJOB_CONTAINER
#: The manager of our entry in spec.runtimePatches (Kueue keeps an entry of its own).
PATCH_MANAGER = "finetune.dev/operator"
#: Restarts of a trainer pod the runtime's Job allows before the TrainJob fails (as a
#: PyTorchJob's runPolicy.backoffLimit; per runtime, not per job: the chart's value).
DEFAULT_BACKOFF_LIMIT = 3


def unsupported(job: api.FineTuneJob) -> str | None:
    """Why the TrainJob child cannot carry this job's spec (None: it can). Trainer v2.2's runtime
    patches set no pod priority, gang policy or time-to-live per job."""
    scheduling, policy = job.spec.scheduling, job.spec.run_policy
    fields = [
        name
        for name, given in (
            ("spec.scheduling.priorityClassName", scheduling and scheduling.priority_class_name),
            ("spec.scheduling.gangScheduling", scheduling and scheduling.gang_scheduling),
            ("spec.runPolicy.ttlSecondsAfterFinished", policy.ttl_seconds_after_finished),
        )
        if given
    ]
    if not fields:
        return None
    return (
        f"{', '.join(fields)} cannot be set on a TrainJob (the operator runs jobs as Kubeflow "
        "Trainer v2 TrainJobs here): remove them, use spec.scheduling.priority with Kueue, or "
        "run the operator with the pytorchjob child (chart value child: pytorchjob)"
    )


def _patch(template: dict[str, Any]) -> dict[str, Any]:
    """Our runtimePatches entry: the parts of the PyTorchJob path's pod template that the
    runtime does not hold and spec.trainer cannot say."""
    pod = template["spec"]
    container = pod["containers"][0]
    pod_spec: dict[str, Any] = {
        "volumes": pod["volumes"],
        "containers": [
            {
                "name": NODE,
                "volumeMounts": container["volumeMounts"],
                "securityContext": container["securityContext"],
            }
        ],
        "securityContext": pod["securityContext"],
        "tolerations": pod["tolerations"],
    }
    for key in ("affinity", "nodeSelector"):
        if key in pod:
            pod_spec[key] = pod[key]
    replicated = {
        "name": NODE,
        "template": {"spec": {"template": {"metadata": template["metadata"], "spec": pod_spec}}},
    }
    return {
        "manager": PATCH_MANAGER,
        "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [replicated]}}},
    }


def train_job(
    job: api.FineTuneJob,
    *,
    image: str,
    plan_summary: str | None,
    exists: bool,
    kueue: bool = False,
    metrics_port: int = METRICS_PORT,
    cache: str | None = None,
    runtime: str = DEFAULT_RUNTIME,
) -> dict[str, Any]:
    """The TrainJob that runs the trainer on numNodes nodes of gpusPerNode GPUs, referencing
    the ClusterTrainingRuntime ``runtime``. Suspension as for the PyTorchJob
    (manifest.pytorch_job): Kueue's once a queue admits it, else ``suspend: true`` only while
    the spec asks for it."""
    suspend: bool | None = True if job.spec.run_policy.suspend else None
    if queued(job) or kueue:
        suspend = None if exists else True
    template = pod_template(job, image, metrics_port, cache)
    template["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] = NODE
    container = template["spec"]["containers"][0]
    res = job.spec.resources
    trainer: dict[str, Any] = {
        "image": container["image"],
        "command": container["command"],
        "args": container["args"],
        "env": container["env"],
        "numNodes": res.num_nodes,
        "numProcPerNode": res.gpus_per_node,
        "resourcesPerNode": container["resources"],
    }
    meta = metadata(job, job.name)
    scheduling = job.spec.scheduling
    if scheduling is not None and scheduling.queue_name:
        meta["labels"][QUEUE_LABEL] = scheduling.queue_name
    meta["labels"].update(priority_labels(scheduling.priority if scheduling else None))
    if plan_summary:
        meta["annotations"] = {PLAN_ANNOTATION: plan_summary}
    spec: dict[str, Any] = {
        "runtimeRef": {
            "apiGroup": API_VERSION.split("/", maxsplit=1)[0],
            "kind": RUNTIME_KIND,
            "name": runtime,
        },
        "trainer": trainer,
        "runtimePatches": [_patch(template)],
    }
    if suspend is not None:
        spec["suspend"] = suspend
    if job.spec.run_policy.active_deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = job.spec.run_policy.active_deadline_seconds
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": meta, "spec": spec}


def runtime(
    *,
    name: str = DEFAULT_RUNTIME,
    image: str,
    metrics_port: int = METRICS_PORT,
    backoff_limit: int = DEFAULT_BACKOFF_LIMIT,
) -> dict[str, Any]:
    """The ClusterTrainingRuntime of the TrainJob child (what the chart's
    templates/trainingruntime.yaml renders): torch distributed, one replicated job ``node``
    whose container runs ``torchrun -m finetune_trainer.train`` and serves metrics."""
    container = {
        "name": NODE,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["torchrun", "-m", names.ENTRY_POINT],
        "args": ["--config", f"{CONFIG_DIR}/{CONFIG_FILE}"],
        "ports": [{"name": "metrics", "containerPort": metrics_port, "protocol": "TCP"}],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    node = {
        "name": NODE,
        "template": {
            "metadata": {"labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
            "spec": {
                "backoffLimit": backoff_limit,
                "template": {
                    "spec": {
                        "restartPolicy": "OnFailure",
                        "enableServiceLinks": False,
                        "containers": [container],
                    }
                },
            },
        },
    }
    return {
        "apiVersion": API_VERSION,
        "kind": RUNTIME_KIND,
        "metadata": {
            "name": name,
            "labels": {
                "trainer.kubeflow.org/framework": "torch",
                "app.kubernetes.io/managed-by": MANAGED_BY,
            },
        },
        "spec": {
            "mlPolicy": {"numNodes": 1, "torch": {}},
            "template": {"spec": {"replicatedJobs": [node]}},
        },
    }
