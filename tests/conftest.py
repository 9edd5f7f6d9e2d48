"""Shared fixtures. tests/ has no __init__.py, so its modules import as top-level names."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from helpers import ROOT, load_yaml

# The session-scoped Kubernetes test bed, and the operator process on top of it.
pytest_plugins = ["testbed", "operator_fixtures"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden", action="store_true", help="rewrite tests/golden from the builders"
    )


@pytest.fixture(scope="session")
def committed_crd() -> dict[str, Any]:
    return load_yaml(ROOT / "crds" / "finetunejob.yaml")


@pytest.fixture
def tiny_job() -> dict[str, Any]:
    """A fresh copy of the offline example, to mutate."""
    return copy.deepcopy(load_yaml(ROOT / "examples" / "tiny-local.yaml"))
