"""The ``hack/cluster`` commands: up, down, status, env, build."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import finetune_testbed

from . import health, provisioner, rendezvous, up
from .build import (
    Need,
    binaries,
    ensure_openssl,
    jobset_source,
    kubectl_in_cache,
    kueue_source,
    trainer_source,
    training_operator_source,
)
from .log import TestbedError, log
from .procs import pid_alive, rss_kib, stop
from .settings import DEFAULT_K8S, K8S_MODULES, Settings, from_env, k8s_minor
from .state import COMPONENTS, OPTIONAL, load, load_env


def main(argv: list[str]) -> int:
    """Run one command; its exit status (2: usage, 1: failure)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(file=sys.stderr)
        return 2
    try:
        settings = from_env(os.environ)
        if getattr(args, "kubernetes", None):
            settings = dataclasses.replace(
                settings, k8s_asked=k8s_minor(args.kubernetes, "--kubernetes")
            )
        if args.command == "up":
            if args.trainer_metrics:
                settings = dataclasses.replace(settings, trainer_metrics=True)
            if args.kueue:
                settings = dataclasses.replace(settings, kueue=True)
            if args.trainer:
                settings = dataclasses.replace(settings, trainer=True)
            if args.api_only and (settings.kueue or settings.trainer):
                raise TestbedError(
                    "--kueue and --trainer need the whole test bed: leave out --api-only"
                )
            return up.up(settings, api_only=args.api_only)
        if args.command == "down":
            return down(settings)
        if args.command == "status":
            return status(settings)
        if args.command == "rendezvous":
            return rendezvous.run(Path(args.state_dir))
        if args.command == "provisioner":
            return provisioner.run(Path(args.state_dir))
        if args.command == "trainer-metrics":
            # needs the trainer's packages (prometheus_client, pydantic): imported only here
            from . import trainer_metrics  # noqa: PLC0415

            return trainer_metrics.run(Path(args.state_dir), args.default_run_seconds)
        if args.command == "env":
            return env(settings, as_json=args.json)
        if args.kueue:
            settings = dataclasses.replace(settings, kueue=True)
        if args.trainer:
            settings = dataclasses.replace(settings, trainer=True)
        return build(settings, tools=args.tools, api_only=args.api_only)
    except TestbedError as e:
        log(f"error: {e}")
        return 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hack/cluster",
        description=finetune_testbed.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    cmd = sub.add_parser("up", help="start the test bed (idempotent)")
    cmd.add_argument(
        "--api-only",
        action="store_true",
        help="only etcd + kube-apiserver with the PyTorchJob CRD (no controllers, no nodes)",
    )
    cmd.add_argument(
        "--trainer-metrics",
        action="store_true",
        help="also serve the trainer's metrics, from a simulated run, on every running master "
        "pod's IP (needs the project's Python environment; added in place to a running test bed)",
    )
    cmd.add_argument(
        "--kueue",
        action="store_true",
        help="also run Kueue (v0.17, PyTorchJob integration, waitForPodsReady) with a GPU "
        "ClusterQueue (added in place to a running test bed)",
    )
    cmd.add_argument(
        "--trainer",
        action="store_true",
        help="also run Kubeflow Trainer v2 (v2.2, TrainJob) and JobSet (v0.11), webhooks served; "
        "no ClusterTrainingRuntime installed (added in place to a running test bed)",
    )
    _kubernetes_flag(cmd)
    sub.add_parser("down", help="stop the test bed of this state dir")
    # The fake trainer's rendezvous loop (a component that `up` starts; not for users).
    cmd = sub.add_parser("rendezvous")
    cmd.add_argument("--state-dir", required=True)
    # The storage provisioner and the fake trainer's metrics (components too; not for users).
    cmd = sub.add_parser("provisioner")
    cmd.add_argument("--state-dir", required=True)
    cmd = sub.add_parser("trainer-metrics")
    cmd.add_argument("--state-dir", required=True)
    cmd.add_argument("--default-run-seconds", type=float, required=True)
    sub.add_parser("status", help="health and memory of each component (exit 1 if down)")
    cmd = sub.add_parser("env", help="shell exports: KUBECONFIG, PATH, TESTBED_*")
    cmd.add_argument("--json", action="store_true", help="the same as JSON, for programs")
    cmd = sub.add_parser("build", help="only build or fetch the binaries")
    what = cmd.add_mutually_exclusive_group()
    what.add_argument("--tools", action="store_true", help="only kubectl, helm, kubeconform")
    what.add_argument("--api-only", action="store_true", help="only what `up --api-only` needs")
    cmd.add_argument("--kueue", action="store_true", help="also Kueue (what `up --kueue` adds)")
    cmd.add_argument(
        "--trainer", action="store_true", help="also JobSet and Trainer (what `up --trainer` adds)"
    )
    _kubernetes_flag(cmd)
    return p


def _kubernetes_flag(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--kubernetes",
        metavar="MINOR",
        help=f"Kubernetes version: {' or '.join(sorted(K8S_MODULES))} (default: "
        f"FINETUNE_K8S_VERSION, else {DEFAULT_K8S}); binaries are cached per version",
    )


def down(settings: Settings) -> int:
    st = load(settings.state_dir)
    if not st or not st.pids:
        log("nothing running")
        return 0
    left = stop(st.pids, reversed(COMPONENTS + OPTIONAL))
    st.pids = {n: pid for n, pid in st.pids.items() if n in left}
    st.save()
    if left:
        raise TestbedError(f"still running: {left}")
    log(f"stopped (logs kept in {settings.state_dir / 'logs'})")
    return 0


def status(settings: Settings) -> int:
    ext = settings.external_kubeconfig
    if ext:
        cached = kubectl_in_cache(settings)
        kubectl = str(cached) if cached.exists() else (shutil.which("kubectl") or "kubectl")
        cmd = [kubectl, "--kubeconfig", ext, "get", "--raw", "/readyz"]
        ok = subprocess.run(cmd, capture_output=True, check=False).returncode == 0
        print(f"external cluster (KUBECONFIG={ext}): {'ok' if ok else 'DOWN'}")
        return 0 if ok else 1
    st = load(settings.state_dir)
    if not st or not st.pids:
        print("down")
        return 1
    ok = True
    for name in st.components:
        pid = st.pids.get(name)
        good = health.component_ok(st, name)
        ok = ok and good
        rss, peak = (rss_kib(pid), rss_kib(pid, "VmHWM")) if pid else (0, 0)
        print(
            f"{name:25s} {'ok' if good else 'DOWN':5s} pid={pid} "
            f"rss={rss / 1024:.0f}MiB peak={peak / 1024:.0f}MiB"
        )
    alive = [pid for pid in st.pids.values() if pid_alive(pid)]
    total_mib = sum(rss_kib(pid) for pid in alive) / 1024
    peak_mib = sum(rss_kib(pid, "VmHWM") for pid in alive) / 1024
    mode = "  (--api-only)" if st.api_only else ""
    print(
        f"{'total':25s}          rss={total_mib:.0f}MiB peak={peak_mib:.0f}MiB   "
        f"KUBECONFIG={st.kubeconfig}{mode}"
    )
    return 0 if ok else 1


def env(settings: Settings, as_json: bool) -> int:
    ext = settings.external_kubeconfig
    info: dict[str, Any] | None
    if ext:
        bins = binaries(settings, Need.TOOLS)
        info = {
            "kubeconfig": ext,
            "binaries": {k: str(v) for k, v in bins.items()},
            "external": True,
            "state_dir": None,
        }
    else:
        st = load(settings.state_dir)
        info = load_env(settings.state_dir)
        if info is None or st is None or not health.all_alive(st):
            raise TestbedError("test bed is not up: run `hack/cluster up`")
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        print(shell_exports(info["kubeconfig"], info["binaries"]), end="")
    return 0


def shell_exports(kubeconfig: str, bins: dict[str, str]) -> str:
    """``export`` lines: KUBECONFIG, our binaries first on PATH, TESTBED_<TOOL> paths."""
    dirs: list[str] = []
    for n in ("kubectl", "helm", "kubeconform", "kube-apiserver"):
        if n in bins and os.path.dirname(bins[n]) not in dirs:
            dirs.append(os.path.dirname(bins[n]))
    lines = [f"export KUBECONFIG={kubeconfig}"]
    if dirs:
        lines.append(f"export PATH={':'.join(dirs)}:$PATH")
    lines += [
        f"export TESTBED_{n.upper()}={bins[n]}"
        for n in ("kubectl", "helm", "kubeconform")
        if n in bins
    ]
    return "".join(line + "\n" for line in lines)


def build(settings: Settings, tools: bool, api_only: bool) -> int:
    if tools:
        bins = binaries(settings, Need.TOOLS)
    else:
        ensure_openssl()
        bins = binaries(settings, Need.API if api_only else Need.FULL)
        training_operator_source(settings)
        if settings.kueue and not api_only:
            kueue_source(settings)
        if settings.trainer and not api_only:
            jobset_source(settings)
            trainer_source(settings)
    for k, v in sorted(bins.items()):
        print(f"{k:25s} {v}")
    return 0
