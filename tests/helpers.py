"""Paths and loaders shared by the tests (tests/ is on sys.path: it has no __init__.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
#: Placeholders in tests/golden, replaced by the real namespace and uid in the e2e tests.
GOLDEN_NAMESPACE, GOLDEN_UID = "golden-namespace", "golden-uid"


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))
