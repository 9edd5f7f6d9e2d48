"""Bad FineTuneJobs are rejected, each with a message that names the field.

Every case is checked twice: by the typed model (what ``finetune validate``, the operator and the
trainer use) and by the generated CRD itself (schema + CEL, evaluated as the API server would),
so the two cannot drift apart. The test-bed tests run the same table against a real API server.
"""

from __future__ import annotations

from typing import Any

import pytest

from bad_specs import BAD, Bad, D, H, R, apply
from crdcheck import crd_failures
from finetune_operator.api import SpecError, cel_problems, parse_stored, validate_document


def test_the_table_is_large_enough() -> None:
    assert len(BAD) >= 30
    assert len({b.id for b in BAD}) == len(BAD)


@pytest.mark.parametrize("bad", BAD, ids=lambda b: b.id)
def test_model_rejects_with_field_message(bad: Bad, tiny_job: dict[str, Any]) -> None:
    problems = validate_document(apply(tiny_job, bad.changes))
    named = [p for p in problems if p.path == bad.path]
    assert named, f"no problem names {bad.path}: {[str(p) for p in problems]}"
    assert any(bad.says in p.message for p in named), [str(p) for p in named]
    assert len(problems) == 1, f"one mistake, one message: {[str(p) for p in problems]}"


@pytest.mark.parametrize("bad", BAD, ids=lambda b: b.id)
def test_generated_crd_rejects(bad: Bad, tiny_job: dict[str, Any], committed_crd: Any) -> None:
    failures = crd_failures(committed_crd, apply(tiny_job, bad.changes))
    assert failures, "the CRD accepted it"
    assert len(failures) == 1, f"one mistake, one message: {failures}"
    # the field itself, or the object that misses it or has it unknown (required, typos)
    field = "." + bad.path
    assert field in failures or field.rpartition(".")[0] in failures, failures


def test_every_problem_is_reported_not_just_the_first(tiny_job: dict[str, Any]) -> None:
    doc = apply(
        tiny_job,
        {f"{H}.learningRate": 1e-3, f"{D}.format": "sharegpt", f"{R}.gpuType": "TPU"},
    )
    paths = {p.path for p in validate_document(doc)}
    assert {f"{H}.learningRate", f"{D}.format", f"{R}.gpuType"} <= paths


def test_not_a_mapping_is_a_problem_not_a_crash() -> None:
    assert validate_document(["a", "list"])[0].message.startswith("a FineTuneJob must be")


def test_what_the_api_server_stored_is_typed_without_its_cel_rules_again(
    tiny_job: dict[str, Any],
) -> None:
    """The operator's reads skip the CEL rules the API server enforced when it stored the
    object; everything else (types, ranges, unknown fields) still stops a bad document."""
    accepted = 0
    for bad in BAD:
        doc = apply(tiny_job, bad.changes)
        try:
            job = parse_stored(doc)
        except SpecError:
            continue  # refused by the types, as parse refuses it
        accepted += 1  # then only a CEL rule refuses it: the same message as parse gives
        said = [p.message for p in cel_problems(job, None)]
        assert any(bad.says in m for m in said), (bad.id, said)
    assert 0 < accepted < len(BAD)
