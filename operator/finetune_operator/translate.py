"""FineTuneJob spec -> trainer config: a pure translation.

Sources become what the trainer opens (see :mod:`finetune_operator.sources`): ``hf://org/name@rev``
a Hub id and revision, ``pvc://claim/path`` the path where the operator mounts that claim,
``file:///path`` the path itself, ``builtin://name`` the name. Decimal strings become numbers.
Pure: imports no Kubernetes client, kopf or torch.
"""

from __future__ import annotations

from finetune_operator.sources import local_path, parse_source
from finetune_operator.spec import FineTuneJobSpec, LoraSpec
from finetune_trainer import names
from finetune_trainer.config import (
    DEFAULT_COLUMNS,
    CheckpointConfig,
    DataConfig,
    HardwareConfig,
    LoraConfig,
    MethodConfig,
    MetricsConfig,
    ModelConfig,
    OptimConfig,
    ParallelismConfig,
    PlanConfig,
    ScheduleConfig,
    SourceKind,
    TrainerConfig,
)


def _resolve(uri: str) -> tuple[SourceKind, str, str | None]:
    source = parse_source(uri)
    if source.scheme == "hf":
        return "hf", source.location, source.revision
    if source.scheme == "builtin":
        return "builtin", source.location, None
    return "local", local_path(uri), None


def _lora(spec: FineTuneJobSpec) -> LoraConfig | None:
    if spec.method.type != "lora":
        return None
    lora = spec.method.lora or LoraSpec()
    return LoraConfig(
        r=lora.r,
        alpha=lora.alpha,
        dropout=float(lora.dropout),
        target_modules=tuple(lora.target_modules),
    )


def _gpu_type(spec: FineTuneJobSpec) -> str:
    if spec.resources.gpu_type is None:  # the operator infers it from the nodes first
        raise ValueError(
            "spec.resources.gpuType is left out: infer it from the nodes (or set it) before "
            "making the trainer config"
        )
    return spec.resources.gpu_type


def to_trainer_config(
    spec: FineTuneJobSpec,
    *,
    name: str,
    default_output_dir: str,
    plan: PlanConfig | None = None,
    metrics_port: int = names.METRICS_PORT,
) -> TrainerConfig:
    """The trainer config for one FineTuneJob.

    ``default_output_dir`` is used when the spec names no output storage (a local run's run folder,
    or a path inside the pod). ``plan`` is the planner's choice when the caller has made it.
    """
    model_kind, model_name, model_rev_in_uri = _resolve(spec.model.source)
    data_kind, data_name, data_rev = _resolve(spec.dataset.source)
    columns = dict(DEFAULT_COLUMNS[spec.dataset.format])
    if spec.dataset.columns is not None:
        given = spec.dataset.columns.model_dump(exclude_none=True)
        columns.update({k: v for k, v in given.items() if k in columns})
    hp = spec.hyperparameters
    return TrainerConfig(
        run_name=name,
        model=ModelConfig(
            kind=model_kind,
            name_or_path=model_name,
            revision=spec.model.revision or model_rev_in_uri,
            token_env=names.ENV_HF_TOKEN if spec.model.token_secret_ref else None,
            dtype=spec.model.dtype,
        ),
        data=DataConfig(
            kind=data_kind,
            name_or_path=data_name,
            config_name=spec.dataset.config,
            revision=data_rev,
            split=spec.dataset.split,
            eval_split=spec.dataset.eval_split,
            eval_fraction=float(spec.dataset.eval_fraction),
            format=spec.dataset.format,
            columns=columns,
            max_seq_length=spec.dataset.max_seq_length,
            packing=spec.dataset.packing,
            num_proc=spec.dataset.preprocessing_workers,
        ),
        method=MethodConfig(type=spec.method.type, lora=_lora(spec)),
        optim=OptimConfig(
            learning_rate=float(hp.learning_rate),
            weight_decay=float(hp.weight_decay),
            max_grad_norm=float(hp.max_grad_norm),
            lr_scheduler=hp.lr_scheduler,
            warmup_steps=hp.warmup_steps,
        ),
        schedule=ScheduleConfig(
            epochs=hp.epochs,
            max_steps=hp.max_steps,
            global_batch_size=hp.global_batch_size,
            seed=hp.seed,
            eval_every_steps=hp.eval_every_steps,
        ),
        hardware=HardwareConfig(
            gpu_type=_gpu_type(spec),
            num_nodes=spec.resources.num_nodes,
            procs_per_node=spec.resources.gpus_per_node,
        ),
        parallelism=ParallelismConfig(**spec.parallelism.model_dump()),
        plan=plan,
        checkpoint=CheckpointConfig(
            dir=local_path(spec.checkpoint.storage) if spec.checkpoint.storage else None,
            every_steps=spec.checkpoint.every_steps,
            keep_last=spec.checkpoint.keep_last,
            resume=spec.checkpoint.resume,
        ),
        output_dir=local_path(spec.output.storage) if spec.output else default_output_dir,
        metrics=MetricsConfig(port=metrics_port),
    )
