"""Staging's pure parts: the report read back from the staging pod, where staging stands, what
status records and tells, the trainer config pinned to the staged commits, the cache claim."""

from __future__ import annotations

from typing import Any

import pytest

from bad_specs import apply
from finetune_operator import api, staging
from finetune_operator.controller import Outcome
from finetune_operator.objects import (
    Condition,
    ContainerState,
    ContainerStatus,
    Pod,
    Terminated,
    Waiting,
)
from finetune_operator.plan import plan_job
from finetune_operator.settings import Settings, SettingsError
from finetune_operator.status import (
    Failure,
    FineTuneJobStatus,
    Observed,
    StagingWait,
    derive,
)
from finetune_operator.story import notes
from finetune_operator.translate import to_trainer_config
from finetune_trainer.staging_report import (
    BAD_INPUT,
    STAGING_FAILED,
    SourceReport,
    StagingFailure,
    StagingReport,
    parse_message,
)
from helpers import ROOT, load_yaml

T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"
CLAIM = staging.CacheClaim("finetune-cache", managed=True, access_mode="ReadWriteOnce")
#: config.json keys of a model no catalog knows (a 3B Llama).
CONFIG = {
    "model_type": "llama",
    "hidden_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 24,
    "num_key_value_heads": 8,
    "intermediate_size": 8192,
    "vocab_size": 128256,
    "tie_word_embeddings": True,
}


def report(config: dict[str, Any] | None = None, **model: Any) -> StagingReport:
    return StagingReport(
        model=SourceReport(
            kind="hf",
            source="example-org/llama-3b",
            commit="c" * 40,
            bytes=1000,
            fetched_bytes=1000,
            seconds=1.2,
            **model,
        ),
        dataset=SourceReport(kind="hf", source="org/data", commit="d" * 40, bytes=10, seconds=0.5),
        config=CONFIG if config is None else config,
        vocab_size=128256,
    )


def ended(code: int, message: str, *, phase: str | None = None) -> Pod:
    state = ContainerState(
        terminated=Terminated(code, "Completed" if code == 0 else "Error", message)
    )
    return Pod(
        "j-staging-abc",
        phase=phase or ("Succeeded" if code == 0 else "Failed"),
        container_statuses=(ContainerStatus(staging.CONTAINER, state=state),),
    )


def job(*conditions: str, failed: int = 0, message: str = "") -> staging.StagingJob:
    return staging.StagingJob(
        "j-staging", tuple(Condition(c, "True", message=message) for c in conditions), failed
    )


def spec_of(doc: dict[str, Any]) -> Any:
    return api.parse(doc).spec


MISTRAL = load_yaml(ROOT / "examples" / "mistral-7b-python-code.yaml")


# --------------------------------------------------------------------------- the message


def test_the_report_and_a_failure_read_back_as_written() -> None:
    assert parse_message(report().line()) == report()
    failure = StagingFailure(BAD_INPUT, "model x has only pickle weights")
    assert parse_message(failure.line()) == failure
    assert failure.permanent
    assert not StagingFailure(STAGING_FAILED, "the Hub failed").permanent


@pytest.mark.parametrize(
    "text",
    [None, "", "Error: OOM", "[1, 2]", '{"version": 1}', "Traceback (most recent call last):"],
)
def test_anything_else_is_no_message(text: str | None) -> None:
    assert parse_message(text) is None


# --------------------------------------------------------------------------- where it stands


def test_staging_waits_for_its_job() -> None:
    seen = staging.progress("j", None, [], CLAIM)
    assert isinstance(seen, StagingWait)
    assert seen.reason == "Staging"
    assert "j-staging" in seen.message
    assert "finetune-cache" in seen.message


def test_a_complete_job_hands_back_its_report() -> None:
    assert staging.progress("j", job("Complete"), [ended(0, report().line())], CLAIM) == report()


def test_a_complete_job_without_a_report_fails_for_a_retry_to_fix() -> None:
    seen = staging.progress("j", job("Complete"), [ended(0, "")], CLAIM)
    assert isinstance(seen, Failure)
    assert seen.reason == STAGING_FAILED
    assert "without a report" in seen.message


def test_bad_input_fails_at_once_before_the_job_says_so() -> None:
    told = StagingFailure(BAD_INPUT, "no revision 'v9'").line()
    seen = staging.progress("j", job(), [ended(3, told)], CLAIM)
    assert seen == Failure(reason=BAD_INPUT, message="no revision 'v9'")


def test_a_hub_failure_is_retried_then_fails_with_its_reason() -> None:
    told = StagingFailure(STAGING_FAILED, "cannot reach the Hub").line()
    retrying = staging.progress("j", job(failed=1), [ended(1, told)], CLAIM)
    assert isinstance(retrying, StagingWait)
    assert "attempt 1 failed (cannot reach the Hub), retrying" in retrying.message
    pods = [ended(1, told), ended(1, told), ended(1, told)]
    spent = staging.progress("j", job("Failed", failed=3), pods, CLAIM)
    assert spent == Failure(reason=STAGING_FAILED, message="cannot reach the Hub")


def test_a_job_that_failed_without_a_message_points_at_its_logs() -> None:
    seen = staging.progress("j", job("Failed", message="BackoffLimitExceeded"), [], CLAIM)
    assert isinstance(seen, Failure)
    assert seen.reason == STAGING_FAILED
    assert "kubectl logs job/j-staging" in seen.message


def test_a_staging_pod_that_cannot_start_is_a_problem_while_staging() -> None:
    pulling = Pod(
        "j-staging-abc",
        container_statuses=(
            ContainerStatus(
                staging.CONTAINER, "nope:1", ContainerState(waiting=Waiting("ErrImagePull"))
            ),
        ),
    )
    seen = staging.progress("j", job(), [pulling], CLAIM)
    assert isinstance(seen, StagingWait)
    assert seen.reason == "ImagePullBackOff"
    assert seen.problem is not None


# --------------------------------------------------------------------------- what status records


def test_status_records_the_commits_and_the_architecture() -> None:
    recorded = staging.staging_status(report(), CLAIM)
    assert not isinstance(recorded, Failure)
    assert (recorded.model_commit, recorded.dataset_commit) == ("c" * 40, "d" * 40)
    assert (recorded.bytes, recorded.fetched_bytes, recorded.seconds) == (1010, 1000, 2)
    assert recorded.cache == "finetune-cache"
    facts = staging.model_facts(recorded, "hf://example-org/llama-3b")
    assert facts is not None
    assert (facts.num_layers, facts.num_kv_heads, facts.head_dim) == (28, 8, 128)


def test_the_plan_comes_from_the_staged_config() -> None:
    spec = spec_of(apply(MISTRAL, {"spec.model.source": "hf://example-org/llama-3b"}))
    assert plan_job(spec) is None  # no catalog knows the model
    recorded = staging.staging_status(report(), CLAIM)
    assert not isinstance(recorded, Failure)
    planned = plan_job(spec, staging.model_facts(recorded, spec.model.source))
    assert planned is not None
    assert planned.plan.world == 8


def test_a_config_the_planner_cannot_read_is_bad_input() -> None:
    recorded = staging.staging_status(
        report({"model_type": "t5", "is_encoder_decoder": True}), CLAIM
    )
    assert isinstance(recorded, Failure)
    assert recorded.reason == BAD_INPUT
    assert "encoder-decoder" in recorded.message


def test_an_empty_config_leaves_the_plan_to_the_catalog() -> None:
    recorded = staging.staging_status(report({}), CLAIM)
    assert not isinstance(recorded, Failure)
    assert recorded.model is None
    assert staging.model_facts(recorded, "hf://x/y") is None


def test_the_trainer_is_pinned_to_the_staged_commits_without_a_token() -> None:
    spec = spec_of(apply(MISTRAL, {"spec.dataset.source": "hf://org/data@main"}))
    config = to_trainer_config(spec, name="j", default_output_dir="/tmp/output")
    assert config.model.token_env == "HF_TOKEN"
    recorded = staging.staging_status(report(), CLAIM)
    assert not isinstance(recorded, Failure)
    pinned = staging.pinned(config, recorded)
    assert pinned.model.revision == "c" * 40
    assert pinned.data.revision == "d" * 40
    assert pinned.model.token_env is None
    assert pinned.model.name_or_path == config.model.name_or_path


def test_local_sources_keep_their_paths() -> None:
    spec = spec_of(
        apply(
            MISTRAL,
            {"spec.model.source": "pvc://models/base", "spec.model.tokenSecretRef": None,
             "spec.dataset.source": "file:///data/train.jsonl"},
        )
    )  # fmt: skip
    config = to_trainer_config(spec, name="j", default_output_dir="/tmp/output")
    recorded = staging.staging_status(
        StagingReport(
            model=SourceReport(kind="local", source="/mnt/pvc/models/base"),
            dataset=SourceReport(kind="local", source="/data/train.jsonl"),
            config=CONFIG,
            vocab_size=128256,
        ),
        CLAIM,
    )
    assert not isinstance(recorded, Failure)
    pinned = staging.pinned(config, recorded)
    assert (pinned.model.revision, pinned.data.revision) == (None, None)
    assert pinned.data.name_or_path == "/data/train.jsonl"


# --------------------------------------------------------------------------- which jobs stage


@pytest.mark.parametrize(
    ("model", "dataset", "staged"),
    [
        ("hf://org/m", "hf://org/d", True),
        ("pvc://models/base", "builtin://python-stdlib-alpaca", True),  # its config.json
        ("file:///models/base", "file:///data/train.jsonl", True),
        ("builtin://tiny-llama", "hf://org/d", True),  # the data is downloaded
        ("builtin://tiny-llama", "builtin://python-stdlib-alpaca", False),
        ("builtin://tiny-llama", "pvc://data/train.jsonl", False),  # nothing to fetch or read
    ],
)
def test_what_is_staged(model: str, dataset: str, staged: bool) -> None:
    doc = apply(
        MISTRAL,
        {"spec.model.source": model, "spec.model.tokenSecretRef": None,
         "spec.dataset.source": dataset},
    )  # fmt: skip
    assert staging.needed(spec_of(doc)) is staged


# --------------------------------------------------------------------------- the cache claim


def test_a_multi_node_job_needs_a_read_write_many_cache() -> None:
    two = spec_of(apply(MISTRAL, {"spec.resources.numNodes": 2}))
    claim = staging.cache_claim(two)
    assert (claim.name, claim.access_mode) == (staging.DEFAULT_CLAIM_RWX, "ReadWriteMany")
    own = staging.cache_claim(
        spec_of(apply(MISTRAL, {"spec.resources.numNodes": 2, "spec.cache": "c"}))
    )
    single = staging.ClaimView("c", "Bound", ("ReadWriteOnce",))
    problem = staging.cache_problem(own, single)
    assert problem is not None
    assert problem.reason == "CacheUnavailable"
    assert "ReadWriteMany" in problem.message
    assert staging.cache_problem(own, staging.ClaimView("c", "Bound", ("ReadWriteMany",))) is None


def test_a_named_cache_that_does_not_exist_is_said_and_the_default_one_is_made() -> None:
    own = staging.cache_claim(spec_of(apply(MISTRAL, {"spec.cache": "models-cache"})))
    problem = staging.cache_problem(own, None)
    assert problem is not None
    assert "models-cache" in problem.message
    assert staging.cache_problem(staging.cache_claim(spec_of(MISTRAL)), None) is None


def test_the_cache_settings_come_from_the_environment() -> None:
    settings = Settings.from_env(
        {"FINETUNE_CACHE_STORAGE_CLASS": "nfs", "FINETUNE_CACHE_SIZE": "2Ti"}
    )
    assert settings.cache == staging.CacheSettings(storage_class="nfs", size="2Ti")
    assert Settings.from_env({}).cache == staging.CacheSettings(None, "200Gi")
    with pytest.raises(SettingsError, match="FINETUNE_CACHE_SIZE"):
        Settings.from_env({"FINETUNE_CACHE_SIZE": "lots"})


# --------------------------------------------------------------------------- status and story


def test_staging_is_a_phase_with_a_staged_condition() -> None:
    wait = StagingWait("Staging", "the staging Job j-staging resolves ...")
    status = derive(Observed(1, False, staging_wait=wait), None, T0)
    assert status.phase == "Staging"
    staged = next(c for c in status.conditions or [] if c.type == "Staged")
    assert (staged.status, staged.reason) == ("False", "Staging")
    assert status.failure is None


def test_a_staging_failure_fails_the_job_with_its_reason() -> None:
    failure = Failure(reason=BAD_INPUT, message="no revision 'v9'")
    status = derive(Observed(1, False, staging_failure=failure), None, T0)
    assert (status.phase, status.failure) == ("Failed", failure)
    assert status.completion_time == T0
    types = {c.type: (c.status, c.reason) for c in status.conditions or []}
    assert types["Staged"] == ("False", BAD_INPUT)
    assert types["Failed"] == ("True", BAD_INPUT)


def test_what_was_staged_stays_in_status() -> None:
    recorded = staging.staging_status(report(), CLAIM)
    assert not isinstance(recorded, Failure)
    planned = derive(Observed(1, False, staging=recorded), None, T0)
    assert planned.staging == recorded
    later = derive(Observed(1, False), planned, T1)  # a refresh: nothing staged just now
    assert later.staging == recorded
    staged = next(c for c in later.conditions or [] if c.type == "Staged")
    assert (staged.status, staged.last_transition_time) == ("True", T0)
    assert "model cccccccccccc, dataset dddddddddddd staged" in staged.message


def _told(
    before: str | None, status: FineTuneJobStatus, doc: dict[str, Any] = MISTRAL
) -> list[tuple[str, str]]:
    outcome = Outcome(before, status.phase, status, True, api.parse(doc))
    return [(n.type, n.reason) for n in notes(outcome)]


def test_the_story_tells_staging_and_what_the_spec_allowed() -> None:
    staging_now = derive(
        Observed(1, False, staging_wait=StagingWait("Staging", "downloading")), None, T0
    )
    assert _told(None, staging_now) == [("Normal", "Staging")]
    allowing = apply(
        MISTRAL, {"spec.model.allowPickleWeights": True, "spec.model.allowRemoteCode": True}
    )
    assert _told(None, staging_now, allowing) == [
        ("Normal", "Staging"),
        ("Warning", "PickleWeightsAllowed"),
        ("Warning", "RemoteCodeAllowed"),
    ]
    recorded = staging.staging_status(report().model_copy(update={"warnings": ("pickle",)}), CLAIM)
    assert not isinstance(recorded, Failure)
    planned = derive(Observed(1, False, staging=recorded), staging_now, T1)
    assert _told("Staging", planned) == [
        ("Normal", "Staged"),
        ("Warning", "StagingWarning"),
        ("Normal", "Planned"),
    ]
    failed = derive(
        Observed(1, False, staging_failure=Failure(reason=BAD_INPUT, message="x")), staging_now, T1
    )
    assert _told("Staging", failed) == [("Warning", BAD_INPUT)]


def test_a_cache_claim_that_is_not_bound_says_what_to_check() -> None:
    unbound = Pod(
        "j-staging-abc",
        phase="Pending",
        conditions=(
            Condition(
                "PodScheduled",
                "False",
                "Unschedulable",
                "0/4 nodes are available: pod has unbound immediate PersistentVolumeClaims. "
                "preemption: 0/4 nodes are available: 4 Preemption is not helpful for scheduling.",
            ),
        ),
    )
    seen = staging.progress("j", job(), [unbound], CLAIM)
    assert isinstance(seen, StagingWait)
    assert seen.reason == "CachePending"
    assert "cache claim finetune-cache to be bound" in seen.message
    assert "ReadWriteOnce volume" in seen.message
