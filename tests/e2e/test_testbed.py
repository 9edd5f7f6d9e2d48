"""The test bed is real: scheduler, controller-manager GC, kwok GPU nodes, training-operator.

Pod behaviour on kwok nodes is driven by ``testbed.finetune.dev/*`` annotations (hack/README.md);
the containers' commands do the same thing on a real cluster, so these tests also run against
any cluster selected by KUBECONFIG that has 8-GPU nodes and the training-operator.
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
JOB_LABEL = "training.kubeflow.org/job-name"
CLUSTER = Path(__file__).resolve().parents[2] / "hack" / "cluster"
# Generous: this machine has 2 cores and everything runs on it.
TIMEOUT = 180


def replica(
    command: str,
    annotations: dict | None = None,
    gpus: int = 8,
    restart_policy: str = "OnFailure",
    container_name: str = "pytorch",
) -> dict:
    return {
        "replicas": 1,
        "restartPolicy": restart_policy,
        "template": {
            "metadata": {"annotations": annotations or {}},
            "spec": {
                "tolerations": [GPU_TOLERATION],
                "containers": [
                    {
                        "name": container_name,
                        "image": "busybox:1.36",
                        "command": ["sh", "-c", command],
                        "resources": {
                            "limits": {"nvidia.com/gpu": gpus},
                            "requests": {"cpu": "1", "memory": "1Gi"},
                        },
                    }
                ],
            },
        },
    }


def pytorchjob(
    name: str,
    namespace: str,
    replicas: dict,
    backoff_limit: int | None = None,
    run_policy: dict | None = None,
) -> dict:
    spec: dict = {"pytorchReplicaSpecs": replicas}
    if run_policy or backoff_limit is not None:
        spec["runPolicy"] = dict(run_policy or {})
    if backoff_limit is not None:
        spec["runPolicy"]["backoffLimit"] = backoff_limit
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def condition(obj: dict, ctype: str) -> dict | None:
    for c in obj.get("status", {}).get("conditions") or []:
        if c.get("type") == ctype and c.get("status") == "True":
            return c
    return None


def job_pods(tb, namespace: str, name: str) -> list[dict]:
    return tb.kubectl_json("get", "pods", "-n", namespace, "-l", f"{JOB_LABEL}={name}")["items"]


def test_pytorchjob_runs_on_gpu_nodes_to_success(gpu_testbed, kube_namespace):
    tb = gpu_testbed
    namespace = kube_namespace
    run = {"testbed.finetune.dev/run-duration": "15s"}
    job = pytorchjob(
        "ok",
        namespace,
        {
            "Master": replica("sleep 15", run),
            "Worker": replica("sleep 15", run),
        },
    )
    p = tb.apply(job)
    assert p.returncode == 0, p.stderr

    # training-operator creates one pod and one (headless) service per replica
    def two_pods():
        ps = job_pods(tb, namespace, "ok")
        return ps if len(ps) == 2 else None

    pods = tb.wait_for(
        two_pods,
        TIMEOUT,
        desc="2 pods of the PyTorchJob",
    )
    assert {p["metadata"]["labels"]["training.kubeflow.org/replica-type"] for p in pods} == {
        "master",
        "worker",
    }
    tb.wait_for(
        lambda: (
            len(
                tb.kubectl_json("get", "services", "-n", namespace, "-l", f"{JOB_LABEL}=ok")[
                    "items"
                ]
            )
            == 2
        ),
        TIMEOUT,
        desc="2 services of the PyTorchJob",
    )

    # kube-scheduler binds them to GPU nodes; 8 GPUs each means two different nodes
    def scheduled():
        ps = job_pods(tb, namespace, "ok")
        return ps if len(ps) == 2 and all(p["spec"].get("nodeName") for p in ps) else None

    pods = tb.wait_for(scheduled, TIMEOUT, desc="pods bound to nodes")
    nodes = {p["spec"]["nodeName"] for p in pods}
    assert len(nodes) == 2, nodes
    for n in nodes:
        node = tb.kubectl_json("get", "node", n)
        assert int(node["status"]["allocatable"]["nvidia.com/gpu"]) >= 8
        assert node["metadata"]["labels"].get("nvidia.com/gpu.present") == "true" or tb.external

    # Running (kwok plays the kubelet) ...
    tb.wait_for(
        lambda: all(p["status"].get("phase") == "Running" for p in job_pods(tb, namespace, "ok")),
        TIMEOUT,
        interval=0.5,
        desc="pods Running",
    )
    tb.wait_for(
        lambda: condition(tb.kubectl_json("get", "pytorchjob", "ok", "-n", namespace), "Running"),
        TIMEOUT,
        desc="PyTorchJob Running condition",
    )
    # ... then Succeeded, and the PyTorchJob follows
    done = tb.wait_for(
        lambda: condition(tb.kubectl_json("get", "pytorchjob", "ok", "-n", namespace), "Succeeded"),
        TIMEOUT,
        desc="PyTorchJob Succeeded condition",
    )
    assert done["reason"]
    master = [
        p
        for p in job_pods(tb, namespace, "ok")
        if p["metadata"]["labels"]["training.kubeflow.org/replica-type"] == "master"
    ]
    assert master
    assert master[0]["status"]["phase"] == "Succeeded"
    assert master[0]["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0


def test_pod_asking_for_16_gpus_is_unschedulable(gpu_testbed, kube_namespace):
    tb = gpu_testbed
    namespace = kube_namespace
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "too-big", "namespace": namespace},
        "spec": {
            "tolerations": [GPU_TOLERATION],
            "containers": [
                {
                    "name": "pytorch",
                    "image": "busybox:1.36",
                    "command": ["sleep", "3600"],
                    "resources": {"limits": {"nvidia.com/gpu": 16}},
                }
            ],
        },
    }
    p = tb.apply(pod)
    assert p.returncode == 0, p.stderr

    def unschedulable():
        st = tb.kubectl_json("get", "pod", "too-big", "-n", namespace)["status"]
        for c in st.get("conditions") or []:
            if (
                c["type"] == "PodScheduled"
                and c["status"] == "False"
                and c.get("reason") == "Unschedulable"
            ):
                return st, c
        return None

    st, cond = tb.wait_for(unschedulable, TIMEOUT, desc="PodScheduled=False/Unschedulable")
    assert st["phase"] == "Pending"
    assert "nvidia.com/gpu" in cond.get("message", ""), cond
    assert not tb.kubectl_json("get", "pod", "too-big", "-n", namespace)["spec"].get("nodeName")


def test_deleting_pytorchjob_garbage_collects_pods(gpu_testbed, kube_namespace):
    tb = gpu_testbed
    namespace = kube_namespace
    forever = {"testbed.finetune.dev/run-duration": "1h"}
    job = pytorchjob(
        "gc",
        namespace,
        {"Master": replica("sleep 3600", forever), "Worker": replica("sleep 3600", forever)},
    )
    assert tb.apply(job).returncode == 0

    def both_running():
        ps = job_pods(tb, namespace, "gc")
        return len(ps) == 2 and all(p["status"].get("phase") == "Running" for p in ps)

    tb.wait_for(
        both_running,
        TIMEOUT,
        desc="pods Running",
    )
    pods = job_pods(tb, namespace, "gc")
    for p in pods:
        owners = p["metadata"]["ownerReferences"]
        assert owners[0]["kind"] == "PyTorchJob"
        assert owners[0]["controller"] is True

    # Background cascading deletion: the API server removes the PyTorchJob at once and the
    # controller-manager's garbage collector deletes the orphaned dependents.
    p = tb.kubectl(
        "delete", "pytorchjob", "gc", "-n", namespace, "--cascade=background", "--wait=false"
    )
    assert p.returncode == 0, p.stderr
    tb.wait_for(
        lambda: tb.kubectl("get", "pytorchjob", "gc", "-n", namespace).returncode != 0,
        TIMEOUT,
        desc="PyTorchJob gone",
    )
    tb.wait_for(lambda: not job_pods(tb, namespace, "gc"), TIMEOUT, desc="pods garbage-collected")
    tb.wait_for(
        lambda: (
            not tb.kubectl_json("get", "services", "-n", namespace, "-l", f"{JOB_LABEL}=gc")[
                "items"
            ]
        ),
        TIMEOUT,
        desc="services garbage-collected",
    )


def test_webhook_rejects_container_not_named_pytorch(gpu_testbed, kube_namespace):
    tb = gpu_testbed
    namespace = kube_namespace
    bad = pytorchjob("bad-name", namespace, {"Master": replica("true", container_name="trainer")})
    p = tb.apply(bad)
    assert p.returncode != 0
    assert (
        'admission webhook "validator.pytorchjob.training-operator.kubeflow.org" denied the request'
        in p.stderr
    ), p.stderr
    assert "pytorch" in p.stderr
    assert tb.kubectl("get", "pytorchjob", "bad-name", "-n", namespace).returncode != 0
    # the same job with the container named `pytorch` is admitted (server-side dry run)
    good = pytorchjob("bad-name", namespace, {"Master": replica("true")})
    p = tb.apply(good, "--dry-run=server")
    assert p.returncode == 0, p.stderr


def test_failing_pod_fails_pytorchjob_after_backoff_limit(gpu_testbed, kube_namespace):
    tb = gpu_testbed
    namespace = kube_namespace
    crash = {"testbed.finetune.dev/exit-code": "1", "testbed.finetune.dev/run-duration": "3s"}
    job = pytorchjob(
        "crash",
        namespace,
        {"Master": replica("sleep 3; exit 1", crash, restart_policy="OnFailure")},
        backoff_limit=2,
    )
    # The training-operator deletes the pod when it fails the job, so watch the pod (every
    # update, no polling gaps) to see the restarts it counted.
    template = (
        "{.metadata.name} {.status.containerStatuses[0].restartCount} "
        '{.status.containerStatuses[0].lastState.terminated.exitCode}{"\\n"}'
    )
    watch = subprocess.Popen(
        [
            tb.kubectl_bin,
            f"--kubeconfig={tb.kubeconfig}",
            "get",
            "pods",
            "-n",
            namespace,
            "-l",
            f"{JOB_LABEL}=crash",
            "--watch",
            "-o",
            f"jsonpath={template}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=tb.env(),
    )
    seen: list[str] = []
    reader = threading.Thread(
        target=lambda: seen.extend(iter(watch.stdout.readline, "")), daemon=True
    )
    reader.start()
    try:
        assert tb.apply(job).returncode == 0
        # The kubelet (kwok) restarts the failing container in place; the training-operator
        # counts the restarts against backoffLimit and fails the job.
        failed = tb.wait_for(
            lambda: condition(
                tb.kubectl_json("get", "pytorchjob", "crash", "-n", namespace), "Failed"
            ),
            TIMEOUT,
            desc="PyTorchJob Failed condition",
        )
    finally:
        watch.terminate()
        watch.wait(timeout=30)
        reader.join(timeout=30)
    assert "backoff limit" in failed["message"], failed
    assert not condition(
        tb.kubectl_json("get", "pytorchjob", "crash", "-n", namespace), "Succeeded"
    )

    restarts = [line.split() for line in seen if len(line.split()) == 3]
    assert restarts, seen
    assert max(int(r[1]) for r in restarts) >= 2, seen
    assert all(r[2] == "1" for r in restarts), seen


RENDEZVOUS = "testbed.finetune.dev/rendezvous"


def test_master_waits_for_every_worker_like_torchrun(gpu_testbed, kube_namespace):
    """A training pod runs its course only once every pod of its PyTorchJob runs (torchrun's
    rendezvous): a worker held Pending keeps the master Running past its run-duration, and the
    job finishes only after the worker starts."""
    tb = gpu_testbed
    if tb.external:
        pytest.skip("the rendezvous and the pending annotation are the test bed's")
    namespace = kube_namespace
    run = {"testbed.finetune.dev/run-duration": "2s"}
    held = {**run, "testbed.finetune.dev/pending": "true"}
    job = pytorchjob(
        "gang", namespace, {"Master": replica("true", run), "Worker": replica("true", held)}
    )
    assert tb.apply(job).returncode == 0

    def master_running():
        ps = {p["metadata"]["name"]: p for p in job_pods(tb, namespace, "gang")}
        master = ps.get("gang-master-0", {})
        return master if master.get("status", {}).get("phase") == "Running" else None

    tb.wait_for(master_running, TIMEOUT, desc="the master Running")
    # Five times its run-duration later, the master still waits for the worker.
    time.sleep(10)
    master = master_running()
    assert master is not None, "the master finished while its worker was Pending"
    assert RENDEZVOUS not in (master["metadata"].get("annotations") or {})
    pj = tb.kubectl_json("get", "pytorchjob", "gang", "-n", namespace)
    assert condition(pj, "Succeeded") is None

    # The worker starts: both join, run their 2 s and the job succeeds.
    tb.kubectl("annotate", "pod", "gang-worker-0", "-n", namespace,
               "testbed.finetune.dev/pending-", check=True)  # fmt: skip
    tb.wait_for(
        lambda: condition(
            tb.kubectl_json("get", "pytorchjob", "gang", "-n", namespace), "Succeeded"
        ),
        TIMEOUT,
        desc="PyTorchJob Succeeded once every pod ran",
    )
    for pod in job_pods(tb, namespace, "gang"):
        assert RENDEZVOUS in pod["metadata"]["annotations"], pod["metadata"]["name"]
        assert pod["status"]["phase"] == "Succeeded"


def test_an_image_the_registry_lacks_is_never_started(gpu_testbed, kube_namespace):
    """A typo'd image goes ErrImagePull -> ImagePullBackOff as a kubelet reports it; the pod
    never runs (the other container, whose image exists, waits in ContainerCreating)."""
    tb = gpu_testbed
    if tb.external:
        pytest.skip("the test bed's registry")
    namespace = kube_namespace
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "typo", "namespace": namespace},
        "spec": {
            "tolerations": [GPU_TOLERATION],
            "containers": [
                {"name": "bad", "image": "ghcr.io/finetune-dev/finetune-trainr:0.1.0"},
                {"name": "good", "image": "busybox:1.36"},
            ],
        },
    }
    assert tb.apply(pod).returncode == 0

    def backoff():
        st = tb.kubectl_json("get", "pod", "typo", "-n", namespace).get("status", {})
        states = {c["name"]: c["state"] for c in st.get("containerStatuses") or []}
        waiting = states.get("bad", {}).get("waiting", {})
        return (st, states) if waiting.get("reason") == "ImagePullBackOff" else None

    st, states = tb.wait_for(backoff, TIMEOUT, desc="ImagePullBackOff")
    assert st["phase"] == "Pending"
    assert "podIP" not in st
    bad = states["bad"]["waiting"]
    assert bad["message"] == 'Back-off pulling image "ghcr.io/finetune-dev/finetune-trainr:0.1.0"'
    assert states["good"]["waiting"]["reason"] == "ContainerCreating"
    table = tb.kubectl("get", "pod", "typo", "-n", namespace).stdout
    assert "ImagePullBackOff" in table  # what a user sees


def test_gpu_nodes_of_two_types_carry_gpu_feature_discovery_labels(gpu_testbed):
    """H100-80GB and A100-40GB nodes, labelled as NVIDIA GPU feature discovery labels them."""
    tb = gpu_testbed
    if tb.external:
        pytest.skip("the test bed's nodes")
    nodes = tb.kubectl_json("get", "nodes", "-l", "nvidia.com/gpu.present=true")["items"]
    products = {}
    for node in nodes:
        labels = node["metadata"]["labels"]
        products.setdefault(labels["nvidia.com/gpu.product"], []).append(labels)
        assert labels["nvidia.com/gpu.count"] == node["status"]["allocatable"]["nvidia.com/gpu"]
    assert set(products) == {"NVIDIA-H100-80GB-HBM3", "NVIDIA-A100-SXM4-40GB"}
    assert {labels["nvidia.com/gpu.memory"] for labels in products["NVIDIA-A100-SXM4-40GB"]} == {
        "40960"
    }
    assert {labels["nvidia.com/gpu.family"] for labels in products["NVIDIA-H100-80GB-HBM3"]} == {
        "hopper"
    }


def test_a_claim_of_the_default_class_is_bound_and_its_volume_goes_with_it(
    gpu_testbed, kube_namespace
):
    """The test bed's provisioner binds claims as a cluster's dynamic provisioner does, so a pod
    that mounts one is scheduled (the scheduler refuses unbound claims)."""
    tb = gpu_testbed
    if tb.external:
        pytest.skip("the StorageClass and its provisioner are the test bed's")
    namespace = kube_namespace
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "finetune-models", "namespace": namespace},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "200Gi"}}},
    }
    assert tb.apply(claim).returncode == 0
    bound = tb.wait_for(
        lambda: (
            (c := tb.kubectl_json("get", "pvc", "finetune-models", "-n", namespace))["status"].get(
                "phase"
            )
            == "Bound"
            and c
        ),
        60,
        desc="the claim Bound",
    )
    assert bound["spec"]["storageClassName"] == "standard"  # the default class
    volume = bound["spec"]["volumeName"]
    assert tb.kubectl_json("get", "pv", volume)["spec"]["capacity"]["storage"] == "200Gi"
    tb.kubectl("delete", "pvc", "finetune-models", "-n", namespace, check=True)
    tb.wait_for(
        lambda: tb.kubectl("get", "pv", volume).returncode != 0, 60, desc="the volume deleted"
    )


def metrics_text(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return r.read().decode()
    except OSError:
        return None


def test_trainer_metrics_are_served_on_the_master_pod_ip_while_it_runs(gpu_testbed, kube_namespace):
    """`up --trainer-metrics` (added in place): a master pod's IP is a loopback address of the
    test bed's pod network, and the trainer's own metrics are served there from a simulated
    run, steps advancing, until the pod ends."""
    tb = gpu_testbed
    if tb.external:
        pytest.skip("the pod network and the fake trainer's metrics are the test bed's")
    up = subprocess.run(
        # this Python: the component runs the trainer's metrics module (prometheus_client)
        [sys.executable, str(CLUSTER), "up", "--trainer-metrics"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert up.returncode == 0, up.stderr
    network = json.loads((tb.state_dir / "env.json").read_text())["pod_network"]
    namespace = kube_namespace
    annotations = {
        "testbed.finetune.dev/run-duration": "12s",
        "testbed.finetune.dev/total-steps": "60",
    }
    master = replica("true", annotations)
    master["template"]["spec"]["containers"][0]["ports"] = [
        {"name": "metrics", "containerPort": 9090}
    ]
    job = pytorchjob(
        "served", namespace, {"Master": master, "Worker": replica("true", annotations)}
    )
    assert tb.apply(job).returncode == 0

    def master_ip() -> str | None:
        ps = {p["metadata"]["name"]: p for p in job_pods(tb, namespace, "served")}
        status = ps.get("served-master-0", {}).get("status", {})
        return status.get("podIP") if status.get("phase") == "Running" else None

    ip = tb.wait_for(master_ip, TIMEOUT, interval=0.2, desc="the master Running")
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(network)
    url = f"http://{ip}:9090/metrics"
    steps = []
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline and master_ip():
        text = metrics_text(url)
        if text:
            assert "finetune_trainer_build_info" in text
            found = re.search(r"^finetune_train_steps_total (\S+)$", text, re.M)
            assert found, text
            steps.append(float(found.group(1)))
        time.sleep(0.5)
    assert steps, "nothing served on the master pod's IP"
    assert steps == sorted(steps)
    assert steps[-1] > steps[0]
    assert steps[-1] <= 60
    tb.wait_for(lambda: metrics_text(url) is None, 30, desc="serving stops when the pod ends")
