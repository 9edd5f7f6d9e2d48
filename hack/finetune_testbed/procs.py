"""Process supervision: start the components detached, watch them start, stop them by pid.

Every component leads its own process group (``start_new_session``), logs to
``<state dir>/logs/<name>.log`` and has its pid in ``<state dir>/pids/<name>.pid``; the pids also
go into state.json, which is how ``down`` and ``status`` find them from another process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from .log import TestbedError, log

STOP_GRACE_SECONDS = 15


class Supervisor:
    """The processes of one test bed: those it started, and those already running (``adopted``)."""

    def __init__(self, state_dir: Path, adopted: Mapping[str, int] | None = None) -> None:
        self.state_dir = state_dir
        self.logs = state_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self._adopted = dict(adopted or {})
        self._started: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def pids(self) -> dict[str, int]:
        return {**self._adopted, **{n: p.pid for n, p in self._started.items()}}

    def start(
        self, name: str, cmd: Sequence[str | Path], env: Mapping[str, str] | None = None
    ) -> None:
        """Start ``cmd`` detached, without KUBECONFIG and with loopback exempt from proxies."""
        e = dict(os.environ)
        e.pop("KUBECONFIG", None)
        e["NO_PROXY"] = e["no_proxy"] = "127.0.0.1,localhost"
        e.update(env or {})
        argv = [str(c) for c in cmd]
        with (self.logs / f"{name}.log").open("ab") as logf:
            p = subprocess.Popen(
                argv,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=e,
                cwd=self.state_dir,
                start_new_session=True,
                close_fds=True,
            )
        self._started[name] = p
        (self.state_dir / "pids").mkdir(exist_ok=True)
        (self.state_dir / "pids" / f"{name}.pid").write_text(f"{p.pid} {argv[0]}\n")

    def check_alive(self) -> None:
        """Raise, with the end of its log, if a component this supervisor started has exited."""
        for name, p in self._started.items():
            if p.poll() is not None:
                tail = (self.logs / f"{name}.log").read_text(errors="replace")[-4000:]
                raise TestbedError(f"{name} exited with {p.returncode}; last log lines:\n{tail}")

    def wait_for(self, what: str, ready: Callable[[], bool], timeout: float) -> None:
        """Poll ``ready`` every 0.25 s until it is true; fail early if a component exits."""
        t0 = time.time()
        while True:
            self.check_alive()
            if ready():
                log(f"{what} ready ({time.time() - t0:.1f}s)")
                return
            if time.time() - t0 > timeout:
                raise TestbedError(f"timed out after {timeout:g}s waiting for {what}")
            time.sleep(0.25)


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """A memory field of /proc/<pid>/status in KiB (VmRSS now, VmHWM the peak); 0 if gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def stop(pids: Mapping[str, int], order: Iterable[str]) -> list[str]:
    """SIGTERM each process group in ``order`` (then the rest), SIGKILL after a grace period.

    Returns the names of those still alive afterwards.
    """
    order = list(order)
    names = [n for n in order if n in pids] + [n for n in pids if n not in order]
    for name in names:
        _stop_one(name, pids[name])
    return [n for n in names if pid_alive(pids[n])]


def _stop_one(name: str, pid: int) -> None:
    if not pid_alive(pid):
        return
    try:
        os.killpg(pid, signal.SIGTERM)  # each component leads its own process group
    except ProcessLookupError:
        return
    except PermissionError:
        os.kill(pid, signal.SIGTERM)
    deadline = time.time() + STOP_GRACE_SECONDS
    while pid_alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    if pid_alive(pid):
        log(f"{name} (pid {pid}) did not stop: SIGKILL")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
