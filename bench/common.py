"""Helpers the benchmarks share: the machine they ran on, the seed-style padding, statistics.

Imported by the bench scripts (``bench/trainer/run.py``, ``bench/gpu/run.py``) after they put
``bench/`` on ``sys.path``; it needs torch (the trainer benches' dependency).
"""

from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path
from typing import Any

import torch

#: The CPU features that decide matmul speed per dtype (so results can be told apart).
CPU_FLAGS = {"avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "fma"}


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return ""


def cpu_flags() -> list[str]:
    """Which of :data:`CPU_FLAGS` this CPU has."""
    line = next((x for x in _cpuinfo().splitlines() if x.startswith("flags")), "")
    return sorted(CPU_FLAGS & set(line.split(":", 1)[-1].split()))


def cpu_model() -> str:
    line = next((x for x in _cpuinfo().splitlines() if x.startswith("model name")), "")
    return line.split(":", 1)[-1].strip() or platform.processor() or platform.machine()


def machine(device: torch.device) -> dict[str, Any]:
    """What ran the bench: accelerator, driver/CUDA, library versions, CPU and its flags."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=torch.cuda.get_device_name(device),
            gpu_memory_bytes=int(props.total_memory),
            gpu_capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            driver=_driver_version(),
        )
    return info


def _driver_version() -> str | None:
    """The NVIDIA driver version (from the kernel module; no nvidia-smi needed)."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text(encoding="utf-8")
    except OSError:
        return None
    words = text.split()
    return next((w for w in words if w[:1].isdigit() and w.count(".") >= 1), None)


def pad_to_max(rows: list[dict[str, Any]], pad: int, seq_len: int) -> dict[str, torch.Tensor]:
    """The seed-style batch: every sample padded to ``seq_len``, with its attention mask."""
    ids = torch.full((len(rows), seq_len), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), seq_len), dtype=torch.long)
    for i, r in enumerate(rows):
        n = min(len(r["input_ids"]), seq_len)
        ids[i, :n] = torch.tensor(r["input_ids"][:n])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def stats(values: list[float]) -> dict[str, float]:
    mean = statistics.fmean(values)
    return {
        "mean": mean,
        "min": min(values),
        "max": max(values),
        "spread": (max(values) - min(values)) / mean if mean else 0.0,
    }
