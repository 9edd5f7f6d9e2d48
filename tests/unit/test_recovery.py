"""Recovery decisions (pure): the startup deadline, hang restarts within a budget, re-planning
after out-of-memory; and the typed views they read."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from finetune_operator import api
from finetune_operator.objects import (
    Child,
    Condition,
    ContainerState,
    ContainerStatus,
    Pod,
    Terminated,
    Waiting,
)
from finetune_operator.plan import plan_config, plan_job, plan_status
from finetune_operator.recovery import (
    FIRST_STEP_SECONDS,
    HANG_FLOOR_SECONDS,
    REPLAN_MARGIN,
    STARTUP_DEADLINE_EXCEEDED,
    Replan,
    Restart,
    StepClock,
    candidates,
    hang_decision,
    hang_timeout,
    observe_step,
    out_of_memory,
    out_of_memory_in,
    plan_config_of,
    replan,
    resume_note,
    running_since,
    startup_failure,
    step_seconds,
)
from finetune_operator.spec import RunPolicy
from finetune_operator.status import Failure, PlanStatus
from helpers import ROOT, load_yaml

NOW = datetime(2026, 12, 7, 6, 0, 0, tzinfo=UTC)


def ago(seconds: float) -> datetime:
    return NOW - timedelta(seconds=seconds)


# ---------------------------------------------------------------------------------------------
# The typed views
# ---------------------------------------------------------------------------------------------


def test_a_pod_keeps_its_times_restarts_and_init_containers() -> None:
    pod = Pod.parse(
        {
            "metadata": {
                "name": "j-worker-0",
                "uid": "p1",
                "creationTimestamp": "2026-12-07T05:50:00Z",
                "deletionTimestamp": "2026-12-07T05:59:00Z",
            },
            "status": {
                "phase": "Pending",
                "startTime": "2026-12-07T05:50:02.5+00:00",
                "initContainerStatuses": [
                    {"name": "stage", "state": {"waiting": {"reason": "PodInitializing"}}}
                ],
                "containerStatuses": [
                    {"name": "pytorch", "restartCount": 2, "state": {"running": {}}},
                    {"name": "side", "restartCount": "x", "state": {}},
                ],
            },
        }
    )
    assert pod.uid == "p1"
    assert pod.created == ago(600)
    assert pod.started == ago(597.5)
    assert pod.deleting
    assert pod.restarts == 2  # an unreadable count reads as 0
    assert [c.running for c in pod.container_statuses] == [True, False]
    (init,) = pod.init_container_statuses
    assert init.state.waiting == Waiting("PodInitializing")
    assert Pod.parse({"metadata": {"name": "p", "creationTimestamp": "nonsense"}}).created is None


def test_a_pytorchjob_keeps_its_times_annotations_and_when_it_began_running() -> None:
    job = Child.parse(
        {
            "metadata": {
                "name": "j",
                "uid": "u",
                "creationTimestamp": "2026-12-07T05:00:00Z",
                "annotations": {"finetune.dev/plan": "fsdp8 mbs2 ga4 ac=none"},
            },
            "spec": {"runPolicy": {"suspend": True}},
            "status": {
                "startTime": "2026-12-07T05:00:01Z",
                "conditions": [
                    {"type": "Created", "status": "True"},
                    {
                        "type": "Running",
                        "status": "True",
                        "lastTransitionTime": "2026-12-07T05:40:00Z",
                    },
                    {"type": "Restarting", "status": "False", "lastTransitionTime": "x"},
                ],
            },
        }
    )
    assert (job.created, job.started) == (ago(3600), ago(3599))
    assert job.annotations == {"finetune.dev/plan": "fsdp8 mbs2 ga4 ac=none"}
    assert job.suspended
    assert job.since("Running") == ago(1200)
    assert job.since("Restarting") is None  # not True now
    assert job.since("Created") is None  # True, but no time given
    assert not job.deleting


# ---------------------------------------------------------------------------------------------
# Startup deadline
# ---------------------------------------------------------------------------------------------


def pending(name: str, created_ago: float, *, waiting: Waiting | None = None, **kw: Any) -> Pod:
    statuses = (
        (ContainerStatus("pytorch", "registry.example/trainer:9", ContainerState(waiting)),)
        if waiting
        else ()
    )
    return Pod(name, phase="Pending", created=ago(created_ago), container_statuses=statuses, **kw)


PULL = Waiting("ImagePullBackOff", 'Back-off pulling image "registry.example/trainer:9"')


def test_a_pod_pulling_its_image_at_the_deadline_fails_the_job_with_its_own_message() -> None:
    late = pending("j-master-0", 601, waiting=PULL)
    assert startup_failure([late], 601, NOW) is not None
    assert startup_failure([late], 602, NOW) is None, "still in time"
    failure = startup_failure([late], 600, NOW)
    assert failure is not None
    assert failure.reason == STARTUP_DEADLINE_EXCEEDED
    assert failure.pod == "j-master-0"
    assert failure.message == (
        "pod j-master-0 has not started 601 s after it was created (runPolicy."
        "startupDeadlineSeconds is 600): container pytorch (image registry.example/trainer:9) "
        'waits with ImagePullBackOff: Back-off pulling image "registry.example/trainer:9"'
    )


def test_the_scheduler_s_message_explains_an_unschedulable_pod() -> None:
    why = "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
    pod = pending(
        "j-worker-1",
        900,
        conditions=(Condition("PodScheduled", "False", "Unschedulable", why),),
    )
    failure = startup_failure([pod], 600, NOW)
    assert failure is not None
    assert failure.message.endswith(f"not scheduled (Unschedulable): {why}")
    stuck_init = Pod(
        "j-master-0",
        phase="Pending",
        created=ago(700),
        conditions=(Condition("PodScheduled", "True"),),
        init_container_statuses=(
            ContainerStatus("stage", state=ContainerState(Waiting("CrashLoopBackOff", "back-off"))),
        ),
    )
    failure = startup_failure([stuck_init], 600, NOW)
    assert failure is not None
    assert failure.message.endswith("init container stage waits with CrashLoopBackOff: back-off")


def test_running_ended_deleted_and_young_pods_are_not_late_the_oldest_late_is_named() -> None:
    old = ago(5000)
    fine = [
        Pod("running", phase="Running", created=old),
        Pod("done", phase="Succeeded", created=old),
        Pod("going", phase="Pending", created=old, deleting=True),
        Pod("unknown-age", phase="Pending"),
        pending("young", 10, waiting=PULL),
    ]
    assert startup_failure(fine, 600, NOW) is None
    failure = startup_failure([*fine, pending("late", 700), pending("later", 900)], 600, NOW)
    assert failure is not None
    assert failure.pod == "later"
    assert "not scheduled yet" in failure.message


# ---------------------------------------------------------------------------------------------
# Hang detection
# ---------------------------------------------------------------------------------------------


def test_the_step_clock_restarts_only_when_the_step_changes() -> None:
    first = observe_step(None, 40, ago(100))
    assert first == StepClock(40, ago(100))
    assert observe_step(first, 40, NOW) is first
    assert observe_step(first, 41, NOW) == StepClock(41, NOW)
    assert observe_step(first, 20, NOW) == StepClock(20, NOW), "a resumed run went back"


def test_the_hang_timeout_is_ten_step_times_with_a_floor_unless_set() -> None:
    default = RunPolicy()
    assert step_seconds(40, 100, 120) == 2.0  # 60 steps left in 120 s
    assert step_seconds(100, 100, 0) is None
    assert step_seconds(40, None, 120) is None
    assert hang_timeout(default, 2.0) == HANG_FLOOR_SECONDS
    assert hang_timeout(default, 95.0) == 950
    assert hang_timeout(default, None) == FIRST_STEP_SECONDS
    assert hang_timeout(default, 95.0, stepped=False) == FIRST_STEP_SECONDS
    assert hang_timeout(RunPolicy(hang_timeout_seconds=45), 95.0, stepped=False) == 45


def test_a_job_that_stops_stepping_is_restarted_until_its_budget_is_spent_then_hung() -> None:
    policy = RunPolicy(hang_timeout_seconds=60, max_restarts=2)
    running = ago(3600)
    assert hang_decision(StepClock(7, ago(59)), running, policy, 0, 1.0, NOW) is None
    first = hang_decision(StepClock(7, ago(61)), running, policy, 0, 1.0, NOW)
    assert isinstance(first, Restart)
    assert first.restarts == 1
    assert first.message == (
        "no training progress for 61 s (at step 7; hang timeout 60 s, runPolicy."
        "hangTimeoutSeconds): restarting the training pods (1 of 2 restarts, runPolicy."
        "maxRestarts); they resume from the last complete checkpoint"
    )
    second = hang_decision(StepClock(7, ago(61)), running, policy, 1, 1.0, NOW)
    assert isinstance(second, Restart)
    assert second.restarts == 2
    spent = hang_decision(StepClock(7, ago(61)), running, policy, 2, 1.0, NOW)
    assert isinstance(spent, Failure)
    assert spent.reason == "Hung"
    assert "the 2 restart(s) runPolicy.maxRestarts allows are spent" in spent.message
    no_budget = RunPolicy(hang_timeout_seconds=60, max_restarts=0)
    assert isinstance(
        hang_decision(StepClock(7, ago(61)), running, no_budget, 0, 1.0, NOW), Failure
    )


def test_a_restarted_gang_has_the_whole_timeout_from_when_it_runs_again() -> None:
    """The step stood still since before the restart; the new pods run since 100 s ago: with
    the derived timeout they have the first-step allowance (they load the model again), with
    a set timeout they have that timeout from the restart."""
    clock = StepClock(7, ago(5000))
    assert hang_decision(clock, ago(100), RunPolicy(), 1, 2.0, NOW) is None
    late = hang_decision(clock, ago(FIRST_STEP_SECONDS + 1), RunPolicy(), 1, 2.0, NOW)
    assert isinstance(late, Restart)
    assert "derived from the step time" in late.message
    assert hang_decision(clock, ago(100), RunPolicy(hang_timeout_seconds=120), 1, 2.0, NOW) is None
    assert isinstance(
        hang_decision(clock, ago(121), RunPolicy(hang_timeout_seconds=120), 1, 2.0, NOW), Restart
    )
    # Stepping since the restart: the derived timeout is back to ten step times (floor 300).
    assert isinstance(
        hang_decision(StepClock(9, ago(301)), ago(400), RunPolicy(), 0, 2.0, NOW), Restart
    )
    assert hang_decision(None, ago(FIRST_STEP_SECONDS - 1), RunPolicy(), 0, None, NOW) is None
    assert hang_decision(clock, None, RunPolicy(), 0, 2.0, NOW) is None, "not running: no hang"


def test_a_gang_runs_since_the_latest_of_its_running_condition_pod_starts_and_restart() -> None:
    child = Child("j", conditions=(Condition("Running", "True", last_transition=ago(900)),))
    master = Pod("j-master-0", phase="Running", started=ago(600))
    worker = Pod("j-worker-0", phase="Running", started=ago(800))
    assert running_since(child, [master, worker]) == ago(600)
    assert running_since(child, [master, worker], restarted=ago(300)) == ago(300)
    gone = Pod("j-worker-0", phase="Pending", deleting=True)
    assert running_since(child, [master, gone]) == ago(600), "a pod on its way out is not waited"
    assert running_since(child, [master, Pod("j-worker-0", phase="Pending")]) is None
    assert running_since(child, []) is None
    assert running_since(Child("j"), [master]) is None
    assert running_since(None, [master]) is None


def test_an_out_of_memory_end_counts_only_in_the_current_attempt_s_pods() -> None:
    killed = ContainerState(terminated=Terminated(137, "OOMKilled"))
    cuda = ContainerState(
        terminated=Terminated(1, "Error", '{"reason": "GPUOutOfMemory", "message": "tried 2 GiB"}')
    )
    error = ContainerState(terminated=Terminated(1, "Error"))

    def pod(name: str, age: float, **status: ContainerState) -> Pod:
        return Pod(
            name, created=ago(age), container_statuses=(ContainerStatus("pytorch", **status),)
        )

    old = pod("j-master-0", 600, last_state=killed)
    new = pod("j-worker-0", 60, state=cuda)
    failed = pod("j-worker-1", 60, state=error)
    found = out_of_memory_in([old, failed, new], since=ago(120))
    assert found is not None
    assert (found.reason, found.pod) == ("GPUOutOfMemory", "j-worker-0")
    assert out_of_memory_in([old, failed], since=ago(120)) is None
    oom = out_of_memory_in([old, failed])
    assert oom is not None
    assert oom.reason == "OOMKilled"


# ---------------------------------------------------------------------------------------------
# Re-plan after out-of-memory
# ---------------------------------------------------------------------------------------------


def mistral(**run_policy: Any) -> api.FineTuneJob:
    doc = load_yaml(ROOT / "examples" / "mistral-7b-python-code.yaml")
    doc["spec"].setdefault("runPolicy", {}).update(run_policy)
    return api.parse(doc)


def first_plan(job: api.FineTuneJob) -> PlanStatus:
    result = plan_job(job.spec)
    assert result is not None
    return plan_status(result)


OOM = Failure(reason="OOMKilled", message="pod j-master-0 ran out of memory", exit_code=137)
GPU_OOM = Failure(reason="GPUOutOfMemory", message="CUDA out of memory: tried 2.0 GiB")


def test_out_of_memory_is_the_kubelets_kill_or_the_trainers_cuda_error() -> None:
    assert out_of_memory(OOM)
    assert out_of_memory(GPU_OOM)
    assert not out_of_memory(Failure(reason="LossDiverged"))
    assert not out_of_memory(None)


def test_an_oom_re_plans_to_the_fastest_plan_with_headroom_and_again_lower() -> None:
    job = mistral()
    failed = first_plan(job)
    ranked = candidates(job.spec)
    assert ranked[0].summary == failed.summary  # the planner's best ran first
    first = replan(job.spec, failed, OOM, [], 0)
    assert isinstance(first, Replan), first
    peak, before = first.plan.est_peak_memory_bytes_per_gpu, failed.est_peak_memory_bytes_per_gpu
    assert peak <= before * (1 - REPLAN_MARGIN)
    # The fastest such plan: every faster candidate is tried or has too little headroom.
    faster = ranked[: [c.summary for c in ranked].index(first.plan.summary)]
    assert all(c.estimate.peak_memory_bytes > before * (1 - REPLAN_MARGIN) for c in faster)
    assert first.plan.world == failed.world
    assert first.config == plan_config(first.result) == plan_config_of(first.plan)
    assert first.plan.reason.startswith(f"re-planned after OOMKilled with {failed.summary}: ")
    assert first.message.startswith(f"OOMKilled with plan {failed.summary} (predicted ")
    assert "re-plan 1 of 2" in first.message
    assert "resumes from the last complete checkpoint" in first.message
    second = replan(job.spec, first.plan, GPU_OOM, [failed], 1)
    assert isinstance(second, Replan), second
    assert second.plan.est_peak_memory_bytes_per_gpu <= peak * (1 - REPLAN_MARGIN)
    assert second.plan.summary not in {failed.summary, first.plan.summary}
    assert "GPUOutOfMemory" in second.message
    assert "re-plan 2 of 2" in second.message


def test_when_the_replans_are_spent_the_job_fails_with_the_out_of_memory_reason() -> None:
    job = mistral(maxReplans=1)
    failed = first_plan(job)
    spent = replan(job.spec, failed, OOM, [failed], 1)
    assert isinstance(spent, Failure)
    assert spent.reason == "OOMKilled"
    assert spent.exit_code == 137
    assert spent.message.startswith("pod j-master-0 ran out of memory; no re-plan left after 1")
    off = replan(mistral(maxReplans=0).spec, failed, OOM, [], 0)
    assert isinstance(off, Failure)
    assert "with re-planning off (runPolicy.maxReplans is 0)" in off.message


def test_a_manual_plan_or_a_model_the_trainer_plans_is_not_re_planned() -> None:
    job = mistral()
    failed = first_plan(job)
    manual = job.spec.model_copy(
        update={
            "parallelism": job.spec.parallelism.model_copy(update={"mode": "manual", "fsdp": 8})
        }
    )
    refused = replan(manual, failed, OOM, [], 0)
    assert isinstance(refused, Failure)
    assert "parallelism.mode is manual" in refused.message
    unknown = job.spec.model_copy(
        update={"model": job.spec.model.model_copy(update={"source": "pvc://models/mine"})}
    )
    refused = replan(unknown, failed, OOM, [], 0)
    assert isinstance(refused, Failure)
    assert "cannot re-plan: the model is not known offline" in refused.message


def test_no_plan_with_enough_headroom_fails_with_what_to_do() -> None:
    job = mistral()
    failed = first_plan(job)
    lowest = min(candidates(job.spec), key=lambda c: c.estimate.peak_memory_bytes)
    floor = failed.model_copy(
        update={
            "summary": lowest.summary,
            "est_peak_memory_bytes_per_gpu": lowest.estimate.peak_memory_bytes,
        }
    )
    refused = replan(job.spec, floor, GPU_OOM, [failed], 1)
    assert isinstance(refused, Failure)
    assert refused.reason == "GPUOutOfMemory"
    assert "no other plan predicts 10% less than the " in refused.message
    assert "use method lora" in refused.message


@pytest.mark.parametrize(
    ("change", "checkpoints", "expected"),
    [
        ({}, True, "resumes from the last complete checkpoint (same sharding)"),
        ({"fsdp": 4, "tensor_parallel": 2}, True, "reshards to the new layout"),
        ({"method": "lora"}, True, "starts over from step 0: a full checkpoint does not load"),
        ({}, False, "starts over from step 0: the job keeps no checkpoints"),
    ],
)
def test_how_a_new_plan_resumes_is_said(
    change: dict[str, Any], checkpoints: bool, expected: str
) -> None:
    failed = first_plan(mistral())
    assert expected in resume_note(failed, failed.model_copy(update=change), checkpoints)


@pytest.mark.parametrize(("zero", "sync"), [(2, "every"), (3, "last"), (2, "last")])
def test_a_recorded_plan_keeps_its_zero_stage_and_gradient_sync(zero: int, sync: str) -> None:
    """A re-planned job runs its recorded status.plan: the ZeRO stage and gradient sync the
    planner chose are in it, and reach the trainer (not the defaults, ZeRO-3 and every)."""
    result = plan_job(mistral().spec)
    assert result is not None
    chosen = result.plan.model_copy(update={"zero_stage": zero, "gradient_sync": sync})
    recorded = plan_status(result.model_copy(update={"plan": chosen}))
    assert (recorded.zero_stage, recorded.gradient_sync) == (zero, sync)
    config = plan_config_of(PlanStatus.model_validate(recorded.model_dump(by_alias=True)))
    assert (config.zero_stage, config.gradient_sync) == (zero, sync)
