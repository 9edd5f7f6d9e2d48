"""helm install into the test bed, then the operator runs with the chart's ServiceAccount token.

Shows with ``kubectl auth can-i --as=system:serviceaccount:...`` that the chart's RBAC lets the
operator do its work and nothing else (never Secrets), in cluster-wide and single-namespace
mode, and that the aggregated roles give users view/edit rights on FineTuneJobs.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from chartkit import CHART, REPO

pytestmark = pytest.mark.e2e

CRD = "finetunejobs.finetune.dev"

#: (verb, resource, subresource) the operator must be allowed in a watched namespace.
ALLOWED = [
    ("get", "finetunejobs.finetune.dev", ""),
    ("list", "finetunejobs.finetune.dev", ""),
    ("watch", "finetunejobs.finetune.dev", ""),
    ("patch", "finetunejobs.finetune.dev", ""),
    ("update", "finetunejobs.finetune.dev", "status"),
    ("patch", "finetunejobs.finetune.dev", "status"),
    ("get", "pytorchjobs.kubeflow.org", ""),
    ("list", "pytorchjobs.kubeflow.org", ""),
    ("watch", "pytorchjobs.kubeflow.org", ""),
    ("create", "pytorchjobs.kubeflow.org", ""),
    ("patch", "pytorchjobs.kubeflow.org", ""),
    ("get", "configmaps", ""),
    ("create", "configmaps", ""),
    ("patch", "configmaps", ""),
    ("list", "pods", ""),
    ("watch", "pods", ""),
    ("create", "events", ""),
    ("delete", "pytorchjobs.kubeflow.org", ""),  # a re-plan after out-of-memory makes it anew
    ("delete", "pods", ""),  # a hung gang is restarted from its last checkpoint
    ("create", "jobs.batch", ""),  # staging
    ("watch", "jobs.batch", ""),
    ("create", "persistentvolumeclaims", ""),  # the namespace's cache claim
]
#: What it must never do there.
DENIED = [
    ("get", "secrets", ""),
    ("list", "secrets", ""),
    ("watch", "secrets", ""),
    ("delete", "finetunejobs.finetune.dev", ""),
    ("create", "finetunejobs.finetune.dev", ""),
    ("delete", "configmaps", ""),
    ("delete", "jobs.batch", ""),
    ("delete", "persistentvolumeclaims", ""),
    ("list", "configmaps", ""),
    ("create", "pods", ""),
    ("deletecollection", "pods", ""),
    ("get", "pods", "log"),
    ("create", "pods", "exec"),
    ("create", "deployments.apps", ""),
    ("create", "roles.rbac.authorization.k8s.io", ""),
    ("create", "rolebindings.rbac.authorization.k8s.io", ""),
    ("create", "serviceaccounts", "token"),
]
#: Cluster-scoped: only CRD discovery and reading Nodes (their GPU labels) are allowed.
CLUSTER_DENIED = [
    ("list", "secrets", ""),  # --all-namespaces
    ("patch", "nodes", ""),
    ("update", "nodes", "status"),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io", ""),
    ("create", "customresourcedefinitions.apiextensions.k8s.io", ""),
    ("patch", "customresourcedefinitions.apiextensions.k8s.io", ""),
    ("*", "*", ""),
]


def can_i(tb: Any, who: str, verb: str, resource: str, sub: str, namespace: str | None) -> bool:
    args = ["auth", "can-i", verb, resource, f"--as={who}"]
    args += [f"--subresource={sub}"] if sub else []
    args += ["-n", namespace] if namespace else ["--all-namespaces"]
    p = tb.kubectl(*args)
    assert p.stdout.strip() in ("yes", "no"), p.stdout + p.stderr
    return p.stdout.strip() == "yes"


def permissions(tb: Any, who: str, namespace: str | None, table: list) -> dict[str, bool]:
    return {
        f"{v} {r}{'/' + s if s else ''}": can_i(tb, who, v, r, s, namespace) for v, r, s in table
    }


def make_namespace(tb: Any, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    tb.kubectl("create", "namespace", name, check=True)
    return name


@pytest.fixture
def release_namespace(crd: Any) -> Iterator[str]:
    name = make_namespace(crd, "ftop")
    yield name
    crd.kubectl("delete", "namespace", name, "--wait=false")


def helm_install(tb: Any, release: str, namespace: str, *sets: str) -> str:
    args = ["install", release, str(CHART), "-n", namespace]
    for s in sets:
        args += ["--set", s]
    p = tb.helm_run(*args)
    assert p.returncode == 0, p.stderr
    return p.stdout


def adopt_crd(tb: Any, release: str, namespace: str) -> None:
    """Let the release take over the session's CRD (Helm adopts objects labelled for it)."""
    tb.kubectl(
        "label", "--overwrite", f"crd/{CRD}", "app.kubernetes.io/managed-by=Helm", check=True
    )
    tb.kubectl(
        "annotate", "--overwrite", f"crd/{CRD}",
        f"meta.helm.sh/release-name={release}", f"meta.helm.sh/release-namespace={namespace}",
        check=True,
    )  # fmt: skip


HELM_OWNER = ("meta.helm.sh/release-name", "meta.helm.sh/release-namespace")
SPEC_HASH = "finetune.dev/spec-sha256"


def finetune_crd() -> str:
    """What ``finetune crd`` prints (the installed CLI, as README runs it)."""
    p = subprocess.run(
        [str(Path(sys.executable).parent / "finetune"), "crd"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return p.stdout


def crd_the_readme_way(tb: Any) -> None:
    """The CRD as on a cluster where README's ``finetune crd | kubectl apply --server-side -f -``
    ran and no Helm release ever held it (an earlier test's release may have: drop its marks)."""
    tb.kubectl("label", f"crd/{CRD}", "app.kubernetes.io/managed-by-", check=True)
    tb.kubectl("annotate", f"crd/{CRD}", *(f"{key}-" for key in HELM_OWNER), check=True)
    fresh = tb.kubectl(
        "apply", "--server-side", "--force-conflicts", "-f", "-", input=finetune_crd()
    )
    assert fresh.returncode == 0, fresh.stderr
    readme = tb.kubectl("apply", "--server-side", "-f", "-", input=finetune_crd())
    assert readme.returncode == 0, readme.stderr


def live_crd_metadata(tb: Any) -> dict[str, Any]:
    meta = tb.kubectl_json("get", f"crd/{CRD}")["metadata"]
    return {"labels": meta.get("labels", {}), "annotations": meta.get("annotations", {})}


def chart_crd_hash() -> str:
    chart_copy = yaml.safe_load((CHART / "files" / "finetunejob.yaml").read_text())
    return str(chart_copy["metadata"]["annotations"][SPEC_HASH])


def sa_kubeconfig(tb: Any, namespace: str, sa: str, path: Path) -> Path:
    """A kubeconfig that authenticates with a token of the chart's ServiceAccount."""
    token = tb.kubectl("create", "token", sa, "-n", namespace, "--duration=1h", check=True)
    admin = yaml.safe_load(Path(tb.kubeconfig).read_text())
    cluster = admin["clusters"][0]["cluster"]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "testbed", "cluster": cluster}],
        "users": [{"name": sa, "user": {"token": token.stdout.strip()}}],
        "contexts": [{"name": sa, "context": {"cluster": "testbed", "user": sa}}],
        "current-context": sa,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_install_cluster_wide_and_run_the_operator_as_its_service_account(
    crd: Any, release_namespace: str, tmp_path: Path
) -> None:
    tb, ns = crd, release_namespace
    release = f"ft-{uuid.uuid4().hex[:5]}"
    adopt_crd(tb, release, ns)
    notes = helm_install(tb, release, ns, "crds.install=true", "crds.keep=true")
    assert "kubectl get ftj" in notes
    # The release holds the CRD: it installs and upgrades it, and keeps it on uninstall.
    assert "installed and upgraded by this release, and kept on `helm uninstall`" in notes, notes
    manifest = tb.helm_run("get", "manifest", release, "-n", ns, check=True).stdout
    assert f"name: {CRD}" in manifest
    assert f"rollout status deployment/{release}-finetune-operator" in notes
    sa = f"{release}-finetune-operator"
    who = f"system:serviceaccount:{ns}:{sa}"
    jobs_ns = make_namespace(tb, "ftjobs")
    try:
        # What it may and may not do, in a namespace it has never heard of (cluster-wide mode).
        allowed = permissions(tb, who, jobs_ns, ALLOWED)
        assert all(allowed.values()), {k: v for k, v in allowed.items() if not v}
        denied = permissions(tb, who, jobs_ns, DENIED)
        assert not any(denied.values()), {k: v for k, v in denied.items() if v}
        cluster = permissions(tb, who, None, CLUSTER_DENIED)
        assert not any(cluster.values()), {k: v for k, v in cluster.items() if v}
        assert can_i(tb, who, "watch", "customresourcedefinitions.apiextensions.k8s.io", "", None)
        # nvidia.com/gpu.product labels: a job's GPU type inferred when gpuType is left out.
        assert can_i(tb, who, "list", "nodes", "", None)

        # The real operator process, authenticated only by the ServiceAccount's token.
        kubeconfig = sa_kubeconfig(tb, ns, sa, tmp_path / "sa.kubeconfig")
        run_operator_and_a_job(tb, kubeconfig, jobs_ns, tmp_path / "operator.log")
    finally:
        tb.kubectl("delete", "namespace", jobs_ns, "--wait=false")
        p = tb.helm_run("uninstall", release, "-n", ns)
        assert p.returncode == 0, p.stderr
    # crds.keep: the CRD (and every FineTuneJob) survives the uninstall.
    assert tb.kubectl("get", f"crd/{CRD}").returncode == 0
    crd_the_readme_way(tb)  # leave the shared test bed's CRD as README makes it


def test_helm_install_after_the_readme_crd_leaves_it_and_says_so(
    crd: Any, release_namespace: str
) -> None:
    """README's order: ``finetune crd | kubectl apply --server-side -f -``, then ``helm install``
    with the default values. Helm refuses to take over an object it does not own, so the chart
    leaves the CRD alone (install, upgrade, uninstall) and NOTES.txt says so."""
    tb, ns = crd, release_namespace
    release = f"ft-{uuid.uuid4().hex[:5]}"
    crd_the_readme_way(tb)
    before = live_crd_metadata(tb)
    assert before["annotations"][SPEC_HASH] == chart_crd_hash()  # the CLI's CRD is the chart's
    try:
        notes = helm_install(tb, release, ns)
        assert "held by kubectl or another tool, not a Helm release: left as it is" in notes, notes
        assert "It is this chart's version." in notes, notes
        assert "crds.install=false" in notes
        manifest = tb.helm_run("get", "manifest", release, "-n", ns, check=True).stdout
        assert "CustomResourceDefinition" not in manifest
        assert live_crd_metadata(tb) == before  # not taken over, not relabelled

        # An older CRD (as an older CLI's `finetune crd | kubectl apply --server-side` leaves
        # it): the upgrade says so and how to update it; README's command then does.
        older = yaml.safe_load(finetune_crd())
        older["metadata"]["annotations"][SPEC_HASH] = "0" * 64
        applied = tb.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(older))
        assert applied.returncode == 0, applied.stderr
        upgrade = tb.helm_run("upgrade", release, str(CHART), "-n", ns, "--reuse-values")
        assert upgrade.returncode == 0, upgrade.stderr
        assert "It is NOT this chart's version: update it" in upgrade.stdout, upgrade.stdout
        assert "finetune crd | kubectl apply --server-side -f -" in upgrade.stdout
        readme = tb.kubectl("apply", "--server-side", "-f", "-", input=finetune_crd())
        assert readme.returncode == 0, readme.stderr
        assert live_crd_metadata(tb) == before
    finally:
        p = tb.helm_run("uninstall", release, "-n", ns)
        assert p.returncode == 0, p.stderr
    # Never the release's: the uninstall leaves it (and every FineTuneJob) as it was.
    assert live_crd_metadata(tb) == before


def run_operator_and_a_job(tb: Any, kubeconfig: Path, jobs_ns: str, log: Path) -> None:
    from operator_fixtures import free_port

    health = free_port()
    env = tb.env(KUBECONFIG=str(kubeconfig), FINETUNE_PROGRESS_INTERVAL="2", PYTHONUNBUFFERED="1")
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "finetune"), "operator",
             "--metrics-port", str(free_port()), "--health-port", str(health)],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:
        job = yaml.safe_load((REPO / "examples" / "tiny-local.yaml").read_text())
        job["metadata"] = {"name": "rbac-check", "namespace": jobs_ns}
        applied = tb.apply(job)
        assert applied.returncode == 0, applied.stderr

        def progressed() -> Any:
            assert proc.poll() is None, log.read_text()[-4000:]
            ftj = tb.kubectl_json("get", "finetunejob", "rbac-check", "-n", jobs_ns)
            children = tb.kubectl("get", "pytorchjob,configmap", "-n", jobs_ns, "-o", "name")
            phase = ftj.get("status", {}).get("phase")
            return phase in ("Pending", "Running", "Succeeded") and "pytorchjob" in children.stdout

        tb.wait_for(progressed, timeout=120, desc="the operator to create the PyTorchJob")
        events = tb.kubectl_json("get", "events", "-n", jobs_ns)["items"]
        assert any(e.get("source", {}).get("component") == "finetune-operator" for e in events)
        # kopf's annotations were written (patch on finetunejobs); no finalizer: nothing of the
        # operator's must run before a job goes, so a namespace never waits for the operator.
        meta = tb.kubectl_json("get", "finetunejob", "rbac-check", "-n", jobs_ns)["metadata"]
        assert "finetune.dev/last-handled-configuration" in meta.get("annotations", {})
        assert "finetune.dev/finalizer" not in meta.get("finalizers", [])
        tb.kubectl(
            "delete", "finetunejob", "rbac-check", "-n", jobs_ns, "--timeout=60s", check=True
        )
        time.sleep(1)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    text = log.read_text()
    # "403" as a word: kopf's stream ids are hex and may contain the digits
    assert not re.search(r"\b403\b", text), text[-4000:]
    for forbidden in ("Forbidden", "Not enough permissions"):
        assert forbidden not in text, text[-4000:]


def test_single_namespace_mode_grants_nothing_elsewhere(crd: Any, release_namespace: str) -> None:
    tb, ns = crd, release_namespace
    release = f"ft-{uuid.uuid4().hex[:5]}"
    watched, other = make_namespace(tb, "ftwatch"), make_namespace(tb, "ftother")
    try:
        helm_install(
            tb, release, ns, "crds.install=false", f"operator.watchNamespaces={{{watched}}}",
            "rbac.aggregateToDefaultRoles=false",
        )  # fmt: skip
        who = f"system:serviceaccount:{ns}:{release}-finetune-operator"
        inside = permissions(tb, who, watched, ALLOWED)
        assert all(inside.values()), {k: v for k, v in inside.items() if not v}
        for namespace in (other, ns):
            outside = permissions(tb, who, namespace, ALLOWED + DENIED)
            assert not any(outside.values()), {k: v for k, v in outside.items() if v}
        cluster = permissions(
            tb, who, None, [*CLUSTER_DENIED, ("list", "finetunejobs.finetune.dev", "")]
        )
        assert not any(cluster.values()), {k: v for k, v in cluster.items() if v}
        # kopf's namespace discovery (to follow the namespaces it watches by name).
        assert can_i(tb, who, "watch", "namespaces", "", None)
        assert can_i(tb, who, "list", "nodes", "", None)  # the GPU type, in either mode
    finally:
        tb.helm_run("uninstall", release, "-n", ns)
        for n in (watched, other):
            tb.kubectl("delete", "namespace", n, "--wait=false")


def test_users_get_finetunejobs_through_the_aggregated_roles(
    crd: Any, release_namespace: str
) -> None:
    tb, ns = crd, release_namespace
    release = f"ft-{uuid.uuid4().hex[:5]}"
    team = make_namespace(tb, "ftteam")
    try:
        helm_install(tb, release, ns, "crds.install=false", "dashboard.enabled=false")
        for user, role in (("alice", "edit"), ("bob", "view")):
            tb.kubectl("create", "rolebinding", f"{user}-{role}", f"--clusterrole={role}",
                       f"--user={user}", "-n", team, check=True)  # fmt: skip

        def aggregated() -> bool:
            return can_i(tb, "alice", "create", "finetunejobs.finetune.dev", "", team)

        tb.wait_for(aggregated, timeout=60, desc="the edit role to aggregate FineTuneJobs")
        assert can_i(tb, "alice", "delete", "finetunejobs.finetune.dev", "", team)
        assert can_i(tb, "bob", "list", "finetunejobs.finetune.dev", "", team)
        assert can_i(tb, "bob", "get", "finetunejobs.finetune.dev", "status", team)
        assert not can_i(tb, "bob", "create", "finetunejobs.finetune.dev", "", team)
        assert not can_i(tb, "bob", "delete", "finetunejobs.finetune.dev", "", team)
    finally:
        tb.helm_run("uninstall", release, "-n", ns)
        tb.kubectl("delete", "namespace", team, "--wait=false")
