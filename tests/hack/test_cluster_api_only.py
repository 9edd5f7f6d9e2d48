"""`hack/cluster up --api-only`, the inner loop's test bed: an API server and the child CRDs,
nothing that schedules or runs pods, and the same status/env/down as the full test bed."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed import CLUSTER

pytestmark = pytest.mark.integration


def _cluster(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    env["FINETUNE_TESTBED_STATE"] = str(state)
    return subprocess.run(
        [str(CLUSTER), *args], capture_output=True, text=True, env=env, timeout=300, check=False
    )


@pytest.fixture(scope="module")
def api_only(testbed: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A second, API-only test bed of this module's own (``testbed`` built the binaries)."""
    state = tmp_path_factory.mktemp("api-only") / "state"
    up = _cluster(state, "up", "--api-only")
    assert up.returncode == 0, up.stderr[-4000:]
    try:
        env = _cluster(state, "env", "--json")
        assert env.returncode == 0, env.stderr
        yield {"state": state, **json.loads(env.stdout)}
    finally:
        down = _cluster(state, "down")
        assert down.returncode == 0, down.stderr


def _kubectl(bed: dict[str, Any], *args: str, stdin: str | None = None) -> Any:
    return subprocess.run(
        [bed["binaries"]["kubectl"], f"--kubeconfig={bed['kubeconfig']}", *args],
        input=stdin, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_it_runs_the_api_server_and_nothing_else(api_only: dict[str, Any]) -> None:
    assert api_only["api_only"] is True
    assert api_only["components"] == ["etcd", "kube-apiserver"]
    status = _cluster(api_only["state"], "status")
    assert status.returncode == 0, status.stderr
    assert "(--api-only)" in status.stdout
    assert "kube-scheduler" not in status.stdout


def test_child_crds_are_served_but_no_controller_acts(api_only: dict[str, Any]) -> None:
    namespace = "api-only-check"
    assert _kubectl(api_only, "create", "namespace", namespace).returncode == 0
    job = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": "served", "namespace": namespace},
        "spec": {"pytorchReplicaSpecs": {"Master": {"replicas": 1, "template": {"spec": {
            "containers": [{"name": "pytorch", "image": "busybox:1.36"}]}}}}},
    }  # fmt: skip
    created = _kubectl(api_only, "create", "-f", "-", stdin=json.dumps(job))
    assert created.returncode == 0, created.stderr
    time.sleep(3)  # what a controller-manager or training-operator would have done by now
    account = _kubectl(api_only, "get", "serviceaccount", "default", "-n", namespace)
    assert account.returncode != 0, "a default ServiceAccount appeared: something else runs"
    pods = _kubectl(api_only, "get", "pods", "-n", namespace, "-o", "name")
    assert pods.returncode == 0
    assert pods.stdout == "", "pods were created: the training-operator runs"
