"""Fixtures for the chart, image and monitoring tests (the real helm, kubeconform, promtool)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from chartkit import CHART, KUBE_VERSION, prometheus_paths, tool_paths, write_all_schemas


@pytest.fixture(scope="session")
def tools() -> dict[str, str]:
    try:
        return tool_paths()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def prom() -> dict[str, str]:
    try:
        return prometheus_paths()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def schemas(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("schemas")
    write_all_schemas(dest)
    return dest


class Helm:
    def __init__(self, binary: str) -> None:
        self.binary = binary

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run(
            [self.binary, *args], capture_output=True, text=True, check=False, timeout=120
        )
        if check and p.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{p.stderr}")
        return p

    def template(
        self, *values: Path, namespace: str = "finetune-system", check: bool = True, **sets: str
    ) -> subprocess.CompletedProcess:
        args = ["template", "ft", str(CHART), "-n", namespace, f"--kube-version={KUBE_VERSION}"]
        for v in values:
            args += ["-f", str(v)]
        for key, value in sets.items():
            args += ["--set", f"{key}={value}"]
        return self.run(*args, check=check)


@pytest.fixture(scope="session")
def helm(tools: dict[str, str]) -> Helm:
    return Helm(tools["helm"])
