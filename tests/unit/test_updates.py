"""Updates: fields that would corrupt a running job are immutable; the others may change."""

from __future__ import annotations

from typing import Any

import pytest

from bad_specs import apply
from finetune_operator.api import validate_document

IMMUTABLE = [
    ({"spec.model.source": "builtin://tiny-llama"}, "spec.model", "immutable"),
    ({"spec.dataset.maxSeqLength": 1024}, "spec.dataset", "immutable"),
    ({"spec.method.type": "lora"}, "spec.method", "immutable"),
    ({"spec.hyperparameters.seed": 7}, "spec.hyperparameters", "seed is immutable"),
    ({"spec.checkpoint.storage": "file:///elsewhere"}, "spec.checkpoint.storage", "immutable"),
]

MUTABLE = [
    {"spec.hyperparameters.maxSteps": 120},
    {"spec.runPolicy.suspend": True},
    {"spec.checkpoint.everySteps": 10},
    {"spec.resources.cpu": "4"},
]


@pytest.mark.parametrize(("changes", "path", "says"), IMMUTABLE)
def test_immutable_fields_are_refused_on_update(
    changes: dict[str, Any], path: str, says: str, tiny_job: dict[str, Any]
) -> None:
    problems = validate_document(apply(tiny_job, changes), old=tiny_job)
    assert any(p.path == path and says in p.message for p in problems), problems


@pytest.mark.parametrize("changes", MUTABLE)
def test_mutable_fields_may_change(changes: dict[str, Any], tiny_job: dict[str, Any]) -> None:
    assert validate_document(apply(tiny_job, changes), old=tiny_job) == []


def test_immutable_fields_may_be_anything_on_create(tiny_job: dict[str, Any]) -> None:
    for changes, _, _ in IMMUTABLE:
        assert validate_document(apply(tiny_job, changes)) == []
