"""Status derived from the PyTorchJob and its pods: phase, conditions, failure reasons, progress."""

from __future__ import annotations

import pytest

from finetune_operator import api
from finetune_operator.controller import Outcome
from finetune_operator.objects import (
    Child,
    Condition,
    ContainerState,
    ContainerStatus,
    Pod,
    Terminated,
    Waiting,
)
from finetune_operator.scrape import parse_checkpoint, parse_progress
from finetune_operator.status import (
    Failure,
    FineTuneJobStatus,
    GpuAsk,
    Observed,
    derive,
    pod_problem,
    refine_failure,
)
from finetune_operator.story import notes
from helpers import ROOT, load_yaml

T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"


def child(*conditions: str, message: str = "") -> Child:
    return Child("j", "u", tuple(Condition(c, "True", message=message) for c in conditions))


def pod(
    *statuses: ContainerStatus, conditions: tuple[Condition, ...] = (), phase: str = "Running"
) -> Pod:
    return Pod("j-master-0", phase=phase, container_statuses=statuses, conditions=conditions)


def terminated(reason: str, code: int, *, last: bool = False) -> Pod:
    state = ContainerState(terminated=Terminated(code, reason))
    if last:
        return pod(ContainerStatus("pytorch", last_state=state))
    return pod(ContainerStatus("pytorch", state=state))


UNSCHEDULABLE = pod(
    conditions=(
        Condition("PodScheduled", "False", "Unschedulable",
                  "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."),
    ),
    phase="Pending",
)  # fmt: skip
PULL = pod(
    ContainerStatus("pytorch", "nope:1", ContainerState(waiting=Waiting("ImagePullBackOff"))),
    phase="Pending",
)


@pytest.mark.parametrize(
    ("pods", "reason", "code"),
    [
        ([terminated("OOMKilled", 137)], "OOMKilled", 137),
        ([terminated("OOMKilled", 137, last=True)], "OOMKilled", 137),
        ([terminated("Error", 1)], "Error", 1),
        ([PULL], "ImagePullBackOff", None),
        ([UNSCHEDULABLE], "Unschedulable", None),
        ([terminated("Completed", 0)], None, None),
    ],
)
def test_pod_states_become_failure_reasons(
    pods: list[Pod], reason: str | None, code: int | None
) -> None:
    found = pod_problem(pods)
    assert (found.reason if found else None) == reason
    assert (found.exit_code if found else None) == code
    if found:
        assert "j-master-0" in found.message


def test_the_trainers_termination_message_becomes_the_failure() -> None:
    """The trainer's one-line cause (finetune_trainer.failure) is the reason and the message;
    other text stays a plain Error with it as detail."""
    line = '{"reason": "LossDiverged", "message": "loss not finite since step 7"}'
    said = pod(
        ContainerStatus("pytorch", state=ContainerState(terminated=Terminated(1, "Error", line)))
    )
    found = pod_problem([said])
    assert found is not None
    assert (found.reason, found.exit_code) == ("LossDiverged", 1)
    assert found.message == "pod j-master-0 (exit 1): loss not finite since step 7"
    plain = pod(
        ContainerStatus("pytorch", state=ContainerState(terminated=Terminated(3, "Error", "boom")))
    )
    found = pod_problem([plain])
    assert found is not None
    assert found.reason == "Error"
    assert "boom" in found.message


@pytest.mark.parametrize(
    ("obs", "phase"),
    [
        (Observed(1, False), "Planned"),
        (Observed(1, False, child=child("Created")), "Pending"),
        (Observed(1, False, child=child("Created", "Running")), "Running"),
        (Observed(1, True, child=child("Created", "Running")), "Suspended"),
        (Observed(1, False, child=child("Created", "Succeeded")), "Succeeded"),
        (Observed(1, False, child=child("Failed")), "Failed"),
        (Observed(1, False, plan_error="needs 4 GPUs"), "Failed"),
    ],
)
def test_phase(obs: Observed, phase: str) -> None:
    assert derive(obs, None, T0).phase == phase


def test_infeasible_plan_fails_with_the_fix() -> None:
    status = derive(
        Observed(3, False, plan_error="needs 4 GPUs of 80 GB, or method lora"), None, T0
    )
    assert status.failure == Failure(
        reason="PlanInfeasible", message="needs 4 GPUs of 80 GB, or method lora"
    )
    planned = next(c for c in status.conditions or [] if c.type == "Planned")
    assert (planned.status, planned.reason, planned.observed_generation) == (
        "False",
        "PlanInfeasible",
        3,
    )
    assert status.pytorch_job is None


def test_oom_reason_survives_the_job_failing() -> None:
    failed = child(
        "Failed", message="Job j has failed because it has reached the specified backoff limit"
    )
    status = derive(
        Observed(1, False, child=failed, pods=(terminated("OOMKilled", 137, last=True),)), None, T0
    )
    assert status.failure is not None
    assert (status.failure.reason, status.failure.exit_code) == ("OOMKilled", 137)


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (
            "Job j has failed because it has reached the specified backoff limit",
            "BackoffLimitExceeded",
        ),
        (
            "Job j has failed because it was active longer than specified deadline",
            "DeadlineExceeded",
        ),
    ],
)
def test_job_level_failures(message: str, reason: str) -> None:
    status = derive(Observed(1, False, child=child("Failed", message=message)), None, T0)
    assert status.failure is not None
    assert status.failure.reason == reason


def test_unschedulable_is_a_condition_while_pending() -> None:
    status = derive(Observed(1, False, child=child("Created"), pods=(UNSCHEDULABLE,)), None, T0)
    running = next(c for c in status.conditions or [] if c.type == "Running")
    assert (status.phase, running.status, running.reason) == ("Pending", "False", "Unschedulable")
    assert "Insufficient nvidia.com/gpu" in running.message


def test_transition_times_only_move_when_status_changes() -> None:
    first = derive(Observed(1, False, child=child("Created")), None, T0)
    again = derive(Observed(1, False, child=child("Created")), first, T1)
    assert again == first  # nothing changed: nothing to patch
    running = derive(Observed(1, False, child=child("Created", "Running")), first, T1)
    times = {c.type: c.last_transition_time for c in running.conditions or []}
    assert times["Validated"] == T0
    assert times["Running"] == T1


def test_terminal_phases_are_never_left() -> None:
    done = derive(Observed(1, False, child=child("Succeeded")), None, T0)
    assert done.completion_time == T0
    later = derive(Observed(2, False, child=None), done, T1)
    assert later == done
    assert isinstance(later, FineTuneJobStatus)


METRICS = """\
# TYPE finetune_train_steps_total counter
finetune_train_steps_total 450.0
# TYPE finetune_train_progress_ratio gauge
finetune_train_progress_ratio 0.45
# TYPE finetune_train_loss gauge
finetune_train_loss 1.23456
# TYPE finetune_train_tokens_total counter
finetune_train_tokens_total 900000.0
# TYPE finetune_train_step_duration_seconds histogram
finetune_train_step_duration_seconds_bucket{le="+Inf"} 450.0
finetune_train_step_duration_seconds_count 450.0
finetune_train_step_duration_seconds_sum 900.0
"""


def test_progress_from_metrics() -> None:
    progress = parse_progress(METRICS, T0)
    assert progress is not None
    assert (progress.step, progress.total_steps, progress.percent) == (450, 1000, 45)
    assert progress.loss == "1.2346"
    assert progress.tokens_per_second == 1000
    assert progress.eta_seconds == 1100  # 550 steps x 2 s
    assert progress.summary == "450/1000 (45%)"


def test_no_progress_before_the_first_step() -> None:
    assert (
        parse_progress(
            "# TYPE finetune_train_steps_total counter\nfinetune_train_steps_total 0\n", T0
        )
        is None
    )


def test_latest_checkpoint_from_metrics() -> None:
    text = METRICS + (
        "# TYPE finetune_checkpoint_last_step gauge\nfinetune_checkpoint_last_step 400.0\n"
        "# TYPE finetune_checkpoint_last_save_timestamp_seconds gauge\n"
        "finetune_checkpoint_last_save_timestamp_seconds 1.7956512e+09\n"
    )
    saved = parse_checkpoint(text, "pvc://ckpts/run-1/")
    assert saved is not None
    assert saved.step == 400
    assert saved.latest == "pvc://ckpts/run-1/step-00000400"
    assert saved.time == "2026-11-26T00:00:00Z"
    assert parse_checkpoint(text, None).latest is None  # type: ignore[union-attr]
    assert parse_checkpoint(METRICS, "pvc://ckpts/run-1") is None  # none taken yet


def test_a_late_pod_tells_why_a_job_hit_its_backoff_limit() -> None:
    failed = child(
        "Failed", message="Job j has failed because it has reached the specified backoff limit"
    )
    status = derive(Observed(1, False, child=failed), None, T0)
    assert status.failure is not None
    assert status.failure.reason == "BackoffLimitExceeded"
    refined = refine_failure(status, [terminated("OOMKilled", 137, last=True)])
    assert refined.failure is not None
    assert (refined.failure.reason, refined.phase) == ("OOMKilled", "Failed")
    assert next(c for c in refined.conditions or [] if c.type == "Failed").reason == "OOMKilled"
    assert refine_failure(refined, [terminated("Error", 1)]) == refined  # specific reasons stay


# --------------------------------------------------------------------------- recovering


MISSING_CLAIM = pod(
    conditions=(
        Condition("PodScheduled", "False", "Unschedulable",
                  '0/3 nodes are available: persistentvolumeclaim "finetune-models" not found. '
                  "preemption: 0/3 nodes are available: 3 Preemption is not helpful for "
                  "scheduling."),
    ),
    phase="Pending",
)  # fmt: skip
RUNNING = pod(ContainerStatus("pytorch", state=ContainerState()))


def test_a_failure_is_cleared_when_the_job_recovers() -> None:
    stuck = derive(Observed(1, False, child=child("Created"), pods=(MISSING_CLAIM,)), None, T0)
    assert stuck.failure is not None
    assert stuck.failure.reason == "PersistentVolumeClaimMissing"

    def seen(*conditions: str, pods: tuple[Pod, ...] = ()) -> Observed:
        return Observed(
            1, False, child=child(*conditions), pods=pods, previous_failure=stuck.failure
        )

    scheduled = derive(seen("Created"), stuck, T1)  # the claim was made: the pods start
    assert (scheduled.phase, scheduled.failure) == ("Pending", None)
    running = derive(seen("Created", "Running", pods=(RUNNING,)), stuck, T1)
    assert (running.phase, running.failure) == ("Running", None)
    reason = {c.type: c.reason for c in running.conditions or []}
    assert reason["Running"] == "Running"
    done = derive(seen("Created", "Succeeded"), running, T1)
    assert (done.phase, done.failure) == ("Succeeded", None)
    straight = derive(seen("Created", "Succeeded"), stuck, T1)  # the Running refresh missed
    assert (straight.phase, straight.failure) == ("Succeeded", None)


def test_a_failure_seen_earlier_still_explains_a_job_that_fails() -> None:
    oom = pod_problem([terminated("OOMKilled", 137, last=True)])
    backoff = child("Failed", message="Job j has failed because it has reached the backoff limit")
    status = derive(Observed(1, False, child=backoff, previous_failure=oom), None, T0)
    assert status.failure == oom  # the pod that OOMed is gone; its reason is not


def test_a_missing_claim_is_named_with_what_to_do() -> None:
    problem = pod_problem([MISSING_CLAIM])
    assert problem is not None
    assert problem.reason == "PersistentVolumeClaimMissing"
    assert "PersistentVolumeClaim finetune-models does not exist" in problem.message
    assert "create a PersistentVolumeClaim named finetune-models" in problem.message
    assert "GPU" not in problem.message
    assert "nodeSelector" not in problem.message
    status = derive(Observed(1, False, child=child("Created"), pods=(MISSING_CLAIM,)), None, T0)
    running = next(c for c in status.conditions or [] if c.type == "Running")
    assert (status.phase, running.reason) == ("Pending", "PersistentVolumeClaimMissing")


# --------------------------------------------------------------------------- the story told


def _told(before: str | None, status: FineTuneJobStatus) -> list[tuple[str, str]]:
    job = api.parse(load_yaml(ROOT / "examples" / "tiny-local.yaml"))
    outcome = Outcome(before, status.phase, status, True, job)
    return [(n.type, n.reason) for n in notes(outcome)]


def test_a_job_that_succeeded_always_tells_that_it_ran() -> None:
    pending = derive(Observed(1, False, child=child("Created")), None, T0)
    done = derive(Observed(1, False, child=child("Created", "Succeeded")), pending, T1)
    assert _told("Pending", done) == [("Normal", "Running"), ("Normal", "Succeeded")]
    running = derive(Observed(1, False, child=child("Created", "Running")), pending, T1)
    assert _told("Pending", running) == [("Normal", "Running")]
    assert _told("Running", done) == [("Normal", "Succeeded")]
    assert _told("Running", running) == []  # no transition, nothing to tell


def test_a_failure_is_told_as_a_warning_with_its_reason() -> None:
    failed = derive(Observed(1, False, plan_error="needs 4 GPUs"), None, T0)
    assert _told(None, failed) == [("Warning", "PlanInfeasible")]


def test_every_missing_claim_is_named_up_front() -> None:
    missing = ("finetune-checkpoints", "finetune-models")
    obs = Observed(1, False, child=child("Created"), pods=(MISSING_CLAIM,), missing_claims=missing)
    status = derive(obs, None, T0)
    assert status.phase == "Pending"
    assert status.failure is not None
    assert status.failure.reason == "PersistentVolumeClaimMissing"
    assert "PersistentVolumeClaims finetune-checkpoints, finetune-models do not exist" in (
        status.failure.message
    )
    assert "named finetune-checkpoints and one named finetune-models" in status.failure.message


#: What kube-scheduler says when no node has the GPU product/count the pod's affinity asks for.
NO_GPU_NODE = (
    "0/4 nodes are available: 1 node(s) had untolerated taint {node.kubernetes.io/not-ready: }, "
    "3 node(s) didn't match Pod's node affinity/selector. preemption: 0/4 nodes are available: "
    "4 Preemption is not helpful for scheduling."
)
H100X8 = GpuAsk("H100-80GB", 8, ("NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-PCIe"))


def _pending(message: str) -> Pod:
    cond = Condition("PodScheduled", "False", "Unschedulable", message)
    return pod(conditions=(cond,), phase="Pending")


def test_no_node_with_the_planned_gpus_is_named_in_status() -> None:
    obs = Observed(1, False, child=child("Created"), pods=(_pending(NO_GPU_NODE),), gpu=H100X8)
    status = derive(obs, None, T0)
    assert status.phase == "Pending"
    assert status.failure is not None
    assert status.failure.reason == "Unschedulable"
    message = status.failure.message
    assert "no node offers 8 H100-80GB GPUs" in message
    assert "nvidia.com/gpu.product in [NVIDIA-H100-80GB-HBM3, NVIDIA-H100-PCIe]" in message
    assert "nvidia.com/gpu.count >= 8" in message
    assert "didn't match Pod's node affinity/selector" in message  # the scheduler's own words


def test_gpus_that_exist_but_are_busy_are_not_called_missing() -> None:
    busy = (
        "0/4 nodes are available: 2 Insufficient nvidia.com/gpu, 2 node(s) didn't match Pod's "
        "node affinity/selector."
    )
    found = pod_problem([_pending(busy)], H100X8)
    assert found is not None
    assert found.reason == "Unschedulable"
    assert "no node offers" not in found.message
    assert "Insufficient nvidia.com/gpu" in found.message
