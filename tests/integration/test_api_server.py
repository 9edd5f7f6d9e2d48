"""The generated CRD in a real API server: it installs, accepts the examples, refuses every bad
spec of the unit table with the field's name, enforces immutability, and explains itself."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bad_specs import BAD, Bad, apply
from helpers import EXAMPLES, load_yaml

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def api(crd: Any) -> Iterator[tuple[Any, str]]:
    """The test bed with our CRD installed (the ``crd`` fixture), and a fresh namespace."""
    namespace = f"ftj-api-{uuid.uuid4().hex[:6]}"
    crd.kubectl("create", "namespace", namespace, check=True)
    # Discovery can lag behind Established for a moment.
    crd.wait_for(
        lambda: crd.kubectl("get", "ftj", "-n", namespace).returncode == 0,
        timeout=60,
        desc="ftj to be served",
    )
    yield crd, namespace
    crd.kubectl("delete", "namespace", namespace, "--wait=false")


def _dry_run(api: tuple[Any, str], document: dict[str, Any]) -> Any:
    testbed, namespace = api
    return testbed.kubectl(
        "apply", "--dry-run=server", "-n", namespace, "-f", "-", input=json.dumps(document)
    )


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_api_server_accepts_example(api: tuple[Any, str], path: Path) -> None:
    result = _dry_run(api, load_yaml(path))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("bad", BAD, ids=lambda b: b.id)
def test_api_server_refuses_bad_spec_naming_the_field(
    api: tuple[Any, str], bad: Bad, tiny_job: dict[str, Any]
) -> None:
    result = _dry_run(api, apply(tiny_job, bad.changes))
    assert result.returncode != 0, "the API server accepted it"
    assert bad.path in result.stderr, result.stderr
    # One mistake, one message (Kubernetes' own note that CEL was skipped is not about a field).
    assert len(field_errors(result.stderr)) == 1, result.stderr


#: What the API server adds when a type/enum/required error stops it from running the CEL rules.
CEL_SKIPPED = "some validation rules were not checked because the object was invalid"


def field_errors(stderr: str) -> list[str]:
    """The field errors of an ``is invalid`` answer: one inline, or one ``* ``-line each."""
    rest = stderr.strip().partition(" is invalid: ")[2]
    lines = [line[2:] for line in rest.splitlines() if line.startswith("* ")] or [rest]
    return [line for line in lines if CEL_SKIPPED not in line]


def test_immutable_fields_are_refused_on_a_stored_job(
    api: tuple[Any, str], tiny_job: dict[str, Any]
) -> None:
    testbed, namespace = api
    tiny_job["metadata"]["name"] = "immutable-check"
    created = testbed.apply(tiny_job, "-n", namespace)
    assert created.returncode == 0, created.stderr

    changed_model = apply(tiny_job, {"spec.model.source": "builtin://tiny-llama"})
    refused = testbed.apply(changed_model, "-n", namespace)
    assert refused.returncode != 0
    assert "model is immutable" in refused.stderr

    longer = apply(tiny_job, {"spec.hyperparameters.maxSteps": 200})
    accepted = testbed.apply(longer, "-n", namespace)
    assert accepted.returncode == 0, accepted.stderr


def test_kubectl_explain_prints_the_field_docs(api: tuple[Any, str]) -> None:
    testbed, _ = api
    result = testbed.kubectl("explain", "finetunejob.spec.dataset.packing")
    assert result.returncode == 0, result.stderr
    assert "per-document position ids" in result.stdout
    top = testbed.kubectl("explain", "ftj.spec.hyperparameters")
    assert "learningRate" in top.stdout
    assert "epochs or maxSteps is required" in top.stdout


def test_kubectl_get_ftj_shows_the_story_columns(
    api: tuple[Any, str], tiny_job: dict[str, Any]
) -> None:
    testbed, namespace = api
    tiny_job["metadata"]["name"] = "columns-check"
    assert testbed.apply(tiny_job, "-n", namespace).returncode == 0
    header = testbed.kubectl("get", "ftj", "-n", namespace).stdout.splitlines()[0].split()
    assert header == [
        "NAME", "PHASE", "MODEL", "GPUS", "PLAN", "PROGRESS", "LOSS", "REASON", "AGE"
    ]  # fmt: skip
    wide = testbed.kubectl("get", "ftj", "-n", namespace, "-o", "wide").stdout.splitlines()[0]
    assert wide.split()[-2:] == ["AGE", "MESSAGE"]  # what to do about it: only in -o wide
    listed = testbed.kubectl("get", "finetune", "-n", namespace, "-o", "name").stdout
    assert "finetunejob.finetune.dev/columns-check" in listed
