"""``finetune run``'s engine: launch torchrun over this machine's devices."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from finetune_trainer.config import TrainerConfig


def default_nproc() -> int:
    """One process per GPU, or one on a machine without GPUs."""
    try:
        import torch  # noqa: PLC0415 - torch is slow to import; only needed here

        if torch.cuda.is_available():
            return max(1, torch.cuda.device_count())
    except ImportError:  # pragma: no cover - the trainer extra brings torch
        pass
    return 1


def torchrun_command(config_path: str | Path, nproc: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "finetune_trainer.train",
        "--config",
        str(config_path),
    ]


def run_local(config: TrainerConfig, nproc: int | None = None) -> int:
    """Train ``config`` on this machine with ``nproc`` processes; returns the exit code.

    The processes run ``python -m finetune_trainer.train --config PATH``, the entrypoint of the
    PyTorchJob pods, so a local run is the same code as a cluster run.
    """
    n = nproc or (config.plan.world_size if config.plan else None) or default_nproc()
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        # torchrun would set 1 for several processes; share the cores instead.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
    with tempfile.TemporaryDirectory(prefix="finetune-") as tmp:
        path = Path(tmp) / "trainer-config.json"
        path.write_text(config.to_json(), encoding="utf-8")
        proc = subprocess.Popen(torchrun_command(path, n), env=env)
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                # Ctrl-C reached torchrun too: let it stop its workers, then report.
                continue
