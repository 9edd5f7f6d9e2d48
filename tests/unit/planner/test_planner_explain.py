"""The plan's reason says what a user would want to know about precision."""

from __future__ import annotations

import pytest

from finetune_trainer.planner import Cluster, Workload, known_model, plan_parallelism


@pytest.mark.parametrize(
    ("gpu", "says_fp8"),
    [("H100-80GB", True), ("L40S", True), ("B200", True), ("A100-80GB", False)],
)
def test_reason_says_fp8_is_not_used_where_the_gpu_has_it(gpu: str, says_fp8: bool) -> None:
    result = plan_parallelism(
        known_model("meta-llama/Meta-Llama-3-8B"),
        Cluster.of(gpu, nodes=1, gpus_per_node=8),
        Workload(seq_len=2048, global_batch_size=64, method="lora"),
    )
    assert ("fp8 not used" in result.reason) is says_fp8, result.reason
    assert "tok/s/GPU (MFU" in result.reason
