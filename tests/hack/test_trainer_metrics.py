"""The test bed's fake trainer metrics and storage, their pure parts: the simulated run's schedule,
what is read of a pod, the pod network, the volumes the provisioner makes (the cluster behaviour
is in tests/e2e/test_testbed.py and tests/e2e/test_walkthrough.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from prometheus_client import generate_latest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "hack"))

from finetune_operator.scrape import parse_checkpoint, parse_progress
from finetune_testbed import manifests, provisioner, trainer_metrics
from finetune_testbed.trainer_metrics import Hang, MasterPod, Run, Schedule, parse_duration
from finetune_trainer import metrics

NETWORK = "127.42.0.0/16"


def test_go_durations_are_read_as_kwok_reads_them() -> None:
    assert parse_duration("30s") == 30
    assert parse_duration("1m30s") == 90
    assert parse_duration("500ms") == 0.5
    assert parse_duration("1h") == 3600
    with pytest.raises(ValueError, match="not a Go duration"):
        parse_duration("30")


def test_a_run_loads_then_steps_evenly_then_saves() -> None:
    s = Schedule(run_seconds=100, total_steps=40)
    assert s.step_at(0) == 0
    assert s.step_at(9.9) == 0  # loading the model: no step yet
    assert s.step_at(10 + 2 * 20) == 20  # halfway through the 80 s of steps
    assert s.step_at(90) == 40
    assert s.step_at(99) == 40
    assert not s.finished(89.9)
    assert s.finished(90)


def test_a_long_run_told_its_load_time_steps_from_then() -> None:
    """A 4-hour run that loads for 5 s (load-duration) steps at once, as a bench of many
    long-running jobs needs; steps still end inside the run, before the final save."""
    p = pod()
    p["metadata"]["annotations"][trainer_metrics.LOAD_DURATION] = "5s"  # type: ignore[index]
    p["metadata"]["annotations"][trainer_metrics.RUN_DURATION] = "4h"  # type: ignore[index]
    pod_ = MasterPod.of(p)
    assert pod_.load_seconds == 5.0
    s = Schedule.of(None, pod_.run_seconds or 0, 1000, pod_.load_seconds)
    assert s.step_at(4.9) == 0
    assert s.step_at(5 + 3 * s.step_seconds) == 3
    assert s.step_at(5 + 0.8 * 4 * 3600) == 1000
    assert not s.finished(5 + 0.8 * 4 * 3600)


def test_the_loss_falls_and_the_learning_rate_warms_up_then_decays() -> None:
    s = Schedule(run_seconds=60, total_steps=300, learning_rate=2e-5, warmup_steps=50)
    losses = [s.loss(k) for k in (1, 100, 200, 300)]
    assert losses == sorted(losses, reverse=True)
    assert 10.0 < losses[0] < 10.7
    assert 1.1 < losses[-1] < 1.3
    assert s.lr(25) == pytest.approx(1e-5)
    assert s.lr(50) == pytest.approx(2e-5)
    assert s.lr(300) == pytest.approx(0.0)


def test_checkpoints_come_every_n_steps_and_at_the_end() -> None:
    s = Schedule(run_seconds=60, total_steps=300, checkpoint_every=200)
    assert s.checkpoint_step(199, finished=False) == 0
    assert s.checkpoint_step(250, finished=False) == 200
    assert s.checkpoint_step(300, finished=False) == 300 // 200 * 200
    assert s.checkpoint_step(300, finished=True) == 300


def pod(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {
        "metadata": {
            "uid": "u1",
            "namespace": "ns",
            "name": "j-master-0",
            "labels": {
                "training.kubeflow.org/job-name": "j",
                "training.kubeflow.org/replica-type": "master",
            },
            "annotations": {
                "testbed.finetune.dev/rendezvous": "2026-12-07T02:00:00Z",
                "testbed.finetune.dev/run-duration": "30s",
            },
        },
        "spec": {
            "containers": [
                {"name": "pytorch", "ports": [{"name": "metrics", "containerPort": 9400}]}
            ],
            "volumes": [{"name": "trainer-config", "configMap": {"name": "j-trainer"}}],
        },
        "status": {"phase": "Running", "podIP": "127.42.1.0"},
    }
    base.update(changes)
    return base


def test_a_master_pod_is_read_once() -> None:
    p = MasterPod.of(pod())
    assert (p.uid, p.ip, p.port, p.run_seconds, p.config_map) == (
        "u1",
        "127.42.1.0",
        9400,
        30.0,
        "j-trainer",
    )
    assert p.joined_at == 1796608800  # 2026-12-07T02:00:00Z
    assert p.serves(NETWORK)


def test_only_running_joined_masters_on_the_pod_network_serve() -> None:
    assert not MasterPod.of(pod(status={"phase": "Succeeded", "podIP": "127.42.1.0"})).serves(
        NETWORK
    )
    assert not MasterPod.of(pod(status={"phase": "Running", "podIP": "127.0.0.1"})).serves(NETWORK)
    assert not MasterPod.of(pod(status={"phase": "Running", "podIP": "10.0.0.3"})).serves(NETWORK)
    unjoined = pod()
    unjoined["metadata"]["annotations"] = {}  # type: ignore[index]
    assert not MasterPod.of(unjoined).serves(NETWORK)
    worker = pod()
    worker["metadata"]["labels"]["training.kubeflow.org/replica-type"] = "worker"  # type: ignore[index]
    assert not MasterPod.of(worker).serves(NETWORK)
    silent = pod()
    silent["metadata"]["annotations"][trainer_metrics.OPT_OUT] = "false"  # type: ignore[index]
    assert not MasterPod.of(silent).serves(NETWORK)


def test_a_resumed_run_goes_on_from_its_checkpoint_as_the_operator_reads_it() -> None:
    """A run that resumed at step 200 of 300 reports step 200 and its checkpoint at once, then
    counts only its own steps; the operator reads the run's step and total, not the count."""
    p = MasterPod.of(pod())
    s = Schedule(run_seconds=30, total_steps=300, checkpoint_every=100, tokens_per_step=1000)
    run = Run(p, s, metrics.create(torch_version="t", transformers_version="t"), start=200)
    assert p.joined_at is not None
    run.advance(p.joined_at + 1)  # loading: no step of its own yet
    text = generate_latest(run.trainer.registry).decode()
    assert parse_progress(text, "now") is None
    saved = parse_checkpoint(text, None)
    assert saved is not None
    assert saved.step == 200
    run.advance(p.joined_at + 3 + 0.08 * 50)  # 50 steps of its own
    text = generate_latest(run.trainer.registry).decode()
    progress = parse_progress(text, "now")
    assert progress is not None
    assert (progress.step, progress.total_steps, progress.percent) == (250, 300, 83)
    assert "finetune_train_steps_total 50.0" in text


def test_what_is_served_is_what_the_operator_reads() -> None:
    """The trainer's own registry, advanced to a time, parsed by the operator's scrape.py."""
    p = MasterPod.of(pod())
    s = Schedule(run_seconds=30, total_steps=300, checkpoint_every=100, tokens_per_step=1000)
    run = Run(p, s, metrics.create(torch_version="testbed", transformers_version="testbed"))
    assert p.joined_at is not None
    run.advance(p.joined_at + 3 + 0.08 * 150)  # loading 3 s, then 0.08 s a step: 150 steps
    text = generate_latest(run.trainer.registry).decode()
    progress = parse_progress(text, "now")
    assert progress is not None
    assert (progress.step, progress.total_steps, progress.percent) == (150, 300, 50)
    assert progress.loss == f"{s.loss(150):.4f}"
    assert progress.tokens_per_second == round(1000 / 0.08)
    assert progress.eta_seconds == 12  # 150 steps left at 0.08 s
    saved = parse_checkpoint(text, "pvc://c/j")
    assert saved is not None
    assert (saved.step, saved.latest) == (100, "pvc://c/j/step-00000100")
    run.advance(p.joined_at + 28)  # training over: every step, and the final checkpoint
    text = generate_latest(run.trainer.registry).decode()
    final, last = parse_progress(text, "now"), parse_checkpoint(text, None)
    assert final is not None
    assert final.step == 300
    assert last is not None
    assert last.step == 300


def test_a_hang_is_a_step_count_or_a_time_after_the_rendezvous() -> None:
    assert Hang.parse("5") == Hang(steps=5)
    assert Hang.parse(" 40s ") == Hang(seconds=40.0)
    with pytest.raises(ValueError, match="neither a step count"):
        Hang.parse("soon")
    s = Schedule(run_seconds=100, total_steps=40)  # steps from 10 s, 2 s each
    assert s.hang_step(None) is None
    assert s.hang_step(Hang(steps=5)) == 5
    assert s.hang_step(Hang(steps=500)) == 40
    assert s.hang_step(Hang(seconds=20)) == 5


def _served(run: Run, at: float) -> tuple[int, int | None]:
    """The step and the checkpoint step the operator reads after advancing ``run`` to ``at``."""
    run.advance(at)
    text = generate_latest(run.trainer.registry).decode()
    progress, saved = parse_progress(text, "now"), parse_checkpoint(text, None)
    assert progress is not None
    return progress.step, saved.step if saved else None


@pytest.mark.parametrize("hang", ["6", "22s"])
def test_a_hanging_run_stops_stepping_for_good_and_saves_no_more(hang: str) -> None:
    """hang-after 6 steps, or 22 s after the rendezvous (10 s loading, then 2 s a step): the
    served step stays 6 to the end of the pod's run, with no final checkpoint."""
    raw = pod()
    raw["metadata"]["annotations"][trainer_metrics.HANG_AFTER] = hang  # type: ignore[index]
    raw["metadata"]["annotations"][trainer_metrics.RUN_DURATION] = "100s"  # type: ignore[index]
    p = MasterPod.of(raw)
    assert p.hang == Hang.parse(hang)
    assert p.joined_at is not None
    s = Schedule(run_seconds=100, total_steps=40, checkpoint_every=5)
    run = Run(p, s, metrics.create(torch_version="testbed", transformers_version="testbed"))
    assert _served(run, p.joined_at + 14) == (2, None)
    assert _served(run, p.joined_at + 30) == (6, 5)
    assert _served(run, p.joined_at + 60) == (6, 5)
    assert _served(run, p.joined_at + 99) == (6, 5), "training never finishes"
    steady = Run(
        MasterPod.of(pod()), s, metrics.create(torch_version="t", transformers_version="t")
    )
    assert _served(steady, p.joined_at + 99) == (40, 40)


def test_each_node_gets_its_own_slice_of_a_loopback_pod_network() -> None:
    network = manifests.pod_network(42)
    assert network == NETWORK
    cidrs = [n["spec"]["podCIDR"] for n in manifests.nodes(2, 1, network)]
    assert cidrs == ["127.42.1.0/24", "127.42.2.0/24", "127.42.3.0/24", "127.42.4.0/24"]
    assert all("podCIDR" not in n["spec"] for n in manifests.nodes(2, 1))
    with pytest.raises(ValueError, match="control plane"):
        manifests.pod_network(0)  # 127.0.x.x: the control plane's


def claim(**spec: object) -> dict[str, object]:
    return {
        "metadata": {"name": "finetune-models", "namespace": "ns", "uid": "c1"},
        "spec": {
            "storageClassName": "standard",
            "accessModes": ["ReadWriteMany"],
            "resources": {"requests": {"storage": "200Gi"}},
            **spec,
        },
        "status": {"phase": "Pending"},
    }


def test_a_pending_claim_of_the_default_class_gets_a_volume_bound_to_it() -> None:
    volume = provisioner.volume_for(claim(), Path("/v"))
    assert volume is not None
    assert volume["metadata"]["name"] == "pvc-c1"
    assert volume["spec"]["capacity"] == {"storage": "200Gi"}
    assert volume["spec"]["accessModes"] == ["ReadWriteMany"]
    assert volume["spec"]["claimRef"]["uid"] == "c1"
    assert provisioner.volume_for(claim(volumeName="pvc-c1"), Path("/v")) is None
    assert provisioner.volume_for(claim(storageClassName="fast"), Path("/v")) is None


def test_released_volumes_of_ours_are_deleted() -> None:
    ours = {"pv.kubernetes.io/provisioned-by": provisioner.PROVISIONER}
    volumes = [
        {"metadata": {"name": "a", "annotations": ours}, "status": {"phase": "Released"}},
        {"metadata": {"name": "b", "annotations": ours}, "status": {"phase": "Bound"}},
        {"metadata": {"name": "c"}, "status": {"phase": "Released"}},
    ]
    assert provisioner.released(volumes) == ["a"]


def trainjob_pod(completion: str = "0", job_index: str = "0") -> dict[str, object]:
    p = pod(
        spec={
            "containers": [{"name": "node", "ports": [{"name": "metrics", "containerPort": 9400}]}],
            "volumes": [
                {"name": "runtime-cm", "configMap": {"name": "other"}},
                {"name": "trainer-config", "configMap": {"name": "tj-trainer"}},
            ],
        }
    )
    meta = dict(p["metadata"])  # type: ignore[call-overload]
    meta["labels"] = {
        "finetune.dev/job": "tj",
        "jobset.sigs.k8s.io/jobset-name": "tj",
        "jobset.sigs.k8s.io/replicatedjob-name": "node",
        "jobset.sigs.k8s.io/job-index": job_index,
        "batch.kubernetes.io/job-completion-index": completion,
    }
    p["metadata"] = meta
    return p


def test_rank_0_of_a_trainjob_serves_like_a_master() -> None:
    p = MasterPod.of(trainjob_pod())
    assert (p.master, p.port, p.config_map, p.job) == (True, 9400, "tj-trainer", "tj")
    assert p.serves(NETWORK)
    assert not MasterPod.of(trainjob_pod(completion="1")).master
    assert not MasterPod.of(trainjob_pod(job_index="1")).master


def test_an_unresponsive_trainer_takes_the_connection_and_never_answers() -> None:
    """What a scrape of a stuck trainer meets: the connection is taken, the answer never comes
    (the operator's scrape waits for its timeout); closed, the address refuses at once."""
    import socket

    mute = pod(status={"phase": "Running", "podIP": "127.42.7.9"})
    mute["metadata"]["annotations"][trainer_metrics.OPT_OUT] = "unresponsive"  # type: ignore[index]
    p = MasterPod.of(mute)
    assert p.unresponsive
    assert p.serves(NETWORK)
    # listen() reads nothing of the cluster: no API client needed
    server = trainer_metrics.Server(None, NETWORK, 30)  # type: ignore[arg-type]
    server.listen(p)
    try:
        with socket.create_connection((p.ip, 9400), timeout=2) as conn:
            conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            conn.settimeout(0.5)
            with pytest.raises(TimeoutError):
                conn.recv(1)
    finally:
        server.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((p.ip, 9400), timeout=2).close()
