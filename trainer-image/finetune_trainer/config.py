"""What the trainer reads: one JSON document, with nothing about Kubernetes in it.

The operator writes it into a ConfigMap (``finetune_operator.translate`` builds it from a
FineTuneJob spec); ``finetune run`` writes it to a file for a local run. Sources are already
resolved to what the trainer opens (a Hub id, a local path, a builtin name) and decimals are
numbers. Pure: imports no Kubernetes client, kopf or torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SourceKind = Literal["hf", "local", "builtin"]
Format = Literal["alpaca", "text", "summarization", "chat"]
CONFIG_VERSION: Literal[1] = 1

#: The column each format reads for each role, unless the dataset says otherwise.
DEFAULT_COLUMNS: dict[str, dict[str, str]] = {
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output"},
    "summarization": {"article": "article", "summary": "highlights"},
    "text": {"text": "text"},
    "chat": {"messages": "messages"},
}


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Config):
    kind: SourceKind
    #: Hub id ("org/name"), local folder, or builtin architecture name.
    name_or_path: str
    revision: str | None = None
    #: Environment variable that holds a Hub token, if any.
    token_env: str | None = None
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


class DataConfig(_Config):
    kind: SourceKind
    name_or_path: str
    config_name: str | None = None
    revision: str | None = None
    split: str = "train"
    eval_split: str | None = None
    eval_fraction: float = Field(default=0.0, ge=0.0, lt=0.5)
    format: Format = "alpaca"
    #: role -> column name, complete for the format.
    columns: dict[str, str]
    max_seq_length: int = Field(default=2048, ge=16)
    packing: bool = True
    num_proc: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _columns_cover_format(self) -> DataConfig:
        missing = set(DEFAULT_COLUMNS[self.format]) - set(self.columns)
        if missing:
            raise ValueError(f"columns lack the roles {sorted(missing)} that {self.format} reads")
        return self


class LoraConfig(_Config):
    r: int = Field(ge=1)
    alpha: int = Field(ge=1)
    dropout: float = Field(ge=0.0, lt=1.0)
    target_modules: tuple[str, ...]


class MethodConfig(_Config):
    type: Literal["full", "lora"] = "full"
    lora: LoraConfig | None = None


class OptimConfig(_Config):
    learning_rate: float = Field(gt=0.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    max_grad_norm: float = Field(default=1.0, gt=0.0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)


class ScheduleConfig(_Config):
    epochs: int | None = Field(default=None, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    global_batch_size: int = Field(ge=1)
    seed: int = 42
    eval_every_steps: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_length(self) -> ScheduleConfig:
        if (self.epochs is None) == (self.max_steps is None):
            raise ValueError("set exactly one of epochs or max_steps")
        return self


class HardwareConfig(_Config):
    gpu_type: str
    num_nodes: int = Field(ge=1)
    procs_per_node: int = Field(ge=1)

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.procs_per_node


class ParallelismConfig(_Config):
    """The user's constraints; unset means the planner chooses."""

    mode: Literal["auto", "manual"] = "auto"
    data_parallel: int | None = None
    fsdp: int | None = None
    tensor_parallel: int | None = None
    context_parallel: int | None = None
    pipeline_parallel: int | None = None
    micro_batch_size: int | None = None
    activation_checkpointing: Literal["none", "selective", "full"] | None = None
    cpu_offload: bool | None = None
    #: ``torch.compile`` each decoder layer (the planner does not weigh it; off by default).
    compile: bool = False


class PlanConfig(_Config):
    """A plan already chosen (by the operator, or by ``finetune run``); the trainer applies it."""

    data_parallel: int = Field(ge=1)
    fsdp: int = Field(ge=1)
    tensor_parallel: int = Field(ge=1)
    context_parallel: int = Field(
        default=1,
        ge=1,
        description="ranks each sequence is split over (torch's context_parallel, ring"
        " attention; GPU only, not with a pipeline)",
    )
    pipeline_parallel: int = Field(ge=1)
    pipeline_schedule: str | None = None
    virtual_stages: int = Field(default=1, ge=1)
    micro_batch_size: int = Field(ge=1)
    gradient_accumulation: int = Field(ge=1)
    activation_checkpointing: Literal["none", "selective", "full"] = "none"
    cpu_offload: bool = False
    gradient_sync: Literal["every", "last"] = Field(
        default="every",
        description="when FSDP/DDP reduce gradients under accumulation: on every micro-batch,"
        " or only on the last one (each rank keeps its unsharded fp32 gradients meanwhile);"
        " pipelines always reduce on the last",
    )
    zero_stage: Literal[2, 3] = Field(
        default=3,
        description="3: FSDP reshards each layer's parameters after its forward and gathers them"
        " again for its backward (ZeRO-3); 2: they stay gathered from forward to backward"
        " (FSDP2 reshard_after_forward=False; gradients and optimizer states still sharded,"
        " ZeRO-2): one all-gather per micro-batch instead of two, for more memory",
    )

    @property
    def world_size(self) -> int:
        """The ranks the plan covers: data parallel x fsdp x context x tensor x pipeline."""
        return (
            self.data_parallel
            * self.fsdp
            * self.context_parallel
            * self.tensor_parallel
            * self.pipeline_parallel
        )

    @property
    def summary(self) -> str:
        """E.g. 'fsdp8 tp2 mbs2 ga4 ac=selective' (the planner's words)."""
        degrees = [
            f"{name}{n}"
            for name, n in (
                ("dp", self.data_parallel),
                ("fsdp", self.fsdp),
                ("cp", self.context_parallel),
                ("tp", self.tensor_parallel),
                ("pp", self.pipeline_parallel),
            )
            if n > 1
        ]
        return " ".join(
            [
                *(degrees or ["single"]),
                f"mbs{self.micro_batch_size}",
                f"ga{self.gradient_accumulation}",
                f"ac={self.activation_checkpointing}",
                *(
                    ["zero2"]
                    if self.zero_stage == 2 and self.fsdp * self.context_parallel > 1
                    else []
                ),
            ]
        )


def checkpoint_dirname(step: int) -> str:
    """The folder of the checkpoint taken at ``step`` under ``CheckpointConfig.dir`` (the
    operator reports it in status.checkpoint.latest)."""
    return f"step-{step:08d}"


class CheckpointConfig(_Config):
    dir: str | None = None
    every_steps: int = Field(default=500, ge=1)
    keep_last: int = Field(default=3, ge=1)
    resume: Literal["auto", "never"] = "auto"


class MetricsConfig(_Config):
    port: int = Field(default=9090, ge=0, le=65535)
    log_every_steps: int = Field(default=10, ge=1)


class ResilienceConfig(_Config):
    """How the run stops instead of hanging or training on garbage."""

    #: A collective (all-reduce, all-gather, ...) that has not completed after this long fails
    #: the run with CollectiveTimeout (a stopped or lost rank), instead of waiting for ever. It
    #: also bounds how long the other ranks wait for rank 0 to download the model and data.
    collective_timeout_seconds: int = Field(default=1800, ge=1)
    #: Steps in a row with a NaN or infinite loss or gradient norm (their updates are skipped)
    #: before the run stops with LossDiverged.
    nonfinite_steps: int = Field(default=3, ge=1)


class TrainerConfig(_Config):
    """Everything one training run needs."""

    version: Literal[1] = CONFIG_VERSION
    run_name: str
    model: ModelConfig
    data: DataConfig
    method: MethodConfig = MethodConfig()
    optim: OptimConfig
    schedule: ScheduleConfig
    hardware: HardwareConfig
    parallelism: ParallelismConfig = ParallelismConfig()
    plan: PlanConfig | None = None
    checkpoint: CheckpointConfig = CheckpointConfig()
    output_dir: str
    metrics: MetricsConfig = MetricsConfig()
    resilience: ResilienceConfig = ResilienceConfig()

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def load(cls, path: str | Path) -> TrainerConfig:
        return cls.model_validate_json(Path(path).read_text(encoding="utf-8"))
