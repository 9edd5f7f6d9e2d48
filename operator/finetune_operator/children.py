"""The child a FineTuneJob runs as: one seam, one implementation per kind.

``pytorchjob`` (the default: Kubeflow training-operator v1) or ``trainjob`` (Kubeflow Trainer
v2, on JobSet). The operator's setting (the chart's ``child`` value) picks the kind of new jobs;
a job that has a child keeps its kind (status.pytorchJob or status.trainJob says which), so
changing the setting never moves a running job. Everything kind-specific the controller needs is
here: how to build the child, where its suspend lives, which label finds its pods. Pure: no
Kubernetes client, kopf or torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from finetune_operator import api, manifest, trainjob
from finetune_operator.objects import PYTORCHJOB, TRAINJOB, Child
from finetune_operator.status import FineTuneJobStatus
from finetune_trainer import names

ChildName = Literal["pytorchjob", "trainjob"]
CHILD_NAMES: tuple[ChildName, ...] = ("pytorchjob", "trainjob")


@dataclass(frozen=True)
class Inputs:
    """What building a child takes besides the job (the operator's settings, what staging and
    the plan gave, what the cluster holds now)."""

    image: str
    plan_summary: str | None = None
    #: Whether the child exists already (a queued one is then Kueue's to unsuspend).
    exists: bool = False
    #: Whether the existing child carries Kueue's queue label.
    kueue: bool = False
    metrics_port: int = manifest.METRICS_PORT
    #: The cache claim staging filled (None: not staged).
    cache: str | None = None
    #: The ClusterTrainingRuntime a TrainJob references.
    runtime: str = trainjob.DEFAULT_RUNTIME


@dataclass(frozen=True)
class ChildKind:
    """One kind of child, and what the controller needs to know of it."""

    name: ChildName
    api_version: str
    kind: str
    plural: str
    #: The label its controller puts on its pods, valued with the child's name.
    pod_label: str
    #: The trainer's container in its pods.
    container: str
    #: Where its suspend is, under spec (a merge patch sets it there).
    suspend_path: tuple[str, ...]
    #: Whether its controller may run a failed child again (Kubeflow Trainer v2 clears a
    #: TrainJob's Failed condition and re-creates its JobSet when that is deleted): the
    #: operator then suspends a failed child, so nothing of a finished job ever runs again.
    reruns_failed: bool
    build: Callable[[api.FineTuneJob, Inputs], dict[str, Any]]
    #: Why it cannot carry a job's spec (None: it can).
    unsupported: Callable[[api.FineTuneJob], str | None]

    def suspend_body(self, suspend: bool) -> dict[str, Any]:
        """``{"spec": {...: {"suspend": suspend}}}`` at its suspend path."""
        body: dict[str, Any] = {"suspend": suspend}
        for key in reversed(self.suspend_path):
            body = {key: body}
        return {"spec": body}

    def parse(self, raw: dict[str, Any]) -> Child:
        return Child.parse_trainjob(raw) if self.kind == TRAINJOB else Child.parse_pytorchjob(raw)


def _pytorch_job(job: api.FineTuneJob, given: Inputs) -> dict[str, Any]:
    return manifest.pytorch_job(
        job,
        image=given.image,
        plan_summary=given.plan_summary,
        exists=given.exists,
        kueue=given.kueue,
        metrics_port=given.metrics_port,
        cache=given.cache,
    )


def _train_job(job: api.FineTuneJob, given: Inputs) -> dict[str, Any]:
    return trainjob.train_job(
        job,
        image=given.image,
        plan_summary=given.plan_summary,
        exists=given.exists,
        kueue=given.kueue,
        metrics_port=given.metrics_port,
        cache=given.cache,
        runtime=given.runtime,
    )


PYTORCHJOB_CHILD = ChildKind(
    name="pytorchjob",
    api_version=manifest.PYTORCHJOB_API_VERSION,
    kind=PYTORCHJOB,
    plural="pytorchjobs",
    pod_label=names.JOB_NAME_LABEL,
    container=names.CONTAINER,
    suspend_path=("runPolicy",),
    reruns_failed=False,
    build=_pytorch_job,
    unsupported=lambda job: None,
)
TRAINJOB_CHILD = ChildKind(
    name="trainjob",
    api_version=trainjob.API_VERSION,
    kind=TRAINJOB,
    plural="trainjobs",
    pod_label=names.JOBSET_NAME_LABEL,
    container=names.TRAINJOB_CONTAINER,
    suspend_path=(),
    reruns_failed=True,
    build=_train_job,
    unsupported=trainjob.unsupported,
)
KINDS = {k.name: k for k in (PYTORCHJOB_CHILD, TRAINJOB_CHILD)}
BY_KIND = {k.kind: k for k in KINDS.values()}


def of(status: FineTuneJobStatus | None, default: ChildKind) -> ChildKind:
    """The kind of a job's child: the one its status records, else ``default`` (the
    operator's setting, for a job that has none yet)."""
    if status is not None and status.train_job is not None:
        return TRAINJOB_CHILD
    if status is not None and status.pytorch_job is not None:
        return PYTORCHJOB_CHILD
    return default
