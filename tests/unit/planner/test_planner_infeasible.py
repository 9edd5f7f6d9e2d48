"""Infeasible inputs fail with a message that says what would fit (each verified)."""

import re

import pytest

from finetune_trainer.planner import (
    Cluster,
    Constraints,
    PlanInfeasible,
    Workload,
    known_model,
    plan_parallelism,
)


def test_70b_full_on_one_a100_node() -> None:
    model = known_model("meta-llama/Meta-Llama-3-70B")
    cluster = Cluster.of("A100-40GB", nodes=1, gpus_per_node=8)
    wl = Workload(seq_len=4096, global_batch_size=64)
    with pytest.raises(PlanInfeasible) as info:
        plan_parallelism(model, cluster, wl)
    err = info.value
    assert "does not fit" in err.message
    assert "GB of host memory per node for CPU offload" in err.message
    assert err.closest is not None
    assert not err.closest.estimate.fits
    more = [s for s in err.suggestions if "GPUs of 40 GB" in s]
    assert more, err.message
    assert "method lora (r=16)" in err.suggestions
    # the suggestion is true: that many GPUs do fit
    n = int(more[0].split()[1])
    plan_parallelism(model, Cluster.of("A100-40GB", nodes=n // 8), wl)
    plan_parallelism(model, cluster, wl.model_copy(update={"method": "lora"}))


def test_shorter_sequence_suggested() -> None:
    model = known_model("tiny-llama")
    cluster = Cluster.of("CPU", nodes=1, gpus_per_node=1)
    # 4M tokens: the chunked loss holds 64k on a CPU "GPU"; activations alone outgrow this
    wl = Workload(seq_len=4_194_304, global_batch_size=1)
    with pytest.raises(PlanInfeasible, match=r"GiB per GPU.*maxSeqLength <= \d+") as info:
        plan_parallelism(model, cluster, wl)
    assert not any("GPUs of" in s for s in info.value.suggestions)
    shorter = int(re.search(r"maxSeqLength <= (\d+)", str(info.value)).group(1))  # type: ignore[union-attr]
    # the suggestion is the longest power of two that fits
    plan_parallelism(model, cluster, wl.model_copy(update={"seq_len": shorter}))
    with pytest.raises(PlanInfeasible):
        plan_parallelism(model, cluster, wl.model_copy(update={"seq_len": 2 * shorter}))


def test_bigger_gpu_suggested() -> None:
    model = known_model("Qwen/Qwen2-7B")
    cluster = Cluster.of("L40S", nodes=1, gpus_per_node=1)
    wl = Workload(seq_len=2048, global_batch_size=1)
    with pytest.raises(PlanInfeasible) as info:
        plan_parallelism(model, cluster, wl, Constraints(cpu_offload=False))
    assert any(s.startswith("gpuType") for s in info.value.suggestions), info.value.message


def test_no_layout_for_batch() -> None:
    model = known_model("tiny-llama")
    cluster = Cluster.of("CPU", nodes=1, gpus_per_node=8)
    wl = Workload(seq_len=64, global_batch_size=3)
    con = Constraints(tensor_parallel=1, pipeline_parallel=1)
    with pytest.raises(PlanInfeasible, match="no valid parallel layout") as info:
        plan_parallelism(model, cluster, wl, con)
    assert "removing the fixed parallelism settings" in info.value.suggestions
    assert any("globalBatchSize a multiple of 8" in s for s in info.value.suggestions)
