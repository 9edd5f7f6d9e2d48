"""The TrainJob child (Kubeflow Trainer v2): its builder, its runtime, and how the operator reads
a TrainJob back (pure)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from bad_specs import apply
from finetune_operator import api, children, manifest, staging, trainjob
from finetune_operator.objects import Child, Pod
from finetune_operator.plan import plan_job
from finetune_operator.settings import Settings, SettingsError
from finetune_operator.status import ChildRef, FineTuneJobStatus
from finetune_trainer import names
from helpers import EXAMPLES, GOLDEN_NAMESPACE, GOLDEN_UID, ROOT, load_yaml

GOLDEN = ROOT / "tests" / "golden"
IMAGE = "finetune-trainer:0.1.0"


def _job(doc: dict[str, Any]) -> api.FineTuneJob:
    doc = apply(doc, {"metadata.namespace": GOLDEN_NAMESPACE, "metadata.uid": GOLDEN_UID})
    return api.parse(doc)


def _cache(job: api.FineTuneJob) -> str | None:
    return staging.cache_claim(job.spec).name if staging.needed(job.spec) else None


def _train_job(job: api.FineTuneJob, **kw: Any) -> dict[str, Any]:
    planned = plan_job(job.spec)
    given: dict[str, Any] = {
        "image": IMAGE,
        "plan_summary": planned.summary if planned else None,
        "exists": False,
        "cache": _cache(job),
    }
    return trainjob.train_job(job, **{**given, **kw})


def _pytorch_job(job: api.FineTuneJob) -> dict[str, Any]:
    planned = plan_job(job.spec)
    summary = planned.summary if planned else None
    return manifest.pytorch_job(
        job, image=IMAGE, plan_summary=summary, exists=False, cache=_cache(job)
    )


def effective_pod(train_job: dict[str, Any], runtime: dict[str, Any]) -> dict[str, Any]:
    """The pod template Trainer v2 makes of ``runtime`` for ``train_job``: spec.trainer's image,
    command, args, env and resources on the ``node`` container, then our runtimePatches entry
    (pod metadata, volumes, the container's mounts and security context, the pod's security
    context, tolerations, affinity, node selector)."""
    (node,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    pod = copy.deepcopy(node["template"]["spec"]["template"])
    (container,) = pod["spec"]["containers"]
    trainer = train_job["spec"]["trainer"]
    container.update(
        image=trainer["image"],
        command=trainer["command"],
        args=trainer["args"],
        env=trainer["env"],
        resources=trainer["resourcesPerNode"],
    )
    (patch,) = train_job["spec"]["runtimePatches"]
    (replicated,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert replicated["name"] == node["name"]
    patched = replicated["template"]["spec"]["template"]
    pod["metadata"] = patched["metadata"]
    for key, value in patched["spec"].items():
        if key == "containers":
            (own,) = value
            assert own["name"] == container["name"]
            container.update({k: v for k, v in own.items() if k != "name"})
        else:
            pod["spec"][key] = value
    return pod


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_trainjob_matches_golden(path: Path, request: pytest.FixtureRequest) -> None:
    child = _train_job(_job(load_yaml(path)))
    golden = GOLDEN / f"{path.stem}.trainjob.yaml"
    text = yaml.safe_dump(child, sort_keys=False)
    if request.config.getoption("--update-golden", default=False):
        golden.write_text(text)
    assert golden.read_text() == text, f"{golden} is stale: pytest --update-golden"


def test_runtime_matches_golden(request: pytest.FixtureRequest) -> None:
    golden = GOLDEN / "clustertrainingruntime.yaml"
    text = yaml.safe_dump(trainjob.runtime(image=IMAGE), sort_keys=False)
    if request.config.getoption("--update-golden", default=False):
        golden.write_text(text)
    assert golden.read_text() == text, f"{golden} is stale: pytest --update-golden"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_trainjob_pods_are_the_pytorchjob_s_pods(path: Path) -> None:
    """Both children run the same pod: image, command, env, GPUs, volumes, mounts, security
    contexts, tolerations, affinity, labels and the metrics port; only the container's name is
    each controller's own (the training-operator's ``pytorch``, Trainer v2's ``node``)."""
    job = _job(load_yaml(path))
    replicas = _pytorch_job(job)["spec"]["pytorchReplicaSpecs"]
    pytorch_pod = copy.deepcopy(replicas["Master"]["template"])
    runtime = trainjob.runtime(image="ignored: spec.trainer.image wins")
    pod = effective_pod(_train_job(job), runtime)
    for template in (pytorch_pod, pod):
        template["spec"]["containers"][0].pop("name")
        template["metadata"]["annotations"].pop("kubectl.kubernetes.io/default-container")
    pod["spec"].pop("restartPolicy")  # the PyTorchJob says it per replica: OnFailure, as here
    assert replicas["Master"]["restartPolicy"] == "OnFailure"
    assert pod == pytorch_pod


def test_nodes_gpus_and_processes_follow_the_spec() -> None:
    job = _job(load_yaml(ROOT / "examples" / "llama3-8b-cnn-dailymail.yaml"))
    trainer = _train_job(job)["spec"]["trainer"]
    assert trainer["numNodes"] == job.spec.resources.num_nodes == 2
    assert trainer["numProcPerNode"] == 8
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "8"
    # Trainer v2 refuses PET_* in spec.trainer.env: its torch plugin sets them
    assert not [e for e in trainer["env"] if e["name"].startswith("PET_")]


def test_trainjob_references_the_runtime_and_is_owned(tiny_job: dict[str, Any]) -> None:
    child = _train_job(_job(tiny_job), runtime="team-runtime")
    assert child["spec"]["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
        "name": "team-runtime",
    }
    (owner,) = child["metadata"]["ownerReferences"]
    assert owner["kind"] == "FineTuneJob"
    assert owner["controller"] is True
    assert child["metadata"]["labels"][names.JOB_LABEL] == tiny_job["metadata"]["name"]
    (patch,) = child["spec"]["runtimePatches"]
    assert patch["manager"] == trainjob.PATCH_MANAGER


def test_suspend_follows_the_spec_and_kueue_owns_queued_jobs(tiny_job: dict[str, Any]) -> None:
    job = _job(tiny_job)
    assert "suspend" not in _train_job(job)["spec"]
    suspended = _job(apply(tiny_job, {"spec.runPolicy.suspend": True}))
    assert _train_job(suspended)["spec"]["suspend"] is True
    queued = _job(apply(tiny_job, {"spec.scheduling": {"queueName": "team"}}))
    first = _train_job(queued)
    assert first["spec"]["suspend"] is True  # Kueue admits it
    assert first["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team"
    assert "suspend" not in _train_job(queued, exists=True)["spec"]  # then it is Kueue's
    deadline = _job(apply(tiny_job, {"spec.runPolicy.activeDeadlineSeconds": 600}))
    assert _train_job(deadline)["spec"]["activeDeadlineSeconds"] == 600


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"spec.scheduling": {"priorityClassName": "high"}}, "priorityClassName"),
        ({"spec.scheduling": {"gangScheduling": True}}, "gangScheduling"),
        ({"spec.runPolicy.ttlSecondsAfterFinished": 60}, "ttlSecondsAfterFinished"),
    ],
)
def test_what_a_trainjob_cannot_carry_is_refused_with_what_to_do(
    tiny_job: dict[str, Any], change: dict[str, Any], field: str
) -> None:
    assert trainjob.unsupported(_job(tiny_job)) is None
    message = trainjob.unsupported(_job(apply(tiny_job, change)))
    assert message is not None
    assert field in message
    assert "child: pytorchjob" in message
    assert children.PYTORCHJOB_CHILD.unsupported(_job(apply(tiny_job, change))) is None


def _trainjob_doc(**status: Any) -> dict[str, Any]:
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": {
            "name": "j",
            "uid": "u",
            "creationTimestamp": "2026-12-07T10:00:00Z",
            "labels": {"kueue.x-k8s.io/queue-name": "team"},
            "managedFields": [
                {"manager": "finetune-operator", "fieldsV1": {"f:spec": {"f:suspend": {}}}},
                {"manager": "other", "fieldsV1": {"f:spec": {"f:trainer": {}}}},
            ],
        },
        "spec": {"suspend": False},
        "status": status,
    }


def _condition(type_: str, status: str = "True", message: str = "") -> dict[str, Any]:
    return {"type": type_, "status": status, "reason": type_, "message": message}


def test_a_trainjob_reads_as_the_operator_s_child() -> None:
    starting = Child.parse(_trainjob_doc(jobsStatus=[{"name": "node", "ready": 0, "active": 1}]))
    assert starting.kind == "TrainJob"
    assert starting.queue_name == "team"
    assert starting.suspend_owners == ("finetune-operator",)
    assert not starting.true_conditions()  # pods asked for, not all ready: not Running
    running = Child.parse(_trainjob_doc(jobsStatus=[{"name": "node", "ready": 1, "active": 1}]))
    assert set(running.true_conditions()) == {"Running"}
    assert running.since("Running") == running.created
    done = Child.parse(
        _trainjob_doc(
            conditions=[_condition("Complete", message="jobset completed")],
            jobsStatus=[{"name": "node", "succeeded": 1}],
        )
    )
    assert set(done.true_conditions()) == {"Succeeded"}
    assert done.true_conditions()["Succeeded"].message == "jobset completed"
    failed = Child.parse(_trainjob_doc(conditions=[_condition("Failed", message="backoff")]))
    assert set(failed.true_conditions()) == {"Failed"}
    held = _trainjob_doc(
        conditions=[_condition("Suspended")], jobsStatus=[{"name": "node", "ready": 1}]
    )
    held["spec"]["suspend"] = True
    parsed = Child.parse(held)
    assert parsed.suspended
    assert set(parsed.true_conditions()) == {"Suspended"}


def test_rank_zero_is_the_first_index_of_the_first_node_job() -> None:
    def pod(**labels: str) -> Pod:
        return Pod.parse({"metadata": {"name": "p", "labels": labels}})

    node = {names.REPLICATED_JOB_LABEL: "node", names.JOB_INDEX_LABEL: "0"}
    assert pod(**node, **{names.COMPLETION_INDEX_LABEL: "0"}).rank_zero
    assert not pod(**node, **{names.COMPLETION_INDEX_LABEL: "1"}).rank_zero
    assert pod(**{names.REPLICA_TYPE_LABEL: "master"}).rank_zero
    assert not pod(**{names.REPLICA_TYPE_LABEL: "worker"}).rank_zero


def test_a_job_keeps_the_kind_of_child_it_started_with() -> None:
    ref = ChildRef(name="j", uid="u")
    default = children.TRAINJOB_CHILD
    assert children.of(None, default) is default
    assert children.of(FineTuneJobStatus(pytorch_job=ref), default) is children.PYTORCHJOB_CHILD
    assert children.of(FineTuneJobStatus(train_job=ref), children.PYTORCHJOB_CHILD) is default
    assert children.TRAINJOB_CHILD.suspend_body(True) == {"spec": {"suspend": True}}
    assert children.PYTORCHJOB_CHILD.suspend_body(False) == {
        "spec": {"runPolicy": {"suspend": False}}
    }


def test_the_child_setting() -> None:
    assert Settings.from_env({}).child is children.PYTORCHJOB_CHILD
    chosen = Settings.from_env({names.ENV_CHILD: "trainjob", names.ENV_TRAINJOB_RUNTIME: "rt"})
    assert chosen.child is children.TRAINJOB_CHILD
    assert chosen.trainjob_runtime == "rt"
    with pytest.raises(SettingsError, match="FINETUNE_CHILD='TrainJob': expected one of"):
        Settings.from_env({names.ENV_CHILD: "TrainJob"})
    with pytest.raises(SettingsError, match="FINETUNE_TRAINJOB_RUNTIME"):
        Settings.from_env({names.ENV_TRAINJOB_RUNTIME: "Bad Name"})
