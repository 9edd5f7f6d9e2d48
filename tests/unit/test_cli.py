"""The ``finetune`` command as a user runs it: the installed console scripts, in a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune_operator import crd
from helpers import EXAMPLES, ROOT

SCRIPT_DIR = Path(sys.executable).parent


def run(
    *args: str, stdin: str | None = None, script: str = "finetune"
) -> subprocess.CompletedProcess[str]:
    exe = SCRIPT_DIR / script
    assert exe.exists(), f"{script} is not installed next to {sys.executable}"
    return subprocess.run(
        [str(exe), *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


def test_validate_accepts_every_example() -> None:
    result = run("validate", *map(str, EXAMPLES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("valid FineTuneJob") == len(EXAMPLES)


def test_validate_prints_one_line_per_problem_with_its_path(tmp_path: Path) -> None:
    doc = yaml.safe_load((ROOT / "examples" / "tiny-local.yaml").read_text())
    doc["spec"]["hyperparameters"]["learningRate"] = 0.001
    doc["spec"]["dataset"]["format"] = "sharegpt"
    doc["spec"]["resources"]["tolerations"] = [{"operator": "Exists", "value": "x"}]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    result = run("validate", str(bad))
    assert result.returncode == 1
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2, lines  # the CEL rule runs once the types are right
    assert any("spec.hyperparameters.learningRate: must be a string" in line for line in lines)
    assert any("spec.dataset.format: 'sharegpt' is not allowed" in line for line in lines)
    assert all(line.startswith(f"✗ {bad}: spec.") for line in lines)


def test_validate_reports_each_document_of_a_multi_document_file(tmp_path: Path) -> None:
    good = (ROOT / "examples" / "tiny-local.yaml").read_text()
    secret = "apiVersion: v1\nkind: Secret\nmetadata: {name: hf-token}\n"
    path = tmp_path / "all.yaml"
    path.write_text(good + "---\n" + secret + "---\n" + good.replace("maxSteps: 60", "epochs: 0"))
    result = run("validate", str(path))
    assert result.returncode == 1
    assert f"{path}#1: valid FineTuneJob tiny-local" in result.stdout
    assert f"{path}#2: skipped (Secret)" in result.stdout
    assert f"{path}#3: spec.hyperparameters.epochs" in result.stdout


def test_validate_reads_stdin() -> None:
    text = (ROOT / "examples" / "tiny-local.yaml").read_text()
    result = run("validate", "-", stdin=text)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("content", "says"),
    [(None, "cannot read"), ("spec: [unclosed\n", "not valid YAML")],
)
def test_unreadable_input_exits_2_with_a_reason(
    tmp_path: Path, content: str | None, says: str
) -> None:
    path = tmp_path / "job.yaml"
    if content is not None:
        path.write_text(content)
    result = run("validate", str(path))
    assert result.returncode == 2
    assert says in result.stderr


def test_crd_prints_the_generated_crd() -> None:
    result = run("crd")
    assert result.returncode == 0
    assert result.stdout == crd.crd_yaml()


def test_installed_as_a_kubectl_plugin() -> None:
    result = run("version", script="kubectl-finetune")
    assert result.returncode == 0
    assert result.stdout.startswith("finetune ")


def test_help_lists_the_commands() -> None:
    result = run("--help")
    assert result.returncode == 0
    for command in ("validate", "crd"):
        assert command in result.stdout
