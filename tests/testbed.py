"""pytest plugin: a session-scoped Kubernetes test bed on top of ``hack/cluster``.

Register it with ``pytest_plugins = ["testbed"]`` (tests/ is on sys.path). Fixtures:

``testbed`` (session)
    A :class:`Testbed`. Without ``KUBECONFIG`` it runs ``hack/cluster up`` (a real
    kube-apiserver, controller-manager, scheduler, kwok GPU nodes, Kubeflow
    training-operator; see hack/README.md) and ``hack/cluster down`` at session end —
    unless a test bed was already up, which it reuses and leaves running. With
    ``KUBECONFIG`` set it uses that cluster and starts nothing.

    With ``FINETUNE_TESTBED=api`` (``make test-fast``) it runs ``hack/cluster up --api-only``
    instead: etcd and kube-apiserver with the PyTorchJob CRD, up in seconds (a test bed that
    is already up, of either kind, is reused). Tests marked ``e2e`` then skip, saying so;
    ``Testbed.api_only`` tells a test which kind it got.

``kube_namespace`` (function)
    A fresh namespace name (its default ServiceAccount exists, so pods can be created),
    deleted without waiting after the test.

``gpu_testbed`` (session)
    ``testbed``, but the test is skipped unless the cluster has schedulable
    ``nvidia.com/gpu`` nodes and the PyTorchJob CRD (always true for our own test bed).

``kueue_testbed`` (session)
    ``gpu_testbed`` with Kueue: on our own test bed ``hack/cluster up --kueue`` adds Kueue
    (v0.17, PyTorchJob integration, waitForPodsReady) and its queues (ClusterQueue ``gpus``,
    16 H100 GPUs; WorkloadPriorityClasses ``low``/``high``) in place, and it stays for the rest
    of the session (it only touches jobs labelled with a queue). On a user's cluster
    (``KUBECONFIG``) the test is skipped unless Kueue's CRDs are there. Tests make their own
    LocalQueues (``Testbed.local_queue``).

``trainer_testbed`` (session)
    ``gpu_testbed`` with Kubeflow Trainer v2 (v2.2.0, TrainJob) and JobSet (v0.11.1): on our own
    test bed ``hack/cluster up --trainer`` adds them in place (webhooks served; no
    ClusterTrainingRuntime installed: tests make their own); a TrainJob's trainer pods run on
    the kwok GPU nodes through the same Stages and annotations as PyTorchJob pods. With Kueue
    running too, Kueue is restarted so that its TrainJob integration starts. On a user's cluster
    the test is skipped unless the TrainJob CRD is there.

``oldest_testbed`` (session)
    A second, API-only test bed of the oldest supported Kubernetes (``OLDEST_K8S``, 1.31: etcd
    3.4 + kube-apiserver v1.31, ``hack/cluster up --api-only --kubernetes 1.31``) in its own state
    dir (``<state dir>-k8s-1.31``, its own ports), beside the main test bed (v1.35 by default);
    stopped at session end unless it was already up. Skipped with ``KUBECONFIG``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "hack" / "cluster"


@dataclass
class Testbed:
    """What tests get: a kubeconfig, binaries and small helpers around kubectl."""

    kubeconfig: str
    kubectl_bin: str
    helm: str | None = None
    kubeconform: str | None = None
    external: bool = False
    state_dir: Path | None = None
    binaries: dict[str, str] = field(default_factory=dict)
    #: Only etcd and kube-apiserver run: no controllers (no default ServiceAccounts, no garbage
    #: collection, no namespace deletion), no scheduler, no nodes, no training-operator.
    api_only: bool = False

    # ------------------------------------------------------------------ processes
    def env(self, **extra: str) -> dict[str, str]:
        """os.environ with KUBECONFIG and the test bed's binaries first on PATH."""
        env = dict(os.environ)
        env["KUBECONFIG"] = self.kubeconfig
        dirs = []
        for b in (self.kubectl_bin, self.helm, self.kubeconform):
            if b and os.path.dirname(b) not in dirs:
                dirs.append(os.path.dirname(b))
        env["PATH"] = os.pathsep.join([*dirs, env.get("PATH", "")])
        env.update(extra)
        return env

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = False, timeout: float = 120
    ) -> subprocess.CompletedProcess:
        """Run kubectl against the test bed; text stdout/stderr are captured."""
        return subprocess.run(
            [self.kubectl_bin, f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
            env=self.env(),
        )

    def kubectl_json(self, *args: str) -> Any:
        """``kubectl <args> -o json``, parsed; raises on failure."""
        p = self.kubectl(*args, "-o", "json")
        if p.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {p.stderr}")
        return json.loads(p.stdout)

    def apply(self, obj: dict | list | str, *extra: str) -> subprocess.CompletedProcess:
        """``kubectl apply -f -`` of a dict, a list of dicts or YAML/JSON text (check=False)."""
        if isinstance(obj, list):
            obj = {"apiVersion": "v1", "kind": "List", "items": obj}
        text = obj if isinstance(obj, str) else json.dumps(obj)
        return self.kubectl("apply", "-f", "-", *extra, input=text)

    def helm_run(
        self, *args: str, check: bool = False, timeout: float = 300
    ) -> subprocess.CompletedProcess:
        if not self.helm:
            raise RuntimeError("helm is not available")
        return subprocess.run(
            [self.helm, f"--kubeconfig={self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
            env=self.env(),
        )

    # ------------------------------------------------------------------ waiting
    @staticmethod
    def wait_for(
        predicate: Callable[[], Any],
        timeout: float = 120,
        interval: float = 1.0,
        desc: str = "condition",
        explain: Callable[[], Any] | None = None,
    ) -> Any:
        """Poll ``predicate`` until it returns something truthy and return that; fail on timeout
        (with what ``explain`` returns then, e.g. the objects' state, in the message)."""
        deadline = time.monotonic() + timeout
        last_exc: Exception | None = None
        while True:
            try:
                value = predicate()
                if value:
                    return value
            except Exception as e:
                last_exc = e
            if time.monotonic() > deadline:
                msg = f"timed out after {timeout:.0f}s waiting for {desc}"
                if last_exc is not None:
                    msg += f" (last error: {last_exc!r})"
                if explain is not None:
                    try:
                        msg += f"\n{explain()}"
                    except Exception as e:  # the failure is the timeout, not this
                        msg += f"\n(could not explain: {e!r})"
                pytest.fail(msg)
            time.sleep(interval)

    def has_gpu_nodes(self) -> bool:
        nodes = self.kubectl_json("get", "nodes")["items"]
        return any(
            int(n.get("status", {}).get("allocatable", {}).get("nvidia.com/gpu", "0")) > 0
            for n in nodes
        )

    def has_crd(self, name: str) -> bool:
        return self.kubectl("get", "crd", name).returncode == 0

    def local_queue(
        self, namespace: str, name: str = "default", cluster_queue: str = "gpus"
    ) -> None:
        """A Kueue LocalQueue ``name`` in ``namespace`` feeding ``cluster_queue``."""
        queue = {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "LocalQueue",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"clusterQueue": cluster_queue},
        }
        applied = self.apply(queue)
        assert applied.returncode == 0, applied.stderr

    def logs_dir(self) -> Path | None:
        return self.state_dir / "logs" if self.state_dir else None

    def trainer_log_lines(self) -> list[str]:
        """What kwok serves as the log of every training container (hack/cluster writes it in
        the CRI log format: time, stream, tag, line)."""
        path = self.state_dir / "trainer.log" if self.state_dir else None
        if path is None or not path.is_file():
            return []
        return [line.split(" ", 3)[3] for line in path.read_text().splitlines()]


def _cluster(
    *args: str, env: dict | None = None, timeout: float = 3600
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(CLUSTER), *args], capture_output=True, text=True, env=env, timeout=timeout, check=False
    )


def _load_testbed(env: dict | None = None) -> Testbed:
    p = _cluster("env", "--json", env=env)
    if p.returncode != 0:
        raise RuntimeError(f"hack/cluster env failed: {p.stderr}")
    info = json.loads(p.stdout)
    b = info.get("binaries", {})
    kubectl = b.get("kubectl") or shutil.which("kubectl")
    if not kubectl:
        raise RuntimeError("no kubectl: `hack/cluster build --tools`")
    return Testbed(
        kubeconfig=info["kubeconfig"],
        kubectl_bin=kubectl,
        helm=b.get("helm"),
        kubeconform=b.get("kubeconform"),
        external=bool(info.get("external")),
        state_dir=Path(info["state_dir"]) if info.get("state_dir") else None,
        binaries=b,
        api_only=bool(info.get("api_only")),
    )


#: ``FINETUNE_TESTBED=api``: only the API tier of the test bed (``hack/cluster up --api-only``).
API_ONLY = os.environ.get("FINETUNE_TESTBED", "") == "api"
SKIP_E2E = (
    "FINETUNE_TESTBED=api starts only the API server; this test needs the whole simulated "
    "cluster (controllers, scheduler, kwok nodes, training-operator): run it with `make test`"
)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if API_ONLY and item.get_closest_marker("e2e") is not None:
        pytest.skip(SKIP_E2E)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build the test bed's binaries before any test runs when a collected test needs them.

    A cold build takes 15-20 minutes on 2 cores; doing it here keeps it out of per-test
    timeouts (pytest-timeout counts fixture setup) and shows its progress on the terminal.
    """

    def used(fixture: str) -> bool:
        return any(fixture in getattr(i, "fixturenames", ()) for i in session.items)

    if session.config.option.collectonly or not (used("testbed") or used("oldest_testbed")):
        return
    if not used("testbed"):
        args = []
    elif os.environ.get("KUBECONFIG"):
        args = ["build", "--tools"]
    else:
        args = ["build", "--api-only"] if API_ONLY else ["build"]
        if not API_ONLY and used("kueue_testbed"):
            args.append("--kueue")
        if not API_ONLY and used("trainer_testbed"):
            args.append("--trainer")
    builds = [args] if args else []
    if not os.environ.get("KUBECONFIG") and used("oldest_testbed"):
        builds.append(["build", "--api-only", "--kubernetes", OLDEST_K8S])
    capman = session.config.pluginmanager.getplugin("capturemanager")
    t0 = time.monotonic()
    with capman.global_and_fixture_disabled() if capman else _NullContext():
        for build in builds:
            print(
                f"\n[testbed] hack/cluster {' '.join(build)} (reuses cached binaries)", flush=True
            )
            p = subprocess.run([str(CLUSTER), *build], check=False, stdout=subprocess.DEVNULL)
            print(
                f"[testbed] binaries ready in {time.monotonic() - t0:.0f}s (rc={p.returncode})",
                flush=True,
            )
    # On failure the `testbed` fixture runs `up`, which retries the build and reports the error.


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture(scope="session")
def testbed():
    started = False
    if not os.environ.get("KUBECONFIG"):
        already = _cluster("status").returncode == 0
        # `up` is idempotent: it returns at once when what is asked for runs already, and adds
        # the rest of the test bed to one started with --api-only.
        up = ["up", "--api-only"] if API_ONLY else ["up"]
        t0 = time.monotonic()
        p = _cluster(*up)
        if p.returncode != 0:
            pytest.fail(
                f"hack/cluster {' '.join(up)} failed (rc={p.returncode}):\n{p.stderr[-8000:]}",
                pytrace=False,
            )
        started = not already
        if started:
            print(f"\n[testbed] {' '.join(up)} in {time.monotonic() - t0:.1f}s")
    else:
        p = _cluster("up")  # builds kubectl/helm/kubeconform only; starts nothing
        if p.returncode != 0:
            pytest.fail(
                f"hack/cluster up (tools for KUBECONFIG) failed:\n{p.stderr[-8000:]}", pytrace=False
            )
    tb = _load_testbed()
    try:
        yield tb
    finally:
        if started:
            p = _cluster("down", timeout=300)
            if p.returncode != 0:
                print(f"[testbed] hack/cluster down failed: {p.stderr}")


@pytest.fixture(scope="session")
def gpu_testbed(testbed: Testbed):
    if testbed.api_only:
        pytest.skip(SKIP_E2E)
    # On a user's cluster (KUBECONFIG) a missing part is a reason to skip; on our own test bed
    # it is a broken test bed, and skipping would hide every e2e test.
    lacking = pytest.skip if testbed.external else pytest.fail
    if not testbed.has_crd("pytorchjobs.kubeflow.org"):
        lacking("cluster has no PyTorchJob CRD (Kubeflow training-operator)")
    if not testbed.has_gpu_nodes():
        lacking("cluster has no nvidia.com/gpu nodes")
    return testbed


@pytest.fixture
def kube_namespace(testbed: Testbed):
    name = f"t-{uuid.uuid4().hex[:10]}"
    testbed.kubectl("create", "namespace", name, check=True)
    # Pods need the namespace's default ServiceAccount (made by the controller-manager).
    if testbed.api_only:
        testbed.kubectl("create", "serviceaccount", "default", "-n", name, check=True)
    testbed.wait_for(
        lambda: testbed.kubectl("get", "serviceaccount", "default", "-n", name).returncode == 0,
        timeout=60,
        interval=0.5,
        desc=f"default ServiceAccount in {name}",
    )
    yield name
    testbed.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found")


KUEUE_CRD = "workloads.kueue.x-k8s.io"


@pytest.fixture(scope="session")
def kueue_testbed(gpu_testbed: Testbed):
    if gpu_testbed.external:
        if not gpu_testbed.has_crd(KUEUE_CRD):
            pytest.skip("cluster has no Kueue (no workloads.kueue.x-k8s.io CRD)")
        return gpu_testbed
    t0 = time.monotonic()
    p = _cluster("up", "--kueue")  # adds Kueue in place; at once if it runs already
    if p.returncode != 0:
        pytest.fail(
            f"hack/cluster up --kueue failed (rc={p.returncode}):\n{p.stderr[-8000:]}",
            pytrace=False,
        )
    if "starting them" in p.stderr:
        print(f"\n[testbed] Kueue added in {time.monotonic() - t0:.1f}s")
    return gpu_testbed


TRAINJOB_CRD = "trainjobs.trainer.kubeflow.org"


@pytest.fixture(scope="session")
def trainer_testbed(gpu_testbed: Testbed):
    if gpu_testbed.external:
        if not gpu_testbed.has_crd(TRAINJOB_CRD):
            pytest.skip(
                "cluster has no Kubeflow Trainer v2 (no trainjobs.trainer.kubeflow.org CRD)"
            )
        return gpu_testbed
    t0 = time.monotonic()
    p = _cluster("up", "--trainer")  # adds JobSet and Trainer in place; at once if they run
    if p.returncode != 0:
        pytest.fail(
            f"hack/cluster up --trainer failed (rc={p.returncode}):\n{p.stderr[-8000:]}",
            pytrace=False,
        )
    if "starting them" in p.stderr:
        print(f"\n[testbed] Trainer and JobSet added in {time.monotonic() - t0:.1f}s")
    return gpu_testbed


#: The oldest Kubernetes minor the product supports: an API-only test bed of it runs the API tests.
OLDEST_K8S = "1.31"


@pytest.fixture(scope="session")
def oldest_testbed() -> Iterator[Testbed]:
    if os.environ.get("KUBECONFIG"):
        pytest.skip("KUBECONFIG selects the cluster: no second test bed of Kubernetes 1.31 here")
    main_state = os.environ.get("FINETUNE_TESTBED_STATE") or str(REPO / "hack" / ".state")
    env = dict(os.environ)
    env["FINETUNE_TESTBED_STATE"] = f"{main_state.rstrip('/')}-k8s-{OLDEST_K8S}"
    env["FINETUNE_K8S_VERSION"] = OLDEST_K8S
    already = _cluster("status", env=env).returncode == 0
    t0 = time.monotonic()
    p = _cluster("up", "--api-only", env=env)
    if p.returncode != 0:
        pytest.fail(
            f"hack/cluster up --api-only --kubernetes {OLDEST_K8S} failed:\n{p.stderr[-8000:]}",
            pytrace=False,
        )
    if not already:
        print(
            f"\n[testbed] Kubernetes {OLDEST_K8S} API-only test bed up in "
            f"{time.monotonic() - t0:.1f}s"
        )
    tb = _load_testbed(env)
    try:
        yield tb
    finally:
        if not already:
            _cluster("down", env=env, timeout=300)
