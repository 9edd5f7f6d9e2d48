"""The operator's settings, read once from the environment when it starts (the Helm chart sets
them in templates/deployment.yaml). Pure: imports no Kubernetes client, kopf or torch."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from finetune_operator import __version__
from finetune_operator.children import CHILD_NAMES, KINDS, ChildKind
from finetune_operator.oplog import LOG_FORMATS, LogFormat
from finetune_operator.spec import QUANTITY_PATTERN
from finetune_operator.staging import CacheSettings
from finetune_operator.trainjob import DEFAULT_RUNTIME
from finetune_trainer import names

#: The trainer image of this release, used when FINETUNE_TRAINER_IMAGE is not set.
DEFAULT_IMAGE = f"finetune-trainer:{__version__}"
#: Seconds between two scrapes of a running job's progress.
DEFAULT_PROGRESS_INTERVAL = 15.0
#: The StorageClass and size of the per-namespace cache claims (the chart's cache values).
ENV_CACHE_STORAGE_CLASS = "FINETUNE_CACHE_STORAGE_CLASS"
ENV_CACHE_SIZE = "FINETUNE_CACHE_SIZE"
DEFAULT_CACHE_SIZE = "200Gi"
DEFAULT_CACHE = CacheSettings(size=DEFAULT_CACHE_SIZE)


class SettingsError(ValueError):
    """An environment variable holds a value the operator cannot use."""


@dataclass(frozen=True)
class Settings:
    """What the operator is configured with (one value for its whole life)."""

    #: The image the trainer pods run, unless a FineTuneJob names its own (spec.image).
    trainer_image: str = DEFAULT_IMAGE
    #: The port the trainer serves /metrics on, and the operator scrapes.
    trainer_metrics_port: int = names.METRICS_PORT
    #: Seconds between two scrapes of a running job's progress.
    progress_interval: float = DEFAULT_PROGRESS_INTERVAL
    #: How the operator logs: plain lines, or one JSON object a line (FINETUNE_LOG_FORMAT).
    log_format: LogFormat = "plain"
    #: The cache claims the operator makes for jobs that name none (spec.cache).
    cache: CacheSettings = DEFAULT_CACHE
    #: The kind of child new jobs run as: a PyTorchJob, or a Kubeflow Trainer v2 TrainJob.
    child: ChildKind = KINDS["pytorchjob"]
    #: The ClusterTrainingRuntime a TrainJob references (the chart installs it).
    trainjob_runtime: str = DEFAULT_RUNTIME

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """The settings in ``env`` (os.environ); the defaults for what is unset or empty."""
        image = env.get(names.ENV_TRAINER_IMAGE) or DEFAULT_IMAGE
        port_text = env.get(names.ENV_TRAINER_METRICS_PORT) or str(names.METRICS_PORT)
        interval_text = env.get(names.ENV_PROGRESS_INTERVAL) or str(DEFAULT_PROGRESS_INTERVAL)
        try:
            port = int(port_text)
        except ValueError:
            port = -1
        if not 1 <= port <= 65535:
            raise SettingsError(
                f"{names.ENV_TRAINER_METRICS_PORT}={port_text!r}: expected a port, 1-65535"
            )
        try:
            interval = float(interval_text)
        except ValueError:
            interval = math.nan
        if not interval > 0 or math.isinf(interval):
            raise SettingsError(
                f"{names.ENV_PROGRESS_INTERVAL}={interval_text!r}: expected seconds, a number > 0"
            )
        log_text = env.get(names.ENV_LOG_FORMAT) or "plain"
        log_format = next((f for f in LOG_FORMATS if f == log_text), None)
        if log_format is None:
            raise SettingsError(
                f"{names.ENV_LOG_FORMAT}={log_text!r}: expected one of {', '.join(LOG_FORMATS)}"
            )
        size = env.get(ENV_CACHE_SIZE) or DEFAULT_CACHE_SIZE
        if not re.fullmatch(QUANTITY_PATTERN, size):
            raise SettingsError(f"{ENV_CACHE_SIZE}={size!r}: expected a quantity such as 200Gi")
        cache = CacheSettings(storage_class=env.get(ENV_CACHE_STORAGE_CLASS) or None, size=size)
        child_text = env.get(names.ENV_CHILD) or "pytorchjob"
        child = next((KINDS[c] for c in CHILD_NAMES if c == child_text), None)
        if child is None:
            raise SettingsError(
                f"{names.ENV_CHILD}={child_text!r}: expected one of {', '.join(CHILD_NAMES)}"
            )
        runtime = env.get(names.ENV_TRAINJOB_RUNTIME) or DEFAULT_RUNTIME
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", runtime):
            raise SettingsError(
                f"{names.ENV_TRAINJOB_RUNTIME}={runtime!r}: expected the name of a "
                "ClusterTrainingRuntime (lower-case letters, digits, '-' and '.')"
            )
        return cls(
            child=child,
            trainjob_runtime=runtime,
            cache=cache,
            trainer_image=image,
            trainer_metrics_port=port,
            progress_interval=interval,
            log_format=log_format,
        )
