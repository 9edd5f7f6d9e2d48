"""The operator's own Prometheus metrics (names in finetune_trainer.names, which the Grafana
dashboard reads too)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from finetune_operator import __version__
from finetune_trainer import names

RECONCILES = Counter(names.OPERATOR_RECONCILE, "Reconciles of FineTuneJobs, by result", ["result"])
RECONCILE_SECONDS = Histogram(names.OPERATOR_RECONCILE_DURATION, "Time one reconcile took")
JOBS = Gauge(names.OPERATOR_JOBS, "FineTuneJobs known to the operator, by phase", ["phase"])
BUILD = Gauge(names.OPERATOR_BUILD_INFO, "Operator build", ["version"])
PHASES = ("Pending", "Planned", "Running", "Succeeded", "Failed", "Suspended")

_phase_of: dict[str, str] = {}


@contextmanager
def timed() -> Iterator[None]:
    """Count and time one reconcile; an exception counts as an error and propagates."""
    start = time.perf_counter()
    try:
        yield
    except Exception:
        RECONCILES.labels(result="error").inc()
        raise
    else:
        RECONCILES.labels(result="ok").inc()
    finally:
        RECONCILE_SECONDS.observe(time.perf_counter() - start)


def job_phase(key: str, phase: str | None) -> None:
    """Record the phase of job ``key`` (namespace/name); None forgets it."""
    if phase is None:
        _phase_of.pop(key, None)
    else:
        _phase_of[key] = phase
    for p in PHASES:
        JOBS.labels(phase=p).set(sum(1 for v in _phase_of.values() if v == p))


def serve(port: int) -> None:
    BUILD.labels(version=__version__).set(1)
    for result in ("ok", "error"):
        RECONCILES.labels(result=result)  # so rate(...{result="error"}) is 0, not empty
    for p in PHASES:
        JOBS.labels(phase=p).set(0)
    start_http_server(port)
