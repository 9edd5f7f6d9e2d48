"""Operator throughput: 200 FineTuneJobs at once, against the floor of 200 PyTorchJobs.

In one run, on the local test bed (hack/cluster) or the cluster in KUBECONFIG:
  ours:  create N FineTuneJobs, measure create -> PyTorchJob latency (p50/p99) and the time until
         all N PyTorchJobs exist, plus the operator's CPU seconds and peak memory;
  floor: create the same N PyTorchJobs directly and time training-operator until all their
         pods exist (what any job has to wait for anyway).
API requests: the API server's own count (apiserver_request_total) over the "ours" phase, by
verb and resource, per job; all clients of the test bed are in it (kwok, the scheduler,
training-operator, the controller-manager), so it bounds the operator's share from above. The
operator's own writes are counted exactly: every server-side APPLY is the operator's (nobody else
on the test bed applies), the writes to FineTuneJobs (status replace, kopf's finalizer and
progress annotations) are only its, and its Events carry its reporting component.
Writes bench/results/operator.json (``--model hub``: operator_staged.json).
Usage: python bench/operator/run.py [--jobs 200] [--model builtin|hub]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config, watch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "operator"))

sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from common import machine  # noqa: E402
from finetune_operator import api, manifest  # noqa: E402
from finetune_operator.plan import plan_job  # noqa: E402

WRITES = {"POST", "PUT", "PATCH", "APPLY", "DELETE"}


def _requests(env: dict[str, str]) -> dict[tuple[str, str], float]:
    """The API server's request counts by (verb, resource[/subresource]), all clients."""
    text = subprocess.run(
        ["kubectl", "get", "--raw", "/metrics"], check=True, capture_output=True, text=True,
        env=env,
    ).stdout  # fmt: skip
    counts: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "apiserver_request":
            continue
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            labels = sample.labels
            resource = labels.get("resource", "")
            if labels.get("subresource"):
                resource += "/" + labels["subresource"]
            key = (labels.get("verb", ""), resource)
            counts[key] = counts.get(key, 0.0) + sample.value
    return counts


def _per_job(
    before: dict[tuple[str, str], float], after: dict[tuple[str, str], float], jobs: int
) -> dict[str, float]:
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    return {
        f"{verb} {resource}": round(n / jobs, 2)
        for (verb, resource), n in sorted(delta.items())
        if n > 0 and verb != "WATCH"
    }


def _operator_writes(per_job: dict[str, float], events_per_job: float) -> float:
    """The operator's writes per job: every APPLY, its writes to FineTuneJobs (less the bench's
    own create), and its Events."""
    total = events_per_job
    for key, n in per_job.items():
        verb, resource = key.split(" ", 1)
        if verb == "APPLY" or (verb in WRITES - {"POST"} and resource.startswith("finetunejobs")):
            total += n
    return round(total, 2)


def _cluster_env() -> dict[str, str]:
    if os.environ.get("KUBECONFIG"):
        return dict(os.environ)
    subprocess.run([str(ROOT / "hack" / "cluster"), "up"], check=True)
    info = json.loads(
        subprocess.run(
            [str(ROOT / "hack" / "cluster"), "env", "--json"], check=True, capture_output=True
        ).stdout
    )
    return {**os.environ, "KUBECONFIG": info["kubeconfig"]}


#: The jobs of a run: ``builtin`` has nothing to stage (create -> PyTorchJob is the operator's
#: own path); ``hub`` is the Mistral example, whose model is staged first (a staging Job and its
#: pod run before the plan, so its latency is mostly theirs).
MODELS = ("builtin", "hub")


def _job(name: str, model: str = "builtin") -> dict[str, Any]:
    job = yaml.safe_load((ROOT / "examples" / "mistral-7b-python-code.yaml").read_text())
    job["metadata"] = {"name": name}
    del job["spec"]["checkpoint"]["storage"]
    del job["spec"]["output"]
    del job["spec"]["model"]["tokenSecretRef"]
    if model == "builtin":
        job["spec"]["model"] = {"source": "builtin://tiny-mistral", "dtype": "bfloat16"}
        job["spec"]["dataset"] = {
            "source": "builtin://python-stdlib-alpaca",
            "format": "alpaca",
            "maxSeqLength": 512,
        }
    job["spec"]["podMetadata"] = {"annotations": {"testbed.finetune.dev/pending": "true"}}
    return job


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_operator(
    env: dict[str, str], namespace: str, output: Any, trace: Path | None = None
) -> subprocess.Popen[bytes]:
    """``finetune operator`` watching ``namespace`` (its log to ``output``), once healthy;
    with ``trace``, under tracemalloc (traced.py: SIGUSR1 writes its profile there)."""
    health_port = _free_port()
    program = ["-m", "finetune_operator.cli"]
    if trace is not None:
        program = [str(Path(__file__).with_name("traced.py"))]
        env = {**env, "FINETUNE_TRACE_OUT": str(trace)}
    operator = subprocess.Popen(
        [sys.executable, *program, "operator", "-n", namespace,
         "--metrics-port", str(_free_port()), "--health-port", str(health_port)],
        env=env, stdout=output, stderr=subprocess.STDOUT,
    )  # fmt: skip
    for _ in range(120):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{health_port}/healthz", timeout=1)
            break
        except OSError:
            time.sleep(0.5)
    return operator


def _proc_usage(pid: int) -> tuple[float, int]:
    """CPU seconds (user+system) and peak RSS bytes of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    peak = next(
        int(line.split()[1]) * 1024
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("VmHWM:")
    )
    return cpu, peak


class Arrivals:
    """Watches a kind in a namespace and records when each object first appears."""

    def __init__(self, list_fn: Any, namespace: str, key: Any) -> None:
        self.seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(list_fn, namespace, key), daemon=True
        )
        self._thread.start()

    def _run(self, list_fn: Any, namespace: str, key: Any) -> None:
        w = watch.Watch()
        while not self._stop.is_set():
            try:
                for ev in w.stream(list_fn, namespace=namespace, timeout_seconds=5):
                    obj = ev["object"]
                    name = key(obj)
                    if name and name not in self.seen:
                        self.seen[name] = time.monotonic()
                    if self._stop.is_set():
                        w.stop()
                        break
            except (client.ApiException, OSError, ValueError) as exc:
                # a saturated API server's watch cache lags ("Too large resource version"):
                # list again (an object first seen then is stamped late, never lost)
                print(f"watch: {exc!s:.200}; listing again", flush=True)
                w = watch.Watch()
                time.sleep(1)

    def wait(self, count: int, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while len(self.seen) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return time.monotonic()

    def stop(self) -> None:
        self._stop.set()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--model", choices=MODELS, default="builtin")
    args = parser.parse_args()
    env = _cluster_env()
    config.load_kube_config(config_file=env["KUBECONFIG"])
    core, custom = client.CoreV1Api(), client.CustomObjectsApi()
    crd = subprocess.run(
        [sys.executable, "-m", "finetune_operator.cli", "crd"],
        capture_output=True,
        check=True,
        env=env,
    ).stdout
    subprocess.run(
        ["kubectl", "apply", "--server-side", "-f", "-"],
        input=crd,
        check=True,
        env=env,
        capture_output=True,
    )

    run = uuid.uuid4().hex[:6]
    ours_ns, floor_ns = f"bench-ftj-{run}", f"bench-ptj-{run}"
    for ns in (ours_ns, floor_ns):
        core.create_namespace({"metadata": {"name": ns}})
    names = [f"job-{i}" for i in range(args.jobs)]

    # --- ours: FineTuneJob -> operator -> PyTorchJob
    operator = start_operator(env, ours_ns, subprocess.DEVNULL)
    cpu_before, _ = _proc_usage(operator.pid)
    requests_before = _requests(env)
    children = Arrivals(
        lambda **kw: custom.list_namespaced_custom_object(
            "kubeflow.org", "v1", plural="pytorchjobs", **kw
        ),
        ours_ns,
        lambda o: o["metadata"]["name"],
    )
    created: dict[str, float] = {}
    start = time.monotonic()
    for name in names:
        custom.create_namespaced_custom_object(
            api.GROUP, api.VERSION, ours_ns, api.PLURAL, _job(name, args.model)
        )
        created[name] = time.monotonic()
    end = children.wait(args.jobs, args.timeout)
    children.stop()
    requests_after = _requests(env)
    ours_events = sum(
        1
        for e in core.list_namespaced_event(ours_ns).items
        if (e.reporting_component or (e.source.component if e.source else ""))
        == "finetune-operator"
    )
    cpu_after, peak = _proc_usage(operator.pid)
    operator.terminate()
    stop = time.monotonic()
    try:  # kopf finishes the handlers in flight before it exits
        operator.wait(timeout=120)
    except subprocess.TimeoutExpired:
        operator.kill()
        operator.wait()
    shutdown_seconds = time.monotonic() - stop
    latencies = sorted(children.seen[n] - created[n] for n in names if n in children.seen)

    # --- floor: the same PyTorchJobs created directly -> training-operator -> pods
    planned = plan_job(api.parse(_job("x", args.model)).spec)
    summary = planned.summary if planned else None
    pods = Arrivals(
        core.list_namespaced_pod,
        floor_ns,
        lambda o: (o.metadata.labels or {}).get("training.kubeflow.org/job-name"),
    )
    floor_start = time.monotonic()
    for name in names:
        doc = _job(name, args.model)
        doc["metadata"].update({"namespace": floor_ns, "uid": "x"})
        ptj = manifest.pytorch_job(
            api.parse(doc), image="finetune-trainer:0.1.0", plan_summary=summary, exists=False
        )
        del ptj["metadata"]["ownerReferences"]
        custom.create_namespaced_custom_object("kubeflow.org", "v1", floor_ns, "pytorchjobs", ptj)
    floor_end = pods.wait(args.jobs, args.timeout)
    pods.stop()

    for ns in (ours_ns, floor_ns):
        core.delete_namespace(ns)
    ours_total = end - start
    floor_total = floor_end - floor_start
    per_job = _per_job(requests_before, requests_after, args.jobs)
    result = {
        "jobs": args.jobs,
        "model": args.model,
        "machine": machine(torch.device("cpu")),
        "requests_per_job_all_clients": per_job,
        "operator_writes_per_job": _operator_writes(per_job, ours_events / args.jobs),
        "operator_events_per_job": round(ours_events / args.jobs, 2),
        "ours": {
            "all_pytorchjobs_exist_seconds": round(ours_total, 2),
            "children_created": len(latencies),
            "create_to_child_p50_seconds": round(statistics.median(latencies), 3)
            if latencies
            else None,
            "create_to_child_p99_seconds": round(latencies[int(0.99 * (len(latencies) - 1))], 3)
            if latencies
            else None,
            "operator_cpu_seconds": round(cpu_after - cpu_before, 2),
            "operator_peak_rss_bytes": peak,
            "operator_shutdown_seconds": round(shutdown_seconds, 2),
        },
        "floor_training_operator": {
            "all_pods_exist_seconds": round(floor_total, 2),
            "pods_created": len(pods.seen),
        },
        "ratio_ours_over_floor": round(ours_total / floor_total, 2) if floor_total else None,
    }
    name = "operator.json" if args.model == "builtin" else "operator_staged.json"
    out = ROOT / "bench" / "results" / name
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
