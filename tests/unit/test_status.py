"""Status derived from the PyTorchJob and its pods: phase, conditions, failure reasons, progress."""

from __future__ import annotations

import pytest

from finetune_operator.objects import (
    Condition,
    ContainerState,
    ContainerStatus,
    Pod,
    PyTorchJob,
    Terminated,
    Waiting,
)
from finetune_operator.scrape import parse_checkpoint, parse_progress
from finetune_operator.status import (
    Failure,
    FineTuneJobStatus,
    Observed,
    derive,
    pod_problem,
    refine_failure,
)

T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"


def child(*conditions: str, message: str = "") -> PyTorchJob:
    return PyTorchJob("j", "u", tuple(Condition(c, "True", message=message) for c in conditions))


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
