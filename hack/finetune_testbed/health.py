"""Is each component up? Its own health endpoint, asked over loopback (``up`` and ``status``)."""

from __future__ import annotations

import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from . import provisioner, rendezvous
from .procs import pid_alive
from .state import State


def http_ok(url: str, token: str | None = None, cafile: str | None = None) -> bool:
    """GET ``url`` answers 200 within 2 s (https: verified against ``cafile``, if given)."""
    ctx = None
    if url.startswith("https"):
        ctx = ssl.create_default_context(cafile=cafile)
        if not cafile:  # the component's self-signed serving cert
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=2.0, context=ctx) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def probe(st: State, component: str) -> Callable[[], bool]:
    """The readiness check of one component of the test bed ``st``."""
    p = st.ports
    ca = str(st.ca)
    urls: dict[str, Callable[[], bool]] = {
        "etcd": lambda: http_ok(f"http://127.0.0.1:{p['etcd']}/health"),
        "kube-apiserver": lambda: http_ok(f"{st.server}/readyz", st.admin_token, ca),
        "kube-controller-manager": lambda: http_ok(f"https://127.0.0.1:{p['kcm']}/healthz"),
        "kube-scheduler": lambda: http_ok(f"https://127.0.0.1:{p['scheduler']}/healthz"),
        "kwok": lambda: http_ok(f"https://127.0.0.1:{p['kwok']}/healthz", cafile=ca),
        "training-operator": lambda: http_ok(f"http://127.0.0.1:{p['to-probe']}/readyz"),
        "kueue": lambda: http_ok(f"http://127.0.0.1:{p['kueue-probe']}/readyz"),
        "jobset": lambda: http_ok(f"http://127.0.0.1:{p['jobset-probe']}/readyz"),
        "trainer": lambda: http_ok(f"http://127.0.0.1:{p['trainer-probe']}/readyz"),
        "rendezvous": lambda: rendezvous.alive(st.state_dir),
        "provisioner": lambda: provisioner.alive(st.state_dir),
        # not imported: that module needs the trainer's Python packages, `status` must not
        "trainer-metrics": lambda: beat(st.state_dir / "trainer-metrics.heartbeat"),
    }
    return urls[component]


def beat(heartbeat: Path, within: float = 10.0) -> bool:
    """A component's loop has touched its heartbeat file in the last ``within`` seconds."""
    try:
        return time.time() - heartbeat.stat().st_mtime < within
    except OSError:
        return False


def all_alive(st: State) -> bool:
    """Every process of the test bed exists (cheap; says nothing about health)."""
    return bool(st.pids) and all(pid_alive(pid) for pid in st.pids.values())


def component_ok(st: State, component: str) -> bool:
    pid = st.pids.get(component)
    return pid is not None and pid_alive(pid) and probe(st, component)()


def healthy(st: State) -> bool:
    """Every component of the test bed is alive and answers its health check."""
    return all(component_ok(st, c) for c in st.components)
