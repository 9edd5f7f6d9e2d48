"""The oldest supported Kubernetes, v1.31: the API tests of the FineTuneJob CRD on an API-only
test bed of it (etcd 3.4 + kube-apiserver v1.31, the ``oldest_testbed`` fixture), beside the
main test bed (v1.35).

The tests are tests/integration/test_api_server.py's own, collected here a second time with
``crd`` (which they use through their ``api`` fixture) bound to the v1.31 API server: the CRD
installs, accepts the examples, refuses every bad spec of the table with the field's name (its
CEL rules compile and run on v1.31), enforces immutability, explains itself, shows its printer
columns.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from test_api_server import (  # noqa: F401  (collected here again, against v1.31)
    api,
    test_api_server_accepts_example,
    test_api_server_refuses_bad_spec_naming_the_field,
    test_immutable_fields_are_refused_on_a_stored_job,
    test_kubectl_explain_prints_the_field_docs,
    test_kubectl_get_ftj_shows_the_story_columns,
)

from helpers import ROOT

pytestmark = pytest.mark.integration

CRD = "finetunejobs.finetune.dev"


@pytest.fixture(scope="module")
def crd(oldest_testbed: Any) -> Any:
    """The Kubernetes 1.31 test bed with the FineTuneJob CRD installed from crds/."""
    crd_file = str(ROOT / "crds" / "finetunejob.yaml")
    applied = oldest_testbed.kubectl("apply", "--server-side", "--force-conflicts", "-f", crd_file)
    assert applied.returncode == 0, applied.stderr
    oldest_testbed.kubectl(
        "wait", "--for=condition=Established", f"crd/{CRD}", "--timeout=60s", check=True
    )
    return oldest_testbed


def test_the_api_server_is_the_oldest_supported(crd: Any) -> None:
    version = crd.kubectl_json("version")["serverVersion"]
    assert (version["major"], version["minor"]) == ("1", "31")
