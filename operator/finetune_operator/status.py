"""The FineTuneJob status shape (what ``kubectl get ftj`` and ``finetune describe`` show).

The operator only ever writes these declared fields. Numbers that are not integers (loss, MFU) are
decimal strings, as in the spec. Pure: imports no Kubernetes client, kopf or torch.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

Phase = Literal["Pending", "Planned", "Running", "Succeeded", "Failed", "Suspended"]
ConditionType = Literal["Validated", "Planned", "Running", "Succeeded", "Failed", "Suspended"]
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


class PyTorchJobRef(StatusModel):
    """The Kubeflow PyTorchJob that runs this job."""

    name: Annotated[str, Field(description="PyTorchJob name (same namespace).")]
    uid: Annotated[str, Field(description="PyTorchJob UID.")]


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


class Failure(StatusModel):
    """Why the job failed, in terms a user can act on."""

    reason: Annotated[
        str,
        Field(
            description=(
                "PlanInfeasible, OOMKilled, ImagePullBackOff, Unschedulable, Error, "
                "DeadlineExceeded or BackoffLimitExceeded."
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
        Field(description="Pending, Planned, Running, Succeeded, Failed or Suspended."),
    ] = None
    conditions: Annotated[
        list[Condition] | None,
        Field(
            description="Validated, Planned, Running, Succeeded, Failed and Suspended conditions.",
            json_schema_extra={
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
            },
        ),
    ] = None
    plan: Annotated[PlanStatus | None, Field(description="The chosen parallelism plan.")] = None
    pytorch_job: Annotated[PyTorchJobRef | None, Field(description="The child PyTorchJob.")] = None
    progress: Annotated[Progress | None, Field(description="Training progress.")] = None
    checkpoint: Annotated[CheckpointStatus | None, Field(description="The latest checkpoint.")] = (
        None
    )
    failure: Annotated[Failure | None, Field(description="Why the job failed.")] = None
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
