"""GPU catalog and cluster shape."""

import pytest
from pydantic import ValidationError

from finetune_trainer.planner import GPU_CATALOG, Cluster, get_gpu
from finetune_trainer.planner.hardware import GiB


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("H100-80GB", "H100-80GB"),
        ("h100", "H100-80GB"),
        ("NVIDIA-H100-80GB-HBM3", "H100-80GB"),
        ("H200", "H200"),
        ("A100-40GB", "A100-40GB"),
        ("A100", "A100-80GB"),
        ("l40s", "L40S"),
        ("B200", "B200"),
        ("cpu", "CPU"),
    ],
)
def test_lookup(alias: str, name: str) -> None:
    assert get_gpu(alias).name == name


def test_unknown_gpu_lists_known() -> None:
    with pytest.raises(KeyError, match="H100-80GB"):
        get_gpu("TPU-v5")


@pytest.mark.parametrize(
    ("name", "min_gib", "max_gib", "tflops"),
    [
        ("H100-80GB", 79, 80, 989),
        ("H200", 139, 141, 989),
        ("A100-40GB", 39, 40, 312),
        ("A100-80GB", 79, 80.1, 312),
        ("L40S", 44, 46, 362),
        ("B200", 160, 180, 2250),
    ],
)
def test_datasheet_numbers(name: str, min_gib: float, max_gib: float, tflops: float) -> None:
    g = GPU_CATALOG[name]
    assert min_gib <= g.memory_bytes / GiB <= max_gib
    assert g.bf16_flops == pytest.approx(tflops * 1e12)
    assert g.intra_node_bandwidth >= g.inter_node_bandwidth


def test_cluster() -> None:
    c = Cluster.of("H100-80GB", nodes=2, gpus_per_node=8)
    assert c.world == 16
    assert c.describe() == "2x8xH100-80GB"
    with pytest.raises(ValidationError):
        Cluster.of("H100-80GB", nodes=1, gpus_per_node=16)
    with pytest.raises(ValidationError):
        Cluster.of("H100-80GB", nodes=0)
