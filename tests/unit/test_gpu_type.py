"""spec.resources.gpuType left out: the GPU type is inferred from the nodes' nvidia.com/gpu.product
labels (NVIDIA GPU feature discovery) when they are all of one type, and never guessed otherwise.
"""

from __future__ import annotations

from typing import Any

import pytest

from bad_specs import DELETE, apply
from finetune_operator import api, manifest
from finetune_operator.gputype import (
    NotInferred,
    gpu_type_of_product,
    infer_gpu_type,
    with_gpu_type,
)
from finetune_operator.plan import plan_job, planning_problem
from finetune_operator.spec import GPU_TYPES
from finetune_operator.status import InferredGpuType, Observed, derive

NOW = "2026-12-07T03:00:00Z"
H100_SXM, H100_PCIE = "NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-PCIe"
A100_40 = "NVIDIA-A100-SXM4-40GB"
V100 = "Tesla-V100-SXM2-16GB"  # GFD's label on a V100: not a GPU the planner knows


def _without_gpu_type(tiny_job: dict[str, Any], **more: Any) -> dict[str, Any]:
    """The offline example on GPUs, gpuType left out."""
    changes = {"spec.resources.gpuType": DELETE, "spec.resources.gpusPerNode": 2, **more}
    return apply(tiny_job, changes)


@pytest.mark.parametrize("gpu_type", [t for t in GPU_TYPES if t != "CPU"])
def test_each_gpu_types_node_labels_map_back_to_it(gpu_type: str) -> None:
    products = manifest.gpu_node_products(gpu_type)  # what its pods' node affinity accepts
    assert products
    assert {gpu_type_of_product(p) for p in products} == {gpu_type}


def test_a_product_the_planner_does_not_know_maps_to_nothing() -> None:
    assert gpu_type_of_product(V100) is None
    assert gpu_type_of_product("") is None
    # compared exactly, as node affinity compares it: a label in other case is another label
    assert gpu_type_of_product(H100_SXM.lower()) is None


def test_nodes_of_one_gpu_type_give_that_type() -> None:
    inferred = infer_gpu_type([H100_SXM, H100_PCIE, H100_SXM])
    assert isinstance(inferred, InferredGpuType)
    assert inferred.gpu_type == "H100-80GB"
    assert inferred.node_products == [H100_SXM, H100_PCIE]  # sorted
    assert inferred.nodes == 3
    assert inferred.message == (
        "gpuType inferred from nodes: H100-80GB (node label "
        f"nvidia.com/gpu.product={H100_SXM} on 2 nodes, nvidia.com/gpu.product={H100_PCIE} on "
        "1 node)"
    )


def test_nodes_of_several_gpu_types_are_not_guessed_between() -> None:
    found = infer_gpu_type([H100_SXM, A100_40, H100_SXM])
    assert isinstance(found, NotInferred)
    assert "several GPU types" in found.message
    assert f"A100-40GB (nvidia.com/gpu.product={A100_40} on 1 node)" in found.message
    assert f"H100-80GB (nvidia.com/gpu.product={H100_SXM} on 2 nodes)" in found.message
    assert found.message.endswith("set spec.resources.gpuType to one of A100-40GB, H100-80GB")


def test_no_labelled_node_says_to_install_feature_discovery_or_set_the_type() -> None:
    found = infer_gpu_type([])
    assert isinstance(found, NotInferred)
    assert "no node has the nvidia.com/gpu.product label" in found.message
    assert "install GPU feature discovery" in found.message
    assert found.message.endswith("or set spec.resources.gpuType")
    narrowed = infer_gpu_type([], node_selector=True)
    assert isinstance(narrowed, NotInferred)
    assert "no node that matches spec.resources.nodeSelector has" in narrowed.message


def test_an_unknown_product_is_named_and_never_mapped_to_a_known_type() -> None:
    found = infer_gpu_type([V100, V100])
    assert isinstance(found, NotInferred)
    assert f"nvidia.com/gpu.product={V100} on 2 nodes" in found.message
    assert "a GPU the planner does not know" in found.message
    assert "set spec.resources.gpuType" in found.message
    beside = infer_gpu_type([V100, H100_SXM])  # an unknown type beside a known one: two types
    assert isinstance(beside, NotInferred)
    assert "several GPU types" in beside.message
    assert V100 in beside.message
    assert "H100-80GB" in beside.message


def test_a_spec_may_leave_gpu_type_out_and_is_then_planned_by_the_operator(
    tiny_job: dict[str, Any],
) -> None:
    doc = _without_gpu_type(tiny_job, **{"spec.parallelism.cpuOffload": True})
    assert api.validate_document(doc) == []  # the cpuOffload rule holds without gpuType
    spec = api.parse(doc).spec
    assert spec.resources.gpu_type is None
    assert plan_job(spec) is None  # offline: no nodes to infer it from
    assert planning_problem(spec) is None  # so validation does not fail it
    planned = plan_job(with_gpu_type(spec, "H100-80GB"))
    assert planned is not None
    assert planned.plan.world == 2


def test_pods_of_a_job_with_an_inferred_type_get_its_node_affinity(
    tiny_job: dict[str, Any],
) -> None:
    job = api.parse(_without_gpu_type(tiny_job))
    with pytest.raises(ValueError, match="gpuType must be resolved"):
        manifest.pytorch_job(job, image="i", plan_summary=None, exists=False)
    resolved = job.model_copy(update={"spec": with_gpu_type(job.spec, "A100-40GB")})
    child = manifest.pytorch_job(resolved, image="i", plan_summary=None, exists=False)
    pod = child["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    by_key = {e["key"]: e["values"] for e in term["matchExpressions"]}
    assert set(by_key["nvidia.com/gpu.product"]) == set(manifest.gpu_node_products("A100-40GB"))


def test_status_says_why_a_job_waits_for_its_gpu_type_and_what_was_inferred() -> None:
    message = "cannot infer spec.resources.gpuType: ..."
    waiting = derive(Observed(1, False, gpu_type_error=message), None, NOW)
    assert waiting.phase == "Pending"  # not terminal: setting gpuType lets it go on
    assert waiting.failure is not None
    assert (waiting.failure.reason, waiting.failure.message) == ("GpuTypeNotInferred", message)
    planned_cond = {c.type: c for c in waiting.conditions or []}["Planned"]
    assert (planned_cond.status, planned_cond.reason) == ("False", "GpuTypeNotInferred")

    inferred = infer_gpu_type([H100_SXM])
    assert isinstance(inferred, InferredGpuType)
    planned = derive(Observed(2, False, inferred_gpu_type=inferred), waiting, NOW)
    assert planned.phase == "Planned"
    assert planned.failure is None
    assert planned.inferred_gpu_type == inferred
    planned_cond = {c.type: c for c in planned.conditions or []}["Planned"]
    assert planned_cond.status == "True"
    assert planned_cond.message.startswith("gpuType inferred from nodes: H100-80GB (node label")
    wire = planned.model_dump(by_alias=True, exclude_none=True, mode="json")
    assert wire["inferredGpuType"]["gpuType"] == "H100-80GB"
    assert wire["inferredGpuType"]["nodeProducts"] == [H100_SXM]
