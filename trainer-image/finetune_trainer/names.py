"""Names shared by the operator, the trainer, the Helm chart and the Grafana dashboard.

One place for every string two of them must agree on: labels, the container, the trainer's entry
point, environment variables, the metrics port and metric names. Pure (constants, no imports),
so the operator and charts/dashboard.py import it without torch, and the trainer never imports
the operator. The chart's YAML cannot import it and repeats a few (templates/podmonitor.yaml,
templates/deployment.yaml): change them together.
"""

from __future__ import annotations

# --------------------------------------------------------------------------- labels
#: On every child of a FineTuneJob (ConfigMap, PyTorchJob, pods): the FineTuneJob's name.
JOB_LABEL = "finetune.dev/job"
#: Set by the Kubeflow training-operator on a PyTorchJob's pods: the PyTorchJob's name.
JOB_NAME_LABEL = "training.kubeflow.org/job-name"
#: Set by the training-operator on a PyTorchJob's pods: ``master`` or ``worker``.
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
#: Set by JobSet on a TrainJob's pods (Kubeflow Trainer v2): the JobSet's name, the TrainJob's.
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
#: Set by JobSet and the Job controller on a TrainJob's pods: which replicated job, which Job of
#: it, and which index of that Job (node rank 0 is index 0 of Job 0 of the trainer's ``node``).
REPLICATED_JOB_LABEL = "jobset.sigs.k8s.io/replicatedjob-name"
JOB_INDEX_LABEL = "jobset.sigs.k8s.io/job-index"
COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
#: The label the chart's PodMonitor gives trainer series (from JOB_LABEL): the dashboard's filter.
METRIC_JOB_LABEL = "finetunejob"

# --------------------------------------------------------------------------- the trainer pod
#: The container name the training-operator requires in a PyTorchJob, and ours in its pods.
CONTAINER = "pytorch"
#: The container name Kubeflow Trainer v2 requires for the trainer of a TrainJob (its torch
#: plugin sets the PET_* variables torchrun reads on the container of this name only).
TRAINJOB_CONTAINER = "node"
#: The trainer's module, run as ``torchrun -m ENTRY_POINT --config PATH``.
ENTRY_POINT = "finetune_trainer.train"
#: The port the trainer serves /metrics on (named ``metrics`` in the pod) unless configured.
METRICS_PORT = 9090

# --------------------------------------------------------------------------- environment
#: In the trainer pod: which FineTuneJob it runs for, and how to log.
ENV_JOB_NAME = "FINETUNE_JOB_NAME"
ENV_JOB_NAMESPACE = "FINETUNE_JOB_NAMESPACE"
ENV_LOG_FORMAT = "FINETUNE_LOG_FORMAT"
#: In the trainer pod: the Hugging Face Hub token (from a Secret, never inline).
ENV_HF_TOKEN = "HF_TOKEN"
#: The operator's settings (the chart's deployment.yaml sets them).
ENV_TRAINER_IMAGE = "FINETUNE_TRAINER_IMAGE"
ENV_TRAINER_METRICS_PORT = "FINETUNE_TRAINER_METRICS_PORT"
ENV_PROGRESS_INTERVAL = "FINETUNE_PROGRESS_INTERVAL"
#: The operator's child kind for new jobs (``pytorchjob`` or ``trainjob``), and the
#: ClusterTrainingRuntime a TrainJob references.
ENV_CHILD = "FINETUNE_CHILD"
ENV_TRAINJOB_RUNTIME = "FINETUNE_TRAINJOB_RUNTIME"

# --------------------------------------------------------------------------- trainer metrics
# Metric family names as registered. prometheus_client exposes a counter ``c`` as ``c_total``
# and a histogram ``h`` as ``h_bucket``, ``h_sum`` and ``h_count``: see total() and the suffixes.
TRAIN_LOSS = "finetune_train_loss"
TRAIN_LEARNING_RATE = "finetune_train_learning_rate"
TRAIN_GRAD_NORM = "finetune_train_grad_norm"
TRAIN_TOKENS = "finetune_train_tokens"  # counter
TRAIN_STEPS = "finetune_train_steps"  # counter
TRAIN_STEP_DURATION = "finetune_train_step_duration_seconds"  # histogram
TRAIN_MFU = "finetune_train_mfu_ratio"
TRAIN_PROGRESS = "finetune_train_progress_ratio"
#: The run's optimizer step (counted from its start, also across a resume) and its total.
TRAIN_STEP = "finetune_train_step"
TRAIN_TOTAL_STEPS = "finetune_train_total_steps"
DATALOADER_WAIT = "finetune_dataloader_wait_seconds"  # histogram
CHECKPOINT_SAVE_DURATION = "finetune_checkpoint_save_duration_seconds"  # histogram
CHECKPOINT_LAST_SAVE = "finetune_checkpoint_last_save_timestamp_seconds"
CHECKPOINT_LAST_STEP = "finetune_checkpoint_last_step"
EVAL_LOSS = "finetune_eval_loss"
GPU_MEMORY = "finetune_gpu_memory_max_allocated_bytes"
TRAINER_BUILD_INFO = "finetune_trainer_build_info"

# --------------------------------------------------------------------------- operator metrics
OPERATOR_RECONCILE = "finetune_operator_reconcile"  # counter
OPERATOR_RECONCILE_DURATION = "finetune_operator_reconcile_duration_seconds"  # histogram
OPERATOR_JOBS = "finetune_operator_jobs"
OPERATOR_BUILD_INFO = "finetune_operator_build_info"


def total(counter: str) -> str:
    """The exposed sample name of a counter."""
    return f"{counter}_total"


def bucket(histogram: str) -> str:
    return f"{histogram}_bucket"


def hsum(histogram: str) -> str:
    return f"{histogram}_sum"


def count(histogram: str) -> str:
    return f"{histogram}_count"
