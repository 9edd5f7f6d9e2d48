"""Property: the operator's whole pure path never crashes on a spec the API server accepts.

Hypothesis draws FineTuneJobs across the API (sources, formats, methods, pinned degrees, GPU
types, node counts...), keeps those the API's rules accept, and runs what a reconcile runs:
plan, translate, build the children, derive status for each child state. The only allowed
refusal is PlanInfeasible, which must come with a message.
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from finetune_operator import api, manifest
from finetune_operator.plan import PlanInfeasible, plan_config, plan_job, plan_status
from finetune_operator.spec import GPU_TYPES
from finetune_operator.status import Observed, derive
from finetune_operator.translate import to_trainer_config

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
DEGREES = st.sampled_from([1, 2, 3, 4, 8, 16])


def _optional(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional=fields)


specs = st.fixed_dictionaries(
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
        "hyperparameters": st.one_of(
            st.builds(
                lambda n, b: {"maxSteps": n, "globalBatchSize": b},
                st.integers(1, 10**6),
                st.integers(1, 4096),
            ),
            st.builds(
                lambda n, b: {"epochs": n, "globalBatchSize": b},
                st.integers(1, 10),
                st.integers(1, 4096),
            ),
        ),
        "parallelism": _optional(
            mode=st.sampled_from(["auto", "manual"]),
            dataParallel=DEGREES,
            fsdp=DEGREES,
            tensorParallel=DEGREES,
            pipelineParallel=DEGREES,
            microBatchSize=st.integers(1, 64),
            activationCheckpointing=st.sampled_from(["none", "selective", "full"]),
            cpuOffload=st.booleans(),
        ),
        "resources": _optional(
            numNodes=st.integers(1, 64),
            gpusPerNode=st.sampled_from([1, 2, 4, 8, 16]),
            gpuType=st.sampled_from(list(GPU_TYPES)),
        ),
        "runPolicy": _optional(suspend=st.booleans(), backoffLimit=st.integers(0, 10)),
        "scheduling": _optional(queueName=st.just("team-a")),
    }
)

CHILD_STATES = [None, ["Created"], ["Created", "Running"], ["Succeeded"], ["Failed"]]


@settings(
    derandomize=bool(os.environ.get("CI")),  # CI is reproducible; developers' runs explore
    max_examples=int(os.environ.get("FINETUNE_PROPERTY_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow],
)
@given(spec=specs)
def test_operator_path_never_crashes(spec: dict[str, Any]) -> None:
    document = {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": "p", "namespace": "ns", "uid": "u", "generation": 1},
        "spec": spec,
    }
    assume(not api.validate_document(document))
    job = api.parse(document)
    event(f"method {job.spec.method.type}")
    try:
        result = plan_job(job.spec)
    except PlanInfeasible as exc:
        event("infeasible")
        refused = derive(Observed(1, False, plan_error=exc.message), None, "2026-01-01T00:00:00Z")
        assert refused.failure is not None
        assert refused.failure.message.strip()
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
    assert child["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] == 1
    event("planned" if result else "planned by the trainer")
    plan = plan_status(result) if result else None
    if plan is not None:
        assert plan.world == job.spec.resources.num_nodes * job.spec.resources.gpus_per_node
    for conditions in CHILD_STATES:
        observed_child = (
            None
            if conditions is None
            else {
                "metadata": {"name": "p", "uid": "c"},
                "status": {"conditions": [{"type": c, "status": "True"} for c in conditions]},
            }
        )
        status = derive(
            Observed(1, job.spec.run_policy.suspend, plan=plan, child=observed_child),
            None,
            "2026-01-01T00:00:00Z",
        )
        assert status.phase is not None
