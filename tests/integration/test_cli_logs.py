"""`finetune logs` when the API server cannot reach the node that runs the trainer: the user gets
the API server's reason in one line, not a traceback (real API server; the node is a Node object
with no kubelet behind its address, so nothing answers on its kubelet port)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from helpers import EXAMPLES, load_yaml

pytestmark = pytest.mark.integration


def test_logs_reports_an_unreachable_node_in_one_line(crd: Any, namespace: str) -> None:
    testbed = crd
    job = load_yaml(next(p for p in EXAMPLES if p.stem == "mistral-7b-python-code"))
    job["metadata"]["namespace"] = namespace
    assert testbed.apply(job).returncode == 0
    name = job["metadata"]["name"]

    node = f"no-kubelet-{uuid.uuid4().hex[:6]}"  # not annotated for kwok: nobody plays it
    assert (
        testbed.apply({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}}).returncode
        == 0
    )
    try:
        # Its kubelet would listen on loopback at a port where nothing does.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        status = {
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": port}},
        }
        testbed.kubectl(
            "patch", "node", node, "--subresource=status", "--type=merge",
            "-p", json.dumps({"status": status}), check=True,
        )  # fmt: skip
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{name}-master-0",
                "namespace": namespace,
                # as the training-operator labels a master pod
                "labels": {
                    "training.kubeflow.org/job-name": name,
                    "training.kubeflow.org/replica-type": "master",
                    "training.kubeflow.org/replica-index": "0",
                },
            },
            "spec": {
                "nodeName": node,
                "containers": [{"name": "pytorch", "image": "trainer:test"}],
            },
        }
        assert testbed.apply(pod).returncode == 0
        running = {"status": {"phase": "Running"}}
        testbed.kubectl(
            "patch", "pod", f"{name}-master-0", "-n", namespace, "--subresource=status",
            "--type=merge", "-p", json.dumps(running), check=True,
        )  # fmt: skip
        logs = subprocess.run(
            [str(Path(sys.executable).parent / "finetune"), "logs", name, "-n", namespace],
            capture_output=True,
            text=True,
            env=testbed.env(COLUMNS="400"),
            timeout=120,
            check=False,
        )
    finally:
        testbed.kubectl("delete", "node", node, "--wait=false")
    assert logs.returncode == 1
    assert logs.stdout == ""
    lines = logs.stderr.strip().splitlines()
    assert len(lines) == 1, logs.stderr
    assert lines[0].startswith(f"error: cannot read the log of pod {name}-master-0 (FineTuneJob")
    # the API server's own reason: the kubelet URL it tried, and what happened
    assert f"127.0.0.1:{port}/containerLogs/{namespace}/{name}-master-0/pytorch" in lines[0]
    assert "connection refused" in lines[0]
