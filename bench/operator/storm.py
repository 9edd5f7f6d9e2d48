"""Control-plane faults during a burst: N FineTuneJobs at once (default 200) while the operator is
SIGKILLed and restarted 3 times and the API server is killed and restarted once.

On a test bed of its own (``FINETUNE_TESTBED_STATE``, default /tmp/storm-bed; ``hack/cluster
up`` with enough 8-GPU kwok nodes for every job's one-GPU pod at once), taken down at the end
(``--keep`` keeps it). Each job is the tiny builtin model on one H100, planned by the operator;
its pod runs ``TESTBED_POD_RUN_SECONDS`` (5 s) and succeeds. The faults come while the jobs
converge: the first operator kill once every job is created, the API server restart when a
quarter of them have succeeded, the other two operator kills at a half and three quarters.

It checks what issue 13 asks: every job converges (Succeeded), none is lost, each child
PyTorchJob is created once (one uid per job, seen by a watch that lists again after every
disconnect, and the uid status.pytorchJob records), and no Event about a FineTuneJob is
repeated (Events counted by job, reason and message, and their ``count``). Writes
bench/results/storm.json: time to converge, create-to-Succeeded p50/p99, each fault and how
long that component was down, the checks, and the machine (bench/common.py). Exit 1 if a check
fails.   Usage: python bench/operator/storm.py [--jobs 200] [--timeout 1800] [--keep] [--source DIR]

The API server is restarted in place by the bench (same command line, flags, certificates and
etcd, so every object survives; the new pid goes into the test bed's state.json so ``hack/cluster
down`` stops it): ``hack/cluster up`` on a test bed with a dead component stops the whole bed
and starts a fresh one, which would lose every object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch
import urllib3
import yaml
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "hack"))

from common import machine  # noqa: E402
from finetune_testbed.procs import Supervisor, pid_alive  # noqa: E402
from finetune_testbed.state import load  # noqa: E402

GROUP, VERSION, PLURAL = "finetune.dev", "v1alpha1", "finetunejobs"
GPUS_PER_NODE = 8
#: Fractions of the jobs Succeeded at which the later faults come.
API_SERVER_AT, SECOND_KILL_AT, THIRD_KILL_AT = 0.25, 0.5, 0.75
#: What an API call raises while the API server is away (it restarts).
RETRYABLE = (ApiException, OSError, urllib3.exceptions.HTTPError)


def log(message: str) -> None:
    print(f"[storm {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


#: The checkout whose operator runs (``--source``; default this one).
SOURCE = [ROOT]


def python_env() -> dict[str, str]:
    """The environment of our own processes: the source checkout's packages first."""
    path = [str(SOURCE[0] / "operator"), str(SOURCE[0] / "trainer-image")]
    extra = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([*path, *([extra] if extra else [])])}


def testbed(state_dir: Path, jobs: int, run_seconds: float) -> dict[str, Any]:
    """Start (or reuse) the storm's own test bed; its ``hack/cluster env --json``."""
    env = {
        **python_env(),
        "FINETUNE_TESTBED_STATE": str(state_dir),
        "TESTBED_GPU_NODES": str(math.ceil(jobs / GPUS_PER_NODE) + 1),
        "TESTBED_A100_NODES": "0",
        "TESTBED_POD_RUN_SECONDS": str(run_seconds),
    }
    env.pop("KUBECONFIG", None)
    cluster = str(ROOT / "hack" / "cluster")
    subprocess.run([cluster, "up"], check=True, env=env)
    out = subprocess.run([cluster, "env", "--json"], check=True, env=env, capture_output=True)
    return {**json.loads(out.stdout), "_env": env}


def the_job(name: str) -> dict[str, Any]:
    """The tiny builtin model on one H100: planned by the operator, nothing to stage."""
    job = yaml.safe_load((ROOT / "examples" / "tiny-local.yaml").read_text())
    job["metadata"] = {"name": name}
    job["spec"]["resources"] = {"numNodes": 1, "gpusPerNode": 1, "gpuType": "H100-80GB"}
    for key in ("checkpoint", "output"):
        job["spec"].pop(key, None)
    return job


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Operator:
    """``finetune operator`` on the namespace, as a process the bench can SIGKILL."""

    #: Every one made, so that the bench stops them whatever happens.
    made: list[Operator] = []  # noqa: RUF012 - a registry, on purpose

    def __init__(self, kubeconfig: str, namespace: str, logs: Path) -> None:
        Operator.made.append(self)
        self.env = {**python_env(), "KUBECONFIG": kubeconfig}
        self.namespace = namespace
        self.logs = logs
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> float:
        """Start it and wait for its liveness endpoint; the seconds that took."""
        t0 = time.monotonic()
        metrics, health = free_port(), free_port()
        self.starts += 1
        with (self.logs / f"operator-{self.starts}.log").open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "finetune_operator.cli", "operator",
                 "-n", self.namespace, "--metrics-port", str(metrics),
                 "--health-port", str(health)],
                env=self.env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        while time.monotonic() - t0 < 120:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the operator exited with {self.proc.returncode}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{health}/healthz", timeout=1)
                return time.monotonic() - t0
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("the operator did not become healthy in 120 s")

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def port_free(port: int) -> bool:
    """Whether a server can listen on 127.0.0.1:``port`` now."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def restart_api_server(state_dir: Path, ready: Any) -> float:
    """SIGKILL the test bed's kube-apiserver and start it again with the same command line and
    environment (same etcd: nothing is lost); the seconds until it answers again."""
    st = load(state_dir)
    assert st is not None, f"no test bed in {state_dir}"
    pid = st.pids["kube-apiserver"]
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
    environ = dict(
        entry.decode().split("=", 1)
        for entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if b"=" in entry
    )
    t0 = time.monotonic()
    os.killpg(pid, signal.SIGKILL)  # it leads its own process group (procs.Supervisor)
    while pid_alive(pid):
        time.sleep(0.05)
    port = int(st.server.rsplit(":", 1)[1])
    while not port_free(port):  # the last of its threads closes the listener after the leader
        time.sleep(0.05)
    supervisor = Supervisor(state_dir)
    supervisor.start("kube-apiserver", [a.decode() for a in argv], env=environ)
    st.pids["kube-apiserver"] = supervisor.pids["kube-apiserver"]
    st.save()  # `hack/cluster down` stops the new one
    while time.monotonic() - t0 < 120:
        supervisor.check_alive()
        if ready():
            return time.monotonic() - t0
        time.sleep(0.2)
    raise RuntimeError("the API server did not come back in 120 s")


class Children:
    """Every uid each PyTorchJob name had, from a watch that lists again after a disconnect."""

    def __init__(self, custom: client.CustomObjectsApi, namespace: str) -> None:
        self.uids: dict[str, set[str]] = defaultdict(set)
        self.reconnects = 0
        self._custom, self._ns = custom, namespace
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _list(self, **kw: Any) -> Any:
        return self._custom.list_namespaced_custom_object(
            "kubeflow.org", "v1", self._ns, "pytorchjobs", **kw
        )

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                listed = self._list()
                for item in listed["items"]:
                    self.uids[item["metadata"]["name"]].add(item["metadata"]["uid"])
                version = listed["metadata"]["resourceVersion"]
                for event in watch.Watch().stream(
                    self._list, resource_version=version, timeout_seconds=10
                ):
                    meta = event["object"]["metadata"]
                    self.uids[meta["name"]].add(meta["uid"])
                    if self._stop.is_set():
                        break
            except RETRYABLE:
                self.reconnects += 1
                time.sleep(0.5)

    def stop(self) -> None:
        self._stop.set()


def retry(fn: Any, what: str, timeout: float = 180) -> Any:
    """``fn()``, again after an API error or a refused connection (the API server restarts)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except RETRYABLE as exc:
            if isinstance(exc, ApiException) and exc.status == 409:
                raise
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: {exc}") from exc
            time.sleep(0.5)


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(p * (len(ordered) - 1)))], 2)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--run-seconds", type=float, default=5.0)
    parser.add_argument("--keep", action="store_true", help="leave the test bed up")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "storm.json")
    parser.add_argument(
        "--source",
        type=Path,
        default=ROOT,
        help="a checkout whose operator runs (e.g. a broken copy, to see a check fail)",
    )
    args = parser.parse_args()
    SOURCE[0] = args.source.resolve()
    state_dir = Path(os.environ.get("FINETUNE_TESTBED_STATE") or "/tmp/storm-bed")
    bed = testbed(state_dir, args.jobs, args.run_seconds)
    try:
        return storm(args, state_dir, bed)
    finally:
        for operator in Operator.made:
            operator.stop()
        if not args.keep:
            cluster = str(ROOT / "hack" / "cluster")
            subprocess.run([cluster, "down"], env=bed["_env"], check=False)


def storm(args: argparse.Namespace, state_dir: Path, bed: dict[str, Any]) -> int:
    kubeconfig = bed["kubeconfig"]
    config.load_kube_config(config_file=kubeconfig)
    core, custom = client.CoreV1Api(), client.CustomObjectsApi()
    crd = subprocess.run(
        [sys.executable, "-m", "finetune_operator.cli", "crd"],
        capture_output=True,
        check=True,
        env=python_env(),
    ).stdout
    subprocess.run(
        [bed["binaries"]["kubectl"], "apply", "--server-side", "--force-conflicts", "-f", "-"],
        input=crd,
        check=True,
        capture_output=True,
        env={**bed["_env"], "KUBECONFIG": kubeconfig},
    )
    ns = f"storm-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": ns}})
    retry(lambda: core.read_namespaced_service_account("default", ns), "default ServiceAccount")
    names = [f"job-{i:03d}" for i in range(args.jobs)]
    logs = state_dir / "logs"
    operator = Operator(kubeconfig, ns, logs)
    faults: list[dict[str, Any]] = []
    operator.start()
    children = Children(custom, ns)
    created: dict[str, float] = {}
    succeeded: dict[str, float] = {}

    def ready() -> bool:
        try:
            client.VersionApi().get_code(_request_timeout=2)
            return True
        except RETRYABLE:
            return False

    def poll() -> None:
        try:
            items = custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]
        except RETRYABLE:
            return
        now = time.monotonic()
        for item in items:
            name = item["metadata"]["name"]
            if (item.get("status") or {}).get("phase") == "Succeeded":
                succeeded.setdefault(name, now)

    def kill_operator(at: str) -> None:
        t = time.monotonic()
        operator.kill()
        down = operator.start()
        faults.append(
            {
                "fault": "operator SIGKILL and restart",
                "when": at,
                "at_seconds": round(t - start, 2),
                "down_seconds": round(down, 2),
            }
        )
        log(f"operator killed ({at}); healthy again after {down:.1f} s")

    log(f"creating {args.jobs} FineTuneJobs in {ns}")
    start = time.monotonic()
    for name in names:
        try:
            retry(
                lambda n=name: custom.create_namespaced_custom_object(
                    GROUP, VERSION, ns, PLURAL, the_job(n)
                ),
                f"create {name}",
            )
        except ApiException as exc:  # 409: a retried create that had been stored
            if exc.status != 409:
                raise
        created[name] = time.monotonic()
    log(f"created in {time.monotonic() - start:.1f} s")
    kill_operator("every job created")
    pending = [
        (API_SERVER_AT, "api"),
        (SECOND_KILL_AT, "operator"),
        (THIRD_KILL_AT, "operator"),
    ]
    deadline = start + args.timeout
    while len(succeeded) < args.jobs and time.monotonic() < deadline:
        poll()
        share = len(succeeded) / args.jobs
        while pending and share >= pending[0][0]:
            at, what = pending.pop(0)
            when = f"{at:.0%} of the jobs Succeeded"
            if what == "api":
                t = time.monotonic()
                down = restart_api_server(state_dir, ready)
                faults.append(
                    {
                        "fault": "kube-apiserver SIGKILL and restart",
                        "when": when,
                        "at_seconds": round(t - start, 2),
                        "down_seconds": round(down, 2),
                    }
                )
                log(f"API server restarted ({when}); answering again after {down:.1f} s")
            else:
                kill_operator(when)
        time.sleep(1.0)
    converged = time.monotonic() - start
    operator.stop()
    children.stop()
    log(f"{len(succeeded)}/{args.jobs} Succeeded after {converged:.1f} s; checking")

    jobs = {
        i["metadata"]["name"]: i
        for i in retry(
            lambda: custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL), "list"
        )["items"]
    }
    live = {
        i["metadata"]["name"]: i["metadata"]["uid"]
        for i in retry(
            lambda: custom.list_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs"),
            "list",
        )["items"]
    }
    lost = [n for n in names if n not in jobs]
    not_succeeded = sorted(
        f"{n}: {(jobs[n].get('status') or {}).get('phase')}"
        for n in names
        if n in jobs and (jobs[n].get("status") or {}).get("phase") != "Succeeded"
    )
    recreated = sorted(n for n, uids in children.uids.items() if len(uids) > 1)
    untracked = sorted(
        n
        for n in names
        if n in jobs
        and ((jobs[n].get("status") or {}).get("pytorchJob") or {}).get("uid") != live.get(n)
    )
    events = retry(lambda: core.list_namespaced_event(ns), "events").items
    ours = [e for e in events if e.involved_object.kind == "FineTuneJob"]
    told = Counter((e.involved_object.name, e.reason, e.message) for e in ours)
    repeated = sorted(
        {f"{k[0]} {k[1]}: {k[2]}" for k, n in told.items() if n > 1}
        | {
            f"{e.involved_object.name} {e.reason}: {e.message} (count {e.count})"
            for e in ours
            if (e.count or 1) > 1
        }
    )
    latencies = [succeeded[n] - created[n] for n in names if n in succeeded and n in created]
    checks = {
        "every_job_succeeded": not not_succeeded and len(succeeded) == args.jobs,
        "no_job_lost": not lost,
        "each_child_created_once": not recreated and len(children.uids) == args.jobs,
        "status_names_the_live_child": not untracked,
        "no_event_repeated": not repeated,
        "three_operator_kills_and_one_api_server_restart": (
            sum(f["fault"].startswith("operator") for f in faults) == 3
            and sum(f["fault"].startswith("kube-apiserver") for f in faults) == 1
        ),
    }
    nodes = len(retry(core.list_node, "nodes").items)
    result = {
        "jobs": args.jobs,
        "pod_run_seconds": args.run_seconds,
        "converge_seconds": round(converged, 2),
        "create_to_succeeded_p50_seconds": round(statistics.median(latencies), 2)
        if latencies
        else None,
        "create_to_succeeded_p99_seconds": percentile(latencies, 0.99),
        "succeeded": len(succeeded),
        "faults": faults,
        "checks": checks,
        "ok": all(checks.values()),
        "problems": {
            "lost": lost[:20],
            "not_succeeded": not_succeeded[:20],
            "children_created_more_than_once": recreated[:20],
            "status_child_uid_mismatch": untracked[:20],
            "repeated_events": repeated[:20],
        },
        "counts": {
            "pytorchjobs_seen": len(children.uids),
            "pytorchjob_uids_seen": sum(len(u) for u in children.uids.values()),
            "watch_reconnects": children.reconnects,
            "finetunejob_events": len(ours),
            "operator_starts": operator.starts,
        },
        "testbed": {"nodes": nodes, "state_dir": str(state_dir)},
        "machine": machine(torch.device("cpu")),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    retry(lambda: core.delete_namespace(ns), "delete namespace")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
