"""The operator under a busy cluster: N FineTuneJobs at once, then N running for minutes.

In one run, on the local test bed (``hack/cluster up --trainer-metrics``: the fake trainer
serves every running master pod's real metrics module on the pod's loopback IP):

  burst:  N jobs with nothing to stage (a builtin model) created at once, each on one H100 of
          bench nodes added for the run (kwok, 8 GPUs each): time until all their PyTorchJobs
          exist, create -> PyTorchJob p50/p99, API requests per job by verb and resource (all
          clients) and the operator's own writes per job until every job is Pending or later;
  steady: the N jobs Running, with a tenth of their master pods taking the scrape's connection
          and never answering (``testbed.finetune.dev/trainer-metrics: unresponsive``), for
          ``--steady`` seconds at the default progress interval (15 s): how old each answering
          job's ``status.progress`` gets (the longest gap between two readings, window edges
          included), the create -> PyTorchJob latency of a new job made every ``--probe-every``
          seconds meanwhile, the operator's CPU and its memory over the window (growth), and the
          API requests per second of everyone.

Writes bench/results/operator_steady.json (with the machine). Usage:
  python bench/operator/steady.py [--jobs 1000] [--steady 300] [--unresponsive 0.1]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config, watch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "hack"), str(ROOT / "bench"), str(HERE)]

import torch  # noqa: E402
from run import Arrivals, _operator_writes, _per_job, _proc_usage, _requests, start_operator  # noqa: E402

from common import machine  # noqa: E402
from finetune_operator import api  # noqa: E402
from finetune_testbed import manifests  # noqa: E402
from finetune_testbed.kubeapi import Api  # noqa: E402
from finetune_testbed.state import load  # noqa: E402

MUTE = "testbed.finetune.dev/trainer-metrics"
BENCH_LABEL = "finetune.dev/bench"
PROGRESS_LIMIT = 30.0  # seconds: the oldest an answering job's progress may get


def _testbed() -> tuple[dict[str, str], Any]:
    """The test bed with the fake trainer's metrics, its KUBECONFIG, and its state."""
    hack = ROOT / "hack" / "cluster"
    subprocess.run([sys.executable, str(hack), "up", "--trainer-metrics"], check=True)
    info = json.loads(
        subprocess.run(
            [sys.executable, str(hack), "env", "--json"], check=True, capture_output=True
        ).stdout
    )
    state = load(Path(info["state_dir"]))
    if state is None or not state.pod_network:
        raise SystemExit("the test bed has no pod network: hack/cluster up --trainer-metrics")
    return {**os.environ, "KUBECONFIG": info["kubeconfig"]}, state


def _bench_nodes(count: int, network: str) -> list[dict[str, Any]]:
    """``count`` kwok nodes of 8 H100 each, on pod CIDRs after the test bed's own nodes."""
    nodes = []
    for i in range(count):
        node = manifests.gpu_node(f"bench-gpu-{i}", manifests.GPU_ZONES[i % 2])
        node["metadata"]["labels"][BENCH_LABEL] = "steady"
        cidr = manifests.node_pod_cidr(network, 64 + i)
        node["spec"] = {**node["spec"], "podCIDR": cidr, "podCIDRs": [cidr]}
        nodes.append(node)
    return nodes


def _job(name: str, *, mute: bool = False, pending: bool = False) -> dict[str, Any]:
    """The tiny example on one H100 for hours (nothing to stage), without storage."""
    job = yaml.safe_load((ROOT / "examples" / "tiny-local.yaml").read_text())
    job["metadata"] = {"name": name}
    del job["spec"]["checkpoint"]["storage"]
    del job["spec"]["output"]
    job["spec"]["resources"] = {"numNodes": 1, "gpusPerNode": 1, "gpuType": "H100-80GB"}
    job["spec"]["hyperparameters"]["maxSteps"] = 100_000
    notes = {
        "testbed.finetune.dev/run-duration": "4h",
        "testbed.finetune.dev/load-duration": "5s",  # steps (and progress) from the start
    }
    if mute:
        notes[MUTE] = "unresponsive"
    if pending:
        notes = {"testbed.finetune.dev/pending": "true"}
    job["spec"]["podMetadata"] = {"annotations": notes}
    return job


def _stamp(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class Jobs:
    """Watches the FineTuneJobs of a namespace: each one's phase, and every distinct
    ``status.progress.updatedAt`` it showed (the time the operator read the metrics)."""

    def __init__(self, custom: Any, namespace: str) -> None:
        self.phase: dict[str, str] = {}
        self.readings: dict[str, list[float]] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        args = (custom, namespace)
        self._thread = threading.Thread(target=self._run, args=args, daemon=True)
        self._thread.start()

    def _run(self, custom: Any, namespace: str) -> None:
        w = watch.Watch()
        while not self._stop.is_set():
            try:
                self._follow(w, custom, namespace)
            except (client.ApiException, OSError, ValueError) as exc:
                # a saturated API server's watch cache lags ("Too large resource version"):
                # list again and go on
                print(f"FineTuneJob watch: {exc!s:.200}; listing again", flush=True)
                w = watch.Watch()
                time.sleep(1)

    def _follow(self, w: Any, custom: Any, namespace: str) -> None:
        while not self._stop.is_set():
            stream = w.stream(
                custom.list_namespaced_custom_object, api.GROUP, api.VERSION, namespace,
                api.PLURAL, timeout_seconds=30,
            )  # fmt: skip
            for ev in stream:
                obj = ev["object"]
                name = obj["metadata"]["name"]
                status = obj.get("status") or {}
                with self._lock:
                    self.phase[name] = status.get("phase", "")
                    updated = (status.get("progress") or {}).get("updatedAt")
                    seen = self.readings.setdefault(name, [])
                    if updated and (not seen or _stamp(updated) != seen[-1]):
                        seen.append(_stamp(updated))
                if self._stop.is_set():
                    w.stop()
                    break

    def count(self, phases: set[str]) -> int:
        with self._lock:
            return sum(1 for p in self.phase.values() if p in phases)

    def stop(self) -> None:
        self._stop.set()


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1)))], 3)


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (t, y)."""
    if len(points) < 2:
        return 0.0
    mt = statistics.fmean(t for t, _ in points)
    my = statistics.fmean(y for _, y in points)
    den = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (y - my) for t, y in points) / den if den else 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--steady", type=float, default=300, help="seconds of steady state")
    parser.add_argument("--unresponsive", type=float, default=0.1)
    parser.add_argument("--probe-every", type=float, default=10)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "operator_steady.json"))
    parser.add_argument(
        "--trace-memory",
        action="store_true",
        help="run the operator under tracemalloc and add where its memory is to the results "
        "(its RSS and latencies are then tracemalloc's too: give another --out)",
    )
    parser.add_argument(
        "--operator-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set in the operator's environment (e.g. MALLOC_ARENA_MAX=2); recorded in the results",
    )
    args = parser.parse_args()
    env, state = _testbed()
    operator_env = dict(item.split("=", 1) for item in args.operator_env)
    config.load_kube_config(config_file=env["KUBECONFIG"])
    core, custom = client.CoreV1Api(), client.CustomObjectsApi()
    crd = subprocess.run(
        [sys.executable, "-m", "finetune_operator.cli", "crd"], capture_output=True, check=True,
        env=env,
    ).stdout  # fmt: skip
    subprocess.run(
        ["kubectl", "apply", "--server-side", "-f", "-"], input=crd, check=True, env=env,
        capture_output=True,
    )  # fmt: skip
    node_count = math.ceil(args.jobs / 8) + 4  # and room for the probes
    testbed_api = Api(state.server, state.admin_token, state.ca)
    testbed_api.apply_objects(_bench_nodes(node_count, state.pod_network))
    subprocess.run(
        ["kubectl", "wait", "--for=condition=Ready", "node", "-l", f"{BENCH_LABEL}=steady",
         "--timeout=300s"], check=True, env=env, capture_output=True,
    )  # fmt: skip

    ns = f"bench-steady-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": ns}})
    log_path = Path(tempfile.gettempdir()) / f"{ns}-operator.log"
    print(f"operator log: {log_path}", flush=True)
    with log_path.open("wb") as log:
        trace = Path(tempfile.gettempdir()) / f"{ns}-memory.json" if args.trace_memory else None
        operator = start_operator({**env, **operator_env}, ns, log, trace)
    names = [f"job-{i}" for i in range(args.jobs)]
    mute_every = round(1 / args.unresponsive) if args.unresponsive else 0
    muted = {n for i, n in enumerate(names) if mute_every and i % mute_every == mute_every - 1}
    children = Arrivals(
        lambda **kw: custom.list_namespaced_custom_object(
            "kubeflow.org", "v1", plural="pytorchjobs", **kw
        ),
        ns,
        lambda o: o["metadata"]["name"],
    )
    jobs = Jobs(custom, ns)

    # --- burst
    cpu0, _ = _proc_usage(operator.pid)
    requests0 = _requests(env)
    created: dict[str, float] = {}
    start = time.monotonic()
    for name in names:
        custom.create_namespaced_custom_object(
            api.GROUP, api.VERSION, ns, api.PLURAL, _job(name, mute=name in muted)
        )
        created[name] = time.monotonic()
    all_children = children.wait(args.jobs, args.timeout)
    deadline = time.monotonic() + args.timeout
    while jobs.count({"Pending", "Running"}) < args.jobs and time.monotonic() < deadline:
        time.sleep(0.2)
    requests1 = _requests(env)
    cpu1, peak1 = _proc_usage(operator.pid)
    ours_events = sum(
        1
        for e in core.list_namespaced_event(ns).items
        if (e.reporting_component or (e.source.component if e.source else ""))
        == "finetune-operator"
    )
    per_job = _per_job(requests0, requests1, args.jobs)
    latencies = [children.seen[n] - created[n] for n in names if n in children.seen]
    burst = {
        "jobs": args.jobs,
        "all_pytorchjobs_exist_seconds": round(all_children - start, 2),
        "children_created": len(latencies),
        "create_to_child_p50_seconds": _percentile(latencies, 0.5),
        "create_to_child_p99_seconds": _percentile(latencies, 0.99),
        "operator_cpu_seconds": round(cpu1 - cpu0, 2),
        "operator_peak_rss_bytes": peak1,
        "requests_per_job_all_clients_to_pending": per_job,
        "operator_writes_per_job_to_pending": _operator_writes(per_job, ours_events / args.jobs),
    }
    print(json.dumps({"burst": burst}, indent=2), flush=True)

    while jobs.count({"Running"}) < args.jobs and time.monotonic() < deadline:
        time.sleep(1)
    running_at_start = jobs.count({"Running"})

    # --- steady state
    time.sleep(20)  # the first scrapes of the last jobs to start
    window0 = time.time()
    cpu2, _ = _proc_usage(operator.pid)
    requests2 = _requests(env)
    rss: list[tuple[float, float]] = []
    probes: dict[str, float] = {}
    next_probe = time.monotonic()
    end = time.monotonic() + args.steady
    while time.monotonic() < end:
        if time.monotonic() >= next_probe:
            name = f"probe-{len(probes)}"
            custom.create_namespaced_custom_object(
                api.GROUP, api.VERSION, ns, api.PLURAL, _job(name, pending=True)
            )
            probes[name] = time.monotonic()
            next_probe += args.probe_every
        rss.append((time.time() - window0, _rss(operator.pid) / 2**20))
        time.sleep(1)
    window1 = time.time()
    cpu3, peak3 = _proc_usage(operator.pid)
    requests3 = _requests(env)
    time.sleep(5)  # the last probe's child
    probe_latency = [children.seen[n] - t for n, t in probes.items() if n in children.seen]
    children.stop()
    jobs.stop()

    gaps = []
    for name in names:
        if name in muted:
            continue
        inside = [t for t in jobs.readings.get(name, []) if window0 <= t <= window1]
        marks = [window0, *inside, window1]
        gaps.append(max(b - a for a, b in itertools.pairwise(marks)))
    seconds = window1 - window0
    rates = {
        f"{verb} {resource}": round((requests3.get((verb, resource), 0) - n) / seconds, 2)
        for (verb, resource), n in sorted(requests2.items())
        if verb != "WATCH" and requests3.get((verb, resource), 0) - n > 0
    }
    steady = {
        "seconds": round(seconds, 1),
        "running_jobs": running_at_start,
        "unresponsive_masters": len(muted),
        "progress_interval_seconds": 15,
        "answering_jobs": len(gaps),
        "answering_jobs_fresh_within_30s": sum(1 for g in gaps if g <= PROGRESS_LIMIT),
        "progress_age_max_p50_seconds": _percentile(gaps, 0.5),
        "progress_age_max_p99_seconds": _percentile(gaps, 0.99),
        "progress_age_max_worst_seconds": round(max(gaps), 1) if gaps else None,
        "new_jobs": len(probes),
        "new_job_create_to_child_p50_seconds": _percentile(probe_latency, 0.5),
        "new_job_create_to_child_p99_seconds": _percentile(probe_latency, 0.99),
        "new_jobs_without_child": len(probes) - len(probe_latency),
        "operator_cpu_seconds": round(cpu3 - cpu2, 2),
        "operator_cpu_share": round((cpu3 - cpu2) / seconds, 3),
        "operator_rss_first_mib": round(rss[0][1], 1) if rss else None,
        "operator_rss_last_mib": round(rss[-1][1], 1) if rss else None,
        "operator_rss_max_mib": round(max(r for _, r in rss), 1) if rss else None,
        "operator_rss_growth_mib_per_minute": round(60 * _slope(rss), 3),
        "operator_peak_rss_bytes": peak3,
        "requests_per_second_all_clients": rates,
    }
    profile = None
    if trace is not None:  # where the memory is, after the steady state
        os.kill(operator.pid, signal.SIGUSR1)
        for _ in range(600):
            if trace.exists():
                profile = json.loads(trace.read_text())
                break
            time.sleep(1)
    operator.terminate()
    try:
        operator.wait(timeout=120)
    except subprocess.TimeoutExpired:
        operator.kill()
    core.delete_namespace(ns)
    subprocess.run(
        ["kubectl", "delete", "node", "-l", f"{BENCH_LABEL}=steady", "--wait=false"], env=env,
        capture_output=True, check=False,
    )  # fmt: skip
    result = {
        "machine": machine(torch.device("cpu")),
        "operator_env": operator_env,
        "burst": burst,
        "steady": steady,
        "targets": {
            "create_to_child_p99_seconds": 2.0,
            "operator_peak_rss_mib": 200,
            "operator_writes_per_job_to_pending": 6,
            "progress_age_max_seconds": PROGRESS_LIMIT,
        },
    }
    if profile is not None:
        result["memory_profile_tracemalloc"] = profile
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
