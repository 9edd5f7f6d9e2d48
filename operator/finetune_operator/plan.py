"""Plan a FineTuneJob: its spec becomes the planner's inputs, the planner's answer becomes
``status.plan`` and the trainer's :class:`PlanConfig`. Pure: no Kubernetes client, kopf or torch.

A model the planner knows offline (the catalog of public configurations and the builtin tiny
architectures) can be planned from its spec alone (``finetune plan``). In the cluster the
operator plans every staged model from the config.json its staging Job read
(:mod:`finetune_operator.staging`), a private Hub repository or a folder on a PVC included,
before any pod exists; only a model nobody could read is left to the trainer to plan.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from pydantic import ValidationError

from finetune_operator.api import Problem
from finetune_operator.sources import parse_source
from finetune_operator.spec import FineTuneJobSpec, LoraSpec
from finetune_operator.status import PlanStatus
from finetune_trainer.config import PlanConfig
from finetune_trainer.planner import (
    Cluster,
    Constraints,
    ModelFacts,
    PlanInfeasible,
    PlanResult,
    Workload,
    is_known_model,
    known_model,
    plan_parallelism,
)
from finetune_trainer.planner.api import Mode

__all__ = [
    "GPU_TYPE_FROM_NODES",
    "PlanInfeasible",
    "model_facts",
    "plan_config",
    "plan_job",
    "plan_status",
    "planning_problem",
]


def model_facts(spec: FineTuneJobSpec) -> ModelFacts | None:
    """The model's shape when the planner knows it offline, else None (the trainer plans)."""
    source = parse_source(spec.model.source)
    if source.scheme not in {"hf", "builtin"} or not is_known_model(source.location):
        return None
    return known_model(source.location)


def workload(spec: FineTuneJobSpec) -> Workload:
    lora = spec.method.lora or LoraSpec()
    return Workload(
        seq_len=spec.dataset.max_seq_length,
        global_batch_size=spec.hyperparameters.global_batch_size,
        method=spec.method.type,
        lora_rank=lora.r,
        lora_targets=tuple(lora.target_modules),
        lora_dropout=float(lora.dropout),
    )


def constraints(spec: FineTuneJobSpec) -> Constraints:
    """The degrees the user pinned (the field names are the same on both sides)."""
    return Constraints(**spec.parallelism.model_dump(exclude={"mode"}))


def plan_job(spec: FineTuneJobSpec, facts: ModelFacts | None = None) -> PlanResult | None:
    """The plan for ``spec`` (for the model ``facts`` when given, e.g. read from a config.json);
    None when the model is unknown offline (the trainer plans) or gpuType is left out (the
    operator plans once it has inferred it from the nodes). Raises PlanInfeasible."""
    res = spec.resources
    if res.gpu_type is None:  # the operator infers it from the nodes, then plans
        return None
    facts = facts or model_facts(spec)
    if facts is None:
        return None
    try:
        cluster = Cluster.of(res.gpu_type, nodes=res.num_nodes, gpus_per_node=res.gpus_per_node)
    except ValidationError as exc:  # e.g. more GPUs per node than that GPU's servers hold
        reasons = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
        raise PlanInfeasible(f"spec.resources: {reasons}") from None
    return _plan_once(facts, cluster, workload(spec), constraints(spec), spec.parallelism.mode)


#: The plans made so far, by their inputs (a planner answer, or why none fits): the operator
#: reconciles a job many times (created, staged, every event) and many jobs share a shape, and
#: planning one costs ~25-50 ms of CPU. Bounded; thread-safe (kopf runs handlers on threads).
_PLANS: OrderedDict[str, PlanResult | PlanInfeasible] = OrderedDict()
_PLANS_MAX = 512
_PLANS_LOCK = threading.Lock()


def _plan_once(
    facts: ModelFacts, cluster: Cluster, work: Workload, pinned: Constraints, mode: Mode
) -> PlanResult:
    """plan_parallelism, each distinct input planned once (the planner is a pure function)."""
    key = "\x1f".join(m.model_dump_json() for m in (facts, cluster, work, pinned)) + mode
    with _PLANS_LOCK:
        known = _PLANS.get(key)
        if known is not None:
            _PLANS.move_to_end(key)
    if known is None:
        try:
            known = plan_parallelism(facts, cluster, work, pinned, mode=mode)
        except PlanInfeasible as exc:
            known = exc
        with _PLANS_LOCK:
            _PLANS[key] = known
            while len(_PLANS) > _PLANS_MAX:
                _PLANS.popitem(last=False)
    if isinstance(known, PlanInfeasible):
        raise PlanInfeasible(known.message, known.suggestions, known.closest)
    return known


#: What ``finetune plan``/``validate`` say offline about a job that leaves gpuType out.
GPU_TYPE_FROM_NODES = (
    "spec.resources.gpuType is left out: the operator infers it from the cluster's nodes (their "
    "nvidia.com/gpu.product labels, when all GPU nodes are of one type) and plans the job when it "
    "sees them; set gpuType to plan it here"
)


def planning_problem(spec: FineTuneJobSpec) -> Problem | None:
    """Why the operator would fail ``spec`` with PlanInfeasible, as a problem that says what would
    fit; None when a plan fits or the model is planned by the trainer (unknown offline)."""
    try:
        plan_job(spec)
    except PlanInfeasible as exc:
        return Problem("spec", f"no plan fits (the operator would fail it: PlanInfeasible): {exc}")
    return None


def plan_status(result: PlanResult) -> PlanStatus:
    """``status.plan`` for a planner result."""
    return PlanStatus.model_validate(result.to_status())


def plan_config(result: PlanResult) -> PlanConfig:
    """What the trainer needs to apply the plan."""
    return PlanConfig(**{name: getattr(result.plan, name) for name in PlanConfig.model_fields})
