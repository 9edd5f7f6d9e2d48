"""Prometheus metrics (names in finetune_trainer.names), served on each node's local rank 0."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from finetune_trainer import __version__
from finetune_trainer import names as n

_STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
_WAIT_BUCKETS = (0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30)
_SAVE_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1800)


@dataclass
class TrainerMetrics:
    registry: CollectorRegistry
    loss: Gauge
    learning_rate: Gauge
    grad_norm: Gauge
    tokens: Counter
    steps: Counter
    step_duration: Histogram
    dataloader_wait: Histogram
    checkpoint_save: Histogram
    checkpoint_last_save: Gauge
    checkpoint_last_step: Gauge
    eval_loss: Gauge
    mfu: Gauge
    progress: Gauge
    step: Gauge
    total_steps: Gauge
    memory: Gauge
    build_info: Gauge
    server: Any = None

    @property
    def port(self) -> int | None:
        return None if self.server is None else int(self.server.server_port)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def create(torch_version: str, transformers_version: str) -> TrainerMetrics:
    r = CollectorRegistry()
    m = TrainerMetrics(
        registry=r,
        loss=Gauge(n.TRAIN_LOSS, "Mean training loss of the last step (nats/token)", registry=r),
        learning_rate=Gauge(n.TRAIN_LEARNING_RATE, "Learning rate of the last step", registry=r),
        grad_norm=Gauge(n.TRAIN_GRAD_NORM, "Gradient norm before clipping", registry=r),
        tokens=Counter(n.TRAIN_TOKENS, "Real (non-pad) tokens trained on", registry=r),
        steps=Counter(n.TRAIN_STEPS, "Optimizer steps taken", registry=r),
        step_duration=Histogram(
            n.TRAIN_STEP_DURATION,
            "Wall time of one optimizer step",
            buckets=_STEP_BUCKETS,
            registry=r,
        ),
        dataloader_wait=Histogram(
            n.DATALOADER_WAIT,
            "Time a step waited for its batches",
            buckets=_WAIT_BUCKETS,
            registry=r,
        ),
        checkpoint_save=Histogram(
            n.CHECKPOINT_SAVE_DURATION,
            "Time to write one checkpoint",
            buckets=_SAVE_BUCKETS,
            registry=r,
        ),
        checkpoint_last_save=Gauge(
            n.CHECKPOINT_LAST_SAVE,
            "Unix time the latest complete checkpoint was written",
            registry=r,
        ),
        checkpoint_last_step=Gauge(
            n.CHECKPOINT_LAST_STEP,
            "Optimizer step of the latest complete checkpoint",
            registry=r,
        ),
        eval_loss=Gauge(n.EVAL_LOSS, "Mean loss on the held-out eval set (nats/token)", registry=r),
        mfu=Gauge(n.TRAIN_MFU, "Model FLOPs utilisation (0-1) of the last step", registry=r),
        progress=Gauge(n.TRAIN_PROGRESS, "Steps done / total steps (0-1)", registry=r),
        step=Gauge(
            n.TRAIN_STEP,
            "The run's optimizer step (a resumed run goes on from its checkpoint's)",
            registry=r,
        ),
        total_steps=Gauge(n.TRAIN_TOTAL_STEPS, "Optimizer steps the run takes in all", registry=r),
        memory=Gauge(
            n.GPU_MEMORY,
            "Peak accelerator memory allocated (peak RSS on CPU)",
            ["rank"],
            registry=r,
        ),
        build_info=Gauge(
            n.TRAINER_BUILD_INFO,
            "Trainer build (always 1)",
            ["version", "torch", "transformers", "python"],
            registry=r,
        ),
    )
    m.build_info.labels(
        __version__, torch_version, transformers_version, platform.python_version()
    ).set(1)
    return m


def serve(m: TrainerMetrics, port: int, addr: str = "0.0.0.0") -> None:
    """Serve ``/metrics`` on ``port`` (0: any free port, see ``m.port``)."""
    server, _thread = start_http_server(port, addr=addr, registry=m.registry)
    m.server = server
