"""The fake trainer's rendezvous: a training pod runs its course once every pod of its job runs.

Real torchrun blocks in its rendezvous until all ``nnodes`` ranks have joined, so a PyTorchJob
whose worker cannot start never finishes. kwok's Stages select on a pod's own fields only, so
this small loop (a test bed component, started by ``up`` like the others) plays the rendezvous:
when every replica of a PyTorchJob has a pod that is Running (or has already joined), it
annotates those Running pods ``testbed.finetune.dev/rendezvous: <time>``. The Stages that end a
training pod (succeed, fail, OOM, restart) require that annotation; their delay (the pod's
run-duration) starts when it is set.

Two kinds of training pods, each with its gang:

- a PyTorchJob's (label ``training.kubeflow.org/job-name``): one pod per (replica type, index)
  of the PyTorchJob's ``pytorchReplicaSpecs``;
- a TrainJob's (Kubeflow Trainer v2, ``up --trainer``): the pods of the replicated job ``node``
  of its JobSet (labels ``jobset.sigs.k8s.io/jobset-name``, ``…/replicatedjob-name: node``), one
  per (job index, completion index): the replicated job's ``replicas`` × its Job template's
  ``completions`` (else ``parallelism``, else 1). Other replicated jobs (Trainer's initializers)
  are ordinary Job pods.

A pod labelled as a training pod whose PyTorchJob or JobSet cannot be found (made by hand) joins
alone.
"""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .kubeapi import Api
from .log import log
from .state import load

ANNOTATION = "testbed.finetune.dev/rendezvous"
JOB_LABEL = "training.kubeflow.org/job-name"
TYPE_LABEL = "training.kubeflow.org/replica-type"
INDEX_LABEL = "training.kubeflow.org/replica-index"
JOBSET_LABEL = "jobset.sigs.k8s.io/jobset-name"
REPLICATED_JOB_LABEL = "jobset.sigs.k8s.io/replicatedjob-name"
JOB_INDEX_LABEL = "jobset.sigs.k8s.io/job-index"
COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
#: The replicated job of a TrainJob's JobSet that runs the trainer (Trainer's ``constants.Node``).
TRAINER_REPLICATED_JOB = "node"
HEARTBEAT = "rendezvous.heartbeat"
INTERVAL_SECONDS = 0.5

Obj = Mapping[str, Any]
Replica = tuple[str, str]  # (replica type lower-cased, index) or (job index, completion index)
Gang = tuple[str, str, str]  # (kind: "pytorchjob" | "jobset", namespace, name)


@dataclass(frozen=True)
class PodView:
    """What the rendezvous needs of a pod."""

    namespace: str
    name: str
    job: str
    replica: Replica
    running: bool
    joined: bool  # annotated already
    kind: str = "pytorchjob"  # or "jobset" (a TrainJob's pod; ``job`` is the JobSet's name)

    @classmethod
    def of(cls, pod: Obj) -> PodView:
        meta = pod.get("metadata", {})
        labels = meta.get("labels") or {}
        if JOB_LABEL not in labels and JOBSET_LABEL in labels:
            kind, job = "jobset", str(labels[JOBSET_LABEL])
            replica = (
                str(labels.get(JOB_INDEX_LABEL, "")),
                str(labels.get(COMPLETION_INDEX_LABEL, "")),
            )
        else:
            kind, job = "pytorchjob", str(labels.get(JOB_LABEL, ""))
            replica = (str(labels.get(TYPE_LABEL, "")).lower(), str(labels.get(INDEX_LABEL, "")))
        return cls(
            namespace=str(meta.get("namespace", "")),
            name=str(meta.get("name", "")),
            job=job,
            replica=replica,
            running=pod.get("status", {}).get("phase") == "Running"
            and not meta.get("deletionTimestamp"),
            joined=ANNOTATION in (meta.get("annotations") or {}),
            kind=kind,
        )

    @property
    def gang(self) -> Gang:
        return (self.kind, self.namespace, self.job)


def replicas(pytorchjob: Obj) -> set[Replica]:
    """Every (replica type, index) the PyTorchJob asks for."""
    specs = pytorchjob.get("spec", {}).get("pytorchReplicaSpecs") or {}
    return {
        (str(rtype).lower(), str(i))
        for rtype, spec in specs.items()
        for i in range(int((spec or {}).get("replicas", 1)))
    }


def jobset_replicas(jobset: Obj) -> set[Replica]:
    """Every (job index, completion index) of the JobSet's trainer replicated job (``node``)."""
    out: set[Replica] = set()
    for rjob in jobset.get("spec", {}).get("replicatedJobs") or []:
        if rjob.get("name") != TRAINER_REPLICATED_JOB:
            continue
        job = rjob.get("template", {}).get("spec", {})
        pods = job.get("completions") or job.get("parallelism") or 1
        out |= {(str(j), str(i)) for j in range(int(rjob.get("replicas", 1))) for i in range(pods)}
    return out


def to_join(expected: set[Replica] | None, pods: Iterable[PodView]) -> list[PodView]:
    """The Running pods to annotate now: all of them once every expected replica has a pod that
    runs or has joined before (``expected`` None: no PyTorchJob, each pod joins alone)."""
    pods = list(pods)
    waiting = [p for p in pods if p.running and not p.joined]
    if expected is None:
        return waiting
    present = {p.replica for p in pods if p.running or p.joined}
    return waiting if expected <= present else []


def step(api: Api) -> int:
    """One pass over the cluster's training pods; how many pods joined."""
    selector = urllib.parse.quote(JOB_LABEL)
    pods = (api.get(f"/api/v1/pods?labelSelector={selector}") or {}).get("items", [])
    selector = urllib.parse.quote(f"{REPLICATED_JOB_LABEL}={TRAINER_REPLICATED_JOB},{JOBSET_LABEL}")
    trainjob_pods = (api.get(f"/api/v1/pods?labelSelector={selector}") or {}).get("items", [])
    if not pods and not trainjob_pods:
        return 0
    expected: dict[Gang, set[Replica]] = {}
    if pods:
        jobs = (api.get("/apis/kubeflow.org/v1/pytorchjobs") or {}).get("items", [])
        for j in jobs:
            expected[("pytorchjob", j["metadata"]["namespace"], j["metadata"]["name"])] = replicas(
                j
            )
    if trainjob_pods:
        jobsets = (api.get("/apis/jobset.x-k8s.io/v1alpha2/jobsets") or {}).get("items", [])
        for j in jobsets:
            gang = ("jobset", j["metadata"]["namespace"], j["metadata"]["name"])
            expected[gang] = jobset_replicas(j)
    groups: dict[Gang, list[PodView]] = {}
    for pod in [*pods, *trainjob_pods]:
        view = PodView.of(pod)
        groups.setdefault(view.gang, []).append(view)
    joined = 0
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for key, views in groups.items():
        for view in to_join(expected.get(key), views):
            path = f"/api/v1/namespaces/{view.namespace}/pods/{view.name}"
            body = f'{{"metadata":{{"annotations":{{"{ANNOTATION}":"{stamp}"}}}}}}'
            status, _ = api.call("PATCH", path, body.encode(), "application/merge-patch+json")
            if status == 200:
                joined += 1
                log(f"rendezvous: {view.namespace}/{view.name} joined ({key[0]} {key[2]})")
    return joined


def run(state_dir: Path) -> int:
    """Loop until killed (``down`` stops it with the other components)."""
    st = load(state_dir)
    if st is None:
        log(f"rendezvous: no test bed in {state_dir}")
        return 1
    api = Api(st.server, st.admin_token, st.ca)
    heartbeat = state_dir / HEARTBEAT
    while True:
        try:
            step(api)
        except (KeyError, ValueError, TypeError) as e:  # a malformed object: skip this pass
            log(f"rendezvous: {type(e).__name__}: {e}")
        heartbeat.touch()
        time.sleep(INTERVAL_SECONDS)


def alive(state_dir: Path, within: float = 10.0) -> bool:
    """The loop has run a pass in the last ``within`` seconds."""
    try:
        return time.time() - (state_dir / HEARTBEAT).stat().st_mtime < within
    except OSError:
        return False
