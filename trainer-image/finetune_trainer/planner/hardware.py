"""GPU catalog and cluster shape.

Every number is a vendor datasheet figure (dense, i.e. without 2:4 sparsity) unless marked
otherwise. Memory is the capacity the driver reports (what PyTorch can allocate), in bytes.

Sources:
- H100 SXM5 / H200 SXM: NVIDIA H100 datasheet (989 TFLOP/s bf16 dense = 1,979 sparse / 2; HBM3
  3.35 TB/s; NVLink 4 900 GB/s bidirectional per GPU) and H200 datasheet (141 GB HBM3e, 4.8 TB/s).
  nvidia-smi reports 81,559 MiB for H100-80GB and 143,771 MiB for H200.
- A100 SXM4: NVIDIA A100 datasheet (312 TFLOP/s bf16 dense; 1,555 GB/s (40 GB) / 2,039 GB/s
  (80 GB); NVLink 3 600 GB/s bidirectional).
- L40S: NVIDIA L40S datasheet (362 TFLOP/s bf16 dense = 733 sparse / 2; 48 GB GDDR6, 864 GB/s;
  no NVLink, PCIe Gen4 x16 = 32 GB/s per direction).
- B200: NVIDIA DGX B200 datasheet (1,440 GB for 8 GPUs = 180 GB each; 72 PFLOP/s FP8 training
  for 8 GPUs = 9 PF sparse FP8 per GPU -> 2.25 PF dense bf16; HBM3e 8 TB/s; NVLink 5 1.8 TB/s
  bidirectional).
- Inter-node: one 400 Gb/s NIC per GPU (ConnectX-7, the DGX/HGX H100/H200/B200 reference
  design) = 50 GB/s per GPU per direction; 200 Gb/s HDR per GPU for DGX A100 = 25 GB/s.
- H100-96GB: the power-capped (500 W) HBM2e H100 that pytorch/torchtitan's published
  benchmarks used (torchtitan logs show 95.0 GiB capacity). Expected to run 10-15% below an
  80 GB SXM part (lower clocks and memory bandwidth): modelled as a 0.875 sustained-clock factor
  (assumed, the midpoint of that range; not fitted).
- Node labels: NVIDIA GPU feature discovery labels a node ``nvidia.com/gpu.product`` with the
  driver's product name (nvidia-smi's, spaces as dashes; drivers before R470 leave out "NVIDIA-"),
  e.g. ``NVIDIA-H100-80GB-HBM3``, ``NVIDIA-A100-SXM4-40GB``, ``A100-PCIE-40GB``.
Bandwidths below are per GPU per direction (what one rank of a ring can push).
Host memory per node (for CPU offload): DGX H100/H200 2 TB, DGX A100 320GB-system 1 TB,
DGX A100 640GB-system 2 TB, DGX B200 2 TB (base), L40S servers ~1 TB (typical, assumed).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

GiB = 1024**3
GB = 10**9
MiB = 1024**2

Architecture = Literal["ampere", "ada", "hopper", "blackwell", "cpu"]


class GPUSpec(BaseModel):
    """One accelerator type."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    architecture: Architecture
    memory_bytes: int = Field(gt=0, description="capacity PyTorch can allocate")
    bf16_flops: float = Field(gt=0, description="dense bf16 tensor-core FLOP/s (datasheet)")
    clock_factor: float = Field(default=1.0, gt=0, le=1.0, description="sustained/datasheet")
    hbm_bandwidth: float = Field(gt=0, description="bytes/s")
    intra_node_bandwidth: float = Field(gt=0, description="bytes/s per GPU per direction")
    inter_node_bandwidth: float = Field(gt=0, description="bytes/s per GPU per direction")
    host_bandwidth: float = Field(
        default=25 * GB, gt=0, description="bytes/s host<->GPU (PCIe) per GPU, for CPU offload"
    )
    max_gpus_per_node: int = Field(default=8, gt=0)
    host_memory_bytes: int = Field(default=2 * 10**12, gt=0, description="host RAM per node")
    nominal_gb: int = Field(gt=0, description="marketing memory size in GB")
    node_products: tuple[str, ...] = Field(
        default=(),
        description=(
            "values of the nvidia.com/gpu.product node label (NVIDIA GPU feature discovery: "
            "the driver's product name, spaces as dashes) that are this GPU"
        ),
    )

    @property
    def peak_flops(self) -> float:
        """Sustainable peak used for time estimates (datasheet x clock factor)."""
        return self.bf16_flops * self.clock_factor

    @property
    def memory_label(self) -> str:
        """Marketing size, e.g. '80 GB'."""
        return f"{self.nominal_gb} GB"


def _gpu(**kw: object) -> GPUSpec:
    return GPUSpec.model_validate(kw)


GPU_CATALOG: dict[str, GPUSpec] = {
    g.name: g
    for g in (
        _gpu(
            name="H100-80GB",
            node_products=("NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-PCIe"),
            nominal_gb=80,
            architecture="hopper",
            memory_bytes=81_559 * MiB,
            bf16_flops=989e12,
            hbm_bandwidth=3.35e12,
            intra_node_bandwidth=450 * GB,
            inter_node_bandwidth=50 * GB,
            host_bandwidth=55 * GB,  # PCIe Gen5 x16 = 64 GB/s per direction, ~55 achievable
        ),
        _gpu(
            name="H100-96GB",
            nominal_gb=96,
            architecture="hopper",
            memory_bytes=95 * GiB,
            bf16_flops=989e12,
            clock_factor=0.875,
            hbm_bandwidth=2.4e12,  # HBM2e variant
            intra_node_bandwidth=450 * GB,
            inter_node_bandwidth=50 * GB,
            host_bandwidth=55 * GB,
        ),
        _gpu(
            name="H200",
            node_products=("NVIDIA-H200", "NVIDIA-H200-NVL"),
            nominal_gb=141,
            architecture="hopper",
            memory_bytes=143_771 * MiB,
            bf16_flops=989e12,
            hbm_bandwidth=4.8e12,
            intra_node_bandwidth=450 * GB,
            inter_node_bandwidth=50 * GB,
            host_bandwidth=55 * GB,
        ),
        _gpu(
            name="A100-40GB",
            node_products=(
                "NVIDIA-A100-SXM4-40GB",
                "NVIDIA-A100-PCIE-40GB",
                "A100-SXM4-40GB",
                "A100-PCIE-40GB",
            ),
            host_memory_bytes=10**12,
            nominal_gb=40,
            architecture="ampere",
            memory_bytes=40_536 * MiB,
            bf16_flops=312e12,
            hbm_bandwidth=1.555e12,
            intra_node_bandwidth=300 * GB,
            inter_node_bandwidth=25 * GB,
        ),
        _gpu(
            name="A100-80GB",
            node_products=("NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-80GB-PCIe", "A100-SXM4-80GB"),
            nominal_gb=80,
            architecture="ampere",
            memory_bytes=81_920 * MiB,
            bf16_flops=312e12,
            hbm_bandwidth=2.039e12,
            intra_node_bandwidth=300 * GB,
            inter_node_bandwidth=25 * GB,
        ),
        _gpu(
            name="L40S",
            node_products=("NVIDIA-L40S",),
            host_memory_bytes=10**12,
            nominal_gb=48,
            architecture="ada",
            memory_bytes=46_068 * MiB,
            bf16_flops=362e12,
            hbm_bandwidth=864 * GB,
            intra_node_bandwidth=25 * GB,  # PCIe Gen4 x16 through the host, no NVLink
            inter_node_bandwidth=12.5 * GB,  # typical 100 Gb/s per GPU
        ),
        _gpu(
            name="B200",
            node_products=("NVIDIA-B200",),
            nominal_gb=180,
            architecture="blackwell",
            memory_bytes=180 * GB,
            bf16_flops=2.25e15,
            hbm_bandwidth=8e12,
            intra_node_bandwidth=900 * GB,
            inter_node_bandwidth=50 * GB,
            host_bandwidth=55 * GB,
        ),
        # CPU "device" for tests and CPU torchrun runs: numbers are a modest server socket share.
        _gpu(
            name="CPU",
            host_memory_bytes=64 * GiB,
            nominal_gb=16,
            architecture="cpu",
            memory_bytes=16 * GiB,
            bf16_flops=1e12,
            hbm_bandwidth=50 * GB,
            intra_node_bandwidth=10 * GB,
            inter_node_bandwidth=1 * GB,
            host_bandwidth=50 * GB,
            max_gpus_per_node=64,
        ),
    )
}

_ALIASES = {
    "H100": "H100-80GB",
    "H100-SXM": "H100-80GB",
    "H100-SXM5": "H100-80GB",
    "H100-80GB-SXM": "H100-80GB",
    "H100-SXM-80GB": "H100-80GB",
    "H100-80GB-HBM3": "H100-80GB",
    "H100-96": "H100-96GB",
    "H200-141GB": "H200",
    "H200-SXM": "H200",
    "A100": "A100-80GB",
    "A100-80G": "A100-80GB",
    "A100-SXM4-80GB": "A100-80GB",
    "A100-SXM4-40GB": "A100-40GB",
    "A100-40G": "A100-40GB",
    "L40S-48GB": "L40S",
    "B200-180GB": "B200",
    "B200-192GB": "B200",
}


def get_gpu(name: str) -> GPUSpec:
    """Look up a GPU by catalog name or common alias (case-insensitive, 'NVIDIA-' optional)."""
    key = name.strip().upper().replace("_", "-").replace(" ", "-")
    if key.startswith("NVIDIA-"):
        key = key[len("NVIDIA-") :]
    for cand in (key, _ALIASES.get(key, "")):
        for cat_name, spec in GPU_CATALOG.items():
            if cat_name.upper() == cand:
                return spec
    known = ", ".join(GPU_CATALOG)
    raise KeyError(f"unknown GPU type {name!r}; known: {known}")


def gpu_of_node_product(product: str) -> GPUSpec | None:
    """The GPU whose ``nvidia.com/gpu.product`` node label value is ``product`` (as GPU feature
    discovery writes it, compared exactly, as node affinity compares it); None if no GPU in the
    catalog has that label value."""
    return next((g for g in GPU_CATALOG.values() if product in g.node_products), None)


class Cluster(BaseModel):
    """The world the job runs on: nodes x GPUs per node of one GPU type."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    gpu: GPUSpec
    nodes: int = Field(default=1, ge=1)
    gpus_per_node: int = Field(default=8, ge=1)

    @model_validator(mode="after")
    def _check(self) -> Cluster:
        if self.gpus_per_node > self.gpu.max_gpus_per_node:
            raise ValueError(
                f"{self.gpus_per_node} GPUs per node exceeds {self.gpu.max_gpus_per_node} "
                f"for {self.gpu.name}"
            )
        return self

    @classmethod
    def of(cls, gpu: str | GPUSpec, nodes: int = 1, gpus_per_node: int = 8) -> Cluster:
        spec = get_gpu(gpu) if isinstance(gpu, str) else gpu
        return cls(gpu=spec, nodes=nodes, gpus_per_node=gpus_per_node)

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def describe(self) -> str:
        if self.nodes == 1:
            return f"{self.gpus_per_node}x{self.gpu.name}"
        return f"{self.nodes}x{self.gpus_per_node}x{self.gpu.name}"
