"""Fixtures for the operator's end-to-end tests: our CRD, a namespace, a running operator."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from helpers import ROOT

CRD = "finetunejobs.finetune.dev"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def crd(testbed: Any) -> Any:
    """The test bed with the FineTuneJob CRD installed from crds/."""
    crd_file = str(ROOT / "crds" / "finetunejob.yaml")
    applied = testbed.kubectl("apply", "--server-side", "--force-conflicts", "-f", crd_file)
    assert applied.returncode == 0, applied.stderr
    testbed.kubectl(
        "wait", "--for=condition=Established", f"crd/{CRD}", "--timeout=60s", check=True
    )
    return testbed


@pytest.fixture
def namespace(crd: Any) -> Iterator[str]:
    name = f"ftj-{uuid.uuid4().hex[:8]}"
    crd.kubectl("create", "namespace", name, check=True)
    # Pods need the namespace's default ServiceAccount. The controller-manager makes it, but
    # not at once, and not at all in an --api-only test bed: make it (AlreadyExists is fine).
    crd.kubectl("create", "serviceaccount", "default", "-n", name)
    yield name
    crd.kubectl("delete", "namespace", name, "--wait=false")
    # Its pods may hold GPUs of the test bed's nodes (a pod bound to a node keeps its GPUs even
    # if it never runs): let them go before the next test schedules its own. The namespace itself
    # goes on its own (FineTuneJobs carry no finalizer).
    # (An API-only test bed has no kubelet to finish a pod's deletion: nothing to wait for.)
    deadline = time.monotonic() + (0 if getattr(crd, "api_only", False) else 90)
    while time.monotonic() < deadline:
        left = crd.kubectl("get", "pods", "-n", name, "-o", "name")
        if left.returncode != 0 or not left.stdout.strip():
            break
        time.sleep(1)


@dataclass
class Operator:
    """A ``finetune operator`` process watching one namespace."""

    testbed: Any
    namespace: str
    log: Path
    process: subprocess.Popen[bytes] | None = None
    metrics_port: int = 0
    health_port: int = 0
    #: Where the trainer serves and the operator scrapes metrics (a test may pick a free one).
    trainer_metrics_port: int = 9090
    #: More arguments to ``finetune operator`` (e.g. ``--log-format json``).
    args: tuple[str, ...] = ()
    #: More environment for it (its Settings, e.g. FINETUNE_CHILD).
    extra_env: tuple[tuple[str, str], ...] = ()

    def start(self) -> None:
        self.metrics_port, self.health_port = free_port(), free_port()
        env = self.testbed.env(
            FINETUNE_PROGRESS_INTERVAL="2",
            FINETUNE_TRAINER_METRICS_PORT=str(self.trainer_metrics_port),
            PYTHONUNBUFFERED="1",
            **dict(self.extra_env),
        )
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [str(Path(sys.executable).parent / "finetune"), "operator", "-n", self.namespace,
                 "--metrics-port", str(self.metrics_port), "--health-port", str(self.health_port),
                 *self.args],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()[-4000:]
            try:
                url = f"http://127.0.0.1:{self.health_port}/healthz"
                with urllib.request.urlopen(url, timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        pytest.fail(f"operator not healthy in 60 s:\n{self.log.read_text()[-4000:]}")

    def restart(self, **changes: Any) -> None:
        """Stop, change settings (e.g. trainer_metrics_port), start again."""
        self.stop()
        for key, value in changes.items():
            setattr(self, key, value)
        self.start()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return str(resp.read().decode())


@pytest.fixture
def operator(crd: Any, namespace: str, tmp_path: Path) -> Iterator[Operator]:
    op = Operator(crd, namespace, tmp_path / "operator.log")
    op.start()
    yield op
    op.stop()
    if os.environ.get("FINETUNE_KEEP_LOGS"):
        print(op.log.read_text())


#: The ClusterTrainingRuntime of the e2e tests' TrainJobs: the operator's own (trainjob.runtime),
#: with no restarts in place (a pod told to be OOMKilled fails its TrainJob at once, as
#: backoffLimit 0 does a PyTorchJob's).
TRAINJOB_RUNTIME = "finetune-trainer-e2e"


@pytest.fixture(scope="session")
def trainjob_runtime(trainer_testbed: Any, crd: Any) -> Any:
    """The test bed with Kubeflow Trainer v2 and the e2e tests' ClusterTrainingRuntime."""
    from finetune_operator import trainjob

    body = trainjob.runtime(name=TRAINJOB_RUNTIME, image="finetune-trainer:unused", backoff_limit=0)
    applied = trainer_testbed.apply(body)
    assert applied.returncode == 0, applied.stderr
    return trainer_testbed


@pytest.fixture
def trainjob_operator(trainjob_runtime: Any, namespace: str, tmp_path: Path) -> Iterator[Operator]:
    """The operator with the TrainJob child (FINETUNE_CHILD=trainjob)."""
    env = (("FINETUNE_CHILD", "trainjob"), ("FINETUNE_TRAINJOB_RUNTIME", TRAINJOB_RUNTIME))
    op = Operator(trainjob_runtime, namespace, tmp_path / "operator.log", extra_env=env)
    op.start()
    yield op
    op.stop()
    if os.environ.get("FINETUNE_KEEP_LOGS"):
        print(op.log.read_text())
