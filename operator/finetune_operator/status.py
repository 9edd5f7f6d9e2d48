"""The FineTuneJob status shape (what ``kubectl get ftj`` and ``finetune describe`` show).

The operator only ever writes these declared fields. Numbers that are not integers (loss, MFU) are
decimal strings, as in the spec. Pure: imports no Kubernetes client, kopf or torch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from finetune_operator import termination
from finetune_operator.objects import TRAINJOB, Child, Pod, Waiting
from finetune_operator.objects import Condition as JobCondition
from finetune_operator.queueing import MIRRORED, QueueCondition, QueueView
from finetune_operator.spec import GpuType

Phase = Literal[
    "Staging", "Planned", "Queued", "Pending", "Running", "Succeeded", "Failed", "Suspended"
]
ConditionType = Literal[
    "Validated",
    "Staged",
    "Planned",
    "QuotaReserved",
    "Admitted",
    "Evicted",
    "Preempted",
    "Running",
    "Restarted",
    "Succeeded",
    "Failed",
    "Suspended",
]
_TIME = "RFC 3339 date-time"


class StatusModel(BaseModel):
    """Base for status nodes: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class Condition(StatusModel):
    """A metav1.Condition: one aspect of the job's state and when it last changed."""

    type: Annotated[ConditionType, Field(description="Which aspect this condition is about.")]
    status: Annotated[
        Literal["True", "False", "Unknown"], Field(description="True, False or Unknown.")
    ]
    reason: Annotated[
        str,
        Field(
            description="CamelCase machine-readable cause, e.g. PlanInfeasible or OOMKilled.",
            max_length=1024,
            pattern=r"^([A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?)?$",
        ),
    ]
    message: Annotated[str, Field(description="Human-readable details.", max_length=32768)] = ""
    last_transition_time: Annotated[
        str,
        Field(
            description=f"When status last changed ({_TIME}).",
            json_schema_extra={"format": "date-time"},
        ),
    ]
    observed_generation: Annotated[
        int | None, Field(description="The spec generation this condition was computed from.", ge=0)
    ] = None


class PlanStatus(StatusModel):
    """The parallelism plan the job runs with, and the planner's estimates."""

    world: Annotated[int, Field(description="Total training processes (GPUs).", ge=1)]
    data_parallel: Annotated[int, Field(description="Replicated data-parallel groups.", ge=1)]
    fsdp: Annotated[int, Field(description="FSDP shard-group size.", ge=1)]
    tensor_parallel: Annotated[int, Field(description="Tensor-parallel degree.", ge=1)]
    context_parallel: Annotated[
        int, Field(description="Ranks each sequence is split over (ring attention).", ge=1)
    ] = 1
    pipeline_parallel: Annotated[int, Field(description="Pipeline stages.", ge=1)]
    pipeline_schedule: Annotated[
        str | None, Field(description="Pipeline schedule (gpipe, 1f1b, interleaved-1f1b).")
    ] = None
    virtual_stages: Annotated[
        int, Field(description="Model chunks per pipeline rank (interleaved schedules).", ge=1)
    ] = 1
    sequence_parallel: Annotated[
        bool, Field(description="Whether activations are sharded along the sequence with TP.")
    ] = False
    micro_batch_size: Annotated[int, Field(description="Sequences per forward pass per GPU.", ge=1)]
    gradient_accumulation: Annotated[int, Field(description="Micro-batches per step.", ge=1)]
    activation_checkpointing: Annotated[
        Literal["none", "selective", "full"], Field(description="Activation recompute policy.")
    ]
    cpu_offload: Annotated[
        bool, Field(description="Whether state is offloaded to host memory.")
    ] = False
    zero_stage: Annotated[
        Literal[2, 3],
        Field(
            description=(
                "3: FSDP reshards parameters after each layer's forward (ZeRO-3); 2: keeps them "
                "gathered until its backward (ZeRO-2)."
            )
        ),
    ] = 3
    gradient_sync: Annotated[
        Literal["every", "last"],
        Field(
            description=(
                "Gradient reduction under accumulation: every micro-batch, or the last only "
                "(unsharded gradients kept meanwhile)."
            )
        ),
    ] = "every"
    method: Annotated[
        Literal["full", "lora"], Field(description="Training method planned for.")
    ] = "full"
    est_peak_memory_bytes_per_gpu: Annotated[
        int,
        Field(
            description="Estimated peak memory per GPU, in bytes.",
            ge=0,
            alias="estPeakMemoryBytesPerGPU",
        ),
    ]
    est_tokens_per_second: Annotated[
        int, Field(description="Estimated training throughput over all GPUs, tokens/s.", ge=0)
    ]
    est_mfu: Annotated[
        str,
        Field(
            description="Estimated model FLOPs utilisation (0-1), as a decimal string.",
            alias="estMFU",
        ),
    ]
    summary: Annotated[str, Field(description='Short form, e.g. "fsdp8 mbs2 ga4 ac=selective".')]
    reason: Annotated[str, Field(description="Why the planner chose this plan.")] = ""


class InferredGpuType(StatusModel):
    """The GPU type the job is planned for when spec.resources.gpuType is left out, as inferred
    from the nodes' nvidia.com/gpu.product labels (kept for the job's life once recorded)."""

    gpu_type: Annotated[GpuType, Field(description="The GPU type planned for, e.g. H100-80GB.")]
    node_products: Annotated[
        list[str],
        Field(description="The nvidia.com/gpu.product label values of the nodes it came from."),
    ]
    nodes: Annotated[int, Field(description="How many nodes carried those labels.", ge=0)]
    message: Annotated[
        str,
        Field(
            description='e.g. "gpuType inferred from nodes: H100-80GB (node label '
            'nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3 on 2 nodes)".'
        ),
    ]


class StagedModel(StatusModel):
    """The model's architecture as staging read it from its config.json: what the operator plans
    from (a model outside the planner's catalog included), kept so a re-plan needs no download."""

    model_type: Annotated[str, Field(description="config.json model_type, e.g. llama.")]
    num_layers: Annotated[int, Field(description="Decoder layers.", ge=1)]
    hidden_size: Annotated[int, Field(description="Hidden size.", ge=1)]
    num_heads: Annotated[int, Field(description="Attention heads.", ge=1)]
    num_kv_heads: Annotated[int, Field(description="Key/value heads.", ge=1)]
    head_dim: Annotated[int, Field(description="Size of one attention head.", ge=1)]
    intermediate_size: Annotated[int, Field(description="MLP hidden size.", ge=1)]
    vocab_size: Annotated[int, Field(description="Embedding rows (config.json vocab_size).", ge=1)]
    tie_word_embeddings: Annotated[
        bool, Field(description="Whether input and output embeddings are shared.")
    ] = False
    gated_mlp: Annotated[bool, Field(description="Whether the MLP is gated (SwiGLU).")] = True
    qkv_bias: Annotated[bool, Field(description="Whether q/k/v projections have a bias.")] = False


class StagingStatus(StatusModel):
    """What the staging Job resolved and downloaded: the job trains on exactly these commits,
    also after a restart or a resume (a newer upload to the same branch is never picked up)."""

    model_commit: Annotated[
        str | None, Field(description="The Hub commit of the model (hf:// models).")
    ] = None
    dataset_commit: Annotated[
        str | None, Field(description="The Hub commit of the dataset (hf:// datasets).")
    ] = None
    bytes: Annotated[
        int, Field(description="Bytes of the staged model and dataset files.", ge=0)
    ] = 0
    fetched_bytes: Annotated[
        int,
        Field(description="Bytes this staging downloaded (0: all was in the cache already).", ge=0),
    ] = 0
    seconds: Annotated[int, Field(description="Seconds staging took (rounded up).", ge=0)] = 0
    cache: Annotated[
        str | None,
        Field(description="The PersistentVolumeClaim that holds the staged files."),
    ] = None
    model: Annotated[
        StagedModel | None,
        Field(description="The model's architecture, read from its config.json."),
    ] = None
    warnings: Annotated[
        list[str] | None,
        Field(
            description="What the spec allowed against the defaults (pickle weights, remote code)."
        ),
    ] = None


class ChildRef(StatusModel):
    """The child that runs this job (a Kubeflow PyTorchJob or TrainJob)."""

    name: Annotated[str, Field(description="Its name (same namespace).")]
    uid: Annotated[str, Field(description="Its UID.")]


class Progress(StatusModel):
    """Training progress, read from the master pod's metrics."""

    step: Annotated[int, Field(description="Optimizer steps done.", ge=0)] = 0
    total_steps: Annotated[int | None, Field(description="Optimizer steps planned.", ge=0)] = None
    epoch: Annotated[int | None, Field(description="Current epoch (0-based).", ge=0)] = None
    loss: Annotated[str | None, Field(description="Latest training loss, as a decimal string.")] = (
        None
    )
    tokens_per_second: Annotated[
        int | None, Field(description="Recent training throughput over all GPUs.", ge=0)
    ] = None
    percent: Annotated[
        int | None, Field(description="Share of steps done, 0-100.", ge=0, le=100)
    ] = None
    eta_seconds: Annotated[int | None, Field(description="Estimated seconds to the end.", ge=0)] = (
        None
    )
    updated_at: Annotated[
        str | None,
        Field(
            description=f"When progress was read ({_TIME}).",
            json_schema_extra={"format": "date-time"},
        ),
    ] = None
    summary: Annotated[str | None, Field(description='Printed form, e.g. "450/1000 (45%)".')] = None
    step_since: Annotated[
        str | None,
        Field(
            description=(
                f"Since when the step has been what it is ({_TIME}): what hang detection "
                "counts from (runPolicy.hangTimeoutSeconds)."
            ),
            json_schema_extra={"format": "date-time"},
        ),
    ] = None


class CheckpointStatus(StatusModel):
    """The latest complete checkpoint."""

    latest: Annotated[
        str | None, Field(description="Location of the latest complete checkpoint.")
    ] = None
    step: Annotated[int | None, Field(description="Step it was taken at.", ge=0)] = None
    time: Annotated[
        str | None,
        Field(
            description=f"When it completed ({_TIME}).", json_schema_extra={"format": "date-time"}
        ),
    ] = None


class Attempt(StatusModel):
    """One plan the job ran with: the first one, then one for each re-plan after it ran out of
    memory (runPolicy.maxReplans)."""

    plan: Annotated[PlanStatus, Field(description="The plan of this attempt.")]
    reason: Annotated[
        str,
        Field(
            description=(
                "Why this attempt began: Planned (the first), or the out-of-memory reason of the "
                "attempt before it (OOMKilled, GPUOutOfMemory)."
            )
        ),
    ]
    message: Annotated[str, Field(description="What happened, and how the run resumed.")] = ""
    time: Annotated[
        str,
        Field(
            description=f"When the attempt began ({_TIME}).",
            json_schema_extra={"format": "date-time"},
        ),
    ]


class Failure(StatusModel):
    """Why the job failed, in terms a user can act on."""

    reason: Annotated[
        str,
        Field(
            description=(
                "PlanInfeasible, GpuTypeNotInferred, StagingFailed, CacheUnavailable, "
                "StartupDeadlineExceeded, Hung, OOMKilled, ImagePullBackOff, "
                "Unschedulable, PersistentVolumeClaimMissing, Error, DeadlineExceeded, "
                "BackoffLimitExceeded, or the trainer's own reason: LossDiverged, "
                "GPUOutOfMemory, CollectiveTimeout, BadInput, TrainerError."
            )
        ),
    ]
    message: Annotated[str, Field(description="What happened and what to do about it.")] = ""
    pod: Annotated[str | None, Field(description="The pod it happened in.")] = None
    exit_code: Annotated[int | None, Field(description="The container's exit code.")] = None


class FineTuneJobStatus(StatusModel):
    """Observed state of a FineTuneJob, written by the operator."""

    observed_generation: Annotated[
        int | None, Field(description="The spec generation the operator last acted on.", ge=0)
    ] = None
    phase: Annotated[
        Phase | None,
        Field(description="Staging, Planned, Pending, Running, Succeeded, Failed or Suspended."),
    ] = None
    conditions: Annotated[
        list[Condition] | None,
        Field(
            description=(
                "Validated, Staged, Planned, Running, Succeeded, Failed and Suspended conditions."
            ),
            json_schema_extra={
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
            },
        ),
    ] = None
    staging: Annotated[
        StagingStatus | None,
        Field(description="What staging resolved (commits) and downloaded into the cache."),
    ] = None
    plan: Annotated[PlanStatus | None, Field(description="The chosen parallelism plan.")] = None
    inferred_gpu_type: Annotated[
        InferredGpuType | None,
        Field(description="The GPU type inferred from the nodes (spec.resources.gpuType unset)."),
    ] = None
    pytorch_job: Annotated[
        ChildRef | None, Field(description="The child PyTorchJob (the operator's default child).")
    ] = None
    train_job: Annotated[
        ChildRef | None,
        Field(
            description="The child TrainJob (Kubeflow Trainer v2), where the operator makes one."
        ),
    ] = None
    progress: Annotated[Progress | None, Field(description="Training progress.")] = None
    checkpoint: Annotated[CheckpointStatus | None, Field(description="The latest checkpoint.")] = (
        None
    )
    failure: Annotated[Failure | None, Field(description="Why the job failed.")] = None
    attempts: Annotated[
        list[Attempt] | None,
        Field(
            description=(
                "The plans the job ran with, in order, once it has been re-planned after "
                "running out of memory (the last one is status.plan)."
            )
        ),
    ] = None
    restarts: Annotated[
        int | None,
        Field(
            description=(
                "Times the operator restarted the pods of a hung job (runPolicy.maxRestarts)."
            ),
            ge=0,
        ),
    ] = None
    last_restart_time: Annotated[
        str | None,
        Field(
            description=f"When the operator last restarted the pods ({_TIME}).",
            json_schema_extra={"format": "date-time"},
        ),
    ] = None
    start_time: Annotated[
        str | None,
        Field(
            description=f"When training started ({_TIME}).",
            json_schema_extra={"format": "date-time"},
        ),
    ] = None
    completion_time: Annotated[
        str | None,
        Field(
            description=f"When the job ended ({_TIME}).", json_schema_extra={"format": "date-time"}
        ),
    ] = None


# ---------------------------------------------------------------------------------------------
# Deriving status from what the cluster shows (pure)
# ---------------------------------------------------------------------------------------------

TERMINAL: frozenset[str] = frozenset({"Succeeded", "Failed"})
#: Pod problems that keep training from starting (every pod must be up for torchrun).
BLOCKING: frozenset[str] = frozenset(
    {
        "Unschedulable",
        "PersistentVolumeClaimMissing",
        "ImagePullBackOff",
        "CreateContainerConfigError",
    }
)

_WAITING_PROBLEMS = {
    "ImagePullBackOff": "ImagePullBackOff",
    "ErrImagePull": "ImagePullBackOff",
    "InvalidImageName": "ImagePullBackOff",
    "CreateContainerConfigError": "CreateContainerConfigError",
    "CrashLoopBackOff": "CrashLoopBackOff",
}


def _terminated_failure(pod: Pod) -> Failure | None:
    for cs in pod.container_statuses:
        for state in (cs.state, cs.last_state):
            term = state.terminated
            if term is None or term.exit_code == 0:
                continue
            code = term.exit_code
            if term.reason == "OOMKilled":
                return Failure(
                    reason="OOMKilled",
                    message=(
                        f"pod {pod.name} ran out of memory (exit {code}): give the pods more "
                        "memory, or lower parallelism.microBatchSize / turn on "
                        "activationCheckpointing"
                    ),
                    pod=pod.name,
                    exit_code=code,
                )
            cause = termination.parse(term.message)
            if cause is not None:  # the trainer's own words (finetune_trainer.failure)
                return Failure(
                    reason=cause.reason,
                    message=f"pod {pod.name} (exit {code}): {cause.message}",
                    pod=pod.name,
                    exit_code=code,
                )
            detail = term.message or term.reason or "Error"
            return Failure(
                reason="Error",
                message=f"pod {pod.name} exited with code {code}: {detail}; see its logs",
                pod=pod.name,
                exit_code=code,
            )
    return None


@dataclass(frozen=True)
class GpuAsk:
    """The GPUs a job's pods ask for, as their node affinity says (see manifest._affinity)."""

    gpu_type: str
    per_node: int
    #: The ``nvidia.com/gpu.product`` label values of nodes with that GPU.
    products: tuple[str, ...]
    #: Whether spec.resources.nodeSelector narrows the nodes further.
    node_selector: bool = False


def pod_problem(pods: Sequence[Pod], gpu: GpuAsk | None = None) -> Failure | None:
    """The most telling problem among the job's pods, in terms a user can act on."""
    for pod in pods:
        found = _terminated_failure(pod)
        if found:
            return found
    for pod in pods:
        for cs in pod.container_statuses:
            waiting = cs.state.waiting or Waiting()
            reason = _WAITING_PROBLEMS.get(waiting.reason)
            if reason:
                return Failure(
                    reason=reason,
                    message=(
                        f"pod {pod.name}: {waiting.reason} for image {cs.image}: "
                        f"{waiting.message}".rstrip(": ")
                        + "; check spec.image and the pull secret"
                    ),
                    pod=pod.name,
                )
    for pod in pods:
        for cond in pod.conditions:
            if (
                cond.type == "PodScheduled"
                and cond.status == "False"
                and cond.reason == "Unschedulable"
            ):
                return _unschedulable(pod.name, cond.message, gpu)
    return None


#: How the scheduler says a pod's PersistentVolumeClaim does not exist (kube-scheduler's
#: VolumeBinding plugin): ``persistentvolumeclaim "finetune-models" not found``.
_MISSING_CLAIM = re.compile(r'persistentvolumeclaim "(?P<claim>[^"]+)" not found')


def missing_claim(scheduler_message: str) -> str | None:
    """The PersistentVolumeClaim the scheduler says does not exist, if that is why it waits."""
    found = _MISSING_CLAIM.search(scheduler_message)
    return found["claim"] if found else None


def claims_missing(claims: Sequence[str], pod: str | None = None) -> Failure:
    """The failure of a job whose pods wait for PersistentVolumeClaims that do not exist."""
    names = ", ".join(claims)
    plural = "s" if len(claims) > 1 else ""
    where = f"pod {pod} cannot start" if pod else "the pods cannot start"
    uris = ", ".join(f"pvc://{c}/..." for c in claims)
    return Failure(
        reason="PersistentVolumeClaimMissing",
        message=(
            f"{where}: PersistentVolumeClaim{plural} {names} "
            f"{'do' if plural else 'does'} not exist; create a PersistentVolumeClaim named "
            f"{' and one named '.join(claims)} in the job's namespace (README: storage for the "
            f"examples), or change the job's {uris} URIs to a claim that exists"
        ),
        pod=pod,
    )


#: How kube-scheduler's NodeAffinity plugin counts the nodes a pod's affinity/selector excludes.
_AFFINITY_MISMATCH = "didn't match Pod's node affinity/selector"


def no_gpu_node(pod: str, gpu: GpuAsk, scheduler_message: str) -> Failure:
    """The failure of a job whose pods no node can take: none has its GPU type and count."""
    products = ", ".join(gpu.products)
    selector = " that also match spec.resources.nodeSelector" if gpu.node_selector else ""
    return Failure(
        reason="Unschedulable",
        message=(
            f"pod {pod} cannot be scheduled: no node offers {gpu.per_node} {gpu.gpu_type} GPUs "
            f"(nodes labelled nvidia.com/gpu.product in [{products}] with nvidia.com/gpu.count "
            f">= {gpu.per_node}{selector}); add such nodes, or set spec.resources.gpuType and "
            f"gpusPerNode to GPUs the cluster has (scheduler: {scheduler_message})"
        ),
        pod=pod,
    )


def _unschedulable(pod: str, message: str, gpu: GpuAsk | None = None) -> Failure:
    claim = missing_claim(message)
    if claim is not None:
        return claims_missing([claim], pod)
    if gpu is not None and _AFFINITY_MISMATCH in message and "Insufficient" not in message:
        # Every node was excluded by affinity (or a taint): none has the planned GPUs. Where some
        # node had them but not free, the scheduler says "Insufficient nvidia.com/gpu" instead.
        return no_gpu_node(pod, gpu, message)
    return Failure(
        reason="Unschedulable",
        message=(
            f"pod {pod} cannot be scheduled: {message} "
            "(fewer free GPUs than spec.resources asks for, or no node matches "
            "nodeSelector/tolerations)"
        ),
        pod=pod,
    )


def _job_failure(child_failed: JobCondition, pods_problem: Failure | None) -> Failure:
    message = child_failed.message
    if "deadline" in message:
        return Failure(
            reason="DeadlineExceeded", message=f"{message} (runPolicy.activeDeadlineSeconds)"
        )
    if pods_problem is not None and pods_problem.exit_code is not None:  # a container's end
        return pods_problem
    if "backoff limit" in message:
        return Failure(
            reason="BackoffLimitExceeded",
            message=f"{message} (runPolicy.backoffLimit); see the pods' logs",
        )
    return pods_problem or Failure(reason="Error", message=message or "the child job failed")


@dataclass(frozen=True)
class Observed:
    """Everything status is derived from."""

    generation: int | None
    suspend_requested: bool
    plan: PlanStatus | None = None
    plan_error: str | None = None
    child: Child | None = None
    pods: tuple[Pod, ...] = ()
    previous_failure: Failure | None = None
    #: The PersistentVolumeClaims the job names that do not exist (checked up front: the
    #: scheduler names only the first one a pod misses).
    missing_claims: tuple[str, ...] = ()
    #: The GPUs the pods ask for (None: no GPUs, or not known).
    gpu: GpuAsk | None = None
    #: The GPU type inferred from the nodes (spec.resources.gpuType left out).
    inferred_gpu_type: InferredGpuType | None = None
    #: Why the nodes do not tell the GPU type (the job waits for spec.resources.gpuType).
    gpu_type_error: str | None = None
    #: What staging resolved and downloaded (just now; status keeps what it recorded before).
    staging: StagingStatus | None = None
    #: Staging is under way (or waits for its cache): the job is in phase Staging.
    staging_wait: StagingWait | None = None
    #: Staging failed for good (BadInput at once; StagingFailed once the Job's retries are spent).
    staging_failure: Failure | None = None
    #: A pod not running past runPolicy.startupDeadlineSeconds (recovery.startup_failure).
    startup_failure: Failure | None = None
    #: The Kueue Workload of the child, when Kueue admits it (its queue label is set).
    queue: QueueView | None = None


@dataclass(frozen=True)
class StagingWait:
    """Why a job is still staging: the Staged condition's reason and message, and a problem of
    the staging pod a user can act on (e.g. its image cannot be pulled, its cache is unbound)."""

    reason: str
    message: str
    problem: Failure | None = None


def staged_message(staging: StagingStatus) -> str:
    """The Staged condition's message, e.g. "model abc123, dataset def456: 14.5 GB in
    finetune-cache (0 B fetched)"."""
    what = [
        f"{name} {commit[:12]}"
        for name, commit in (("model", staging.model_commit), ("dataset", staging.dataset_commit))
        if commit
    ]
    where = f" in {staging.cache}" if staging.cache else ""
    return (
        f"{', '.join(what) or 'model and dataset'} staged: {_human(staging.bytes)}{where} "
        f"({_human(staging.fetched_bytes)} fetched, {staging.seconds} s)"
    )


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _cond(
    type_: ConditionType, ok: bool, reason: str, message: str, g: int | None, now: str, /
) -> Condition:
    return Condition(
        type=type_,
        status="True" if ok else "False",
        reason=reason,
        message=message,
        last_transition_time=now,
        observed_generation=g,
    )


def _held(obs: Observed) -> str | None:
    """Why Kueue holds the job (phase Queued), or None when it does not: its child carries a
    queue label and its Workload is not admitted (or not made yet, the child still suspended)."""
    child = obs.child
    if child is None or not child.queue_name:
        return None
    if obs.queue is not None:
        return obs.queue.why_held() if obs.queue.held else None
    return f"waiting for Kueue to queue it in {child.queue_name}" if child.suspended else None


_REASON = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")


def _mirror(cond: QueueCondition, g: int | None, now: str) -> Condition:
    """A condition of Kueue's Workload as the FineTuneJob's: Kueue's status, reason, message
    and transition time."""
    return Condition(
        type=cond.type,  # one of MIRRORED
        status=cond.status,
        reason=cond.reason if _REASON.match(cond.reason) else cond.type,
        message=cond.message[:32768],
        last_transition_time=cond.last_transition_time or now,
        observed_generation=g,
    )


def derive(obs: Observed, previous: FineTuneJobStatus | None, now: str) -> FineTuneJobStatus:
    """The status a FineTuneJob should have, given what was observed.

    Conditions keep their lastTransitionTime while their status does not change; a terminal phase
    (Succeeded, Failed) is never left.
    """
    prev = previous or FineTuneJobStatus()
    if prev.phase in TERMINAL:  # never leave a terminal phase
        return prev
    g = obs.generation
    conds: list[Condition] = [_cond("Validated", True, "SpecValid", "spec is valid", g, now)]
    # A failure seen earlier only explains a job that fails now (its pod may be gone): once the
    # job recovers (pods run, it succeeds), the failure goes; the problem of the moment stays.
    failure: Failure | None = None
    completion = prev.completion_time
    start = prev.start_time
    child_conds = obs.child.true_conditions() if obs.child is not None else {}
    problem = pod_problem(obs.pods, obs.gpu)

    staging = obs.staging or prev.staging
    if staging is not None:
        conds.append(_cond("Staged", True, "Staged", staged_message(staging), g, now))

    if obs.gpu_type_error is not None:  # waits: setting spec.resources.gpuType lets it go on
        phase: Phase = "Pending"
        failure = Failure(reason="GpuTypeNotInferred", message=obs.gpu_type_error)
        conds.append(_cond("Planned", False, "GpuTypeNotInferred", obs.gpu_type_error, g, now))
    elif obs.staging_failure is not None:
        phase = "Failed"
        failure = obs.staging_failure
        conds.append(_cond("Staged", False, failure.reason, failure.message, g, now))
        conds.append(_cond("Failed", True, failure.reason, failure.message, g, now))
        completion = completion or now
    elif obs.staging_wait is not None:
        phase = "Staging"
        wait = obs.staging_wait
        failure = wait.problem
        conds.append(_cond("Staged", False, wait.reason, wait.message, g, now))
    elif obs.plan_error is not None:
        phase = "Failed"
        failure = Failure(reason="PlanInfeasible", message=obs.plan_error)
        conds.append(_cond("Planned", False, "PlanInfeasible", obs.plan_error, g, now))
        conds.append(_cond("Failed", True, "PlanInfeasible", obs.plan_error, g, now))
        completion = completion or now
    else:
        planned_msg = obs.plan.reason if obs.plan else "the trainer plans when it reads the model"
        if obs.inferred_gpu_type is not None:
            planned_msg = f"{obs.inferred_gpu_type.message}; {planned_msg}"
        planned_reason = "Planned" if obs.plan else "PlannedByTrainer"
        conds.append(_cond("Planned", True, planned_reason, planned_msg, g, now))
        if "Succeeded" in child_conds:
            phase = "Succeeded"
            msg = child_conds["Succeeded"].message or "training finished"
            conds.append(_cond("Succeeded", True, "TrainingSucceeded", msg, g, now))
            conds.append(_cond("Running", False, "Completed", "training finished", g, now))
            completion = completion or now
        elif "Failed" in child_conds:
            phase = "Failed"
            failure = _job_failure(child_conds["Failed"], problem or obs.previous_failure)
            conds.append(_cond("Failed", True, failure.reason, failure.message, g, now))
            conds.append(_cond("Running", False, failure.reason, failure.message, g, now))
            completion = completion or now
        elif obs.startup_failure is not None:
            phase = "Failed"
            failure = obs.startup_failure
            conds.append(_cond("Failed", True, failure.reason, failure.message, g, now))
            conds.append(_cond("Running", False, failure.reason, failure.message, g, now))
            completion = completion or now
        elif obs.suspend_requested:
            phase = "Suspended"
            why = "runPolicy.suspend is true"
            if obs.child is not None and obs.child.queue_name:
                why += ": its Kueue Workload is deactivated"
            conds.append(_cond("Suspended", True, "Suspended", why, g, now))
            conds.append(_cond("Running", False, "Suspended", "the pods are stopped", g, now))
        elif (held := _held(obs)) is not None:
            phase = "Queued"
            conds.append(_cond("Running", False, "Queued", held, g, now))
        elif "Suspended" in child_conds:
            phase = "Suspended"
            why = f"the {obs.child.kind if obs.child else 'child'} is suspended"
            conds.append(_cond("Suspended", True, "Suspended", why, g, now))
            conds.append(_cond("Running", False, "Suspended", "the pods are stopped", g, now))
        elif "Running" in child_conds and (problem is None or problem.reason not in BLOCKING):
            phase = "Running"
            start = start or now
            msg = "training is running"
            reason = "Running"
            if problem is not None:  # e.g. a worker restarting after OOM
                failure, msg, reason = problem, problem.message, problem.reason
            conds.append(_cond("Running", True, reason, msg, g, now))
        else:
            phase = "Planned" if obs.child is None else "Pending"
            reason, msg = "Starting", "waiting for the pods to start"
            if obs.missing_claims:
                problem = claims_missing(obs.missing_claims)
            if problem is not None:
                failure, reason, msg = problem, problem.reason, problem.message
            conds.append(_cond("Running", False, reason, msg, g, now))

    pytorch_ref, train_ref = prev.pytorch_job, prev.train_job
    if obs.child is not None:
        ref = ChildRef(name=obs.child.name, uid=obs.child.uid)
        if obs.child.kind == TRAINJOB:
            train_ref = ref
        else:
            pytorch_ref = ref
    conds += [c for c in prev.conditions or [] if c.type == "Restarted"]  # the operator's own
    if obs.queue is not None:
        conds += [_mirror(c, g, now) for c in obs.queue.mirrored()]
    else:  # no Workload (now): what Kueue said last stays
        conds += [c for c in prev.conditions or [] if c.type in MIRRORED]
    return FineTuneJobStatus(
        observed_generation=g,
        phase=phase,
        conditions=_keep_transition_times(prev.conditions or [], conds),
        staging=staging,
        plan=obs.plan or prev.plan,
        inferred_gpu_type=obs.inferred_gpu_type,
        pytorch_job=pytorch_ref,
        train_job=train_ref,
        progress=prev.progress,
        checkpoint=prev.checkpoint,
        failure=failure,
        attempts=prev.attempts,
        restarts=prev.restarts,
        last_restart_time=prev.last_restart_time,
        start_time=start,
        completion_time=completion,
    )


def failed(status: FineTuneJobStatus, failure: Failure, now: str) -> FineTuneJobStatus:
    """``status`` ended by the operator's own decision (a hang after the restarts are spent)."""
    g = status.observed_generation
    conds = [c for c in status.conditions or [] if c.type not in {"Failed", "Running"}]
    conds.append(_cond("Failed", True, failure.reason, failure.message, g, now))
    conds.append(_cond("Running", False, failure.reason, failure.message, g, now))
    return status.model_copy(
        update={
            "phase": "Failed",
            "failure": failure,
            "conditions": _keep_transition_times(status.conditions or [], conds),
            "completion_time": status.completion_time or now,
        }
    )


def restarted(
    status: FineTuneJobStatus, restarts: int, message: str, now: str
) -> FineTuneJobStatus:
    """``status`` once the operator restarts the pods of a hung job (the ``restarts``-th time)."""
    g = status.observed_generation
    conds = [c for c in status.conditions or [] if c.type != "Restarted"]
    conds.append(_cond("Restarted", True, "Hung", message, g, now))
    return status.model_copy(
        update={
            "restarts": restarts,
            "last_restart_time": now,
            "conditions": sorted(conds, key=lambda c: c.type),
        }
    )


def replanned(
    status: FineTuneJobStatus, plan: PlanStatus, reason: str, message: str, now: str
) -> FineTuneJobStatus:
    """``status`` once the operator re-plans the job after it ran out of memory: the new plan
    is the last attempt (the first attempt, the plan it ran with, is recorded with it), the
    child is made again, so the job is Planned, its progress and failure gone."""
    g = status.observed_generation
    attempts = list(status.attempts or [])
    if not attempts and status.plan is not None:
        attempts.append(Attempt(plan=status.plan, reason="Planned", time=status.start_time or now))
    attempts.append(Attempt(plan=plan, reason=reason, message=message, time=now))
    conds = [c for c in status.conditions or [] if c.type not in {"Running", "Restarted"}]
    conds.append(_cond("Running", False, "Replanned", message, g, now))
    conds.append(_cond("Restarted", True, "Replanned", message, g, now))
    return status.model_copy(
        update={
            "phase": "Planned",
            "plan": plan,
            "attempts": attempts,
            "failure": None,
            "progress": None,
            "pytorch_job": None,
            "train_job": None,
            "conditions": _keep_transition_times(status.conditions or [], conds),
        }
    )


def refine_failure(status: FineTuneJobStatus, pods: Sequence[Pod]) -> FineTuneJobStatus:
    """A failed job whose reason is only the job-level "backoff limit" learns the pod's own
    reason (OOMKilled, the trainer's cause, an exit code) when that pod's last state arrives
    after the job failed."""
    if status.phase != "Failed" or status.failure is None:
        return status
    if status.failure.reason != "BackoffLimitExceeded":
        return status
    found = pod_problem(pods)
    if found is None or found.exit_code is None:  # only a container's end says more
        return status
    conditions = [
        c.model_copy(update={"reason": found.reason, "message": found.message})
        if c.type == "Failed"
        else c
        for c in status.conditions or []
    ]
    return status.model_copy(update={"failure": found, "conditions": conditions})


def _keep_transition_times(old: list[Condition], new: list[Condition]) -> list[Condition]:
    before = {c.type: c for c in old}
    out = []
    for cond in new:
        prior = before.get(cond.type)
        same = prior is not None and prior.status == cond.status
        out.append(
            cond.model_copy(update={"last_transition_time": prior.last_transition_time})
            if same and prior is not None
            else cond
        )
    return sorted(out, key=lambda c: c.type)
