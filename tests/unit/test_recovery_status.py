"""What status and Events say of the operator's recoveries (pure): a startup deadline fails the
job, a restart and a re-plan are recorded and told once, status keeps them across writes."""

from __future__ import annotations

from finetune_operator import api
from finetune_operator.controller import Outcome
from finetune_operator.objects import Child, Condition
from finetune_operator.plan import plan_job, plan_status
from finetune_operator.status import (
    Failure,
    FineTuneJobStatus,
    Observed,
    derive,
    failed,
    replanned,
    restarted,
)
from finetune_operator.story import notes
from helpers import ROOT, load_yaml

T0, T1, T2 = "2026-12-07T06:00:00Z", "2026-12-07T06:05:00Z", "2026-12-07T06:10:00Z"
JOB = api.parse(
    {**load_yaml(ROOT / "examples" / "mistral-7b-python-code.yaml"), "metadata": {"name": "j"}}
)
RESULT = plan_job(JOB.spec)
assert RESULT is not None
PLAN = plan_status(RESULT)
RUNNING = Child("j", "u", (Condition("Running", "True"),))


def running_status() -> FineTuneJobStatus:
    return derive(Observed(1, False, plan=PLAN, child=RUNNING), None, T0)


def outcome(previous: FineTuneJobStatus, status: FineTuneJobStatus) -> Outcome:
    return Outcome(previous.phase, status.phase, status, True, JOB, previous)


def test_a_startup_deadline_fails_a_starting_job_with_the_pods_message() -> None:
    late = Failure(reason="StartupDeadlineExceeded", message="pod j-master-0 has not started")
    status = derive(
        Observed(1, False, plan=PLAN, child=Child("j", "u"), startup_failure=late), None, T0
    )
    assert (status.phase, status.failure, status.completion_time) == ("Failed", late, T0)
    cond = {c.type: c for c in status.conditions or []}
    assert (cond["Failed"].reason, cond["Running"].status) == ("StartupDeadlineExceeded", "False")


def test_a_restart_is_counted_told_once_and_kept_by_later_writes() -> None:
    before = running_status()
    after = restarted(before, 1, "no training progress for 61 s: restarting", T1)
    assert (after.restarts, after.last_restart_time, after.phase) == (1, T1, "Running")
    told = notes(outcome(before, after))
    assert [(n.type, n.reason, n.message) for n in told] == [
        ("Warning", "Restarted", "no training progress for 61 s: restarting")
    ]
    assert notes(outcome(after, after)) == [], "told once"
    later = derive(Observed(1, False, plan=PLAN, child=RUNNING), after, T2)
    assert (later.restarts, later.last_restart_time) == (1, T1)
    assert "Restarted" in {c.type for c in later.conditions or []}


def test_a_hang_past_the_budget_fails_the_job() -> None:
    hung = Failure(reason="Hung", message="no training progress; restarts spent")
    status = failed(running_status(), hung, T1)
    assert (status.phase, status.failure, status.completion_time) == ("Failed", hung, T1)
    assert [(n.reason, n.message) for n in notes(outcome(running_status(), status))] == [
        ("Hung", hung.message)
    ]


def test_a_re_plan_records_both_attempts_and_waits_for_the_new_child() -> None:
    before = running_status()
    smaller = PLAN.model_copy(update={"summary": "fsdp8 mbs1 ga8 ac=none"})
    after = replanned(before, smaller, "OOMKilled", "OOMKilled with plan ...: re-planned", T1)
    first, second = after.attempts or []
    assert (first.plan, first.reason, first.time) == (PLAN, "Planned", before.start_time)
    assert (second.plan, second.reason, second.time) == (smaller, "OOMKilled", T1)
    assert (after.plan, after.phase, after.pytorch_job, after.failure) == (
        smaller,
        "Planned",
        None,
        None,
    )
    told = [(n.type, n.reason) for n in notes(outcome(before, after))]
    assert told[0] == ("Warning", "Replanned")
    again = replanned(after, PLAN, "GPUOutOfMemory", "again", T2)
    assert [a.reason for a in again.attempts or []] == ["Planned", "OOMKilled", "GPUOutOfMemory"]
    kept = derive(Observed(1, False, plan=smaller), after, T2)
    assert kept.attempts == after.attempts
