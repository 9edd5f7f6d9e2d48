"""The FineTuneJob spec (finetune.dev/v1alpha1) as one typed model.

This module is the single source of the API: the CRD in ``crds/finetunejob.yaml`` is generated
from it (:mod:`finetune_operator.crd`), ``finetune validate`` checks documents against it, and the
operator and trainer parse specs with it. Every field carries the description that ``kubectl
explain`` prints. Cross-field rules are CEL (:class:`finetune_operator.cel.Rule`) so the API server
and Python enforce the very same expressions. No floats: decimals are strings with a pattern.

Pure: imports no Kubernetes client, kopf or torch.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from finetune_operator.cel import Rule
from finetune_trainer.planner.hardware import get_gpu

# ---------------------------------------------------------------------------------------------
# Shared field shapes
# ---------------------------------------------------------------------------------------------

#: Offline model configurations of real architectures, initialised at random by the trainer.
BUILTIN_MODELS = ("tiny-llama", "tiny-mistral", "tiny-qwen2")
#: Offline datasets the trainer can build without a network.
BUILTIN_DATASETS = ("python-stdlib-alpaca",)

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_CLAIM = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_HF = rf"hf://{_NAME}(/{_NAME})?(@[A-Za-z0-9._/-]+)?"
_PVC = rf"pvc://{_CLAIM}(/[^\s]*)?"
_FILE = r"file:///[^\s]*"

MODEL_SOURCE_PATTERN = rf"^({_HF}|{_PVC}|{_FILE}|builtin://({'|'.join(BUILTIN_MODELS)}))$"
DATASET_SOURCE_PATTERN = rf"^({_HF}|{_PVC}|{_FILE}|builtin://({'|'.join(BUILTIN_DATASETS)}))$"
STORAGE_PATTERN = rf"^({_PVC}|{_FILE})$"
#: Non-negative decimal written as a string, e.g. "2e-5", "0.05", "1.0".
DECIMAL_PATTERN = r"^([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$"
#: A Kubernetes resource quantity, e.g. "32", "500m", "256Gi".
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"
_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_IMAGE = r"^[a-zA-Z0-9][a-zA-Z0-9._/:@-]*$"

#: What a user is told when a string does not match one of the patterns above.
PATTERN_HINTS: dict[str, str] = {
    MODEL_SOURCE_PATTERN: (
        "must be hf://ORG/NAME, pvc://CLAIM/PATH, file:///ABSOLUTE/PATH or builtin://NAME with "
        "NAME "
        f"one of {', '.join(BUILTIN_MODELS)}"
    ),
    DATASET_SOURCE_PATTERN: (
        "must be hf://ORG/NAME, pvc://CLAIM/PATH, file:///ABSOLUTE/PATH (.jsonl, .json, .parquet) "
        f"or builtin://NAME with NAME one of {', '.join(BUILTIN_DATASETS)}"
    ),
    STORAGE_PATTERN: "must be pvc://CLAIM/PATH or file:///ABSOLUTE/PATH",
    DECIMAL_PATTERN: 'must be a decimal number written as a string, e.g. "2e-5" or "0.05"',
    QUANTITY_PATTERN: 'must be a Kubernetes quantity such as "8", "500m" or "64Gi"',
    _DNS_LABEL: "must be a lowercase DNS label (a-z, 0-9, '-'; at most 63 characters)",
    _DNS_SUBDOMAIN: "must be a lowercase DNS subdomain name",
    _IMAGE: "must be a container image reference such as registry/repo/trainer:1.0",
}


def decimal(description: str) -> Any:
    """Field for a non-negative decimal string (no floats in the API)."""
    return Field(description=description, pattern=DECIMAL_PATTERN, max_length=32)


def if_decimal(field: str, rule: str) -> str:
    """``rule`` about the decimal string ``field``, checked only when it is a decimal: a word
    (e.g. "fast") gets the pattern's message alone, not a second, CEL conversion error too."""
    return f"!self.{field}.matches(r'{DECIMAL_PATTERN}') || ({rule})"


#: Object fields default to {} in the CRD so the API server fills their inner defaults, as the
#: model does.
_EMPTY: dict[str, Any] = {"default": {}}


class ApiModel(BaseModel):
    """Base for every API node: camelCase on the wire, strict types, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        strict=True,
        frozen=True,
        validate_default=False,
    )
    #: CEL rules on this node; copied into the CRD and evaluated in Python.
    cel_rules: ClassVar[tuple[Rule, ...]] = ()


# ---------------------------------------------------------------------------------------------
# spec.model
# ---------------------------------------------------------------------------------------------


class SecretKeyRef(ApiModel):
    """A key of a Secret in the job's namespace."""

    name: Annotated[
        str,
        Field(description="Name of the Secret.", pattern=_DNS_SUBDOMAIN, max_length=253),
    ]
    key: Annotated[
        str,
        Field(description="Key inside the Secret that holds the value.", max_length=253),
    ] = "token"


class ModelSpec(ApiModel):
    """The base model to fine-tune. Immutable once the job exists."""

    cel_rules = (
        Rule("self == oldSelf", "model is immutable: create a new FineTuneJob to change it"),
        Rule(
            "!has(self.revision) || !self.source.contains('@')",
            "give the revision either as source@revision or in revision, not both",
            "revision",
        ),
        Rule(
            "!has(self.tokenSecretRef) || self.source.startsWith('hf://')",
            "tokenSecretRef is only used for hf:// sources",
            "tokenSecretRef",
        ),
    )

    source: Annotated[
        str,
        Field(
            description=(
                "Where the weights come from: hf://ORG/NAME (Hugging Face Hub, optionally "
                "hf://ORG/NAME@REVISION), pvc://CLAIM/PATH (a folder in save_pretrained layout on "
                "a PersistentVolumeClaim), file:///ABSOLUTE/PATH (a local folder), or "
                "builtin://NAME "
                "for an offline architecture with random weights (tiny-llama, tiny-mistral, "
                "tiny-qwen2)."
            ),
            pattern=MODEL_SOURCE_PATTERN,
            max_length=512,
        ),
    ]
    revision: Annotated[
        str | None,
        Field(
            description="Hub revision (branch, tag or commit) for hf:// sources.",
            max_length=128,
            pattern=r"^[A-Za-z0-9._/-]+$",
        ),
    ] = None
    token_secret_ref: Annotated[
        SecretKeyRef | None,
        Field(
            description=(
                "Secret holding a Hugging Face access token for gated or private models. It "
                "reaches "
                "the trainer only as an environment variable from the Secret, never in plain text."
            )
        ),
    ] = None
    dtype: Annotated[
        Literal["bfloat16", "float16", "float32"],
        Field(description="Compute precision for training (weights are kept in fp32 by FSDP)."),
    ] = "bfloat16"
    allow_pickle_weights: Annotated[
        bool,
        Field(
            description=(
                "Let staging download pickle weights (pytorch_model.bin, .pt, .ckpt) when the "
                "revision has no safetensors. Loading pickle runs code from the file: refused "
                "unless true, and a warning Event says when it was used."
            )
        ),
    ] = False
    allow_remote_code: Annotated[
        bool,
        Field(
            description=(
                "Let staging accept a model whose config.json names custom code (auto_map): the "
                "trainer would run that code. Refused unless true, and a warning Event says when "
                "it was used."
            )
        ),
    ] = False


# ---------------------------------------------------------------------------------------------
# spec.dataset
# ---------------------------------------------------------------------------------------------


class ColumnMap(ApiModel):
    """Maps the dataset's column names onto the roles the chosen format reads.

    Leave a role unset to use its usual name (alpaca: instruction/input/output; summarization:
    article/highlights; text: text; chat: messages).
    """

    instruction: Annotated[
        str | None, Field(description="Column with the instruction (alpaca).", max_length=128)
    ] = None
    input: Annotated[
        str | None,
        Field(description="Column with the optional extra input (alpaca).", max_length=128),
    ] = None
    output: Annotated[
        str | None, Field(description="Column with the expected response (alpaca).", max_length=128)
    ] = None
    article: Annotated[
        str | None,
        Field(description="Column with the document to summarize (summarization).", max_length=128),
    ] = None
    summary: Annotated[
        str | None,
        Field(description="Column with the reference summary (summarization).", max_length=128),
    ] = None
    text: Annotated[
        str | None, Field(description="Column with raw text (text).", max_length=128)
    ] = None
    messages: Annotated[
        str | None,
        Field(description="Column with a list of {role, content} messages (chat).", max_length=128),
    ] = None


class DatasetSpec(ApiModel):
    """The training data and how to turn it into token sequences. Immutable once created."""

    cel_rules = (
        Rule("self == oldSelf", "dataset is immutable: create a new FineTuneJob to change it"),
        Rule(
            "!has(self.evalSplit) || "
            + if_decimal("evalFraction", "double(self.evalFraction) == 0.0"),
            "set either evalSplit or evalFraction, not both",
            "evalFraction",
        ),
        Rule(
            if_decimal("evalFraction", "double(self.evalFraction) < 0.5"),
            "evalFraction must be below 0.5 (it is the share of documents held out for eval)",
            "evalFraction",
        ),
        Rule(
            "!has(self.config) || !self.source.startsWith('file://')",
            "config names a Hub dataset configuration; local files have none",
            "config",
        ),
    )

    source: Annotated[
        str,
        Field(
            description=(
                "Where the data comes from: hf://ORG/NAME (a Hugging Face Hub dataset), "
                "pvc://CLAIM/PATH or file:///ABSOLUTE/PATH (a .jsonl, .json or .parquet file or a "
                "folder of them), or builtin://python-stdlib-alpaca (an offline instruction set "
                "built from the Python standard library: docstring -> instruction, source -> "
                "output)."
            ),
            pattern=DATASET_SOURCE_PATTERN,
            max_length=512,
        ),
    ]
    config: Annotated[
        str | None,
        Field(
            description='Dataset configuration name on the Hub, e.g. "3.0.0" for cnn_dailymail.',
            max_length=128,
        ),
    ] = None
    split: Annotated[
        str,
        Field(
            description="Split to train on.", max_length=128, pattern=r"^[A-Za-z0-9_.\[\]:%+-]+$"
        ),
    ] = "train"
    eval_split: Annotated[
        str | None,
        Field(
            description="Split to compute eval loss on (e.g. validation). Unset: see evalFraction.",
            max_length=128,
            pattern=r"^[A-Za-z0-9_.\[\]:%+-]+$",
        ),
    ] = None
    eval_fraction: Annotated[
        str,
        decimal(
            'Share of training documents held out for eval loss when no evalSplit is given ("0" '
            'turns eval off), e.g. "0.02".'
        ),
    ] = "0"
    format: Annotated[
        Literal["alpaca", "text", "summarization", "chat"],
        Field(
            description=(
                "How records become prompt and response: alpaca (instruction, optional input, "
                "output; the Stanford Alpaca prompt), summarization (article -> summary), text "
                "(plain language modelling, loss on every token), chat (the tokenizer's chat "
                "template; loss on assistant turns)."
            )
        ),
    ] = "alpaca"
    columns: Annotated[
        ColumnMap | None,
        Field(description="Column names, when they differ from the format's usual ones."),
    ] = None
    max_seq_length: Annotated[
        int,
        Field(
            description="Tokens per training sequence; longer documents are truncated.",
            ge=16,
            le=131072,
        ),
    ] = 2048
    packing: Annotated[
        bool,
        Field(
            description=(
                "Pack several documents into each sequence (with per-document position ids, so "
                "attention never crosses documents) instead of padding each one to maxSeqLength."
            )
        ),
    ] = True
    preprocessing_workers: Annotated[
        int | None,
        Field(
            description="Processes for tokenization (datasets.map num_proc). Unset: CPU count.",
            ge=1,
            le=256,
        ),
    ] = None


# ---------------------------------------------------------------------------------------------
# spec.method
# ---------------------------------------------------------------------------------------------


class LoraSpec(ApiModel):
    """Low-rank adapters (PEFT LoRA) trained on top of the frozen base model."""

    r: Annotated[int, Field(description="Adapter rank.", ge=1, le=1024)] = 16
    alpha: Annotated[int, Field(description="Scaling numerator (scale = alpha / r).", ge=1)] = 32
    dropout: Annotated[str, decimal('Dropout on the adapter input, e.g. "0.05".')] = "0.05"
    target_modules: Annotated[
        list[Annotated[str, Field(max_length=128, pattern=r"^[A-Za-z0-9_.*-]+$")]],
        Field(
            description=(
                "Names of the linear layers to adapt. Default: every attention and MLP projection "
                "(q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)."
            ),
            min_length=1,
            max_length=64,
        ),
    ] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    cel_rules = (
        Rule(
            if_decimal("dropout", "double(self.dropout) < 1.0"),
            "dropout must be below 1",
            "dropout",
        ),
    )


class MethodSpec(ApiModel):
    """Which weights are trained. Immutable once created."""

    cel_rules = (
        Rule("self == oldSelf", "method is immutable: create a new FineTuneJob to change it"),
        Rule(
            "!has(self.lora) || self.type == 'lora'", "lora is only allowed with type lora", "lora"
        ),
    )

    type: Annotated[
        Literal["full", "lora"],
        Field(description="full: every weight is trained. lora: low-rank adapters only."),
    ] = "full"
    lora: Annotated[
        LoraSpec | None,
        Field(description="LoRA settings; only with type lora (defaults apply when unset)."),
    ] = None


# ---------------------------------------------------------------------------------------------
# spec.hyperparameters
# ---------------------------------------------------------------------------------------------


class Hyperparameters(ApiModel):
    """Optimisation settings. Decimals are strings, e.g. learningRate: "2e-5"."""

    cel_rules = (
        Rule(
            "has(self.epochs) != has(self.maxSteps)",
            "set exactly one of epochs or maxSteps",
            "epochs",
            "FieldValueRequired",
        ),
        Rule(
            if_decimal(
                "learningRate",
                "double(self.learningRate) > 0.0 && double(self.learningRate) <= 1.0",
            ),
            "learningRate must be in (0, 1]",
            "learningRate",
        ),
        Rule(
            if_decimal("weightDecay", "double(self.weightDecay) <= 1.0"),
            "weightDecay must be in [0, 1]",
            "weightDecay",
        ),
        Rule(
            if_decimal("maxGradNorm", "double(self.maxGradNorm) > 0.0"),
            "maxGradNorm must be above 0",
            "maxGradNorm",
        ),
        Rule(
            "!has(self.maxSteps) || self.warmupSteps < self.maxSteps",
            "warmupSteps must be below maxSteps",
            "warmupSteps",
        ),
        Rule("self.seed == oldSelf.seed", "seed is immutable: a resumed run must replay its data"),
    )

    epochs: Annotated[
        int | None,
        Field(description="Passes over the training data. Set this or maxSteps.", ge=1, le=1000),
    ] = None
    max_steps: Annotated[
        int | None,
        Field(description="Optimizer steps to run. Set this or epochs.", ge=1, le=100_000_000),
    ] = None
    global_batch_size: Annotated[
        int,
        Field(
            description=(
                "Sequences per optimizer step across all GPUs. The planner splits it into "
                "data-parallel ranks x micro-batch x gradient accumulation."
            ),
            ge=1,
            le=1_048_576,
        ),
    ] = 64
    learning_rate: Annotated[str, decimal('Peak learning rate, e.g. "2e-5".')] = "2e-5"
    lr_scheduler: Annotated[
        Literal["cosine", "linear", "constant"],
        Field(description="Learning-rate decay after warmup."),
    ] = "cosine"
    warmup_steps: Annotated[
        int, Field(description="Steps of linear warmup from 0 to learningRate.", ge=0)
    ] = 0
    weight_decay: Annotated[str, decimal('AdamW weight decay, e.g. "0.1".')] = "0.0"
    max_grad_norm: Annotated[str, decimal("Clip the global gradient norm to this value.")] = "1.0"
    seed: Annotated[
        int, Field(description="Seed for initialisation, shuffling and dropout.", ge=0)
    ] = 42
    eval_every_steps: Annotated[
        int | None,
        Field(
            description="Compute eval loss every N steps (and at the end). Unset: at the end.", ge=1
        ),
    ] = None


# ---------------------------------------------------------------------------------------------
# spec.parallelism
# ---------------------------------------------------------------------------------------------


class Parallelism(ApiModel):
    """How the work is split across GPUs. Leave it to the planner (mode auto) unless you must.

    In auto mode any degree you set is kept and the planner chooses the rest. In manual mode every
    degree you leave unset is 1, and the degrees must multiply to numNodes x gpusPerNode.
    """

    mode: Annotated[
        Literal["auto", "manual"],
        Field(
            description="auto: the planner chooses; manual: the degrees below are used as given."
        ),
    ] = "auto"
    data_parallel: Annotated[
        int | None,
        Field(
            description="Replicated data-parallel groups (the replicate dimension of HSDP).", ge=1
        ),
    ] = None
    fsdp: Annotated[
        int | None,
        Field(description="Ranks that shard parameters, gradients and optimizer state.", ge=1),
    ] = None
    tensor_parallel: Annotated[
        int | None,
        Field(
            description="Tensor-parallel degree; stays inside a node and divides the heads.", ge=1
        ),
    ] = None
    context_parallel: Annotated[
        int | None,
        Field(
            description=(
                "Ranks each sequence is split over (ring attention, for long sequences); GPU"
                " only, not with pipelineParallel; the sequence length must split into"
                " 2 x contextParallel equal chunks."
            ),
            ge=1,
        ),
    ] = None
    pipeline_parallel: Annotated[
        int | None, Field(description="Pipeline stages, split at decoder layers.", ge=1)
    ] = None
    micro_batch_size: Annotated[
        int | None, Field(description="Sequences per GPU per forward pass.", ge=1, le=4096)
    ] = None
    activation_checkpointing: Annotated[
        Literal["none", "selective", "full"] | None,
        Field(description="Recompute activations in backward to save memory."),
    ] = None
    cpu_offload: Annotated[
        bool | None,
        Field(description="Keep sharded parameters and optimizer state in host memory."),
    ] = None


# ---------------------------------------------------------------------------------------------
# spec.resources
# ---------------------------------------------------------------------------------------------


class Toleration(ApiModel):
    """A Kubernetes toleration for the training pods."""

    key: Annotated[str | None, Field(description="Taint key to tolerate.", max_length=316)] = None
    operator: Annotated[Literal["Exists", "Equal"], Field(description="Exists or Equal.")] = "Equal"
    value: Annotated[str | None, Field(description="Taint value (with Equal).", max_length=63)] = (
        None
    )
    effect: Annotated[
        Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None,
        Field(description="Taint effect to tolerate. Unset: all effects."),
    ] = None
    toleration_seconds: Annotated[
        int | None, Field(description="How long to stay bound under NoExecute.", ge=0)
    ] = None

    cel_rules = (
        Rule(
            "self.operator != 'Exists' || !has(self.value)",
            "value must be empty when operator is Exists",
            "value",
        ),
    )


GpuType = Literal[
    "H100-80GB", "H200-141GB", "A100-40GB", "A100-80GB", "L40S-48GB", "B200-180GB", "CPU"
]
GPU_TYPES: tuple[GpuType, ...] = get_args(GpuType)


#: The schema's bound on gpusPerNode (no GPU server holds more).
MAX_GPUS_PER_NODE = 16


def _gpus_per_node_rules() -> tuple[Rule, ...]:
    """gpusPerNode at most what one node of gpuType holds (the planner's hardware table), for the
    GPU types whose servers hold fewer than the schema's maximum."""
    by_limit: dict[int, list[str]] = {}
    for name in GPU_TYPES:
        limit = get_gpu(name).max_gpus_per_node
        if limit < MAX_GPUS_PER_NODE:
            by_limit.setdefault(limit, []).append(name)
    return tuple(
        Rule(
            "!has(self.gpuType) || !has(self.gpusPerNode) || "
            f"!(self.gpuType in {names}) || self.gpusPerNode <= {limit}",
            f"one {' or '.join(names)} node holds at most {limit} GPUs: write gpusPerNode: {limit} "
            f"(or fewer) and raise numNodes, e.g. numNodes: 2 and gpusPerNode: {limit} for "
            f"{2 * limit} GPUs",
            "gpusPerNode",
        )
        for limit, names in sorted(by_limit.items())
    )


class Resources(ApiModel):
    """The machines the job runs on."""

    cel_rules = _gpus_per_node_rules()

    num_nodes: Annotated[
        int, Field(description="Nodes (pods): one master plus numNodes-1 workers.", ge=1, le=1000)
    ] = 1
    gpus_per_node: Annotated[
        int,
        Field(
            description=(
                "GPUs per node (nvidia.com/gpu), one training process each. With gpuType CPU it is "
                "the number of CPU training processes per node and no GPU is requested."
            ),
            ge=1,
            le=MAX_GPUS_PER_NODE,
        ),
    ] = 8
    gpu_type: Annotated[
        GpuType | None,
        Field(
            description=(
                "GPU model: the planner's memory and speed figures come from it, and the pods go "
                "only to nodes whose nvidia.com/gpu.product label (NVIDIA GPU feature discovery) "
                "is that GPU. Left out: inferred from the nodes' nvidia.com/gpu.product labels "
                "when the cluster's GPU nodes (those matching nodeSelector, if set) are all of "
                "one type, and recorded in status.inferredGpuType; with several types, or no "
                "labelled node, the job waits and says to set it. CPU: no GPUs."
            )
        ),
    ] = None
    cpu: Annotated[
        str | None,
        Field(
            description='CPU request and limit per pod, e.g. "32".',
            pattern=QUANTITY_PATTERN,
            max_length=32,
        ),
    ] = None
    memory: Annotated[
        str | None,
        Field(
            description='Memory request and limit per pod, e.g. "512Gi".',
            pattern=QUANTITY_PATTERN,
            max_length=32,
        ),
    ] = None
    node_selector: Annotated[
        dict[str, Annotated[str, Field(max_length=63)]] | None,
        Field(description="Node labels the pods must match.", max_length=32),
    ] = None
    tolerations: Annotated[
        list[Toleration] | None,
        Field(
            description="Tolerations for the pods (GPU pools are usually tainted).", max_length=32
        ),
    ] = None


# ---------------------------------------------------------------------------------------------
# spec.checkpoint, spec.output, spec.scheduling, spec.runPolicy
# ---------------------------------------------------------------------------------------------


class CheckpointSpec(ApiModel):
    """Distributed checkpoints for resume after failure or preemption."""

    cel_rules = (
        Rule(
            "!has(oldSelf.storage) || (has(self.storage) && self.storage == oldSelf.storage)",
            "checkpoint.storage is immutable: the run resumes from it",
            "storage",
        ),
    )

    storage: Annotated[
        str | None,
        Field(
            description=(
                "Where checkpoints go (pvc://CLAIM/PATH or file:///PATH). Unset: none are kept."
            ),
            pattern=STORAGE_PATTERN,
            max_length=512,
        ),
    ] = None
    every_steps: Annotated[
        int, Field(description="Save every N optimizer steps (and on SIGTERM).", ge=1)
    ] = 500
    keep_last: Annotated[
        int,
        Field(description="Complete checkpoints to keep; older ones are deleted.", ge=1, le=1000),
    ] = 3
    resume: Annotated[
        Literal["auto", "never"],
        Field(description="auto: continue from the latest complete checkpoint if there is one."),
    ] = "auto"


class OutputSpec(ApiModel):
    """Where the fine-tuned model is written, in Hugging Face save_pretrained layout."""

    storage: Annotated[
        str,
        Field(
            description="Destination folder: pvc://CLAIM/PATH or file:///ABSOLUTE/PATH.",
            pattern=STORAGE_PATTERN,
            max_length=512,
        ),
    ]


class Scheduling(ApiModel):
    """Queueing and priority."""

    queue_name: Annotated[
        str | None,
        Field(
            description=(
                "Kueue LocalQueue to submit to. Kueue then owns suspension: the operator never "
                "unsuspends a job Kueue holds."
            ),
            pattern=_DNS_SUBDOMAIN,
            max_length=253,
        ),
    ] = None
    priority: Annotated[
        str | None,
        Field(
            description=(
                "Kueue WorkloadPriorityClass of the job (the kueue.x-k8s.io/priority-class label "
                "on its child): its place in the queue and whom it may preempt."
            ),
            pattern=_DNS_SUBDOMAIN,
            max_length=253,
        ),
    ] = None
    priority_class_name: Annotated[
        str | None,
        Field(description="PriorityClass for the pods.", pattern=_DNS_SUBDOMAIN, max_length=253),
    ] = None
    gang_scheduling: Annotated[
        bool,
        Field(
            description=(
                "For a cluster with a gang scheduler (Volcano, scheduler-plugins): all of the "
                "job's pods start together or none does (the PyTorchJob's "
                "runPolicy.schedulingPolicy.minAvailable is every replica). Kueue's "
                "waitForPodsReady gives the same guarantee without it."
            )
        ),
    ] = False


class RunPolicy(ApiModel):
    """Lifecycle limits and recovery: suspend, activeDeadlineSeconds, backoffLimit and
    ttlSecondsAfterFinished go to the PyTorchJob's runPolicy (a TrainJob takes suspend and
    activeDeadlineSeconds, its runtime the restart budget); the operator itself enforces the
    startup deadline, restarts a hung job and re-plans after out-of-memory, within these budgets."""

    suspend: Annotated[
        bool, Field(description="true stops the pods (a checkpoint is saved); false resumes.")
    ] = False
    active_deadline_seconds: Annotated[
        int | None, Field(description="Fail the job after this many seconds running.", ge=1)
    ] = None
    backoff_limit: Annotated[
        int, Field(description="Pod restarts allowed before the job fails.", ge=0, le=100)
    ] = 3
    ttl_seconds_after_finished: Annotated[
        int | None,
        Field(
            description=(
                "Delete the PyTorchJob and its pods this long after the end (PyTorchJob child "
                "only)."
            ),
            ge=0,
        ),
    ] = None
    startup_deadline_seconds: Annotated[
        int,
        Field(
            description=(
                "Fail the job (reason StartupDeadlineExceeded, with the pod's own message: "
                "ImagePullBackOff, the scheduler's Unschedulable, a stuck init container) when a "
                "training pod is still not running this many seconds after it was created. "
                "Queued jobs (no pods yet) do not count. The default, 600, leaves time to pull a "
                "20 GB trainer image."
            ),
            ge=10,
            le=86400,
        ),
    ] = 600
    hang_timeout_seconds: Annotated[
        int | None,
        Field(
            description=(
                "Restart the training pods (they resume from the last complete checkpoint) when "
                "the trainer's step has not advanced for this many seconds. Left out: 10 times "
                "the observed step time, at least 300 (1800 before the first step, while the "
                "model loads). Each restart counts against maxRestarts."
            ),
            ge=10,
            le=604800,
        ),
    ] = None
    max_restarts: Annotated[
        int,
        Field(
            description=(
                "Restarts of a hung job allowed; when they are spent, the next hang fails the "
                "job with reason Hung."
            ),
            ge=0,
            le=100,
        ),
    ] = 3
    max_replans: Annotated[
        int,
        Field(
            description=(
                "Times the operator re-plans the job after it runs out of memory (OOMKilled, or "
                "the trainer's GPUOutOfMemory): each time it picks the fastest plan that predicts "
                "a lower peak memory than the one that failed, records it in status.attempts and "
                "resumes from the last checkpoint. 0 fails the job at the first out-of-memory."
            ),
            ge=0,
            le=10,
        ),
    ] = 2


# ---------------------------------------------------------------------------------------------
# spec
# ---------------------------------------------------------------------------------------------

_DEG = "(has(self.parallelism.{0}) ? self.parallelism.{0} : 1)"
_DP_TIMES_FSDP = f"{_DEG.format('dataParallel')} * {_DEG.format('fsdp')}"
_ALL_DEGREES = (
    f"{_DP_TIMES_FSDP} * {_DEG.format('tensorParallel')} * {_DEG.format('pipelineParallel')}"
)
_WORLD = "self.resources.numNodes * self.resources.gpusPerNode"
#: numNodes or gpusPerNode below 1 has its own schema message: the degree rules keep quiet then.
_NO_WORLD = "self.resources.numNodes < 1 || self.resources.gpusPerNode < 1"
_ANY_DEGREE = " || ".join(
    f"has(self.parallelism.{d})"
    for d in ("dataParallel", "fsdp", "tensorParallel", "pipelineParallel")
)


class PodMetadata(ApiModel):
    """Extra labels and annotations for the training pods."""

    labels: Annotated[
        dict[str, Annotated[str, Field(max_length=63)]] | None,
        Field(description="Labels added to every training and staging pod.", max_length=64),
    ] = None
    annotations: Annotated[
        dict[str, Annotated[str, Field(max_length=4096)]] | None,
        Field(
            description=(
                "Annotations added to every training and staging pod (sidecar injection, cost "
                "allocation...)."
            ),
            max_length=64,
        ),
    ] = None


class FineTuneJobSpec(ApiModel):
    """What to fine-tune, on what data, how, and on which machines."""

    cel_rules = (
        Rule(
            f"self.parallelism.mode != 'manual' || {_NO_WORLD} || {_ALL_DEGREES} == {_WORLD}",
            "in manual mode dataParallel x fsdp x tensorParallel x pipelineParallel must equal "
            "numNodes x gpusPerNode",
            "parallelism",
        ),
        Rule(
            f"!({_ANY_DEGREE}) || {_NO_WORLD} || "
            f"({_ALL_DEGREES} <= {_WORLD} && ({_WORLD}) % ({_ALL_DEGREES}) == 0)",
            "the parallel degrees must divide numNodes x gpusPerNode",
            "parallelism",
        ),
        Rule(
            "!has(self.parallelism.tensorParallel) || "
            "self.parallelism.tensorParallel <= self.resources.gpusPerNode",
            "tensorParallel must be at most gpusPerNode (tensor parallelism stays inside a node)",
            "parallelism.tensorParallel",
        ),
        Rule(
            "self.parallelism.mode != 'manual' || "
            f"self.hyperparameters.globalBatchSize % ({_DP_TIMES_FSDP} * "
            f"{_DEG.format('microBatchSize')}) == 0",
            "globalBatchSize must be a multiple of dataParallel x fsdp x microBatchSize",
            "hyperparameters.globalBatchSize",
        ),
        Rule(
            "!has(self.parallelism.cpuOffload) || !self.parallelism.cpuOffload || "
            "!has(self.resources.gpuType) || self.resources.gpuType != 'CPU'",
            "cpuOffload needs GPUs",
            "parallelism.cpuOffload",
        ),
        Rule(
            "!has(self.checkpoint.storage) || !has(self.output) || "
            "self.checkpoint.storage != self.output.storage",
            "checkpoint.storage and output.storage must differ",
            "checkpoint.storage",
        ),
    )

    model: Annotated[ModelSpec, Field(description="The base model.")]
    dataset: Annotated[DatasetSpec, Field(description="The training data.")]
    method: Annotated[
        MethodSpec,
        Field(
            description="Full fine-tune or LoRA.",
            default_factory=MethodSpec,
            json_schema_extra=_EMPTY,
        ),
    ]
    hyperparameters: Annotated[
        Hyperparameters,
        Field(description="Optimisation settings; epochs or maxSteps is required."),
    ]
    parallelism: Annotated[
        Parallelism,
        Field(
            description="Parallelism (the planner decides by default).",
            default_factory=Parallelism,
            json_schema_extra=_EMPTY,
        ),
    ]
    resources: Annotated[
        Resources,
        Field(description="Nodes and GPUs.", default_factory=Resources, json_schema_extra=_EMPTY),
    ]
    checkpoint: Annotated[
        CheckpointSpec,
        Field(
            description="Checkpointing and resume.",
            default_factory=CheckpointSpec,
            json_schema_extra=_EMPTY,
        ),
    ]
    output: Annotated[
        OutputSpec | None,
        Field(
            description=(
                "Where the fine-tuned model goes. Unset: in the cluster the model is lost when the "
                "pods go (a warning says so); local runs write under ./finetune-runs/NAME/model."
            )
        ),
    ] = None
    scheduling: Annotated[Scheduling | None, Field(description="Kueue queue and pod priority.")] = (
        None
    )
    run_policy: Annotated[
        RunPolicy,
        Field(
            description="Suspend, deadlines and retries.",
            default_factory=RunPolicy,
            json_schema_extra=_EMPTY,
        ),
    ]
    pod_metadata: Annotated[
        PodMetadata | None, Field(description="Extra labels and annotations for the pods.")
    ] = None
    cache: Annotated[
        str | None,
        Field(
            description=(
                "PersistentVolumeClaim (in the job's namespace) that holds staged models and "
                "datasets: the staging Job downloads into it once per repository and commit, and "
                "the trainer pods mount it read-only. It must be ReadWriteMany when numNodes > "
                "1. Unset: the operator's per-namespace cache claim (the chart's cache settings)."
            ),
            pattern=_DNS_SUBDOMAIN,
            max_length=253,
        ),
    ] = None
    image: Annotated[
        str | None,
        Field(
            description="Trainer image override. Unset: the image the operator was installed with.",
            pattern=_IMAGE,
            max_length=512,
        ),
    ] = None
