"""README's cluster walk-through, run as a user runs it: ``hack/walkthrough`` in a terminal.

The script brings up the test bed with the fake trainer's metrics (``--trainer-metrics``),
installs the CRD, starts ``finetune operator``, creates the secret and the claims the example
needs, applies the Mistral example (with a 30 s run on the test bed) and follows it with
``kubectl finetune watch`` to Succeeded, then ``kubectl get ftj`` and ``finetune describe``. It
runs under a pseudo-terminal, so ``watch`` draws its live progress bar as a user sees it, and the
test reads what was drawn: the loss falling while the job runs, Succeeded, the final PROGRESS and
LOSS columns, all from the metrics the fake master pod served.
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from helpers import ROOT

pytestmark = pytest.mark.e2e

SCRIPT = ROOT / "hack" / "walkthrough"
README = ROOT / "README.md"
HEADING = "### Walk-through on the local test bed"
JOB = "mistral-7b-python-code"
TIMEOUT = 300
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\r")


def script_steps() -> str:
    """The steps the script runs: its STEPS here-document."""
    text = SCRIPT.read_text()
    return text.split("<<'STEPS'\n", 1)[1].split("\nSTEPS\n", 1)[0]


def readme_steps() -> str:
    """The shell block of README's walk-through section."""
    section = README.read_text().split(HEADING, 1)[1]
    return section.split("```sh\n", 1)[1].split("\n```", 1)[0]


def run_in_terminal(env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Run the script on a pseudo-terminal (as in a user's shell); its exit code and output."""
    main, child = pty.openpty()
    proc = subprocess.Popen(
        [str(SCRIPT)],
        stdin=child,
        stdout=child,
        stderr=child,
        env=env,
        cwd=ROOT,
        close_fds=True,
        start_new_session=True,  # its own process group: the operator it starts goes with it
    )
    os.close(child)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main], [], [], 1.0)
            if ready:
                try:
                    data = os.read(main, 65536)
                except OSError:  # EIO: every writer has closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        else:
            os.killpg(proc.pid, signal.SIGKILL)
    finally:
        os.close(main)
    code = proc.wait(timeout=30)
    return code, b"".join(chunks).decode(errors="replace")


def after(output: str, step: str) -> str:
    """What the step printed (up to the next step)."""
    return output.split(f"$ {step}\n", 1)[1].split("\n$ ", 1)[0]


@pytest.fixture
def walkthrough(gpu_testbed: Any) -> Any:
    if gpu_testbed.external:
        pytest.skip("the walk-through runs the test bed's own hack/cluster (not KUBECONFIG's)")
    ns = f"walk-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}  # as a user starts
    env.update(
        WALKTHROUGH_NAMESPACE=ns,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        COLUMNS="120",
        LINES="40",
        TERM="xterm",
    )
    t0 = time.monotonic()
    code, output = run_in_terminal(env, TIMEOUT)
    seconds = time.monotonic() - t0
    yield code, output, seconds
    gpu_testbed.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found")


def test_readme_walkthrough_is_the_script() -> None:
    assert readme_steps() == script_steps()


def test_readme_walkthrough_runs_to_succeeded_showing_progress(walkthrough: Any) -> None:
    code, raw, seconds = walkthrough
    output = ANSI.sub("", raw).replace("\r\n", "\n")
    assert code == 0, output[-6000:]
    assert seconds < 240, f"the walk-through took {seconds:.0f}s"  # ~60 s idle, 100 s at load 11

    # Every step, in README order, printed as it runs.
    lines = script_steps().splitlines()
    printed = [line[2:] for line in output.splitlines() if line.startswith("$ ")]
    assert printed == [line for line in lines if line in printed]
    assert len(printed) == 12  # ns, up, env, crd, namespace, operator, secret, claims, apply, ...

    # watch: Running, a loss that falls while it runs (the served metrics), then Succeeded.
    watched = after(output, f"kubectl finetune watch {JOB} -n $ns")
    assert f"{JOB}: Running" in watched
    assert f"{JOB}: Succeeded" in watched
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d{4})", watched)]
    distinct = list(dict.fromkeys(losses))
    assert len(distinct) >= 3, watched[-3000:]
    assert distinct[0] > distinct[-1]
    assert all(1.0 < loss < 11.0 for loss in distinct)

    # kubectl get ftj: every step done, and the last loss.
    table = after(output, "kubectl get ftj -n $ns").strip().splitlines()
    header, row = table[0].split(), table[1]
    assert {"PHASE", "PROGRESS", "LOSS"} <= set(header)
    assert "Succeeded" in row
    assert "300/300 (100%)" in row
    assert f"{distinct[-1]:.4f}" in row

    described = after(output, f"finetune describe {JOB} -n $ns")
    assert re.search(r"Progress\s+300/300 \(100%\), loss \d+\.\d{4}", described)
    assert re.search(r"Checkpoint\s+step 300 in", described)
