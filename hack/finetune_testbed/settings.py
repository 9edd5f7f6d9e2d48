"""Everything the test bed reads from the environment, read once at start-up."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from .log import TestbedError

HACK = Path(__file__).resolve().parent.parent
REPO = HACK.parent

#: The Kubernetes minors the test bed builds (the Go module of each in hack/), and the default:
#: the current one; the oldest supported one (1.31) is proven by an API-only test bed of it.
K8S_MODULES = {"1.31": "k8s", "1.35": "k8s-1.35"}
DEFAULT_K8S = "1.35"


@dataclass(frozen=True)
class Settings:
    """The environment variables of ``hack/cluster`` (see its ``--help``), parsed."""

    state_dir: Path  # FINETUNE_TESTBED_STATE, default hack/.state
    cache_dir: Path  # FINETUNE_TESTBED_CACHE, default ${XDG_CACHE_HOME:-~/.cache}/finetune-operator
    kubeconfig: str | None  # KUBECONFIG
    assets: Path | None  # KUBEBUILDER_ASSETS
    gpu_nodes: int  # TESTBED_GPU_NODES (8x H100-80GB each)
    a100_nodes: int  # TESTBED_A100_NODES (8x A100-40GB each)
    images: tuple[str, ...]  # the registry's repositories: DEFAULT_IMAGES + TESTBED_IMAGES
    pod_run_seconds: float  # TESTBED_POD_RUN_SECONDS
    build_jobs: int  # TESTBED_BUILD_JOBS
    up_timeout: float  # TESTBED_UP_TIMEOUT
    trainer_metrics: bool = False  # TESTBED_TRAINER_METRICS=1 or `up --trainer-metrics`
    kueue: bool = False  # TESTBED_KUEUE=1 or `up --kueue` / `build --kueue`
    trainer: bool = False  # TESTBED_TRAINER=1 or `up --trainer` / `build --trainer`
    #: FINETUNE_K8S_VERSION or `--kubernetes` (1.31 | 1.35); None: not asked for (DEFAULT_K8S).
    k8s_asked: str | None = None

    @property
    def kubernetes(self) -> str:
        """The Kubernetes minor of this test bed (``1.35``)."""
        return self.k8s_asked or DEFAULT_K8S

    @property
    def external_kubeconfig(self) -> str | None:
        """KUBECONFIG when it selects another cluster than this state dir's own test bed."""
        if not self.kubeconfig:
            return None
        if os.path.abspath(self.kubeconfig) == str(self.state_dir / "kubeconfig"):
            return None
        return self.kubeconfig

    def bin_dir(self, name: str, version: str) -> Path:
        """Where the binaries of one pinned tool version are cached."""
        return self.cache_dir / "bin" / f"{name}-{version}"


def from_env(env: Mapping[str, str]) -> Settings:
    """Parse the environment; a malformed number is a `TestbedError` naming the variable."""

    def get(name: str) -> str | None:
        return env.get(name) or None

    cache = get("FINETUNE_TESTBED_CACHE")
    if cache is None:
        base = get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        cache = os.path.join(base, "finetune-operator")
    assets = get("KUBEBUILDER_ASSETS")
    return Settings(
        state_dir=Path(get("FINETUNE_TESTBED_STATE") or HACK / ".state").resolve(),
        cache_dir=Path(cache),
        kubeconfig=get("KUBECONFIG"),
        assets=Path(assets) if assets else None,
        gpu_nodes=_number(env, "TESTBED_GPU_NODES", int, 2, minimum=0),
        a100_nodes=_number(env, "TESTBED_A100_NODES", int, 1, minimum=0),
        images=_images(env.get("TESTBED_IMAGES", "")),
        pod_run_seconds=_number(env, "TESTBED_POD_RUN_SECONDS", float, 5.0, minimum=0),
        build_jobs=_number(env, "TESTBED_BUILD_JOBS", int, min(4, os.cpu_count() or 1), minimum=1),
        up_timeout=_number(env, "TESTBED_UP_TIMEOUT", float, 180.0, minimum=1),
        trainer_metrics=_flag(env, "TESTBED_TRAINER_METRICS"),
        kueue=_flag(env, "TESTBED_KUEUE"),
        trainer=_flag(env, "TESTBED_TRAINER"),
        k8s_asked=k8s_minor(env.get("FINETUNE_K8S_VERSION") or None, "FINETUNE_K8S_VERSION"),
    )


def k8s_minor(raw: str | None, where: str) -> str | None:
    """``1.31``, ``v1.31``, ``1.31.4`` -> ``1.31`` (one of K8S_MODULES); None stays None."""
    if raw is None:
        return None
    minor = ".".join(raw.strip().lstrip("v").split(".")[:2])
    if minor not in K8S_MODULES:
        raise TestbedError(f"{where}={raw!r}: the test bed builds Kubernetes {sorted(K8S_MODULES)}")
    return minor


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = (env.get(name) or "0").strip().lower()
    if raw not in ("0", "1", "true", "false"):
        raise TestbedError(f"{name}={raw!r}: expected 1 or 0")
    return raw in ("1", "true")


#: The repositories the test bed's registry holds (any registry host, any tag): this project's
#: images, the test image and the training-operator's init container image (alpine, which waits
#: for the master's address in every worker). A pod with another image waits in
#: ErrImagePull/ImagePullBackOff.
DEFAULT_IMAGES = ("finetune-trainer", "finetune-operator", "busybox", "alpine")
_REPOSITORY = re.compile(r"^[a-z0-9]+([._-][a-z0-9]+)*$")


def _images(raw: str) -> tuple[str, ...]:
    """DEFAULT_IMAGES and the repository names (last path part, no tag) in TESTBED_IMAGES."""
    extra = [name.strip() for name in raw.split(",") if name.strip()]
    for name in extra:
        if not _REPOSITORY.match(name):
            raise TestbedError(
                f"TESTBED_IMAGES: {name!r} is not a repository name (e.g. pytorch, without "
                "registry host, path or tag)"
            )
    return tuple(dict.fromkeys([*DEFAULT_IMAGES, *extra]))


N = TypeVar("N", int, float)


def _number(env: Mapping[str, str], name: str, kind: type[N], default: N, minimum: N) -> N:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise TestbedError(f"{name}={raw!r} is not {what}") from None
    if value < minimum:
        raise TestbedError(f"{name}={raw!r} must be at least {minimum}")
    return value
