"""The operator image installs ``.[operator]`` only: that must work without torch."""

from __future__ import annotations

import subprocess
import venv
from pathlib import Path

import pytest

from helpers import ROOT


@pytest.mark.slow
def test_operator_extra_installs_without_torch(tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    install = subprocess.run(
        [str(py), "-m", "pip", "install", "--quiet", f"{ROOT}[operator]"],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert install.returncode == 0, install.stderr[-3000:]

    probe = "import importlib.util as u; print(u.find_spec('torch') is None)"
    assert (
        subprocess.run(
            [str(py), "-c", probe], capture_output=True, text=True, check=True
        ).stdout.strip()
        == "True"
    )
    for module in ("kopf", "kubernetes", "finetune_operator.api", "finetune_trainer.planner"):
        subprocess.run([str(py), "-c", f"import {module}"], check=True, timeout=120)

    example = ROOT / "examples" / "mistral-7b-python-code.yaml"
    result = subprocess.run(
        [str(env_dir / "bin" / "finetune"), "validate", str(example)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
