"""`finetune validate` reads a manifest as kubectl does: the same YAML text, sent by the real
kubectl to the real API server, is accepted or refused exactly when `finetune validate` accepts
or refuses it, and kubectl's own JSON for it is what our loader produces."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from finetune_operator import kubeyaml
from helpers import ROOT

pytestmark = pytest.mark.integration

EXAMPLE = (ROOT / "examples" / "tiny-local.yaml").read_text(encoding="utf-8")

# (id, line of the example, its replacement, does the API server accept it?)
CASES = [
    ("exponent-no-dot", 'learningRate: "1e-3"', "learningRate: 1e-3", False),
    ("exponent-quoted", 'learningRate: "1e-3"', "learningRate: '1e-3'", True),
    ("integral-exponent", "maxSteps: 60", "maxSteps: 6e1", True),
    ("bool-y", "packing: true", "packing: y", True),
    ("bool-off", "packing: true", "packing: off", True),
    ("bool-word-as-string", "format: alpaca", "format: no", False),
    ("octal-looking", "maxSeqLength: 512", "maxSeqLength: 01000", True),
    ("go-octal-prefix", "gpuType: CPU", "gpuType: 0o17", False),
    ("not-octal", "gpuType: CPU", "gpuType: 012345678", False),
    ("base-60", "gpuType: CPU", "gpuType: 1:20", False),  # a string, but no such GPU either way
    ("tilde-null", "evalEverySteps: 20", "evalEverySteps: ~", True),
    ("date", "format: alpaca", "format: alpaca\n    split: 2024-01-01", True),
]


def _manifest(line: str, replacement: str, name: str) -> str:
    assert line in EXAMPLE, f"the example no longer has {line!r}"
    return EXAMPLE.replace(line, replacement, 1).replace("name: tiny-local", f"name: {name}")


@pytest.fixture(scope="module")
def namespace(crd: Any) -> Iterator[str]:
    name = f"ftj-yaml-{uuid.uuid4().hex[:6]}"
    crd.kubectl("create", "namespace", name, check=True)
    crd.wait_for(
        lambda: crd.kubectl("get", "ftj", "-n", name).returncode == 0,
        timeout=60,
        desc="ftj to be served",
    )
    yield name
    crd.kubectl("delete", "namespace", name, "--wait=false")


def _validate(path: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "finetune"
    return subprocess.run(
        [str(exe), "validate", str(path)], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize(
    ("line", "replacement", "accepted"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_validate_agrees_with_kubectl_and_the_api_server(
    crd: Any, namespace: str, tmp_path: Path, line: str, replacement: str, accepted: bool
) -> None:
    text = _manifest(line, replacement, f"yaml-{uuid.uuid4().hex[:6]}")
    path = tmp_path / "job.yaml"
    path.write_text(text)

    # kubectl's own conversion of the text to JSON (client side) is what we load.
    converted = crd.kubectl("create", "--dry-run=client", "-o", "json", "-n", namespace,
                            "-f", str(path))  # fmt: skip
    assert converted.returncode == 0, converted.stderr
    kubectl_view = json.loads(converted.stdout)
    (ours,) = kubeyaml.load_all(text)
    assert isinstance(ours, dict)
    assert kubectl_view["spec"] == ours["spec"]
    assert kubectl_view["metadata"]["name"] == ours["metadata"]["name"]

    server = crd.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(path))
    ours_says = _validate(path)
    assert (server.returncode == 0) is accepted, server.stderr
    assert (ours_says.returncode == 0) is accepted, ours_says.stdout + ours_says.stderr
