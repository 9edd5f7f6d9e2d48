"""Property: the operator's whole pure path holds on every spec the API server accepts.

Hypothesis draws FineTuneJobs across the API (sources, formats, methods, pinned degrees, GPU
types, node counts...) that are valid by construction (no filtering: an invalid draw is a failure
of the strategy or of the validation), and runs what a reconcile runs: plan, translate, build the
children, then derive status for each state of the child PyTorchJob and its pods. The only allowed
refusal is PlanInfeasible, which must fail the job with its message. The derived status must have
the phase that follows from what was observed, and satisfy the invariants a user and
``kubectl get ftj`` rely on (see ``expected`` and ``check_invariants``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jsonschema
import pytest
from hypothesis import Phase, event, find, given, settings
from hypothesis import strategies as st

from crdcheck import status_validator
from finetune_operator import api, manifest
from finetune_operator.gputype import infer_gpu_type, with_gpu_type
from finetune_operator.objects import Child, Pod
from finetune_operator.plan import PlanInfeasible, plan_config, plan_job, plan_status
from finetune_operator.spec import GPU_TYPES
from finetune_operator.status import (
    ChildRef,
    FineTuneJobStatus,
    InferredGpuType,
    Observed,
    PlanStatus,
    derive,
)
from finetune_operator.translate import to_trainer_config
from helpers import ROOT, load_yaml

SOURCES = [
    "hf://mistralai/Mistral-7B-v0.3",
    "hf://meta-llama/Meta-Llama-3-8B",
    "hf://meta-llama/Meta-Llama-3-70B",
    "hf://Qwen/Qwen2-0.5B",
    "hf://someone/unknown-model@main",
    "pvc://models/base",
    "file:///models/base",
    "builtin://tiny-llama",
    "builtin://tiny-qwen2",
]
NOW, LATER = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"
#: Defaults of spec.resources when a field is left out.
DEFAULT_NODES, DEFAULT_GPUS_PER_NODE, DEFAULT_GPU = 1, 8, "H100-80GB"


def _optional(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional=fields)


def _divisors(n: int, at_most: int | None = None) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0 and (at_most is None or d <= at_most)]


@st.composite
def _resources_and_parallelism(draw: st.DrawFn) -> dict[str, Any]:
    """spec.resources, spec.parallelism and spec.hyperparameters, consistent with each other.

    The rules of the API: the pinned degrees (1 when left out) multiply to a divisor of the world
    (numNodes x gpusPerNode), to the world itself in manual mode; tensorParallel <= gpusPerNode;
    in manual mode globalBatchSize is a multiple of dataParallel x fsdp x microBatchSize;
    cpuOffload only on GPUs.
    """
    resources = draw(
        _optional(numNodes=st.integers(1, 64), gpuType=st.sampled_from(list(GPU_TYPES)))
    )
    on_gpus = resources.get("gpuType", DEFAULT_GPU) != "CPU"
    # One GPU server holds at most 8 GPUs (the gpusPerNode rule); CPU processes up to 16.
    per_node = [1, 2, 4, 8] if on_gpus else [1, 2, 4, 8, 16]
    resources |= draw(_optional(gpusPerNode=st.sampled_from(per_node)))
    gpus_per_node = resources.get("gpusPerNode", DEFAULT_GPUS_PER_NODE)
    world = resources.get("numNodes", DEFAULT_NODES) * gpus_per_node

    parallelism: dict[str, Any] = draw(
        _optional(
            activationCheckpointing=st.sampled_from(["none", "selective", "full"]),
            cpuOffload=st.booleans() if on_gpus else st.just(False),
            microBatchSize=st.integers(1, 64),
        )
    )
    mode = draw(st.sampled_from([None, "auto", "manual"]))
    if mode is not None:
        parallelism["mode"] = mode
    left = world
    degrees: dict[str, int] = {}
    for name in ("tensorParallel", "pipelineParallel", "fsdp", "dataParallel"):
        if mode == "manual" and name == "dataParallel":
            degrees[name] = left  # the product must be the world
        else:
            at_most = gpus_per_node if name == "tensorParallel" else None
            degrees[name] = draw(st.sampled_from(_divisors(left, at_most)))
        left //= degrees[name]
    for name, degree in degrees.items():
        # a degree of 1 may be written or left out; an auto-mode degree may always be left out
        must_write = mode == "manual" and degree != 1
        if must_write or draw(st.booleans()):
            parallelism[name] = degree

    if mode == "manual":
        unit = (
            parallelism.get("dataParallel", 1)
            * parallelism.get("fsdp", 1)
            * parallelism.get("microBatchSize", 1)
        )
        batch = unit * draw(st.integers(1, max(1, 4096 // unit)))
    else:
        batch = draw(st.integers(1, 4096))
    length = draw(
        st.one_of(
            st.builds(lambda n: {"maxSteps": n}, st.integers(1, 10**6)),
            st.builds(lambda n: {"epochs": n}, st.integers(1, 10)),
        )
    )
    return {
        "resources": resources,
        "parallelism": parallelism,
        "hyperparameters": {**length, "globalBatchSize": batch},
    }


specs = st.builds(
    lambda rest, sized: {**rest, **sized},
    st.fixed_dictionaries(
        {
            "model": st.fixed_dictionaries(
                {"source": st.sampled_from(SOURCES)},
                optional={"dtype": st.sampled_from(["bfloat16", "float16", "float32"])},
            ),
            "dataset": st.fixed_dictionaries(
                {
                    "source": st.sampled_from(
                        ["hf://org/data", "pvc://data/x.jsonl", "builtin://python-stdlib-alpaca"]
                    )
                },
                optional={
                    "format": st.sampled_from(["alpaca", "text", "summarization", "chat"]),
                    "maxSeqLength": st.integers(16, 131072),
                    "packing": st.booleans(),
                    "evalFraction": st.sampled_from(["0", "0.01", "0.2"]),
                },
            ),
            "method": st.one_of(
                st.just({"type": "full"}),
                st.builds(lambda r: {"type": "lora", "lora": {"r": r}}, st.integers(1, 256)),
            ),
            "runPolicy": _optional(suspend=st.booleans(), backoffLimit=st.integers(0, 10)),
            "scheduling": _optional(queueName=st.just("team-a")),
        }
    ),
    _resources_and_parallelism(),
)


def _document(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": "p", "namespace": "ns", "uid": "u", "generation": 1},
        "spec": spec,
    }


# --------------------------------------------------------------------- what the cluster shows
CHILD_STATES: list[tuple[str, ...] | None] = [
    None,
    ("Created",),
    ("Created", "Running"),
    ("Succeeded",),
    ("Failed",),
]
#: What a pod of the job reports (None: nothing wrong), and the failure reason it means.
POD_STATES: list[str | None] = [None, "OOMKilled", "Error", "ImagePullBackOff", "Unschedulable"]
CHILD_NAME, CHILD_UID = "p", "c"
#: Stated here, not imported: an oracle that reads the code under test agrees with its bugs.
TERMINAL = frozenset({"Succeeded", "Failed"})
#: Pod problems that keep torchrun from starting (it needs every pod).
HOLDS_BACK = frozenset({"ImagePullBackOff", "Unschedulable"})


def _child(conditions: tuple[str, ...]) -> Child:
    """The child PyTorchJob with these conditions True."""
    return Child.parse(
        {
            "metadata": {"name": CHILD_NAME, "uid": CHILD_UID},
            "status": {"conditions": [{"type": c, "status": "True"} for c in conditions]},
        }
    )


def _pod(state: str) -> Pod:
    """A pod of the job in ``state`` (one of POD_STATES): the one place pods are built."""
    container: dict[str, Any] = {"name": "pytorch", "image": "i"}
    status: dict[str, Any] = {"containerStatuses": [container]}
    if state in ("OOMKilled", "Error"):
        code = 137 if state == "OOMKilled" else 1
        container["state"] = {"terminated": {"reason": state, "exitCode": code}}
    elif state == "ImagePullBackOff":
        container["state"] = {"waiting": {"reason": "ImagePullBackOff"}}
    elif state == "Unschedulable":
        status = {
            "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}]
        }
    else:
        raise ValueError(state)
    return Pod.parse({"metadata": {"name": "p-master-0"}, "status": status})


@dataclass(frozen=True)
class Expected:
    phase: str
    failure: str | None  # failure.reason


def expected(child: tuple[str, ...] | None, pod: str | None, suspend: bool) -> Expected:
    """What status must say, written from the user's side rather than from derive's code."""
    if child is not None and "Succeeded" in child:
        return Expected("Succeeded", None)
    if child is not None and "Failed" in child:
        return Expected("Failed", pod or "Error")  # the pod says why better than the job
    if suspend:
        return Expected("Suspended", None)
    if child is not None and "Running" in child:
        # every pod must be up for torchrun: a pod that cannot start holds the job in Pending
        return Expected("Pending" if pod in HOLDS_BACK else "Running", pod)
    return Expected("Planned" if child is None else "Pending", pod)


ACTIVE = ("Running", "Succeeded", "Failed", "Suspended")


def check_invariants(
    status: FineTuneJobStatus,
    obs: Observed,
    plan: PlanStatus | None,
) -> None:
    conditions = status.conditions or []
    types = [c.type for c in conditions]
    assert types == sorted(set(types)), f"condition types not unique and sorted: {types}"
    by_type = {c.type: c for c in conditions}
    assert {c.observed_generation for c in conditions} == {obs.generation}
    assert status.observed_generation == obs.generation
    assert by_type["Validated"].status == "True"
    planned = by_type["Planned"]
    assert (planned.status, planned.reason) == (
        ("True", "Planned") if plan else ("True", "PlannedByTrainer")
    )
    # exactly the phase's own condition is True among the active ones (none before Running)
    assert [t for t in ACTIVE if t in by_type and by_type[t].status == "True"] == (
        [status.phase] if status.phase in ACTIVE else []
    )
    if status.phase not in ACTIVE:
        assert by_type["Running"].status == "False"
    assert status.plan == plan
    assert (status.completion_time is not None) == (status.phase in TERMINAL)
    assert (status.start_time is not None) == (status.phase == "Running")
    if status.failure is not None:
        assert status.failure.message.strip()
    child_ref = None if obs.child is None else ChildRef(name=CHILD_NAME, uid=CHILD_UID)
    assert status.pytorch_job == child_ref
    # what the operator writes is what the CRD's status schema accepts
    wire = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    errors = [e.message for e in _status_schema().iter_errors(wire)]
    assert errors == [], errors


def check_stability(status: FineTuneJobStatus, obs: Observed) -> None:
    """Re-deriving later from the same observation changes no transition time; a terminal
    status is never left, whatever is observed next."""
    again = derive(obs, status, LATER)
    assert again == status
    if status.phase in TERMINAL:
        for conditions in CHILD_STATES:
            other = Observed(
                obs.generation,
                not obs.suspend_requested,
                plan=obs.plan,
                child=None if conditions is None else _child(conditions),
            )
            assert derive(other, status, LATER) == status


@functools.cache
def _status_schema() -> jsonschema.Draft7Validator:
    return status_validator(load_yaml(ROOT / "crds" / "finetunejob.yaml"))


@settings(
    derandomize=bool(os.environ.get("CI")),  # CI is reproducible; developers' runs explore
    max_examples=int(os.environ.get("FINETUNE_PROPERTY_EXAMPLES", "150")),
    deadline=None,
)
@given(spec=specs, pod=st.sampled_from(POD_STATES))
def test_operator_path_holds(spec: dict[str, Any], pod: str | None) -> None:
    document = _document(spec)
    problems = api.validate_document(document)
    assert problems == [], f"the strategy drew an invalid spec: {[str(p) for p in problems]}"
    job = api.parse(document)
    if job.spec.resources.gpu_type is None:  # as the operator infers it, on a cluster of H100s
        inferred = infer_gpu_type(manifest.gpu_node_products(DEFAULT_GPU))
        assert isinstance(inferred, InferredGpuType), inferred
        job = job.model_copy(update={"spec": with_gpu_type(job.spec, inferred.gpu_type)})
    event(f"method {job.spec.method.type}, mode {job.spec.parallelism.mode}")
    try:
        result = plan_job(job.spec)
    except PlanInfeasible as exc:
        event("infeasible")
        obs = Observed(1, False, plan_error=exc.message)
        refused = derive(obs, None, NOW)
        assert refused.phase == "Failed"
        assert refused.failure is not None
        assert refused.failure.reason == "PlanInfeasible"
        assert refused.failure.message.strip()
        assert refused.completion_time == NOW
        by_type = {c.type: c for c in refused.conditions or []}
        assert (by_type["Planned"].status, by_type["Failed"].status) == ("False", "True")
        check_stability(refused, obs)
        return
    config = to_trainer_config(
        job.spec,
        name=job.name,
        default_output_dir="/out",
        plan=plan_config(result) if result else None,
    )
    child = manifest.pytorch_job(
        job, image="i", plan_summary=result.summary if result else None, exists=False
    )
    assert manifest.config_map(job, config)["data"]["config.json"]
    replicas = child["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1
    workers = replicas.get("Worker", {}).get("replicas", 0)
    assert workers == job.spec.resources.num_nodes - 1
    event("planned" if result else "planned by the trainer")
    plan = plan_status(result) if result else None
    if plan is not None:
        assert plan.world == job.spec.resources.num_nodes * job.spec.resources.gpus_per_node
        degrees = plan.data_parallel * plan.fsdp * plan.tensor_parallel * plan.pipeline_parallel
        assert degrees == plan.world
        pinned = job.spec.parallelism
        for name in ("data_parallel", "fsdp", "tensor_parallel", "pipeline_parallel"):
            if getattr(pinned, name) is not None:
                assert getattr(plan, name) == getattr(pinned, name), name
    suspend = job.spec.run_policy.suspend
    for conditions in CHILD_STATES:
        pods = () if conditions is None or pod is None else (_pod(pod),)
        obs = Observed(
            1,
            suspend,
            plan=plan,
            child=None if conditions is None else _child(conditions),
            pods=pods,
        )
        status = derive(obs, None, NOW)
        want = expected(conditions, pod if pods else None, suspend)
        got = Expected(str(status.phase), status.failure.reason if status.failure else None)
        assert got == want, (conditions, pod, suspend)
        check_invariants(status, obs, plan)
        check_stability(status, obs)


def _world(spec: dict[str, Any]) -> int:
    resources = spec["resources"]
    return int(resources.get("numNodes", DEFAULT_NODES)) * int(
        resources.get("gpusPerNode", DEFAULT_GPUS_PER_NODE)
    )


#: Kinds of spec the strategy must be able to draw (a narrow strategy is a weak property).
REACHABLE: dict[str, Callable[[dict[str, Any]], bool]] = {
    "manual mode over several GPUs": lambda s: (
        s["parallelism"].get("mode") == "manual" and _world(s) > 1
    ),
    "every degree pinned": lambda s: (
        {"dataParallel", "fsdp", "tensorParallel", "pipelineParallel"} <= s["parallelism"].keys()
    ),
    "tensor parallel above 1": lambda s: s["parallelism"].get("tensorParallel", 1) > 1,
    "pipeline parallel above 1": lambda s: s["parallelism"].get("pipelineParallel", 1) > 1,
    "cpu offload": lambda s: s["parallelism"].get("cpuOffload") is True,
    "a CPU job": lambda s: s["resources"].get("gpuType") == "CPU",
    "several nodes": lambda s: s["resources"].get("numNodes", DEFAULT_NODES) > 1,
    "suspended": lambda s: s["runPolicy"].get("suspend") is True,
    "lora": lambda s: s["method"]["type"] == "lora",
}


#: Search only (no shrinking: any example will do), the same examples on every run.
_FIND = settings(max_examples=1000, database=None, derandomize=True, phases=[Phase.generate])


@pytest.mark.parametrize("what", REACHABLE)
def test_the_strategy_reaches_the_interesting_specs(what: str) -> None:
    """Valid by construction must not mean narrow: each kind of spec is drawn, and is valid."""
    found = find(specs, REACHABLE[what], settings=_FIND)
    assert api.validate_document(_document(found)) == [], what
