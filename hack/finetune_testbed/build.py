"""The test bed's binaries: built from pinned Go modules into a cache keyed by version.

Kubernetes (kube-apiserver, kube-controller-manager, kube-scheduler, kubectl) is built from the
Go module of its version: hack/k8s-1.35 (v1.35, the default) or hack/k8s (v1.31; chosen with
FINETUNE_K8S_VERSION or ``--kubernetes``). kwok, the training-operator, Kueue (``up --kueue``),
Trainer (``up --trainer``), helm and kubeconform with ``go install pkg@version``; JobSet, whose
module the Go proxy does not list, with ``go build`` in a throwaway module that requires it
(``go install`` asks the proxy for the list, to look for a deprecation). etcd: v3.6 built from
hack/etcd-3.6 for Kubernetes v1.35, Debian's (3.4) for v1.31; openssl from Debian.
``KUBEBUILDER_ASSETS`` can supply kube-apiserver, etcd, kubectl (and the controller-manager and
scheduler).
"""

from __future__ import annotations

import enum
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from . import kueue, trainer_v2
from .log import TestbedError, log
from .settings import HACK, K8S_MODULES, Settings

ETCD_MODULE = HACK / "etcd-3.6"  # etcd v3.6, for Kubernetes >= 1.35
#: The etcd of each Kubernetes minor: built from ETCD_MODULE, or Debian's (None).
ETCD_BUILT = {"1.31": None, "1.35": ETCD_MODULE}
KWOK_VERSION = "v0.7.0"
TRAINING_OPERATOR_VERSION = "v1.9.3"
TRAINING_OPERATOR_MODULE = "github.com/kubeflow/training-operator"
HELM_VERSION = "v3.16.4"
HELM_K8S_MINOR = 31  # the k8s.io/client-go minor that helm v3.16 is built with
KUBECONFORM_VERSION = "v0.6.7"


class Need(enum.Enum):
    """Which binaries a command needs."""

    TOOLS = "tools"  # kubectl, helm, kubeconform (for a cluster of one's own, or the chart tests)
    API = "api"  # etcd, kube-apiserver, kubectl (`up --api-only`)
    FULL = "full"  # everything `up` starts, and the tools


K8S_NAMES = {
    Need.TOOLS: ("kubectl",),
    Need.API: ("kube-apiserver", "kubectl"),
    Need.FULL: ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl"),
}


@dataclass(frozen=True)
class GoTool:
    """A binary built with ``go install pkg@version`` into its own cache directory."""

    name: str
    pkg: str
    version: str
    exe: str
    ldflags: str = ""
    build_key: str | None = None  # cache key when the ldflags change what the binary does
    #: The module to build ``pkg`` in with ``go build`` (a throwaway module that requires it at
    #: ``version``), instead of ``go install pkg@version``.
    module: str | None = None


# As helm's own Makefile does: the Kubernetes version of its client-go modules (v0.31 for v3.16)
# is what `helm template` and `helm lint` assume without --kube-version.
_HELM_K8S = " ".join(
    f"-X helm.sh/helm/v3/pkg/{pkg}.k8sVersion{part}={value}"
    for pkg in ("chartutil", "lint/rules")
    for part, value in (("Major", 1), ("Minor", HELM_K8S_MINOR))
)
HELM = GoTool(
    "helm",
    "helm.sh/helm/v3/cmd/helm",
    HELM_VERSION,
    "helm",
    f"-X helm.sh/helm/v3/internal/version.version={HELM_VERSION} "
    f"-X helm.sh/helm/v3/internal/version.gitTreeState=clean {_HELM_K8S}",
    build_key=f"{HELM_VERSION}-k8s1.{HELM_K8S_MINOR}",
)
KUBECONFORM = GoTool(
    "kubeconform",
    "github.com/yannh/kubeconform/cmd/kubeconform",
    KUBECONFORM_VERSION,
    "kubeconform",
    f"-X main.version={KUBECONFORM_VERSION}",
)
KWOK = GoTool(
    "kwok",
    "sigs.k8s.io/kwok/cmd/kwok",
    KWOK_VERSION,
    "kwok",
    f"-X sigs.k8s.io/kwok/pkg/consts.Version={KWOK_VERSION}",
)
TRAINING_OPERATOR = GoTool(
    "training-operator",
    f"{TRAINING_OPERATOR_MODULE}/cmd/training-operator.v1",
    TRAINING_OPERATOR_VERSION,
    "training-operator.v1",
)
KUEUE = GoTool(
    "kueue",
    f"{kueue.MODULE}/cmd/kueue",
    kueue.VERSION,
    "kueue",
    f"-X {kueue.MODULE}/pkg/version.GitVersion={kueue.VERSION}",
)

TRAINER = GoTool(
    "trainer",
    f"{trainer_v2.TRAINER_MODULE}/cmd/trainer-controller-manager",
    trainer_v2.TRAINER_VERSION,
    "trainer-controller-manager",
)
JOBSET = GoTool(
    "jobset",
    trainer_v2.JOBSET_MODULE,  # its controller is the module's root package
    trainer_v2.JOBSET_VERSION,
    "jobset",
    module=trainer_v2.JOBSET_MODULE,
)


def binaries(settings: Settings, need: Need) -> dict[str, Path]:
    """Build (or find in the cache) the binaries ``need`` names, by component name (with
    ``settings.kueue``, a full test bed's include Kueue)."""
    out = k8s_binaries(settings, K8S_NAMES[need])
    if need is not Need.API:
        out["helm"] = go_install(settings, HELM)
        out["kubeconform"] = go_install(settings, KUBECONFORM)
    if need is not Need.TOOLS:
        out["etcd"] = ensure_etcd(settings)
    if need is Need.FULL:
        out["kwok"] = go_install(settings, KWOK)
        out["training-operator"] = go_install(settings, TRAINING_OPERATOR)
        if settings.kueue:
            out["kueue"] = go_install(settings, KUEUE)
        if settings.trainer:
            out["jobset"] = go_install(settings, JOBSET)
            out["trainer"] = go_install(settings, TRAINER)
    return out


def k8s_module(settings: Settings) -> Path:
    """The Go module in hack/ that builds the test bed's Kubernetes version."""
    return HACK / K8S_MODULES[settings.kubernetes]


def k8s_version(settings: Settings) -> str:
    """The k8s.io/kubernetes version that the module of ``settings.kubernetes`` requires."""
    return required_version(k8s_module(settings), "k8s.io/kubernetes")


def required_version(module: Path, path: str) -> str:
    """The version of ``path`` that ``module``'s go.mod requires."""
    for line in (module / "go.mod").read_text().splitlines():
        parts = line.replace("require", "").split()
        if len(parts) >= 2 and parts[0] == path:
            return parts[1]
    raise TestbedError(f"cannot find the {path} requirement in {module / 'go.mod'}")


def kubectl_in_cache(settings: Settings) -> Path:
    return settings.bin_dir("kubernetes", k8s_version(settings)) / "kubectl"


def k8s_binaries(settings: Settings, names: Sequence[str]) -> dict[str, Path]:
    """Paths of the named Kubernetes binaries: from KUBEBUILDER_ASSETS if there, else built."""
    assets = settings.assets
    out = {n: assets / n for n in names if assets and (assets / n).exists()}
    to_build = [n for n in names if n not in out]
    if to_build:
        d = build_k8s(settings, to_build)
        out.update({n: d / n for n in to_build})
    return out


def build_k8s(settings: Settings, names: Sequence[str]) -> Path:
    """Build the missing ones of ``names`` from the version's module (hack/k8s, hack/k8s-1.35),
    with Kubernetes' version ldflags."""
    module = k8s_module(settings)
    version = k8s_version(settings)
    d = settings.bin_dir("kubernetes", version)
    missing = [n for n in names if not (d / n).exists()]
    if not missing:
        return d
    _need_go(" ".join(missing))
    d.mkdir(parents=True, exist_ok=True)
    major, minor = version.lstrip("v").split(".")[:2]
    ldflags = ["-s", "-w"]
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        ldflags += [
            f"-X {pkg}.gitVersion={version}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
            f"-X {pkg}.buildDate=1970-01-01T00:00:00Z",
        ]
    tmp = Path(tempfile.mkdtemp(prefix="k8s-build-", dir=d))
    t0 = time.time()
    jobs = str(settings.build_jobs)
    log(
        f"building Kubernetes {version}: {' '.join(missing)} "
        f"(go build -p {jobs}; a cold build takes a while)"
    )
    args = ["build", "-p", jobs, "-trimpath", "-tags", "providerless"]
    targets = ["-o", f"{tmp}/", *(f"k8s.io/kubernetes/cmd/{n}" for n in missing)]
    _go_with_linkname_retry(
        f"Kubernetes {' '.join(missing)}", args, " ".join(ldflags), targets, module, go_env()
    )
    for n in missing:
        os.replace(tmp / n, d / n)
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"built {' '.join(missing)} in {time.time() - t0:.0f}s -> {d}")
    return d


def go_install(settings: Settings, tool: GoTool) -> Path:
    """``go install tool.pkg@tool.version`` into the tool's cache directory (once)."""
    d = settings.bin_dir(tool.name, tool.build_key or tool.version)
    exe = d / tool.exe
    if (d / ".complete").exists() and exe.exists():
        return exe
    _need_go(tool.name)
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    log(f"building {tool.name} {tool.version}")
    ldflags = f"-s -w {tool.ldflags}".strip()
    jobs = str(settings.build_jobs)
    if tool.module:
        # go build in a module of its own (kept beside the binary) that requires the tool's
        # module: no query of the module's version list. With the tool's own `go` version, the
        # module graph is pruned as for `go install pkg@version`: the same build list.
        go_line = next(
            (
                line
                for line in (module_source(settings, tool.module, tool.version) / "go.mod")
                .read_text()
                .splitlines()
                if line.startswith("go ")
            ),
            "go 1.22",
        )
        mod = d / "module"
        shutil.rmtree(mod, ignore_errors=True)
        mod.mkdir()
        (mod / "go.mod").write_text(
            f"module finetune.dev/hack/build/{tool.name}\n\n{go_line}\n\n"
            f"require {tool.module} {tool.version}\n"
        )
        args = ["build", "-p", jobs, "-trimpath"]
        targets = ["-o", str(exe), tool.pkg]
        _go_with_linkname_retry(tool.name, args, ldflags, targets, mod, go_env())
    else:
        env = go_env(module_mode=False)
        env["GOBIN"] = str(d)
        args = ["install", "-p", jobs, "-trimpath"]
        _go_with_linkname_retry(tool.name, args, ldflags, [f"{tool.pkg}@{tool.version}"], d, env)
    (d / ".complete").write_text(time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")
    log(f"built {tool.name} in {time.time() - t0:.0f}s")
    return exe


def training_operator_source(settings: Settings) -> Path:
    """The training-operator module in Go's module cache (its CRD and RBAC manifests)."""
    return module_source(settings, TRAINING_OPERATOR_MODULE, TRAINING_OPERATOR_VERSION)


def kueue_source(settings: Settings) -> Path:
    """The Kueue module in Go's module cache (its CRDs, RBAC and webhook manifests)."""
    return module_source(settings, kueue.MODULE, kueue.VERSION)


def trainer_source(settings: Settings) -> Path:
    """Kubeflow Trainer's module in Go's module cache (its CRDs, RBAC and webhook manifests)."""
    return module_source(settings, trainer_v2.TRAINER_MODULE, trainer_v2.TRAINER_VERSION)


def jobset_source(settings: Settings) -> Path:
    """JobSet's module in Go's module cache (its CRD, RBAC and webhook manifests)."""
    return module_source(settings, trainer_v2.JOBSET_MODULE, trainer_v2.JOBSET_VERSION)


def module_source(settings: Settings, path: str, version: str) -> Path:
    """A Go module's files in Go's module cache (downloaded once), for its manifests."""
    _need_go(f"the manifests of {path}")
    module = f"{path}@{version}"
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(
        ["go", "mod", "download", "-json", module],
        env=go_env(module_mode=False),
        capture_output=True,
        text=True,
        cwd=settings.cache_dir,
        check=False,
    )
    if p.returncode != 0:
        raise TestbedError(f"go mod download {module} failed:\n{p.stdout}{p.stderr}")
    return Path(json.loads(p.stdout)["Dir"])


def go_env(module_mode: bool = True) -> dict[str, str]:
    """os.environ for the go command: ``-mod=mod`` (builds in hack/k8s), or none (``go install
    pkg@version`` ignores the current module and refuses -mod); CGO off and GOTOOLCHAIN=local
    (never download another Go) unless set."""
    env = dict(os.environ)
    flags = [f for f in env.get("GOFLAGS", "").split() if module_mode or not f.startswith("-mod=")]
    if module_mode and not any(f.startswith("-mod=") for f in flags):
        flags.append("-mod=mod")
    env["GOFLAGS"] = " ".join(flags)
    env.setdefault("CGO_ENABLED", "0")
    env.setdefault("GOTOOLCHAIN", "local")  # this Go (1.26) builds every pinned module
    return env


def _go_with_linkname_retry(
    what: str, args: list[str], ldflags: str, targets: list[str], cwd: Path, env: dict[str, str]
) -> None:
    """Run ``go <args> -ldflags <ldflags> <targets>``; should the linker refuse an old
    ``//go:linkname`` (Go >= 1.23), retry with its documented escape hatch."""

    def go(flags: str) -> bool:
        cmd = ["go", *args, "-ldflags", flags, *targets]
        return subprocess.run(cmd, cwd=cwd, env=env, check=False).returncode == 0

    if go(ldflags):
        return
    log(f"build of {what} failed; retrying with -checklinkname=0")
    if not go(f"-checklinkname=0 {ldflags}"):
        raise TestbedError(f"building {what} failed (the go output is above)")


def _need_go(what: str) -> None:
    if shutil.which("go") is None:
        raise TestbedError(f"go is not installed (needed to build {what})")


def ensure_etcd(settings: Settings) -> Path:
    """etcd from KUBEBUILDER_ASSETS; else, for Kubernetes v1.35, etcd v3.6 built from
    hack/etcd-3.6 (once, cached); for v1.31 the one on PATH, else Debian's etcd-server
    (installed)."""
    if settings.assets and (settings.assets / "etcd").exists():
        return settings.assets / "etcd"
    module = ETCD_BUILT[settings.kubernetes]
    if module is not None:
        return build_etcd(settings, module)
    if not shutil.which("etcd"):
        apt_install(["etcd-server"])
    found = shutil.which("etcd")
    if not found:
        raise TestbedError("etcd not found after installing etcd-server")
    return Path(found)


def build_etcd(settings: Settings, module: Path) -> Path:
    """``go build go.etcd.io/etcd/server/v3`` (etcd's main package) in ``module``, once."""
    version = required_version(module, "go.etcd.io/etcd/server/v3")
    d = settings.bin_dir("etcd", version)
    exe = d / "etcd"
    if exe.exists():
        return exe
    _need_go(f"etcd {version}")
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    log(f"building etcd {version}")
    tmp = d / "etcd.tmp"
    args = ["build", "-p", str(settings.build_jobs), "-trimpath"]
    ldflags = f"-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA={version}"
    targets = ["-o", str(tmp), "go.etcd.io/etcd/server/v3"]
    _go_with_linkname_retry(f"etcd {version}", args, ldflags, targets, module, go_env())
    os.replace(tmp, exe)
    log(f"built etcd in {time.time() - t0:.0f}s")
    return exe


def ensure_openssl() -> None:
    if not shutil.which("openssl"):
        apt_install(["openssl"])


def apt_install(pkgs: list[str]) -> None:
    """apt-get install as root, retrying while another apt holds the lock."""
    if os.geteuid() != 0:
        raise TestbedError(
            f"need Debian packages {pkgs}: run as root or install them "
            f"(apt-get install {' '.join(pkgs)})"
        )
    log(f"installing Debian packages: {' '.join(pkgs)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *pkgs]
    for _ in range(30):  # apt's output goes to stderr: stdout is for what programs read
        up = subprocess.run(["apt-get", "update", "-qq"], env=env, stdout=sys.stderr, check=False)
        inst = subprocess.run(install, env=env, stdout=sys.stderr, check=False)
        if up.returncode == 0 and inst.returncode == 0:
            return
        time.sleep(5)
    raise TestbedError(f"apt-get install {' '.join(pkgs)} failed")
