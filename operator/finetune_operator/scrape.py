"""Scrape results: training progress and the latest checkpoint, parsed from the text of the
master pod's Prometheus /metrics (pure: text in, status parts out; :mod:`finetune_operator.kube`
fetches the text)."""

from __future__ import annotations

from datetime import UTC, datetime

from prometheus_client.parser import text_string_to_metric_families

from finetune_operator.status import CheckpointStatus, Progress
from finetune_trainer import names as n
from finetune_trainer.config import checkpoint_dirname


def _samples(text: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.labels or sample.name.endswith(("_sum", "_count")):
                values.setdefault(sample.name, float(sample.value))
    return values


def parse_progress(text: str, now: str) -> Progress | None:
    """Progress from the trainer's /metrics text; None when it reports no step yet."""
    values = _samples(text)
    # The run's step and total (a resumed run goes on from its checkpoint's step); a trainer
    # without those gauges: the steps it counted, and the total they imply.
    step = int(values.get(n.TRAIN_STEP) or values.get(n.total(n.TRAIN_STEPS), 0))
    if step <= 0 or values.get(n.total(n.TRAIN_STEPS), 0) <= 0:
        return None
    ratio = values.get(n.TRAIN_PROGRESS, 0.0)
    total: int | None = int(values.get(n.TRAIN_TOTAL_STEPS, 0)) or None
    if total is None:
        total = round(step / ratio) if ratio > 0 else None
    busy = values.get(n.hsum(n.TRAIN_STEP_DURATION), 0.0)
    counted = values.get(n.count(n.TRAIN_STEP_DURATION), 0.0)
    tokens = values.get(n.total(n.TRAIN_TOKENS), 0.0)
    tokens_per_second = round(tokens / busy) if busy > 0 else None
    eta = None
    if total is not None and counted > 0:
        eta = max(0, round((total - step) * busy / counted))
    percent = min(100, int(ratio * 100)) if ratio > 0 else None
    loss = values.get(n.TRAIN_LOSS)
    summary = f"{step}/{total} ({percent}%)" if total is not None else f"{step}"
    return Progress(
        step=step,
        total_steps=total,
        loss=f"{loss:.4f}" if loss is not None else None,
        tokens_per_second=tokens_per_second,
        percent=percent,
        eta_seconds=eta,
        updated_at=now,
        summary=summary,
    )


def parse_checkpoint(text: str, storage: str | None) -> CheckpointStatus | None:
    """The latest complete checkpoint the trainer reports; None before the first one.

    ``storage`` is spec.checkpoint.storage: the checkpoint's location is its step's folder there.
    """
    values = _samples(text)
    step = int(values.get(n.CHECKPOINT_LAST_STEP, 0))
    if step <= 0:
        return None
    stamp = values.get(n.CHECKPOINT_LAST_SAVE, 0.0)
    when = datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if stamp else None
    latest = f"{storage.rstrip('/')}/{checkpoint_dirname(step)}" if storage else None
    return CheckpointStatus(latest=latest, step=step, time=when)
