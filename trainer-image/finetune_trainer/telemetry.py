"""What a run reports as it goes: the Prometheus metrics (defined in :mod:`metrics`), the
JSON-lines journal, and the display (:mod:`progress`), fed from one place per event (a step, an
evaluation, a checkpoint)."""

from __future__ import annotations

import json
import os
import resource
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import PreTrainedModel

from finetune_trainer import metrics as metrics_mod
from finetune_trainer.config import TrainerConfig
from finetune_trainer.distenv import DistEnv
from finetune_trainer.errors import ConfigError
from finetune_trainer.loop import StepResult
from finetune_trainer.planner.hardware import get_gpu
from finetune_trainer.progress import Progress, log


class Journal:
    """Machine-readable step log: JSON lines appended to $FINETUNE_LOG_JSONL (rank 0), if set."""

    def __init__(self, env: DistEnv) -> None:
        path = os.environ.get("FINETUNE_LOG_JSONL")
        self.path = Path(path) if path and env.rank == 0 else None

    def write(self, **fields: float | int) -> None:
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(fields) + "\n")


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: 6 per parameter (embeddings excluded unless tied) plus
    causal attention."""
    cfg = getattr(model, "config", None)
    n = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings() if isinstance(model, PreTrainedModel) else None
    if emb is not None and not getattr(cfg, "tie_word_embeddings", False):
        n -= sum(p.numel() for p in emb.parameters())
    layers = getattr(cfg, "num_hidden_layers", 0)
    hidden = getattr(cfg, "hidden_size", 0)
    return 6.0 * n + 6.0 * layers * hidden * seq_len  # causal attention: half of 12*L*h*s


def peak_flops(gpu_type: str, device: torch.device, world: int) -> float | None:
    """Peak FLOP/s of all ranks together, if the hardware catalog knows the device."""
    try:
        return get_gpu("CPU" if device.type == "cpu" else gpu_type).peak_flops * world
    except KeyError:
        return None


def memory_bytes(device: torch.device) -> float:
    """Peak accelerator memory allocated (the process's peak RSS on CPU)."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


@dataclass
class Reporter:
    metrics: metrics_mod.TrainerMetrics
    progress: Progress
    journal: Journal
    env: DistEnv
    device: torch.device
    total: int
    flops_per_token: float
    peak_flops: float | None

    @classmethod
    def start(
        cls,
        cfg: TrainerConfig,
        env: DistEnv,
        device: torch.device,
        *,
        total: int,
        flops_per_token: float,
        resumed: tuple[Path, int] | None,
    ) -> Reporter:
        """Metrics served on each node's local rank 0 (everything is computed on every rank);
        ``resumed`` is the checkpoint the run resumed from and its step."""
        metrics = metrics_mod.create(torch.__version__, version("transformers"))
        if resumed is not None:  # the latest checkpoint is the one this run resumed from
            metrics.checkpoint_last_step.set(resumed[1])
            metrics.checkpoint_last_save.set(resumed[0].stat().st_mtime)
        if env.local_rank == 0:
            try:
                metrics_mod.serve(metrics, cfg.metrics.port)
            except OSError as err:
                raise ConfigError(
                    f"cannot serve metrics on port {cfg.metrics.port}: {err}. Free the port or "
                    "choose another one for the trainer's metrics"
                ) from err
            log(env.rank, f"metrics on :{metrics.port}/metrics")
        return cls(
            metrics=metrics,
            progress=Progress(total, cfg.metrics.log_every_steps, enabled=env.rank == 0),
            journal=Journal(env),
            env=env,
            device=device,
            total=total,
            flops_per_token=flops_per_token,
            peak_flops=peak_flops(cfg.hardware.gpu_type, device, env.world_size),
        )

    def begin(self, step: int) -> None:
        self.metrics.progress.set(step / self.total)
        self.metrics.step.set(step)
        self.metrics.total_steps.set(self.total)
        self.progress.start(step)

    def step(self, r: StepResult) -> None:
        """One optimizer step (a collective: every rank's peak memory is gathered)."""
        m = self.metrics
        m.loss.set(r.loss)
        m.learning_rate.set(r.lr)
        m.grad_norm.set(r.grad_norm)
        m.tokens.inc(r.tokens)
        m.steps.inc()
        m.step_duration.observe(r.seconds)
        m.dataloader_wait.observe(r.wait_seconds)
        if self.peak_flops:
            m.mfu.set(min(1.0, self.flops_per_token * r.tokens / r.seconds / self.peak_flops))
        m.progress.set(r.step / self.total)
        m.step.set(r.step)
        self._memory()
        self.progress.step(r.step, r.loss, r.lr, r.tokens / r.seconds)
        self.journal.write(
            step=r.step,
            loss=r.loss,
            lr=r.lr,
            grad_norm=r.grad_norm,
            tokens=r.tokens,
            seconds=r.seconds,
        )

    def _memory(self) -> None:
        env = self.env
        mem = torch.tensor([memory_bytes(self.device)], device=self.device)
        if dist.is_initialized() and env.world_size > 1:
            gathered = [torch.zeros_like(mem) for _ in range(env.world_size)]
            dist.all_gather(gathered, mem)
            first = env.node_rank * env.local_world_size
            for rank in range(first, min(first + env.local_world_size, env.world_size)):
                self.metrics.memory.labels(str(rank)).set(float(gathered[rank].item()))
        else:
            self.metrics.memory.labels(str(env.rank)).set(float(mem.item()))

    def evaluated(self, step: int, loss: float | None) -> None:
        if loss is not None:
            self.metrics.eval_loss.set(loss)
            self.progress.message(f"step {step} eval_loss {loss:.4f}")
            self.journal.write(step=step, eval_loss=loss)

    def saved(self, step: int, seconds: float) -> None:
        self.metrics.checkpoint_save.observe(seconds)
        self.metrics.checkpoint_last_save.set_to_current_time()
        self.metrics.checkpoint_last_step.set(step)

    def message(self, text: str) -> None:
        self.progress.message(text)

    def close(self) -> None:
        self.progress.close()
        self.metrics.close()
