"""The validated, frozen plan and the planner's result objects."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .hardware import Cluster
from .layout import GradSync, Layout, ZeroStage
from .model import ModelFacts
from .workload import Recompute, Schedule, Workload


class Plan(BaseModel):
    """A parallelization strategy for one model, cluster and workload.

    Invariants (checked on construction, so an impossible plan cannot exist):
    dp * fsdp * cp * tp * pp == world; TP stays inside a node and divides heads, kv heads and
    the FFN width; PP divides the layers (times the interleave factor); the global batch equals
    dp * fsdp * micro_batch_size * gradient_accumulation; pipeline schedules have enough
    micro-batches; context parallelism splits the sequence into 2 x cp equal chunks, on GPUs,
    without a pipeline. Rank order, outer to inner: pp, dp (replicate), fsdp (shard), cp, tp.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: ModelFacts
    cluster: Cluster
    workload: Workload
    data_parallel: int = Field(ge=1, description="replicas (HSDP replicate degree)")
    fsdp: int = Field(ge=1, description="FSDP shard degree")
    tensor_parallel: int = Field(default=1, ge=1)
    context_parallel: int = Field(
        default=1, ge=1, description="ranks each sequence is split over (ring attention)"
    )
    pipeline_parallel: int = Field(default=1, ge=1)
    pipeline_schedule: Schedule = "none"
    virtual_stages: int = Field(default=1, ge=1, description="model chunks per pipeline rank")
    micro_batch_size: int = Field(ge=1)
    gradient_accumulation: int = Field(ge=1)
    activation_checkpointing: Recompute = "none"
    cpu_offload: bool = False
    gradient_sync: GradSync = Field(
        default="every",
        description="gradient reduction under accumulation: every micro-batch, or the last only"
        " (unsharded gradients kept meanwhile); pipelines always reduce on the last",
    )
    zero_stage: ZeroStage = Field(
        default=3,
        description="3: FSDP reshards parameters after each layer's forward (ZeRO-3); 2: keeps"
        " them gathered until its backward (ZeRO-2, reshard_after_forward=False)",
    )

    @model_validator(mode="after")
    def _check(self) -> Plan:
        m, c, w = self.model, self.cluster, self.workload
        dp, fs, tp, pp = self.data_parallel, self.fsdp, self.tensor_parallel, self.pipeline_parallel
        errors: list[str] = []
        planned = self.layout().world
        if planned != c.world:
            errors.append(f"dp*fsdp*cp*tp*pp = {planned} != world size {c.world}")
        if tp > c.gpus_per_node or c.gpus_per_node % tp:
            errors.append(f"tensorParallel {tp} must divide GPUs per node {c.gpus_per_node}")
        for what, n in (
            ("attention heads", m.num_heads),
            ("kv heads", m.num_kv_heads),
            ("FFN width", m.intermediate_size),
        ):
            if n % tp:
                errors.append(f"tensorParallel {tp} does not divide {what} ({n})")
        if pp * self.virtual_stages > m.num_layers:
            errors.append(
                f"pipelineParallel {pp} x virtual stages {self.virtual_stages} "
                f"is more stages than {m.num_layers} layers"
            )
        if (pp == 1) != (self.pipeline_schedule == "none"):
            errors.append(f"schedule {self.pipeline_schedule!r} with pipelineParallel {pp}")
        if (self.pipeline_schedule == "interleaved-1f1b") != (self.virtual_stages > 1):
            errors.append("virtual stages > 1 exactly when the schedule is interleaved-1f1b")
        if pp > 1 and self.gradient_accumulation < pp:
            errors.append(f"{self.gradient_accumulation} micro-batches < {pp} pipeline stages")
        if self.pipeline_schedule == "interleaved-1f1b" and self.gradient_accumulation % pp:
            errors.append("interleaved-1f1b needs micro-batches to be a multiple of stages")
        gbs = dp * fs * self.micro_batch_size * self.gradient_accumulation
        if gbs != w.global_batch_size:
            errors.append(
                f"dp*fsdp*microBatch*gradAccum = {gbs} != globalBatchSize {w.global_batch_size}"
            )
        if self.zero_stage == 2 and (pp > 1 or self.cpu_offload):
            errors.append("zeroStage 2 is planned without pipeline parallelism or cpuOffload")
        if self.cpu_offload and pp > 1:
            errors.append("cpuOffload is not supported with pipeline parallelism")
        cp = self.context_parallel
        if cp > 1:
            if w.seq_len % (2 * cp):
                errors.append(
                    f"contextParallel {cp} needs the sequence length ({w.seq_len}) to split into"
                    f" {2 * cp} equal chunks"
                )
            if pp > 1:
                errors.append("contextParallel is not supported with pipeline parallelism")
            if c.gpu.architecture == "cpu":
                errors.append("contextParallel runs on GPUs only (ring attention kernels)")
        if errors:
            raise ValueError("; ".join(errors))
        return self

    @classmethod
    def from_layout(
        cls, model: ModelFacts, cluster: Cluster, workload: Workload, lay: Layout
    ) -> Plan:
        return cls(
            model=model,
            cluster=cluster,
            workload=workload,
            data_parallel=lay.dp,
            fsdp=lay.fsdp,
            tensor_parallel=lay.tp,
            context_parallel=lay.cp,
            pipeline_parallel=lay.pp,
            pipeline_schedule=lay.schedule,
            virtual_stages=lay.v,
            micro_batch_size=lay.mbs,
            gradient_accumulation=lay.ga,
            activation_checkpointing=lay.ac,
            cpu_offload=lay.offload,
            gradient_sync=lay.grad_sync,
            zero_stage=lay.zero,
        )

    def layout(self) -> Layout:
        return Layout(
            dp=self.data_parallel,
            fsdp=self.fsdp,
            tp=self.tensor_parallel,
            pp=self.pipeline_parallel,
            schedule=self.pipeline_schedule,
            v=self.virtual_stages,
            mbs=self.micro_batch_size,
            ga=self.gradient_accumulation,
            ac=self.activation_checkpointing,
            offload=self.cpu_offload,
            grad_sync=self.gradient_sync,
            zero=self.zero_stage,
            cp=self.context_parallel,
        )

    @property
    def world(self) -> int:
        return self.cluster.world

    @property
    def sequence_parallel(self) -> bool:
        """Sequence parallelism is always on with TP (Korthikanti et al. 2022)."""
        return self.tensor_parallel > 1

    @property
    def summary(self) -> str:
        """One line, e.g. 'fsdp8 mbs2 ga4 ac=selective'."""
        return self.layout().summary(lora=self.workload.method == "lora")


class Estimate(BaseModel):
    """What the cost model predicts for one plan."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    peak_memory_bytes: int
    usable_memory_bytes: int
    memory_capacity_bytes: int
    memory_breakdown: dict[str, int]
    fits: bool
    step_time_s: float
    time_breakdown: dict[str, float]
    tokens_per_s: float
    tokens_per_s_per_gpu: float
    mfu: float


class RankedPlan(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    plan: Plan
    estimate: Estimate

    @property
    def summary(self) -> str:
        return self.plan.summary


class PlanResult(BaseModel):
    """The planner's answer: the chosen plan, its estimates, the runners-up and why."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    plan: Plan
    estimate: Estimate
    alternatives: tuple[RankedPlan, ...] = ()
    reason: str
    notes: tuple[str, ...] = ()
    mode: str = "auto"
    candidates_evaluated: int = 0
    planning_seconds: float = 0.0

    @property
    def summary(self) -> str:
        return self.plan.summary

    def to_status(self) -> dict[str, Any]:
        """status.plan of the FineTuneJob (camelCase; MFU as a decimal string, no floats)."""
        p, e = self.plan, self.estimate
        return {
            "world": p.world,
            "dataParallel": p.data_parallel,
            "fsdp": p.fsdp,
            "tensorParallel": p.tensor_parallel,
            "contextParallel": p.context_parallel,
            "pipelineParallel": p.pipeline_parallel,
            "pipelineSchedule": p.pipeline_schedule,
            "virtualStages": p.virtual_stages,
            "microBatchSize": p.micro_batch_size,
            "gradientAccumulation": p.gradient_accumulation,
            "activationCheckpointing": p.activation_checkpointing,
            "cpuOffload": p.cpu_offload,
            "zeroStage": p.zero_stage,
            "gradientSync": p.gradient_sync,
            "sequenceParallel": p.sequence_parallel,
            "method": p.workload.method,
            "estPeakMemoryBytesPerGPU": e.peak_memory_bytes,
            "estTokensPerSecond": round(e.tokens_per_s),
            "estMFU": f"{e.mfu:.3f}",
            "summary": self.summary,
            "reason": self.reason,
        }


class PlanInfeasible(Exception):  # noqa: N818 - the name the operator and the design use
    """No plan fits (or the manual plan is invalid / does not fit). The message says what would.

    Attributes: suggestions (human strings such as 'needs 16 GPUs of 80 GB'), closest (the
    candidate that came nearest, or None).
    """

    def __init__(
        self, message: str, suggestions: tuple[str, ...] = (), closest: RankedPlan | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.suggestions = suggestions
        self.closest = closest
