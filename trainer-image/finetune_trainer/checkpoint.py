"""Checkpoints with torch.distributed.checkpoint: atomic, rotated, resumable.

Layout under the checkpoint dir: ``step-00000020/`` (complete) holding the DCP shards of the
model and optimizer, ``trainer.pt`` (step, scheduler) and ``rng-<rank>.pt``, plus a ``COMPLETE``
marker. A checkpoint is written to ``step-N.tmp/``, marked, then renamed: a crash mid-save
leaves only a ``.tmp`` folder, which resume ignores and the next save removes.

Complete means every rank wrote its part: rank 0 writes the marker only after a barrier that
every rank reaches once its shards and RNG state are on disk (DCP fsyncs its files), so a rank
killed mid-save leaves an unmarked ``.tmp`` and the previous checkpoint stays the latest. The
rename is made durable (the folder is fsynced) before older checkpoints are rotated out, and a
rotated checkpoint loses its marker before its files, so a crash mid-rotation never leaves a
marked, half-deleted folder.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save
from torch.distributed.checkpoint.stateful import Stateful

from finetune_trainer.config import checkpoint_dirname
from finetune_trainer.errors import ConfigError

MARKER = "COMPLETE"
PREFIX = "step-"


def check_writable(path: str | Path, what: str) -> None:
    """Fail now, writing nothing, if ``path`` cannot be created or written."""
    p = Path(path).absolute()
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    ok = probe.is_dir() and os.access(probe, os.W_OK | os.X_OK)
    if ok:
        # Permissions say yes; a read-only mount says no only when we try (removed at once).
        try:
            fd, name = tempfile.mkstemp(prefix=".finetune-probe-", dir=probe)
            os.close(fd)
            os.unlink(name)
        except OSError:
            ok = False
    if not ok:
        raise ConfigError(
            f"the {what} path {p} is not writable ({probe} "
            f"{'is not a folder' if not probe.is_dir() else 'denies writing'}): point it at a "
            "writable folder (a pvc:// claim mounted read-write, or a local folder you own)"
        )


def _dirname(step: int) -> str:
    return checkpoint_dirname(step)


#: A complete checkpoint's folder name: ``step-`` and the step (``step-N.tmp`` is one being
#: written; any other name is not ours).
_NAME = re.compile(rf"{PREFIX}(\d+)")


def complete_checkpoints(root: str | Path) -> list[Path]:
    """The complete checkpoints under ``root`` (named ``step-N``, marked), oldest first."""
    base = Path(root)
    if not base.is_dir():
        return []
    found = [
        p
        for p in base.iterdir()
        if _NAME.fullmatch(p.name) and p.is_dir() and (p / MARKER).is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def latest(root: str | Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def _fsync_dir(path: Path) -> None:
    """Make the entries of ``path`` (a rename into it) durable; a no-op where folders cannot be
    opened for that."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Delete a checkpoint: its marker first, so that it is never complete and half gone."""
    (path / MARKER).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


#: Checkpoint layouts. 2: optimizer state keyed by parameter name ("state.<fqn>.exp_avg",
#: "param_groups.<fqn>.lr"): pipeline ranks hold different parameters, and a nested
#: ``param_groups`` list is written once for all ranks (DCP keeps one copy of equal keys) and
#: restored wrongly. 1 (before the format was recorded): nested, still read.
FORMAT = 2
_OPTIONS = {1: StateDictOptions(), 2: StateDictOptions(flatten_optimizer_state_dict=True)}


class _AppState(Stateful):
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, fmt: int) -> None:
        self.model = model
        self.optimizer = optimizer
        self.options = _OPTIONS[fmt]

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self.options)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state_dict["model"],
            optim_state_dict=state_dict["optim"],
            options=self.options,
        )


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _reason(exc: BaseException) -> str:
    """The last ``SomethingError: message`` line of an exception that carries a remote
    traceback (DCP's CheckpointException does), else its first line."""
    found = re.findall(r"^\s*(?:\w+\.)*\w+(?:Error|Exception): .*$", str(exc), re.MULTILINE)
    return found[-1].strip() if found else (str(exc).splitlines() or [repr(exc)])[0]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@dataclass
class Checkpointer:
    root: Path
    keep_last: int
    rank: int

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        extra: dict[str, Any],
    ) -> tuple[Path, float]:
        """Write checkpoint ``step`` atomically on every rank; returns (path, seconds)."""
        start = time.perf_counter()
        final = self.root / _dirname(step)
        tmp = self.root / (_dirname(step) + ".tmp")
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(f"{PREFIX}*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        _barrier()
        dcp_save({"app": _AppState(model, optimizer, FORMAT)}, checkpoint_id=str(tmp))
        torch.save(_rng_state(), tmp / f"rng-{self.rank}.pt")
        if self.rank == 0:
            torch.save(
                {
                    "step": step,
                    "format": FORMAT,
                    "scheduler": scheduler.state_dict(),
                    **extra,
                },
                tmp / "trainer.pt",
            )
        _barrier()
        if self.rank == 0:
            marker = tmp / MARKER
            with marker.open("w") as f:
                f.write(f"{step}\n")
                f.flush()
                os.fsync(f.fileno())
            if final.exists():
                _remove(final)
            tmp.rename(final)
            _fsync_dir(self.root)
            for old in complete_checkpoints(self.root)[: -self.keep_last]:
                _remove(old)
        _barrier()
        return final, time.perf_counter() - start

    def load(
        self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
    ) -> dict[str, Any]:
        """Restore everything saved at ``path``; returns the trainer state (step, extras)."""
        trainer = torch.load(path / "trainer.pt", weights_only=False)
        fmt = int(trainer.get("format", 1))
        if fmt not in _OPTIONS:
            raise ConfigError(
                f"checkpoint {path} has format {fmt}, newer than this trainer reads "
                f"({FORMAT}): run the trainer image that wrote it, or set checkpoint.resume to "
                "never to start over"
            )
        try:
            dcp_load({"app": _AppState(model, optimizer, fmt)}, checkpoint_id=str(path))
        except (Exception, CheckpointException) as exc:  # the latter is a BaseException
            raise ConfigError(
                f"cannot resume from checkpoint {path}: {_reason(exc)}. It was written by another "
                "model or plan (parameters, sharding, pipeline split must match); restore the "
                "same spec, or move the checkpoint away (or set checkpoint.resume to never) to "
                "start over"
            ) from exc
        scheduler.load_state_dict(trainer["scheduler"])
        rng = path / f"rng-{self.rank}.pt"
        if rng.is_file():
            _set_rng_state(torch.load(rng, weights_only=False))
        return dict(trainer)
