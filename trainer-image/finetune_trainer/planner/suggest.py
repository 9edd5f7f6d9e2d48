"""What would fit: re-run the search on changed inputs (more GPUs, LoRA, shorter sequences,
a larger GPU) and say which of them work."""

from __future__ import annotations

from .hardware import GPU_CATALOG, Cluster
from .model import ModelFacts
from .search import search
from .workload import Constraints, Workload

MAX_SUGGESTED_GPUS = 4096


def _fits(model: ModelFacts, cluster: Cluster, workload: Workload, con: Constraints) -> bool:
    return search(model, cluster, workload, con, keep=1).best is not None


def _more_gpus(model: ModelFacts, cluster: Cluster, workload: Workload) -> str | None:
    gpu = cluster.gpu
    shapes: list[tuple[int, int]] = []
    if cluster.nodes == 1:
        g = cluster.gpus_per_node * 2
        while g <= gpu.max_gpus_per_node:
            shapes.append((1, g))
            g *= 2
    per_node = max(cluster.gpus_per_node, min(8, gpu.max_gpus_per_node))
    n = 2
    while n * per_node <= MAX_SUGGESTED_GPUS:
        shapes.append((n, per_node))
        n *= 2
    for nodes, gpn in shapes:
        if nodes * gpn <= cluster.world:
            continue
        bigger = Cluster(gpu=gpu, nodes=nodes, gpus_per_node=gpn)
        if _fits(model, bigger, workload, Constraints()):
            where = f"{nodes} nodes x {gpn}" if nodes > 1 else f"one node of {gpn}"
            return f"needs {nodes * gpn} GPUs of {gpu.memory_label} ({where})"
    return None


def _shorter(
    model: ModelFacts, cluster: Cluster, workload: Workload, con: Constraints
) -> str | None:
    s = workload.seq_len // 2
    while s >= 128:
        if _fits(model, cluster, workload.model_copy(update={"seq_len": s}), con):
            return f"maxSeqLength <= {s}"
        s //= 2
    return None


def _bigger_gpu(
    model: ModelFacts, cluster: Cluster, workload: Workload, con: Constraints
) -> str | None:
    options = sorted(
        (g for g in GPU_CATALOG.values() if g.memory_bytes > cluster.gpu.memory_bytes),
        key=lambda g: g.memory_bytes,
    )
    for g in options:
        if g.architecture == "cpu" or g.name == "H100-96GB":
            continue
        if cluster.gpus_per_node > g.max_gpus_per_node:
            continue
        other = Cluster(gpu=g, nodes=cluster.nodes, gpus_per_node=cluster.gpus_per_node)
        if _fits(model, other, workload, con):
            return f"gpuType {g.name} ({g.memory_label})"
    return None


def _batch_hint(cluster: Cluster, workload: Workload) -> str | None:
    gbs = workload.global_batch_size
    world = cluster.world
    if gbs % world == 0:
        return None
    lower = max(world, gbs // world * world)
    return f"globalBatchSize a multiple of {world} (e.g. {lower})"


def suggestions(
    model: ModelFacts,
    cluster: Cluster,
    workload: Workload,
    con: Constraints,
    no_layout: bool,
) -> list[str]:
    """Alternatives that would fit, each verified by re-running the search."""
    out: list[str] = []
    if not con.is_empty() and _fits(model, cluster, workload, Constraints()):
        out.append("removing the fixed parallelism settings")
    if no_layout:
        hint = _batch_hint(cluster, workload)
        if hint:
            out.append(hint)
        return out
    more = _more_gpus(model, cluster, workload)
    if more:
        out.append(more)
    if workload.method == "full":
        lora = workload.model_copy(update={"method": "lora"})
        if _fits(model, cluster, lora, Constraints()):
            out.append(f"method lora (r={workload.lora_rank})")
    shorter = _shorter(model, cluster, workload, con)
    if shorter:
        out.append(shorter)
    bigger = _bigger_gpu(model, cluster, workload, con)
    if bigger:
        out.append(bigger)
    return out
