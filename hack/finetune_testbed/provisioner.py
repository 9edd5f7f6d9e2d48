"""The test bed's storage: a default StorageClass whose claims get a volume at once.

kwok mounts nothing, but the kube-scheduler still refuses a pod whose PersistentVolumeClaim is
unbound, so a job that writes to ``pvc://finetune-checkpoints/...`` needs its claims bound, as a
cluster's dynamic provisioner binds them. This loop (a component that ``up`` starts, like the
rendezvous) plays that provisioner: it makes the StorageClass ``standard`` the default, and for
each claim of that class that has no volume it creates a PersistentVolume pre-bound to the claim
(the claim's size and access modes, a hostPath nobody mounts); the controller-manager's
persistent-volume controller then binds them. A volume whose claim is deleted (``Released``)
is deleted, as the class's ``reclaimPolicy: Delete`` says.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .kubeapi import Api, resource_path
from .log import log
from .state import load

STORAGE_CLASS = "standard"
PROVISIONER = "testbed.finetune.dev/fake"
PROVISIONED_BY = "pv.kubernetes.io/provisioned-by"
HEARTBEAT = "provisioner.heartbeat"
INTERVAL_SECONDS = 1.0

Obj = Mapping[str, Any]


def storage_class() -> dict[str, Any]:
    """The default StorageClass: claims without a class get it (DefaultStorageClass admission)."""
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {
            "name": STORAGE_CLASS,
            "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
        },
        "provisioner": PROVISIONER,
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "Immediate",
        "allowVolumeExpansion": True,
    }


def volume_for(claim: Obj, volumes_dir: Path) -> dict[str, Any] | None:
    """The PersistentVolume to create for ``claim``, or None if it needs none (bound, being
    deleted, of another class, or without a size)."""
    meta, spec = claim.get("metadata", {}), claim.get("spec", {})
    size = (spec.get("resources") or {}).get("requests", {}).get("storage")
    if (
        spec.get("storageClassName") != STORAGE_CLASS
        or spec.get("volumeName")
        or meta.get("deletionTimestamp")
        or (claim.get("status") or {}).get("phase", "Pending") != "Pending"
        or not size
    ):
        return None
    name = f"pvc-{meta['uid']}"
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": name, "annotations": {PROVISIONED_BY: PROVISIONER}},
        "spec": {
            "capacity": {"storage": size},
            "accessModes": list(spec.get("accessModes") or ["ReadWriteOnce"]),
            "persistentVolumeReclaimPolicy": "Delete",
            "storageClassName": STORAGE_CLASS,
            "volumeMode": spec.get("volumeMode") or "Filesystem",
            "hostPath": {"path": str(volumes_dir / name), "type": "DirectoryOrCreate"},
            "claimRef": {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "namespace": meta["namespace"],
                "name": meta["name"],
                "uid": meta["uid"],
            },
        },
    }


def released(volumes: Iterable[Obj]) -> list[str]:
    """Our volumes whose claim is gone: to delete."""
    return [
        v["metadata"]["name"]
        for v in volumes
        if (v["metadata"].get("annotations") or {}).get(PROVISIONED_BY) == PROVISIONER
        and (v.get("status") or {}).get("phase") in ("Released", "Failed")
    ]


def step(api: Api, volumes_dir: Path) -> int:
    """One pass: create the volumes claims lack, delete released ones; how many changed."""
    changed = 0
    claims = (api.get("/api/v1/persistentvolumeclaims") or {}).get("items", [])
    existing = {
        v["metadata"]["name"]: v
        for v in (api.get("/api/v1/persistentvolumes") or {}).get("items", [])
    }
    for claim in claims:
        volume = volume_for(claim, volumes_dir)
        if volume is None or volume["metadata"]["name"] in existing:
            continue
        status, _ = api.call(
            "POST", "/api/v1/persistentvolumes", json.dumps(volume).encode(), "application/json"
        )
        if status == 201:
            changed += 1
            ref = volume["spec"]["claimRef"]
            log(f"provisioner: {volume['metadata']['name']} for {ref['namespace']}/{ref['name']}")
    for name in released(existing.values()):
        status, _ = api.call("DELETE", resource_path("v1", "PersistentVolume", name))
        if status in (200, 202):
            changed += 1
            log(f"provisioner: {name} deleted (its claim is gone)")
    return changed


def run(state_dir: Path) -> int:
    """Make the StorageClass, then loop until killed (``down`` stops it with the others)."""
    st = load(state_dir)
    if st is None:
        log(f"provisioner: no test bed in {state_dir}")
        return 1
    api = Api(st.server, st.admin_token, st.ca)
    api.apply(
        f"/apis/storage.k8s.io/v1/storageclasses/{STORAGE_CLASS}",
        json.dumps(storage_class()).encode(),
    )
    heartbeat = state_dir / HEARTBEAT
    while True:
        try:
            step(api, state_dir / "volumes")
        except (KeyError, ValueError, TypeError) as e:  # a malformed object: skip this pass
            log(f"provisioner: {type(e).__name__}: {e}")
        heartbeat.touch()
        time.sleep(INTERVAL_SECONDS)


def alive(state_dir: Path, within: float = 10.0) -> bool:
    """The loop has run a pass in the last ``within`` seconds."""
    try:
        return time.time() - (state_dir / HEARTBEAT).stat().st_mtime < within
    except OSError:
        return False
