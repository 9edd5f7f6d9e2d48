"""What a running test bed leaves in its state dir for the next command: state.json, env.json.

``state.json`` (ports, pids, binaries, components) is written while ``up`` starts things and read
by ``status``, ``down`` and the next ``up``. ``env.json`` is written when ``up`` has finished and
is what ``env`` prints (``tests/testbed.py`` reads it with ``hack/cluster env --json``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# What `up` starts, in start order (`down` stops them in reverse).
COMPONENTS = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
    "rendezvous",
    "provisioner",
    "training-operator",
)
#: Started only when asked for (``up --trainer-metrics``, ``up --trainer``: JobSet and Kubeflow
#: Trainer, ``up --kueue``), after the others; Kueue last (it sets its TrainJob integration up
#: once the TrainJob CRD is served).
OPTIONAL = ("trainer-metrics", "jobset", "trainer", "kueue")
#: The components of each optional feature.
FEATURES = {
    "trainer-metrics": ("trainer-metrics",),
    "trainer": ("jobset", "trainer"),
    "kueue": ("kueue",),
}
API_ONLY = ("etcd", "kube-apiserver")  # `up --api-only`
CLUSTER_TIER = tuple(c for c in COMPONENTS if c not in API_ONLY)  # the rest of `up`


@dataclass
class State:
    state_dir: Path
    server: str  # https://127.0.0.1:<port> of the API server
    kubeconfig: Path  # the admin's
    admin_token: str
    ca: Path
    ports: dict[str, int]
    binaries: dict[str, str]
    components: tuple[str, ...]  # what this test bed runs: API_ONLY or COMPONENTS
    pids: dict[str, int] = field(default_factory=dict)
    started: float = 0.0
    #: The loopback range the kwok nodes' pod CIDRs are cut from ("" on an older test bed).
    pod_network: str = ""
    #: Its Kubernetes minor (a test bed started before there was a choice ran 1.31).
    kubernetes: str = "1.31"

    @property
    def api_only(self) -> bool:
        return set(self.components) == set(API_ONLY)

    def save(self) -> None:
        data = {
            "state_dir": str(self.state_dir),
            "ports": self.ports,
            "server": self.server,
            "kubeconfig": str(self.kubeconfig),
            "admin_token": self.admin_token,
            "ca": str(self.ca),
            "binaries": self.binaries,
            "pids": self.pids,
            "started": self.started,
            "components": list(self.components),
            "pod_network": self.pod_network,
            "kubernetes": self.kubernetes,
        }
        (self.state_dir / "state.json").write_text(json.dumps(data, indent=2) + "\n")

    def env_info(self) -> dict[str, Any]:
        """What ``hack/cluster env --json`` prints for this test bed."""
        return {
            "kubeconfig": str(self.kubeconfig),
            "state_dir": str(self.state_dir),
            "binaries": self.binaries,
            "external": False,
            "components": list(self.components),
            "api_only": self.api_only,
            "pod_network": self.pod_network,
            "trainer_metrics": "trainer-metrics" in self.components,
            "kueue": "kueue" in self.components,
            "trainer": "trainer" in self.components,
            "kubernetes": self.kubernetes,
        }

    def write_env(self) -> None:
        (self.state_dir / "env.json").write_text(json.dumps(self.env_info(), indent=2) + "\n")


def load(state_dir: Path) -> State | None:
    """The state.json of ``state_dir``, or None if there is none (never started, or deleted)."""
    f = state_dir / "state.json"
    if not f.exists():
        return None
    d = json.loads(f.read_text())
    return State(
        state_dir=Path(d["state_dir"]),
        server=str(d["server"]),
        kubeconfig=Path(d["kubeconfig"]),
        admin_token=str(d["admin_token"]),
        ca=Path(d["ca"]),
        ports={str(k): int(v) for k, v in d["ports"].items()},
        binaries={str(k): str(v) for k, v in d["binaries"].items()},
        # state.json of a test bed started before --api-only existed has no components: all ran.
        components=tuple(d.get("components") or COMPONENTS),
        pids={str(k): int(v) for k, v in (d.get("pids") or {}).items()},
        started=float(d.get("started") or 0.0),
        pod_network=str(d.get("pod_network") or ""),
        kubernetes=str(d.get("kubernetes") or "1.31"),
    )


def load_env(state_dir: Path) -> dict[str, Any] | None:
    """The env.json that ``up`` wrote when it finished, or None."""
    f = state_dir / "env.json"
    if not f.exists():
        return None
    info: dict[str, Any] = json.loads(f.read_text())
    return info
