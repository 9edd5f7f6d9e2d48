"""The fake trainer's rendezvous: a training pod runs its course once every pod of its job runs.

Real torchrun blocks in its rendezvous until all ``nnodes`` ranks have joined, so a PyTorchJob
whose worker cannot start never finishes. kwok's Stages select on a pod's own fields only, so
this small loop (a test bed component, started by ``up`` like the others) plays the rendezvous:
when every replica of a PyTorchJob has a pod that is Running (or has already joined), it
annotates those Running pods ``testbed.finetune.dev/rendezvous: <time>``. The Stages that end a
training pod (succeed, fail, OOM, restart) require that annotation; their delay (the pod's
run-duration) starts when it is set.

A pod labelled as a training pod whose PyTorchJob cannot be found (made by hand) joins alone.
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
HEARTBEAT = "rendezvous.heartbeat"
INTERVAL_SECONDS = 0.5

Obj = Mapping[str, Any]
Replica = tuple[str, str]  # (replica type lower-cased, index)


@dataclass(frozen=True)
class PodView:
    """What the rendezvous needs of a pod."""

    namespace: str
    name: str
    job: str
    replica: Replica
    running: bool
    joined: bool  # annotated already

    @classmethod
    def of(cls, pod: Obj) -> PodView:
        meta = pod.get("metadata", {})
        labels = meta.get("labels") or {}
        return cls(
            namespace=str(meta.get("namespace", "")),
            name=str(meta.get("name", "")),
            job=str(labels.get(JOB_LABEL, "")),
            replica=(str(labels.get(TYPE_LABEL, "")).lower(), str(labels.get(INDEX_LABEL, ""))),
            running=pod.get("status", {}).get("phase") == "Running"
            and not meta.get("deletionTimestamp"),
            joined=ANNOTATION in (meta.get("annotations") or {}),
        )


def replicas(pytorchjob: Obj) -> set[Replica]:
    """Every (replica type, index) the PyTorchJob asks for."""
    specs = pytorchjob.get("spec", {}).get("pytorchReplicaSpecs") or {}
    return {
        (str(rtype).lower(), str(i))
        for rtype, spec in specs.items()
        for i in range(int((spec or {}).get("replicas", 1)))
    }


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
    if not pods:
        return 0
    jobs = (api.get("/apis/kubeflow.org/v1/pytorchjobs") or {}).get("items", [])
    expected = {(j["metadata"]["namespace"], j["metadata"]["name"]): replicas(j) for j in jobs}
    groups: dict[tuple[str, str], list[PodView]] = {}
    for pod in pods:
        view = PodView.of(pod)
        groups.setdefault((view.namespace, view.job), []).append(view)
    joined = 0
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for key, views in groups.items():
        for view in to_join(expected.get(key), views):
            path = f"/api/v1/namespaces/{view.namespace}/pods/{view.name}"
            body = f'{{"metadata":{{"annotations":{{"{ANNOTATION}":"{stamp}"}}}}}}'
            status, _ = api.call("PATCH", path, body.encode(), "application/merge-patch+json")
            if status == 200:
                joined += 1
                log(f"rendezvous: {view.namespace}/{view.name} joined ({key[1]})")
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
