"""``up``: start the test bed in named steps, in two tiers.

The API tier (all that ``up --api-only`` starts): etcd, the cluster PKI and users, kube-apiserver,
the PyTorchJob CRD. The cluster tier on top of it: controller-manager, scheduler, the webhook and
kubelet PKI, the bootstrap objects (training-operator RBAC and webhook, kwok nodes), kwok, the
training-operator, and the waits until each is healthy; with ``--trainer``, JobSet and Kubeflow
Trainer v2; with ``--kueue``, Kueue and its queues.
``up`` on a running ``--api-only`` test bed adds the cluster tier in place (same API server, same
objects), and on a running full one the optional components asked for. Components are started
without waiting where they do not depend on each other, and waited for at the end.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import random
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import health, kubeconfig, kueue, manifests, pki, trainer_v2
from .build import (
    JOBSET,
    KUEUE,
    TRAINER,
    Need,
    binaries,
    ensure_openssl,
    go_install,
    jobset_source,
    kueue_source,
    trainer_source,
    training_operator_source,
)
from .kubeapi import Api, resource_path
from .log import TestbedError, log
from .procs import Supervisor, pid_alive, stop
from .settings import HACK, REPO, Settings
from .state import API_ONLY, CLUSTER_TIER, COMPONENTS, FEATURES, OPTIONAL, State, load

# The ports each component listens on, by name in state.json.
PORTS = {
    "etcd": ("etcd", "etcd-peer"),
    "kube-apiserver": ("apiserver",),
    "kube-controller-manager": ("kcm",),
    "kube-scheduler": ("scheduler",),
    "kwok": ("kwok",),
    "rendezvous": (),
    "provisioner": (),
    "training-operator": ("to-metrics", "to-probe", "to-webhook"),
    "trainer-metrics": (),
    "kueue": ("kueue-webhook", "kueue-probe"),
    "jobset": ("jobset-webhook", "jobset-probe"),
    "trainer": ("trainer-webhook", "trainer-probe"),
}
# cert-controller (used by the training-operator) only checks that this file exists.
ROTATOR_CERT_DIR = Path("/tmp/k8s-webhook-server/serving-certs")


@dataclass
class Bed:
    """One test bed being started: its settings, state, binaries and processes."""

    settings: Settings
    state: State
    bins: dict[str, Path]
    training_operator_src: Path
    procs: Supervisor

    @property
    def dir(self) -> Path:
        return self.state.state_dir

    @property
    def pki(self) -> Path:
        return self.dir / "pki"

    def kubeconfig(self, user: str) -> Path:
        return kubeconfig.kubeconfig_path(self.dir, user)

    def save(self) -> None:
        """Record the pids started so far (so that `down` finds them whatever happens next)."""
        self.state.pids = self.procs.pids
        self.state.save()

    def wait(self, component: str) -> None:
        self.procs.wait_for(
            component, health.probe(self.state, component), self.settings.up_timeout
        )

    @functools.cached_property
    def api(self) -> Api:
        """The API server, as the admin (once `write_users` has made the tokens)."""
        return Api(self.state.server, self.state.admin_token, self.state.ca)


# --------------------------------------------------------------------------- the command


def up(settings: Settings, api_only: bool) -> int:
    """Start the test bed of ``settings.state_dir`` (idempotent); the exit status."""
    t_start = time.time()
    if settings.external_kubeconfig:
        ext = settings.external_kubeconfig
        log(f"KUBECONFIG is set ({ext}): using that cluster, starting nothing")
        binaries(settings, Need.TOOLS)
        return 0
    wanted = API_ONLY if api_only else _full(settings)
    if "trainer-metrics" in wanted:
        check_trainer_python()
    st = load(settings.state_dir)
    if st and health.all_alive(st):
        asked = settings.k8s_asked
        if asked and asked != st.kubernetes:
            raise TestbedError(
                f"the test bed of {settings.state_dir} runs Kubernetes {st.kubernetes}, not "
                f"{asked}: `hack/cluster down` first, or give this one its own "
                "FINETUNE_TESTBED_STATE"
            )
        settings = dataclasses.replace(settings, k8s_asked=st.kubernetes)  # what it runs
        if health.healthy(st):
            if set(wanted) <= set(st.components):
                log(f"already up ({settings.state_dir}); `hack/cluster down` to stop")
                return 0
            if not st.api_only:  # started by an older `up`, or without an optional one
                return _add_missing(settings, st, [c for c in wanted if c not in st.components])
            return _complete(settings, st, t_start, wanted)
        log("previous test bed is unhealthy: stopping it")
    if st:
        _stop(st)
    ensure_openssl()
    bins = binaries(settings, Need.API if api_only else Need.FULL)
    bed = _new_bed(settings, bins, training_operator_source(settings), wanted)
    t_ready = time.time()
    try:
        start_api_tier(bed)
        if not api_only:
            start_cluster_tier(bed)
        wait_for_crds(bed)
    except (TestbedError, OSError, KeyboardInterrupt) as e:
        return _fail(bed, e)
    return _done(bed, t_start, t_ready)


def _full(settings: Settings) -> tuple[str, ...]:
    """What a full test bed runs with these settings."""
    asked = {
        "trainer-metrics": settings.trainer_metrics,
        "trainer": settings.trainer,
        "kueue": settings.kueue,
    }
    wanted = {c for feature, on in asked.items() if on for c in FEATURES[feature]}
    return COMPONENTS + tuple(c for c in OPTIONAL if c in wanted)


def check_trainer_python() -> None:
    """The trainer-metrics component runs the trainer's metrics module with this Python."""
    lacking = [m for m in ("prometheus_client", "pydantic") if importlib.util.find_spec(m) is None]
    if lacking:
        raise TestbedError(
            f"--trainer-metrics serves the trainer's own metrics module, which needs "
            f"{' and '.join(lacking)}, missing from {sys.executable}: run hack/cluster with the "
            "project's Python environment first on PATH (`make venv` prints it; then "
            "`PATH=<venv>/bin:$PATH hack/cluster up --trainer-metrics`)"
        )


def _complete(settings: Settings, st: State, t_start: float, wanted: tuple[str, ...]) -> int:
    """Add the cluster tier to a running --api-only test bed."""
    log("the test bed is up with --api-only: starting the rest of it")
    ensure_openssl()
    bins = binaries(settings, Need.FULL)
    procs = Supervisor(st.state_dir, adopted=st.pids)
    bed = Bed(settings, st, bins, training_operator_source(settings), procs)
    st.binaries = {k: str(v) for k, v in bins.items()}
    st.components = wanted
    if "trainer-metrics" in wanted and not st.pod_network:
        st.pod_network = new_pod_network()
    t_ready = time.time()
    try:
        start_cluster_tier(bed)
    except (TestbedError, OSError, KeyboardInterrupt) as e:
        return _fail(bed, e)
    return _done(bed, t_start, t_ready)


def _add_missing(settings: Settings, st: State, missing: list[str]) -> int:
    """Start the components a running full test bed lacks: those an older ``up`` did not start
    (the rendezvous, the provisioner), or trainer-metrics, JobSet and Trainer, or Kueue when
    asked for now. Kueue already running when Trainer is added is restarted once the TrainJob
    CRD is served (it looks for a missing integration's API with a backoff of up to 2 min)."""
    starters = {
        "rendezvous": start_rendezvous,
        "provisioner": start_provisioner,
        "trainer-metrics": add_trainer_metrics,
        "jobset": start_jobset,
        "trainer": start_trainer,
        "kueue": start_kueue,
    }
    order = list(COMPONENTS + OPTIONAL)
    missing = sorted(missing, key=lambda c: order.index(c) if c in order else len(order))
    unknown = [c for c in missing if c not in starters]
    if unknown:
        raise TestbedError(f"the test bed lacks {unknown}: `hack/cluster down` and `up` again")
    log(f"the test bed lacks {missing}: starting them")
    procs = Supervisor(st.state_dir, adopted=st.pids)
    bed = Bed(settings, st, {}, Path(), procs)
    st.components = tuple(dict.fromkeys([*st.components, *missing]))
    for component in missing:
        starters[component](bed)
        bed.wait(component)
        if component == "kueue":
            finish_kueue(bed)
        if component == "trainer":
            finish_trainer(bed)
            kueue_pid = st.pids.get("kueue")
            if "kueue" not in missing and kueue_pid and pid_alive(kueue_pid):
                restart_kueue(bed)
    bed.save()
    bed.state.write_env()
    return 0


def _new_bed(
    settings: Settings, bins: dict[str, Path], to_src: Path, components: tuple[str, ...]
) -> Bed:
    """An empty state dir and the state of a test bed not started yet."""
    sd = settings.state_dir
    if sd.exists():
        shutil.rmtree(sd)
    sd.mkdir(parents=True)
    (sd / "README").write_text(
        "State of `hack/cluster` (safe to delete when the test bed is down).\n"
    )
    ports = allocate_ports(API_ONLY, used=set())
    st = State(
        state_dir=sd,
        server=f"https://127.0.0.1:{ports['apiserver']}",
        kubeconfig=kubeconfig.kubeconfig_path(sd, "admin"),
        admin_token="",
        ca=sd / "pki" / "ca.crt",
        ports=ports,
        binaries={k: str(v) for k, v in bins.items()},
        components=components,
        started=time.time(),
        pod_network=new_pod_network() if "trainer-metrics" in components else "",
        kubernetes=settings.kubernetes,
    )
    return Bed(settings, st, bins, to_src, Supervisor(sd))


def _fail(bed: Bed, e: BaseException) -> int:
    bed.save()
    log(f"up failed: {e or type(e).__name__}")
    log(f"logs are in {bed.procs.logs}; stopping what was started")
    _stop(bed.state)
    return 1


def _done(bed: Bed, t_start: float, t_ready: float) -> int:
    bed.save()
    bed.state.write_env()
    mode = " (--api-only: etcd + kube-apiserver)" if bed.state.api_only else ""
    log(
        f"up{mode}, Kubernetes {bed.state.kubernetes}, in {time.time() - t_ready:.1f}s "
        f"(total {time.time() - t_start:.1f}s incl. "
        f'binaries). KUBECONFIG={bed.state.kubeconfig}  (eval "$(hack/cluster env)")'
    )
    return 0


def _stop(st: State) -> None:
    left = stop(st.pids, reversed(COMPONENTS + OPTIONAL))
    if left:
        log(f"warning: still running: {left}")
    st.pids = {}
    if st.state_dir.exists():
        st.save()


def new_pod_network() -> str:
    """A /16 of 127.0.0.0/8 for the pods of a test bed with trainer-metrics (the others keep
    kwok's default, 10.0.0.0/24: EndpointSlices refuse loopback addresses, so the controller-manager
    warns about the Services of pods with such IPs), drawn at random (as the ports are free ones)
    so that two test beds on one machine are unlikely to hand out the same pod IPs."""
    return manifests.pod_network(random.randint(1, 254))


def allocate_ports(components: tuple[str, ...], used: set[int]) -> dict[str, int]:
    """A free loopback port for each port name of ``components`` (distinct from ``used``)."""
    out: dict[str, int] = {}
    for c in components:
        for name in PORTS[c]:
            port = _free_port()
            while port in used or port in out.values():
                port = _free_port()
            out[name] = port
    return out


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --------------------------------------------------------------------------- API tier


def start_api_tier(bed: Bed) -> None:
    """etcd, kube-apiserver and the PyTorchJob CRD: all that `up --api-only` starts."""
    start_etcd(bed)  # the PKI is made while etcd starts: etcd needs none of it
    write_cluster_pki(bed)
    write_users(bed)
    bed.wait("etcd")
    start_apiserver(bed)
    bed.wait("kube-apiserver")
    install_crds(bed)  # `wait_for_crds` once the rest (if any) is started


def start_etcd(bed: Bed) -> None:
    url = f"http://127.0.0.1:{bed.state.ports['etcd']}"
    peer = f"http://127.0.0.1:{bed.state.ports['etcd-peer']}"
    bed.procs.start("etcd", [
        bed.bins["etcd"], "--name", "testbed", "--data-dir", bed.dir / "etcd",
        "--listen-client-urls", url, "--advertise-client-urls", url,
        "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
        "--initial-cluster", f"testbed={peer}", "--initial-cluster-state", "new",
        "--snapshot-count", "10000", "--quota-backend-bytes", str(2 * 1024**3),
        "--log-level", "warn", "--logger", "zap",
    ])  # fmt: skip
    bed.save()


def write_cluster_pki(bed: Bed) -> None:
    pki.cluster_pki(bed.pki)


def write_users(bed: Bed) -> None:
    """Tokens of every component's user (all of them, so the cluster tier can be added later)
    and their kubeconfigs."""
    tokens = kubeconfig.new_tokens()
    (bed.pki / "tokens.csv").write_text(kubeconfig.tokens_csv(tokens))
    kubeconfig.write_kubeconfigs(bed.dir, bed.state.server, bed.pki / "ca.crt", tokens)
    bed.state.admin_token = tokens["admin"]


def start_apiserver(bed: Bed) -> None:
    p = bed.pki
    bed.procs.start("kube-apiserver", [
        bed.bins["kube-apiserver"],
        f"--etcd-servers=http://127.0.0.1:{bed.state.ports['etcd']}",
        "--bind-address=127.0.0.1", f"--secure-port={bed.state.ports['apiserver']}",
        "--advertise-address=127.0.0.1",
        f"--cert-dir={p}", f"--tls-cert-file={p / 'apiserver.crt'}",
        f"--tls-private-key-file={p / 'apiserver.key'}",
        f"--client-ca-file={p / 'ca.crt'}", f"--token-auth-file={p / 'tokens.csv'}",
        "--authorization-mode=Node,RBAC", "--anonymous-auth=true",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-account-key-file={p / 'sa.pub'}",
        f"--service-account-signing-key-file={p / 'sa.key'}",
        "--service-cluster-ip-range=10.96.0.0/16", "--allow-privileged=true",
        "--endpoint-reconciler-type=none", "--profiling=false", "--v=1",
        f"--kubelet-certificate-authority={p / 'ca.crt'}",
    ])  # fmt: skip
    bed.save()


def install_crds(bed: Bed) -> None:
    """The PyTorchJob CRD from the training-operator module (its controller need not run: the
    operator can create PyTorchJobs against it)."""
    crd = manifests.pytorchjob_crd(bed.training_operator_src)
    path = resource_path(
        "apiextensions.k8s.io/v1", "CustomResourceDefinition", manifests.PYTORCHJOB_CRD
    )
    bed.api.apply(path, crd.read_bytes())


def wait_for_crds(bed: Bed) -> None:
    """The CRD is Established: its API is served."""
    path = resource_path(
        "apiextensions.k8s.io/v1", "CustomResourceDefinition", manifests.PYTORCHJOB_CRD
    )

    def established() -> bool:
        crd = bed.api.get(path) or {}
        conditions = crd.get("status", {}).get("conditions") or []
        return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

    bed.procs.wait_for(f"CRD {manifests.PYTORCHJOB_CRD}", established, bed.settings.up_timeout)


# --------------------------------------------------------------------------- cluster tier


def start_cluster_tier(bed: Bed) -> None:
    """Everything else, on a running API tier; returns when all of it is healthy."""
    used = set(bed.state.ports.values())
    bed.state.ports.update(allocate_ports(CLUSTER_TIER, used))
    start_controller_manager(bed)
    start_scheduler(bed)
    write_component_pki(bed)
    apply_bootstrap_objects(bed)
    start_kwok(bed)
    start_rendezvous(bed)
    start_provisioner(bed)
    start_training_operator(bed)
    if "trainer-metrics" in bed.state.components:
        start_trainer_metrics(bed)
    if "jobset" in bed.state.components:
        start_jobset(bed)
    if "trainer" in bed.state.components:
        start_trainer(bed)  # before Kueue: its TrainJob CRD is served when Kueue starts
    if "kueue" in bed.state.components:
        start_kueue(bed)
    for component in bed.state.components:
        if component not in API_ONLY:
            bed.wait(component)
    wait_for_nodes(bed)
    wait_for_default_service_account(bed)
    wait_for_webhook(bed)
    if "trainer" in bed.state.components:
        finish_trainer(bed)
    if "kueue" in bed.state.components:
        finish_kueue(bed)


def _serving_flags(bed: Bed, user: str, port: str) -> list[str]:
    """What the controller-manager and the scheduler share: their kubeconfig for every client,
    a secure port on loopback, no leader election, no profiling."""
    kc = bed.kubeconfig(user)
    return [
        f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}",
        f"--authorization-kubeconfig={kc}", "--bind-address=127.0.0.1",
        f"--secure-port={bed.state.ports[port]}", "--leader-elect=false", "--profiling=false",
        "--v=1",
    ]  # fmt: skip


def start_controller_manager(bed: Bed) -> None:
    bed.procs.start("kube-controller-manager", [
        bed.bins["kube-controller-manager"], *_serving_flags(bed, "kcm", "kcm"),
        "--use-service-account-credentials=true",
        f"--service-account-private-key-file={bed.pki / 'sa.key'}",
        f"--root-ca-file={bed.pki / 'ca.crt'}",
        f"--cluster-signing-cert-file={bed.pki / 'ca.crt'}",
        f"--cluster-signing-key-file={bed.pki / 'ca.key'}",
    ])  # fmt: skip
    bed.save()


def start_scheduler(bed: Bed) -> None:
    bed.procs.start("kube-scheduler", [
        bed.bins["kube-scheduler"], *_serving_flags(bed, "scheduler", "scheduler"),
    ])  # fmt: skip
    bed.save()


def write_component_pki(bed: Bed) -> None:
    pki.webhook_pki(bed.pki)
    pki.kwok_pki(bed.pki)


def apply_bootstrap_objects(bed: Bed) -> None:
    """The training-operator's ClusterRole (from its module), its namespace, ServiceAccount,
    binding, webhook Secret and ValidatingWebhookConfiguration, and the kwok nodes (also written
    to ``<state dir>/bootstrap.json``, for reference)."""
    role = manifests.training_operator_role(bed.training_operator_src)
    path = resource_path("rbac.authorization.k8s.io/v1", "ClusterRole", "training-operator")
    bed.api.apply(path, role.read_bytes())
    objs = manifests.training_operator_objects(bed.pki, bed.state.ports["to-webhook"])
    objs += manifests.nodes(bed.settings.gpu_nodes, bed.settings.a100_nodes, bed.state.pod_network)
    (bed.dir / "bootstrap.json").write_text(manifests.as_list(objs))
    bed.api.apply_objects(objs)


def start_kwok(bed: Bed) -> None:
    config = bed.dir / "kwok-stages.yaml"
    trainer_log = bed.dir / "trainer.log"
    trainer_log.write_text(manifests.trainer_log())
    config.write_text(
        manifests.kwok_config(bed.settings.pod_run_seconds, trainer_log, bed.settings.images)
    )
    port = bed.state.ports["kwok"]
    bed.procs.start("kwok", [
        bed.bins["kwok"], f"--kubeconfig={bed.kubeconfig('kwok')}", f"--config={config}",
        "--manage-all-nodes=false",
        "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
        "--node-ip=127.0.0.1", f"--node-port={port}", f"--server-address=127.0.0.1:{port}",
        f"--tls-cert-file={bed.pki / 'kwok.crt'}", f"--tls-private-key-file={bed.pki / 'kwok.key'}",
        "--node-lease-duration-seconds=40",
    ], env={"HOME": str(bed.dir)})  # fmt: skip
    bed.save()


def start_rendezvous(bed: Bed) -> None:
    """The fake trainer's rendezvous (rendezvous.py): training pods finish only once every pod
    of their PyTorchJob runs."""
    bed.procs.start("rendezvous", [
        sys.executable, "-m", "finetune_testbed", "rendezvous", "--state-dir", bed.dir,
    ], env={"PYTHONPATH": str(HACK)})  # fmt: skip
    bed.save()


def start_provisioner(bed: Bed) -> None:
    """The storage provisioner (provisioner.py): claims of the default class get a volume."""
    bed.procs.start("provisioner", [
        sys.executable, "-m", "finetune_testbed", "provisioner", "--state-dir", bed.dir,
    ], env={"PYTHONPATH": str(HACK)})  # fmt: skip
    bed.save()


def start_trainer_metrics(bed: Bed) -> None:
    """The fake trainer's metrics (trainer_metrics.py), run by this Python with the trainer's
    package on the path."""
    bed.procs.start("trainer-metrics", [
        sys.executable, "-m", "finetune_testbed", "trainer-metrics", "--state-dir", bed.dir,
        "--default-run-seconds", str(bed.settings.pod_run_seconds),
    ], env={"PYTHONPATH": f"{HACK}:{REPO / 'trainer-image'}"})  # fmt: skip
    bed.save()


def add_trainer_metrics(bed: Bed) -> None:
    """trainer-metrics on a running test bed: first give its nodes pod CIDRs if it has none (a
    node's pod CIDR may be set once, from empty); kwok uses them for the pods it starts next."""
    if not bed.state.pod_network:
        bed.state.pod_network = new_pod_network()
        bed.save()
        items = (bed.api.get("/api/v1/nodes?labelSelector=type%3Dkwok") or {}).get("items", [])
        for i, node in enumerate(sorted(n["metadata"]["name"] for n in items)):
            cidr = manifests.node_pod_cidr(bed.state.pod_network, i)
            body = json.dumps({"spec": {"podCIDR": cidr, "podCIDRs": [cidr]}}).encode()
            status, out = bed.api.call(
                "PATCH", f"/api/v1/nodes/{node}", body, "application/merge-patch+json"
            )
            if status != 200:
                raise TestbedError(f"giving node {node} the pod CIDR {cidr} failed: {out}")
    start_trainer_metrics(bed)


def start_training_operator(bed: Bed) -> None:
    """Its webhook server reads its certs from $TMPDIR/k8s-webhook-server/serving-certs."""
    tmp = bed.dir / "training-operator-tmp"
    certs = tmp / "k8s-webhook-server" / "serving-certs"
    certs.mkdir(parents=True, exist_ok=True)
    shutil.copy(bed.pki / "webhook.crt", certs / "tls.crt")
    shutil.copy(bed.pki / "webhook.key", certs / "tls.key")
    ensure_rotator_placeholder(bed.pki)
    ports = bed.state.ports
    bed.procs.start("training-operator", [
        bed.bins["training-operator"], f"--kubeconfig={bed.kubeconfig('to')}",
        "--enable-scheme=pytorchjob",
        f"--metrics-bind-address=127.0.0.1:{ports['to-metrics']}",
        f"--health-probe-bind-address=127.0.0.1:{ports['to-probe']}",
        f"--webhook-server-port={ports['to-webhook']}", "--leader-elect=false",
        "--zap-devel=false",
    ], env={"MY_POD_NAMESPACE": "kubeflow", "TMPDIR": str(tmp)})  # fmt: skip
    bed.save()


def ensure_rotator_placeholder(pki_dir: Path) -> None:
    """cert-controller waits for /tmp/k8s-webhook-server/serving-certs/tls.crt to exist (a
    hard-coded path; the webhook server itself reads the certs from $TMPDIR). Create it if
    missing; never remove it (another test bed may rely on it)."""
    try:
        ROTATOR_CERT_DIR.mkdir(parents=True, exist_ok=True)
        for ext in ("crt", "key"):
            if not (ROTATOR_CERT_DIR / f"tls.{ext}").exists():
                shutil.copy(pki_dir / f"webhook.{ext}", ROTATOR_CERT_DIR / f"tls.{ext}")
    except OSError as e:
        log(f"warning: cannot create {ROTATOR_CERT_DIR}: {e}")


def wait_for_nodes(bed: Bed) -> None:
    """Every kwok node (the GPU nodes and the CPU node) Ready."""
    expected = bed.settings.gpu_nodes + bed.settings.a100_nodes + 1

    def ready(node: manifests.Obj) -> bool:
        conditions = node.get("status", {}).get("conditions") or []
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def all_ready() -> bool:
        nodes = (bed.api.get("/api/v1/nodes?labelSelector=type%3Dkwok") or {}).get("items", [])
        return len(nodes) == expected and all(ready(n) for n in nodes)

    bed.procs.wait_for("kwok nodes", all_ready, bed.settings.up_timeout)


def wait_for_default_service_account(bed: Bed) -> None:
    """default/default, made by the controller-manager (pods need their namespace's)."""
    path = "/api/v1/namespaces/default/serviceaccounts/default"
    bed.procs.wait_for(
        "default service account", lambda: bed.api.get(path) is not None, bed.settings.up_timeout
    )


def wait_for_webhook(bed: Bed) -> None:
    """The training-operator's webhook denies an invalid PyTorchJob (server-side dry run)."""
    path = "/apis/kubeflow.org/v1/namespaces/default/pytorchjobs"

    def rejects() -> bool:
        status, message = bed.api.dry_run_create(path, manifests.INVALID_PYTORCHJOB)
        return status >= 400 and "denied the request" in message

    bed.procs.wait_for("PyTorchJob webhook", rejects, bed.settings.up_timeout)


# --------------------------------------------------------------------------- Kueue (--kueue)


def start_kueue(bed: Bed) -> None:
    """Kueue (kueue.py): its CRDs (conversion webhook on loopback), ClusterRole and webhook
    configurations from its module, its ServiceAccount's token, certs and configuration; then
    the process. ``finish_kueue`` waits for its webhooks and makes the queues."""
    exe = go_install(bed.settings, KUEUE)
    src = kueue_source(bed.settings)
    bed.state.binaries["kueue"] = str(exe)
    ports = bed.state.ports
    if "kueue-webhook" not in ports:
        ports.update(allocate_ports(("kueue",), set(ports.values())))
    pki.kueue_pki(bed.pki, kueue.CA_NAME, kueue.WEBHOOK_DNS)
    ca = (bed.pki / "kueue-ca.crt").read_bytes()
    install_kueue_crds(bed, src, ca)
    role = bed.api.parse_yaml(kueue.cluster_role_file(src).read_text())
    bed.api.apply_objects([kueue.cluster_role(role), *kueue.access_objects(bed.pki)])
    hooks = kueue.yaml_documents(kueue.webhook_file(src).read_text())
    configs = [bed.api.parse_yaml(doc) for doc in hooks]
    bed.api.apply_objects(
        [kueue.webhook_configuration(c, ports["kueue-webhook"], ca) for c in configs]
    )
    write_kueue_kubeconfig(bed)
    certs = bed.dir / "kueue-certs"
    certs.mkdir(exist_ok=True)
    for name, key in (("tls.crt", "kueue-webhook.crt"), ("tls.key", "kueue-webhook.key")):
        shutil.copy(bed.pki / key, certs / name)
    shutil.copy(bed.pki / "kueue-ca.crt", certs / "ca.crt")
    config = bed.dir / "kueue-config.yaml"
    config.write_text(kueue.configuration(ports["kueue-webhook"], ports["kueue-probe"], certs))
    wait_for_kueue_crds(bed, src)
    bed.procs.start("kueue", [
        exe, f"--config={config}", f"--kubeconfig={bed.kubeconfig('kueue')}",
        "--zap-log-level=info",
    ])  # fmt: skip
    bed.save()


def install_kueue_crds(bed: Bed, src: Path, ca: bytes) -> None:
    """Kueue's CRDs from its module; those it serves in two versions convert through its
    webhook on loopback (the module's ``webhook_in_*`` patches, with a URL)."""
    crd_kind = ("apiextensions.k8s.io/v1", "CustomResourceDefinition")
    patch = json.dumps(kueue.conversion_patch(bed.state.ports["kueue-webhook"], ca)).encode()
    for f in kueue.crd_files(src):
        name = kueue.crd_name(f)
        path = resource_path(*crd_kind, name)
        bed.api.apply(path, f.read_bytes())
        if name.split(".")[0] in kueue.CONVERTED_CRDS:
            status, out = bed.api.call("PATCH", path, patch, "application/merge-patch+json")
            if status != 200:
                raise TestbedError(f"patching the conversion webhook of {name} failed: {out}")


def wait_for_kueue_crds(bed: Bed, src: Path) -> None:
    names = [kueue.crd_name(f) for f in kueue.crd_files(src)]

    def established() -> bool:
        for name in names:
            crd = bed.api.get(
                resource_path("apiextensions.k8s.io/v1", "CustomResourceDefinition", name)
            )
            conditions = (crd or {}).get("status", {}).get("conditions") or []
            if not any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
                return False
        return True

    bed.procs.wait_for("Kueue's CRDs", established, bed.settings.up_timeout)


def write_kueue_kubeconfig(bed: Bed) -> None:
    """Kueue runs as its ServiceAccount, with a token from the TokenRequest API (so it can be
    added to a running test bed: the static tokens are read once, when the API server starts)."""
    path = f"/api/v1/namespaces/{kueue.NAMESPACE}/serviceaccounts/{kueue.SERVICE_ACCOUNT}/token"
    body = json.dumps(kueue.token_request()).encode()
    status, out = bed.api.call("POST", path, body, "application/json")
    if status != 201:
        raise TestbedError(f"a token for Kueue's ServiceAccount was refused ({status}): {out}")
    token = out["status"]["token"]
    kubeconfig.write_kubeconfig(
        bed.kubeconfig("kueue"), bed.state.server, bed.state.ca, token, kueue.SERVICE_ACCOUNT
    )


def finish_kueue(bed: Bed, queues: bool = True) -> None:
    """Kueue's webhooks answer (it denies an invalid ClusterQueue), then (``queues``) the test
    bed's queues: ResourceFlavor, ClusterQueue, WorkloadPriorityClasses (through those
    webhooks)."""
    path = "/apis/kueue.x-k8s.io/v1beta2/clusterqueues"

    def rejects() -> bool:
        status, message = bed.api.dry_run_create(path, kueue.INVALID_CLUSTER_QUEUE)
        return status >= 400 and "denied the request" in message

    bed.procs.wait_for("Kueue's webhooks", rejects, bed.settings.up_timeout)
    if queues:
        bed.api.apply_objects(kueue.queue_objects())


def restart_kueue(bed: Bed) -> None:
    """Stop Kueue and start it again (same ports, certs and configuration)."""
    log("restarting Kueue: it sets its TrainJob integration up now that the CRD is served")
    left = stop({"kueue": bed.state.pids["kueue"]}, ["kueue"])
    if left:
        raise TestbedError("Kueue did not stop")
    start_kueue(bed)
    bed.wait("kueue")
    finish_kueue(bed, queues=False)  # the queues are there (applying them again would
    # rewrite their quotas as the test bed gives them, integers, over the stored quantities)


# --------------------------------------------------------------------------- Trainer (--trainer)


def _ensure_ports(bed: Bed, component: str) -> dict[str, int]:
    ports = bed.state.ports
    if any(name not in ports for name in PORTS[component]):
        ports.update(allocate_ports((component,), set(ports.values())))
    return ports


def _service_account_kubeconfig(bed: Bed, key: str, namespace: str, name: str) -> Path:
    """A kubeconfig for the ServiceAccount ``namespace/name``, with a token from the TokenRequest
    API (the static tokens are read once, when the API server starts)."""
    path = f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token"
    body = json.dumps(kueue.token_request()).encode()
    status, out = bed.api.call("POST", path, body, "application/json")
    if status != 201:
        raise TestbedError(f"a token for the ServiceAccount {namespace}/{name} was refused: {out}")
    kc = bed.kubeconfig(key)
    kubeconfig.write_kubeconfig(kc, bed.state.server, bed.state.ca, out["status"]["token"], name)
    return kc


def _install_crds(bed: Bed, files: list[Path], what: str) -> None:
    """Apply CRDs from a module's files and wait until they are Established."""
    crd_kind = ("apiextensions.k8s.io/v1", "CustomResourceDefinition")
    names = [trainer_v2.crd_name(f) for f in files]
    if not names:
        raise TestbedError(f"no CRDs found for {what}")
    for f, name in zip(files, names, strict=True):
        path = resource_path(*crd_kind, name)
        try:
            bed.api.apply(path, f.read_bytes())
        except TestbedError as e:
            older = trainer_v2.without_uncompilable_rule(f.read_text())
            if older is None or "compilation failed" not in str(e):
                raise
            log(f"{name}: this API server cannot compile one of its CEL rules: dropped it")
            bed.api.apply(path, older.encode())

    def established() -> bool:
        for name in names:
            crd = bed.api.get(resource_path(*crd_kind, name)) or {}
            conditions = crd.get("status", {}).get("conditions") or []
            if not any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
                return False
        return True

    bed.procs.wait_for(f"{what}'s CRDs", established, bed.settings.up_timeout)


def _webhooks(bed: Bed, src_file: Path, names: dict[str, str], port: int) -> None:
    """The module's webhook configurations, renamed (by kind) and pointed at loopback."""
    ca = (bed.pki / "webhook-ca.crt").read_bytes()
    configs = [bed.api.parse_yaml(doc) for doc in kueue.yaml_documents(src_file.read_text())]
    bed.api.apply_objects(
        [trainer_v2.webhook_configuration(c, names[c["kind"]], port, ca) for c in configs]
    )


def start_jobset(bed: Bed) -> None:
    """JobSet (trainer_v2.py): its CRD, ClusterRole and webhooks from its module, the
    namespaces and ServiceAccounts of JobSet and Trainer, its certs and configuration; then the
    process (as its ServiceAccount)."""
    exe = go_install(bed.settings, JOBSET)
    src = jobset_source(bed.settings)
    bed.state.binaries["jobset"] = str(exe)
    ports = _ensure_ports(bed, "jobset")
    _install_crds(bed, trainer_v2.jobset_crd_files(src), "JobSet")
    role = bed.api.parse_yaml(trainer_v2.jobset_role_file(src).read_text())
    bed.api.apply_objects([trainer_v2.jobset_role(role), *trainer_v2.access_objects()])
    _webhooks(
        bed,
        trainer_v2.jobset_webhook_file(src),
        {
            "ValidatingWebhookConfiguration": trainer_v2.JOBSET_VALIDATING,
            "MutatingWebhookConfiguration": trainer_v2.JOBSET_MUTATING,
        },
        ports["jobset-webhook"],
    )
    kc = _service_account_kubeconfig(
        bed, "jobset", trainer_v2.JOBSET_NAMESPACE, trainer_v2.JOBSET_SA
    )
    certs = bed.dir / "jobset-certs"
    _serving_certs(bed, certs)
    config = bed.dir / "jobset-config.yaml"
    config.write_text(
        trainer_v2.jobset_configuration(ports["jobset-webhook"], ports["jobset-probe"], certs)
    )
    bed.procs.start("jobset", [
        exe, f"--config={config}", f"--kubeconfig={kc}", "--zap-log-level=info",
    ], env={"NAMESPACE": trainer_v2.JOBSET_NAMESPACE})  # fmt: skip
    bed.save()


def _serving_certs(bed: Bed, certs: Path) -> None:
    """The test bed's webhook serving cert (for 127.0.0.1) as tls.crt/tls.key in ``certs``."""
    certs.mkdir(parents=True, exist_ok=True)
    shutil.copy(bed.pki / "webhook.crt", certs / "tls.crt")
    shutil.copy(bed.pki / "webhook.key", certs / "tls.key")
    shutil.copy(bed.pki / "webhook-ca.crt", certs / "ca.crt")


def start_trainer(bed: Bed) -> None:
    """Kubeflow Trainer (trainer_v2.py): its CRDs, ClusterRole and webhooks from its module, its
    certs (in ``$TMPDIR/k8s-webhook-server/serving-certs``) and configuration; then the process
    (as its ServiceAccount). No ClusterTrainingRuntime is installed."""
    exe = go_install(bed.settings, TRAINER)
    src = trainer_source(bed.settings)
    bed.state.binaries["trainer"] = str(exe)
    ports = _ensure_ports(bed, "trainer")
    _install_crds(bed, trainer_v2.trainer_crd_files(src), "Trainer")
    role = trainer_v2.trainer_role_file(src).read_text()
    bed.api.apply_objects([bed.api.parse_yaml(role), *trainer_v2.access_objects()])
    _webhooks(
        bed,
        trainer_v2.trainer_webhook_file(src),
        {
            "ValidatingWebhookConfiguration": trainer_v2.TRAINER_VALIDATING,
            "MutatingWebhookConfiguration": trainer_v2.TRAINER_MUTATING,
        },
        ports["trainer-webhook"],
    )
    kc = _service_account_kubeconfig(
        bed, "trainer", trainer_v2.TRAINER_NAMESPACE, trainer_v2.TRAINER_SA
    )
    tmp = bed.dir / "trainer-tmp"
    _serving_certs(bed, tmp / "k8s-webhook-server" / "serving-certs")
    config = bed.dir / "trainer-config.yaml"
    config.write_text(
        trainer_v2.trainer_configuration(ports["trainer-webhook"], ports["trainer-probe"])
    )
    bed.procs.start("trainer", [
        exe, f"--config={config}", f"--kubeconfig={kc}", "--zap-log-level=info",
    ], env={"TMPDIR": str(tmp)})  # fmt: skip
    bed.save()


def finish_trainer(bed: Bed) -> None:
    """JobSet's and Trainer's webhooks answer: each denies an invalid object (server-side dry
    runs)."""

    def denies(path: str, obj: manifests.Obj) -> bool:
        status, message = bed.api.dry_run_create(path, obj)
        return status >= 400 and "denied the request" in message

    jobsets = "/apis/jobset.x-k8s.io/v1alpha2/namespaces/default/jobsets"
    trainjobs = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/default/trainjobs"
    bed.procs.wait_for(
        "JobSet's webhooks",
        lambda: denies(jobsets, trainer_v2.INVALID_JOBSET),
        bed.settings.up_timeout,
    )
    bed.procs.wait_for(
        "Trainer's webhooks",
        lambda: denies(trainjobs, trainer_v2.probe_trainjob()),
        bed.settings.up_timeout,
    )
