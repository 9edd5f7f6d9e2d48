"""Shared fixtures. tests/ has no __init__.py, so its modules import as top-level names."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest_plugins = ["testbed"]  # the session-scoped Kubernetes test bed (tests/testbed.py)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden", action="store_true", help="rewrite tests/golden from the builders"
    )


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def committed_crd() -> dict[str, Any]:
    return load_yaml(ROOT / "crds" / "finetunejob.yaml")


@pytest.fixture
def tiny_job() -> dict[str, Any]:
    """A fresh copy of the offline example, to mutate."""
    return copy.deepcopy(load_yaml(ROOT / "examples" / "tiny-local.yaml"))
