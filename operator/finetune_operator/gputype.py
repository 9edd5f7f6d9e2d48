"""Which GPU type a job runs on when ``spec.resources.gpuType`` is left out.

NVIDIA GPU feature discovery labels every GPU node ``nvidia.com/gpu.product`` with the driver's
product name (e.g. ``NVIDIA-H100-80GB-HBM3``). When the nodes a job may use (all of them, or those
matching ``spec.resources.nodeSelector``) carry products of exactly one GPU type, that type is the
job's: it is planned for it and its pods get that type's node affinity. Otherwise it never
guesses: several types, a product the planner does not know, or no labelled node at all each give
a message that says what was found and to set ``spec.resources.gpuType``.

Pure: the controller lists the labels (through its ``Cluster``); this decides.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from finetune_operator.spec import GPU_TYPES, FineTuneJobSpec, GpuType
from finetune_operator.status import InferredGpuType
from finetune_trainer.planner.hardware import get_gpu, gpu_of_node_product

#: The node label NVIDIA GPU feature discovery writes the GPU's product name in.
PRODUCT_LABEL = "nvidia.com/gpu.product"
_SET_IT = "set spec.resources.gpuType"


@dataclass(frozen=True)
class NotInferred:
    """Why the nodes do not tell the job's GPU type (what was found, and what to do)."""

    message: str


def gpu_type_of_product(product: str) -> GpuType | None:
    """The spec's GPU type whose nodes carry the ``nvidia.com/gpu.product`` value ``product``
    (compared exactly, as the pods' node affinity compares it); None if the planner knows no such
    product."""
    gpu = gpu_of_node_product(product)
    if gpu is None:
        return None
    return next((t for t in GPU_TYPES if t != "CPU" and get_gpu(t).name == gpu.name), None)


def _nodes(count: int) -> str:
    return f"{count} node{'' if count == 1 else 's'}"


def _labelled(products: Counter[str]) -> str:
    return ", ".join(f"{PRODUCT_LABEL}={p} on {_nodes(n)}" for p, n in sorted(products.items()))


def infer_gpu_type(products: Sequence[str], *, node_selector: bool = False) -> (
    InferredGpuType | NotInferred
):  # fmt: skip
    """The GPU type of the nodes whose ``nvidia.com/gpu.product`` labels are ``products`` (one
    value per node), or why there is not exactly one. ``node_selector``: the nodes were narrowed
    by spec.resources.nodeSelector (the messages say so)."""
    found = Counter(products)
    which = "node that matches spec.resources.nodeSelector" if node_selector else "node"
    nodes = "nodes that match spec.resources.nodeSelector" if node_selector else "GPU nodes"
    if not found:
        return NotInferred(
            f"cannot infer spec.resources.gpuType: no {which} has the {PRODUCT_LABEL} label "
            "(NVIDIA GPU feature discovery puts it on GPU nodes): install GPU feature discovery "
            f"(or the NVIDIA GPU operator) on the GPU nodes, or {_SET_IT}"
        )
    by_type: dict[GpuType, Counter[str]] = {}
    unknown: Counter[str] = Counter()
    for product, count in found.items():
        gpu_type = gpu_type_of_product(product)
        if gpu_type is None:
            unknown[product] = count
        else:
            by_type.setdefault(gpu_type, Counter())[product] = count
    known = ", ".join(t for t in GPU_TYPES if t != "CPU")
    if unknown and not by_type:
        return NotInferred(
            f"cannot infer spec.resources.gpuType: the {nodes} ({_labelled(unknown)}) have a "
            f"GPU the planner does not know (it knows {known}); {_SET_IT} to one of those "
            "(its pods then need nodes with that GPU)"
        )
    if unknown or len(by_type) > 1:
        types = sorted(by_type)
        parts = [f"{t} ({_labelled(by_type[t])})" for t in types]
        parts += [f"a GPU the planner does not know ({_labelled(unknown)})"] if unknown else []
        choose = f" to one of {', '.join(types)}" if len(types) > 1 else f" (e.g. {types[0]})"
        return NotInferred(
            f"cannot infer spec.resources.gpuType: the {nodes} have several GPU types: "
            f"{'; '.join(parts)}; the operator does not guess which one to plan for: "
            f"{_SET_IT}{choose}"
        )
    ((gpu_type, labels),) = by_type.items()
    return InferredGpuType(
        gpu_type=gpu_type,
        node_products=sorted(labels),
        nodes=sum(labels.values()),
        message=f"gpuType inferred from nodes: {gpu_type} (node label {_labelled(labels)})",
    )


def with_gpu_type(spec: FineTuneJobSpec, gpu_type: GpuType) -> FineTuneJobSpec:
    """``spec`` with spec.resources.gpuType set to ``gpu_type`` (what it is planned and run as)."""
    resources = spec.resources.model_copy(update={"gpu_type": gpu_type})
    return spec.model_copy(update={"resources": resources})
