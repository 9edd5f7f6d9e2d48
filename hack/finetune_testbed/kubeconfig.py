"""Who may talk to the API server: static-token users, their tokens file and kubeconfigs.

Every component has its own user (RBAC sees the controller-manager, scheduler, kwok and the
training-operator as themselves); all tokens exist from the start because the API server reads
its ``--token-auth-file`` once, so an ``--api-only`` test bed can later be completed in place.
"""

from __future__ import annotations

import base64
import json
import secrets
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class User:
    key: str  # short name: token and kubeconfig file
    name: str  # the user name RBAC sees
    uid: str
    kubeconfig_user: str  # the user's name in its kubeconfig
    groups: tuple[str, ...] = ()


USERS = (
    User("admin", "admin", "admin", "admin", ("system:masters",)),
    User("kcm", "system:kube-controller-manager", "kcm", "system:kube-controller-manager"),
    User("scheduler", "system:kube-scheduler", "scheduler", "system:kube-scheduler"),
    User("kwok", "kwok-controller", "kwok", "kwok-controller", ("system:masters",)),
    User(
        "to",
        "system:serviceaccount:kubeflow:training-operator",
        "training-operator",
        "training-operator",
        ("system:serviceaccounts", "system:serviceaccounts:kubeflow"),
    ),
)


def new_tokens() -> dict[str, str]:
    """A fresh random token per user key."""
    return {u.key: secrets.token_hex(16) for u in USERS}


def tokens_csv(tokens: dict[str, str]) -> str:
    """The API server's ``--token-auth-file``: ``token,user,uid[,"group,group"]`` lines."""
    lines = []
    for u in USERS:
        fields = [tokens[u.key], u.name, u.uid]
        if u.groups:
            fields.append('"' + ",".join(u.groups) + '"')
        lines.append(",".join(fields) + "\n")
    return "".join(lines)


def kubeconfig_path(state_dir: Path, key: str) -> Path:
    """The admin's is ``<state dir>/kubeconfig`` (what users and tests use); the others'
    ``<state dir>/<key>.kubeconfig``."""
    return state_dir / ("kubeconfig" if key == "admin" else f"{key}.kubeconfig")


def write_kubeconfigs(state_dir: Path, server: str, ca_file: Path, tokens: dict[str, str]) -> None:
    for u in USERS:
        path = kubeconfig_path(state_dir, u.key)
        write_kubeconfig(path, server, ca_file, tokens[u.key], u.kubeconfig_user)


def write_kubeconfig(path: Path, server: str, ca_file: Path, token: str, user: str) -> None:
    """A one-context kubeconfig (JSON is YAML) with a bearer token, readable by its owner only."""
    ca_data = base64.b64encode(ca_file.read_bytes()).decode()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "finetune-testbed",
                "cluster": {"server": server, "certificate-authority-data": ca_data},
            }
        ],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [
            {"name": "finetune-testbed", "context": {"cluster": "finetune-testbed", "user": user}}
        ],
        "current-context": "finetune-testbed",
    }
    path.write_text(json.dumps(config, indent=2) + "\n")
    path.chmod(0o600)
