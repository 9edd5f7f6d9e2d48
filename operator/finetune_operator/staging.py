"""Staging: the batch Job that fills the cache before any trainer pod exists, and what it tells.

A FineTuneJob whose model or data must be fetched or read (``hf://``, ``pvc://``, ``file://``)
is staged first: a Job runs ``python -m finetune_trainer.staging`` in the trainer image, which
resolves Hub revisions to commits, downloads into the cache claim once per repository and
commit, reads the model's config.json, and writes its report (one JSON line,
:class:`finetune_trainer.staging_report.StagingReport`) as its termination message. The operator
reads it back (:func:`progress`), records it in ``status.staging`` (:func:`staging_status`),
plans from the recorded architecture (:func:`model_facts`) and pins the trainer config to the
staged commits (:func:`pinned`). A job with a builtin model and no Hub dataset downloads and
reads nothing: it is not staged (:func:`needed`).

Pure builders and readers: typed job in, plain dicts out; nothing here talks to the cluster.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from finetune_operator import api, manifest
from finetune_operator.objects import Condition, Pod
from finetune_operator.sources import claims, parse_source, pvc_mount_path
from finetune_operator.spec import FineTuneJobSpec
from finetune_operator.status import Failure, StagedModel, StagingStatus, StagingWait, pod_problem
from finetune_trainer import names
from finetune_trainer.config import TrainerConfig
from finetune_trainer.planner import ModelFacts
from finetune_trainer.planner.model import ModelConfigError
from finetune_trainer.staging_report import (
    BAD_INPUT,
    EXIT_BAD_INPUT,
    STAGING_FAILED,
    StagingFailure,
    StagingReport,
    parse_message,
)

#: On the staging Job and its pod: the FineTuneJob's name (the trainer children carry JOB_LABEL).
STAGING_LABEL = f"{api.GROUP}/staging"
#: On the staging pod: what it stages (for users, and for the test bed that plays it).
MODEL_ANNOTATION = f"{api.GROUP}/model-source"
DATASET_ANNOTATION = f"{api.GROUP}/dataset-source"
CONTAINER = "stage"
#: Where the cache claim is mounted, and the Hugging Face cache inside it (HF_HOME/hub).
HF_HOME = f"{manifest.CACHE_DIR}/huggingface"
HUB_CACHE = f"{HF_HOME}/hub"
#: The per-namespace cache claims the operator makes when a job names none (spec.cache).
DEFAULT_CLAIM = "finetune-cache"
DEFAULT_CLAIM_RWX = "finetune-cache-rwx"
#: Retries of a staging pod that failed with StagingFailed (the Hub or the disk).
BACKOFF_LIMIT = 2

AccessMode = Literal["ReadWriteOnce", "ReadWriteMany"]


def job_name(name: str) -> str:
    """The staging Job of the FineTuneJob ``name``."""
    return f"{name}-staging"


def needed(spec: FineTuneJobSpec) -> bool:
    """Whether the job is staged: everything but a builtin model with a builtin or local
    dataset (nothing to download, and the planner knows the builtin architectures)."""
    model = parse_source(spec.model.source).scheme
    data = parse_source(spec.dataset.source).scheme
    return not (model == "builtin" and data != "hf")


# ---- the cache claim ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheSettings:
    """The operator's default cache (the chart's ``cache`` values)."""

    #: StorageClass of the claims the operator makes; None: the cluster's default class.
    storage_class: str | None = None
    #: Size of each claim the operator makes (a Kubernetes quantity).
    size: str = "200Gi"


#: The cache claims' settings when the chart sets none.
DEFAULT_CACHE = CacheSettings()


@dataclass(frozen=True)
class CacheClaim:
    """The claim a job stages into: the job's own (spec.cache) or the operator's default."""

    name: str
    #: Whether the operator makes it (the default claim of the namespace).
    managed: bool
    #: The access mode the job needs: ReadWriteMany when pods on several nodes mount it.
    access_mode: AccessMode


def cache_claim(spec: FineTuneJobSpec) -> CacheClaim:
    mode: AccessMode = "ReadWriteMany" if spec.resources.num_nodes > 1 else "ReadWriteOnce"
    if spec.cache:
        return CacheClaim(spec.cache, managed=False, access_mode=mode)
    name = DEFAULT_CLAIM_RWX if mode == "ReadWriteMany" else DEFAULT_CLAIM
    return CacheClaim(name, managed=True, access_mode=mode)


def cache_pvc(namespace: str, claim: CacheClaim, settings: CacheSettings) -> dict[str, Any]:
    """The namespace's default cache claim. Shared by the namespace's jobs, so owned by none of
    them: it outlives each job (a later job on the same commit downloads nothing)."""
    spec: dict[str, Any] = {
        "accessModes": [claim.access_mode],
        "resources": {"requests": {"storage": settings.size}},
    }
    if settings.storage_class:
        spec["storageClassName"] = settings.storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": claim.name,
            "namespace": namespace,
            "labels": {
                "app.kubernetes.io/name": "finetune-cache",
                "app.kubernetes.io/managed-by": manifest.MANAGED_BY,
            },
        },
        "spec": spec,
    }


@dataclass(frozen=True)
class ClaimView:
    """A PersistentVolumeClaim as the operator reads it."""

    name: str
    phase: str = "Pending"
    access_modes: tuple[str, ...] = ()
    storage_class: str | None = None

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> ClaimView:
        meta, spec, status = raw.get("metadata", {}), raw.get("spec", {}), raw.get("status", {})
        return cls(
            name=str(meta.get("name", "")),
            phase=str((status or {}).get("phase") or "Pending"),
            access_modes=tuple(str(m) for m in (spec or {}).get("accessModes") or ()),
            storage_class=(spec or {}).get("storageClassName"),
        )


def cache_problem(claim: CacheClaim, found: ClaimView | None) -> StagingWait | None:
    """Why the cache cannot take the staged files yet (the job waits in Staging), if it cannot."""
    if found is None:
        if claim.managed:
            return None  # the operator makes it
        return StagingWait(
            "CacheUnavailable",
            f"spec.cache names the PersistentVolumeClaim {claim.name}, which does not exist in "
            "the job's namespace: create it, or leave spec.cache out for the operator's cache",
            Failure(
                reason="CacheUnavailable",
                message=f"PersistentVolumeClaim {claim.name} (spec.cache) does not exist",
            ),
        )
    if claim.access_mode == "ReadWriteMany" and "ReadWriteMany" not in found.access_modes:
        message = (
            f"the cache claim {claim.name} is {', '.join(found.access_modes) or 'not'} "
            "ReadWriteMany, but the pods of a job on several nodes mount it together: give "
            "spec.cache a ReadWriteMany claim (a StorageClass that provides it, e.g. NFS or "
            "CephFS), or set the chart's cache.storageClassName to one"
        )
        return StagingWait(
            "CacheUnavailable", message, Failure(reason="CacheUnavailable", message=message)
        )
    if found.phase == "Lost":
        message = f"the cache claim {claim.name} lost its volume: recreate the claim"
        return StagingWait(
            "CacheUnavailable", message, Failure(reason="CacheUnavailable", message=message)
        )
    return None


# ---- the staging Job ---------------------------------------------------------------------------


def _security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
    }


def _args(spec: FineTuneJobSpec) -> list[str]:
    args = ["--config", f"{manifest.CONFIG_DIR}/{manifest.CONFIG_FILE}", "--cache", HUB_CACHE]
    if spec.model.allow_pickle_weights:
        args.append("--allow-pickle-weights")
    if spec.model.allow_remote_code:
        args.append("--allow-remote-code")
    return args


def _env(job: api.FineTuneJob) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": names.ENV_JOB_NAME, "value": job.name},
        {"name": names.ENV_JOB_NAMESPACE, "value": job.metadata.namespace or ""},
        {"name": "HF_HOME", "value": HF_HOME},
        {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
        {"name": "HOME", "value": "/tmp"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    ref = job.spec.model.token_secret_ref
    if ref is not None:
        env.append(
            {
                "name": names.ENV_HF_TOKEN,
                "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}},
            }
        )
    return env


def _volumes(
    job: api.FineTuneJob, claim: CacheClaim
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [
        {"name": "trainer-config", "configMap": {"name": manifest.config_map_name(job.name)}},
        {"name": "cache", "persistentVolumeClaim": {"claimName": claim.name}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "trainer-config", "mountPath": manifest.CONFIG_DIR, "readOnly": True},
        {"name": "cache", "mountPath": manifest.CACHE_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    spec = job.spec
    read = {parse_source(u).claim for u in (spec.model.source, spec.dataset.source)}
    for i, name in enumerate(c for c in claims(spec) if c in read and c != claim.name):
        volumes.append(
            {"name": f"pvc-{i}", "persistentVolumeClaim": {"claimName": name, "readOnly": True}}
        )
        mounts.append({"name": f"pvc-{i}", "mountPath": pvc_mount_path(name), "readOnly": True})
    return volumes, mounts


def labels(job: api.FineTuneJob) -> dict[str, str]:
    return {
        STAGING_LABEL: job.name,
        "app.kubernetes.io/name": "finetune-staging",
        "app.kubernetes.io/instance": job.name,
        "app.kubernetes.io/managed-by": manifest.MANAGED_BY,
    }


def staging_job(job: api.FineTuneJob, *, image: str, claim: CacheClaim) -> dict[str, Any]:
    """The batch Job that stages ``job``'s model and dataset into ``claim``.

    It reads the trainer ConfigMap (the model and dataset sources), runs the trainer image as
    the trainer pods do (restricted securityContext, the Hub token only from its Secret), and
    writes the cache. A BadInput exit (3) fails the Job at once (podFailurePolicy); other
    failures are retried BACKOFF_LIMIT times.
    """
    volumes, mounts = _volumes(job, claim)
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": job.spec.image or image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-m", "finetune_trainer.staging"],
        "args": _args(job.spec),
        "env": _env(job),
        "resources": {
            "requests": {"cpu": "250m", "memory": "1Gi"},  # I/O bound
            "limits": {"memory": "8Gi"},
        },
        "volumeMounts": mounts,
        # The report (or the failure's cause) is the termination message: one JSON line.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": _security_context(),
    }
    extra = job.spec.pod_metadata
    pod_labels = {**((extra.labels or {}) if extra else {}), **labels(job)}
    annotations = {
        **((extra.annotations or {}) if extra else {}),
        MODEL_ANNOTATION: job.spec.model.source,
        DATASET_ANNOTATION: job.spec.dataset.source,
        "kubectl.kubernetes.io/default-container": CONTAINER,
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [container],
        "volumes": volumes,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": manifest.TRAINER_UID,
            "runAsGroup": manifest.TRAINER_UID,
            "fsGroup": manifest.TRAINER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "enableServiceLinks": False,
    }
    if job.spec.scheduling and job.spec.scheduling.priority_class_name:
        pod_spec["priorityClassName"] = job.spec.scheduling.priority_class_name
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(job.name),
            "namespace": job.metadata.namespace,
            "labels": labels(job),
            "ownerReferences": [manifest.owner_reference(job)],
        },
        "spec": {
            "backoffLimit": BACKOFF_LIMIT,
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": CONTAINER,
                            "operator": "In",
                            "values": [EXIT_BAD_INPUT],
                        },
                    },
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                ]
            },
            "template": {
                "metadata": {"labels": pod_labels, "annotations": annotations},
                "spec": pod_spec,
            },
        },
    }


# ---- reading it back ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StagingJob:
    """The staging Job as the operator reads it: its conditions and failed pods."""

    name: str
    conditions: tuple[Condition, ...] = ()
    failed: int = 0

    def true(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_ and c.status == "True"), None)

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> StagingJob:
        meta, status = raw.get("metadata", {}), raw.get("status") or {}
        conditions = [c for c in status.get("conditions") or [] if isinstance(c, Mapping)]
        return cls(
            name=str(meta.get("name", "")),
            conditions=tuple(Condition.parse(c) for c in conditions),
            failed=int(status.get("failed") or 0),
        )


def _messages(pods: Sequence[Pod], *, exit_zero: bool) -> list[tuple[Pod, str]]:
    """The termination messages of the staging containers that ended (exit 0, or not)."""
    found = []
    for pod in pods:
        for cs in pod.container_statuses:
            term = cs.state.terminated
            if term is not None and (term.exit_code == 0) == exit_zero:
                found.append((pod, term.message))
    return found


def _failure(pods: Sequence[Pod]) -> StagingFailure | None:
    """The failure a staging pod told (BadInput first: it is permanent)."""
    told = [
        f
        for _, m in _messages(pods, exit_zero=False)
        if isinstance(f := parse_message(m), StagingFailure)
    ]
    return next((f for f in told if f.permanent), told[-1] if told else None)


def progress(
    name: str, job: StagingJob | None, pods: Sequence[Pod], claim: CacheClaim
) -> StagingReport | Failure | StagingWait:
    """Where the staging of the FineTuneJob ``name`` stands, given its staging Job (None: just
    created) and that Job's pods: the report (done), a Failure (the job fails), or why it waits."""
    doing = (
        f"the staging Job {job_name(name)} resolves and downloads the model and dataset into "
        f"the cache claim {claim.name}"
    )
    if job is None:
        return StagingWait("Staging", doing)
    if job.true("Complete") is not None or job.true("SuccessCriteriaMet") is not None:
        for _, message in _messages(pods, exit_zero=True):
            found = parse_message(message)
            if isinstance(found, StagingReport):
                return found
        return Failure(
            reason=STAGING_FAILED,
            message=f"the staging Job {job.name} succeeded without a report in its pod's "
            "termination message (is spec.image a trainer image of this release?)",
        )
    told = _failure(pods)
    failed = job.true("Failed") or job.true("FailureTarget")
    if told is not None and (told.permanent or failed is not None):
        return Failure(reason=told.reason, message=told.message)
    if failed is not None:
        return Failure(
            reason=STAGING_FAILED,
            message=f"the staging Job {job.name} failed: {failed.message or failed.reason}; see "
            f"its pods' logs (kubectl logs job/{job.name})",
        )
    problem = pod_problem([p for p in pods if p.phase != "Failed"])
    if problem is not None and _waits_for_volume(problem):
        message = (
            f"the staging pod waits for its cache claim {claim.name} to be bound "
            f"({problem.message}): check that its StorageClass can provision a "
            f"{claim.access_mode} volume (kubectl describe pvc {claim.name}; the chart's "
            "cache.storageClassName, or spec.cache for a claim of your own)"
        )
        return StagingWait("CachePending", message, Failure(reason="CachePending", message=message))
    if problem is not None:
        return StagingWait(problem.reason, problem.message, problem)
    if told is not None:  # a retry is under way
        return StagingWait(
            "Staging", f"{doing}; attempt {job.failed} failed ({told.message}), retrying"
        )
    return StagingWait("Staging", doing)


def _waits_for_volume(problem: Failure) -> bool:
    """Whether the scheduler holds a pod back for its volumes (a claim not bound, or one its
    StorageClass failed to provision)."""
    text = problem.message.lower()
    return problem.reason == "Unschedulable" and (
        "persistentvolumeclaim" in text or "volumebinding" in text or "volume binding" in text
    )


def _facts(report: StagingReport) -> ModelFacts | None:
    if not report.config:  # nothing read (a report from an older trainer): plan as before
        return None
    return ModelFacts.from_hf_config(report.config, name=report.model.source)


def staging_status(report: StagingReport, claim: CacheClaim) -> StagingStatus | Failure:
    """``status.staging`` for a report; a BadInput Failure when its config.json cannot be
    planned (the trainer could not run the model either)."""
    try:
        facts = _facts(report)
    except ModelConfigError as exc:
        return Failure(
            reason=BAD_INPUT,
            message=f"model {report.model.source} cannot be fine-tuned here: {exc}",
        )
    return StagingStatus(
        model_commit=report.model.commit,
        dataset_commit=report.dataset.commit,
        bytes=report.model.bytes + report.dataset.bytes,
        fetched_bytes=report.model.fetched_bytes + report.dataset.fetched_bytes,
        seconds=math.ceil(report.model.seconds + report.dataset.seconds),
        cache=claim.name,
        model=StagedModel.model_validate(facts.model_dump(exclude={"name"})) if facts else None,
        warnings=list(report.warnings) or None,
    )


def model_facts(staging: StagingStatus | None, source: str) -> ModelFacts | None:
    """The model's architecture staging recorded (None: plan from the catalog, or the trainer)."""
    if staging is None or staging.model is None:
        return None
    return ModelFacts(name=source, **staging.model.model_dump())


def pinned(config: TrainerConfig, staging: StagingStatus) -> TrainerConfig:
    """The trainer config of a staged job: Hub sources at the staged commits (a restart or a
    resume trains on what was staged, never on a newer upload), and no Hub token (the trainer
    pods load offline from the cache)."""
    model, data = config.model, config.data
    if model.kind == "hf" and staging.model_commit:
        model = model.model_copy(update={"revision": staging.model_commit})
    data_revision = staging.dataset_commit if data.kind == "hf" else None
    if data_revision:
        data = data.model_copy(update={"revision": data_revision})
    model = model.model_copy(update={"token_env": None})
    return config.model_copy(update={"model": model, "data": data})
