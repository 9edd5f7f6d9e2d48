"""The Helm chart with the real tools, no cluster: helm lint/template, kubeconform, promtool."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from chartkit import CHART, REPO, SCHEMA_TEMPLATE, documents

VALUES_DIR = Path(__file__).parent / "values"
VALUES_FILES = sorted(VALUES_DIR.glob("*.yaml"))
ALERTS_TEST = Path(__file__).parent / "alerts_test.yaml"
DASHBOARD_JSON = CHART / "dashboards" / "finetune-operator.json"


def _by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in _by_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


# ------------------------------------------------------------------ helm lint / kubeconform
@pytest.mark.parametrize("values", [None, *VALUES_FILES], ids=lambda v: v.stem if v else "default")
def test_helm_lint_strict(helm, values: Path | None) -> None:
    args = ["lint", "--strict", str(CHART), "--kube-version=1.31.4"]
    if values:
        args += ["-f", str(values)]
    p = helm.run(*args, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "0 chart(s) failed" in p.stdout


def test_chart_refuses_clusters_older_than_it_supports(helm) -> None:
    """Chart.yaml's kubeVersion: an old cluster is refused up front; without --kube-version helm
    assumes the Kubernetes of its own client-go (1.31 for helm 3.16, as a released helm does)."""
    old = helm.run("template", "ft", str(CHART), "--kube-version=1.30.0", check=False)
    assert old.returncode != 0
    assert "incompatible with Kubernetes v1.30.0" in old.stderr
    assert helm.run("template", "ft", str(CHART)).stdout.startswith("---")


@pytest.mark.parametrize("values", [None, *VALUES_FILES], ids=lambda v: v.stem if v else "default")
def test_rendered_manifests_pass_kubeconform_strict(helm, tools, schemas, values) -> None:
    rendered = helm.template(*([values] if values else [])).stdout
    p = subprocess.run(
        [
            tools["kubeconform"],
            "-strict",
            "-summary",
            "-output=json",
            f"-schema-location={schemas}/{SCHEMA_TEMPLATE}",
            "-",
        ],
        input=rendered,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    report = json.loads(p.stdout)
    assert p.returncode == 0, json.dumps(report["resources"], indent=1)[:6000]
    summary = report["summary"]
    # No schema may be missing (that would be "skipped") and every object must be checked.
    assert summary["skipped"] == 0
    assert summary["errors"] == 0
    assert summary["invalid"] == 0
    assert summary["valid"] == len(documents(rendered)) > 5


def test_kubeconform_strict_catches_a_typo(helm, tools, schemas) -> None:
    """The schemas are strict: an unknown field in a rendered object fails (the check is real)."""
    rendered = helm.template(VALUES_DIR / "monitoring.yaml").stdout
    broken = rendered.replace("allowPrivilegeEscalation:", "allowPrivilegeEscalaton:", 1)
    broken = broken.replace("podMetricsEndpoints:", "podMetricEndpoints:", 1)
    p = subprocess.run(
        [tools["kubeconform"], "-strict", f"-schema-location={schemas}/{SCHEMA_TEMPLATE}", "-"],
        input=broken,
        capture_output=True,
        text=True,
        check=False,
    )
    assert p.returncode == 1
    assert "allowPrivilegeEscalaton" in p.stdout
    assert "podMetricEndpoints" in p.stdout


# ------------------------------------------------------------------ values and schema
@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("podMonitr.enabled", "true", "Additional property podMonitr is not allowed"),
        ("serviceMonitor.enable", "true", "Additional property enable is not allowed"),
        ("operator.watchNamespace[0]", "ml", "Additional property watchNamespace"),
        ("trainer.metricsPort", "99999", "trainer.metricsPort"),
        ("image.digest", "latest", "image.digest"),
        ("operator.watchNamespaces[0]", "Bad_Name", "operator.watchNamespaces.0"),
        ("child", "TrainJob", "child"),
        ("trainJob.runtimeName", "Not_A_Name", "trainJob.runtimeName"),
    ],
)
def test_values_schema_rejects(helm, key: str, value: str, message: str) -> None:
    p = helm.template(check=False, **{key: value})
    assert p.returncode != 0
    assert message in p.stderr


def _leaves(node: Any, prefix: str = "") -> set[str]:
    if (
        isinstance(node, dict)
        and node
        and not prefix.endswith(
            ("Labels", "labels", "annotations", "Annotations", "nodeSelector", "resources")
        )
    ):
        out: set[str] = set()
        for k, v in node.items():
            out |= _leaves(v, f"{prefix}.{k}" if prefix else k)
        return out
    return {prefix}


def _schema_leaves(schema: dict[str, Any], prefix: str = "") -> set[str]:
    props = schema.get("properties")
    if props and schema.get("additionalProperties") is False and not prefix.endswith("resources"):
        out: set[str] = set()
        for k, v in props.items():
            out |= _schema_leaves(v, f"{prefix}.{k}" if prefix else k)
        return out
    return {prefix}


def test_schema_and_values_have_the_same_keys() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert _leaves(values) == _schema_leaves(schema)


def test_every_value_is_documented() -> None:
    """Each key in values.yaml has a comment right above it (entries of free-form maps such
    as resources or labels excepted: their map is documented)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    free_maps = {"resources", "labels", "annotations", "additionalLabels", "nodeSelector"}
    stack: list[tuple[int, str]] = []
    undocumented = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z][\w]*):", line)
        if not m:
            continue
        indent, key = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        inside_free_map = any(k in free_maps for _, k in stack)
        stack.append((indent, key))
        if not inside_free_map and not lines[i - 1].strip().startswith("#"):
            undocumented.append(f"line {i + 1}: {key}")
    assert not undocumented, undocumented
    assert len(stack) > 0


# ------------------------------------------------------------------ CRD
def test_chart_crd_is_a_copy_of_crds_dir() -> None:
    assert (CHART / "files" / "finetunejob.yaml").read_bytes() == (
        REPO / "crds" / "finetunejob.yaml"
    ).read_bytes(), "charts/finetune-operator/files/finetunejob.yaml is stale: run `make chart`"


def test_crd_toggles(helm) -> None:
    committed = yaml.safe_load((REPO / "crds" / "finetunejob.yaml").read_text())
    kept = _one(documents(helm.template().stdout), "CustomResourceDefinition")
    assert kept["spec"] == committed["spec"]
    spec_hash = committed["metadata"]["annotations"]  # the chart compares it with the cluster's
    assert kept["metadata"]["annotations"] == {**spec_hash, "helm.sh/resource-policy": "keep"}
    assert kept["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    dropped = documents(helm.template(**{"crds.keep": "false"}).stdout)
    assert _one(dropped, "CustomResourceDefinition")["metadata"]["annotations"] == spec_hash
    none = documents(helm.template(**{"crds.install": "false"}).stdout)
    assert not _by_kind(none, "CustomResourceDefinition")


# ------------------------------------------------------------------ workload and RBAC
def test_deployment_is_restricted(helm) -> None:
    docs = documents(helm.template(VALUES_DIR / "monitoring.yaml").stdout)
    dep = _one(docs, "Deployment")
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["runAsUser"] == 1000
    assert sc["runAsNonRoot"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["image"].endswith("@sha256:" + "0123456789abcdef" * 4)
    env = {e["name"]: e["value"] for e in c["env"]}
    assert (
        env["FINETUNE_TRAINER_IMAGE"] == "registry.example.com/ml/finetune-trainer:0.1.0-cuda12.4"
    )
    assert env["FINETUNE_TRAINER_METRICS_PORT"] == "9400"
    assert c["args"] == ["operator", "--metrics-port=8080", "--health-port=8081"]


def _operator_rules(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rules of every role bound to the operator Deployment's service account."""
    deployment = _one(docs, "Deployment")
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    namespace = deployment["metadata"]["namespace"]
    bound = {
        (b["roleRef"]["kind"], b["roleRef"]["name"])
        for b in _by_kind(docs, "ClusterRoleBinding") + _by_kind(docs, "RoleBinding")
        for subject in b["subjects"]
        if subject["kind"] == "ServiceAccount"
        and (subject["name"], subject.get("namespace")) == (account, namespace)
    }
    roles = [d for d in docs if (d["kind"], d["metadata"]["name"]) in bound]
    assert {(r["kind"], r["metadata"]["name"]) for r in roles} == bound, "a bound role is missing"
    return [rule for role in roles for rule in role.get("rules") or []]


@pytest.mark.parametrize("values", [None, *VALUES_FILES], ids=lambda v: v.stem if v else "default")
def test_operator_rbac_never_touches_secrets_or_wildcards(helm, values) -> None:
    docs = documents(helm.template(*([values] if values else [])).stdout)
    rules = _operator_rules(docs)
    granted = {r for rule in rules for r in rule.get("resources", [])}
    # what the operator needs, so the rules below are the operator's and not an empty list
    assert {"finetunejobs", "finetunejobs/status", "pytorchjobs", "pods"} <= granted, granted
    for rule in rules:
        resources, verbs = rule.get("resources", []), rule["verbs"]
        assert not {"secrets", "*"} & set(resources), rule
        assert "*" not in verbs + rule.get("apiGroups", []), rule
        assert "deletecollection" not in verbs, rule
        if "delete" in verbs:  # recovery only: a hung gang's pods, a re-planned child
            assert set(resources) <= {"pods", "pytorchjobs", "trainjobs"}, rule
        assert not rule.get("nonResourceURLs"), rule


def test_kueue_workloads_are_readable_only_with_kueue_enabled(helm) -> None:
    """kueue.enabled: the operator may read, watch and patch (spec.active) Kueue's Workloads,
    and nothing else of Kueue's; without it, nothing of Kueue's at all."""

    def kueue_rules(**sets: str) -> list[dict[str, Any]]:
        rules = _operator_rules(documents(helm.template(**sets).stdout))
        return [r for r in rules if "kueue.x-k8s.io" in r.get("apiGroups", [])]

    assert kueue_rules() == []
    (rule,) = kueue_rules(**{"kueue.enabled": "true"})
    assert rule["resources"] == ["workloads"]
    assert sorted(rule["verbs"]) == ["get", "list", "patch", "watch"]


def test_trainjob_child_gets_the_operator_s_own_runtime(helm) -> None:
    """child: trainjob installs the ClusterTrainingRuntime the operator's TrainJobs reference,
    the object trainjob.runtime builds (what the golden file and the e2e tests use), and tells
    the operator which child and runtime; the default installs no runtime."""
    from finetune_operator import trainjob

    docs = documents(helm.template(VALUES_DIR / "trainjob.yaml").stdout)
    chart_runtime = _one(docs, "ClusterTrainingRuntime", "finetune-torch")
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    built = trainjob.runtime(
        name="finetune-torch",
        image=f"ghcr.io/finetune-dev/finetune-trainer:{chart['appVersion']}",
        metrics_port=9400,
        backoff_limit=5,
    )
    assert chart_runtime["spec"] == built["spec"]
    framework = "trainer.kubeflow.org/framework"  # what Trainer v2 reads of its labels
    assert chart_runtime["metadata"]["labels"][framework] == built["metadata"]["labels"][framework]
    env = {
        e["name"]: e.get("value")
        for e in _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["FINETUNE_CHILD"] == "trainjob"
    assert env["FINETUNE_TRAINJOB_RUNTIME"] == "finetune-torch"
    assert "trainjobs" in {r for rule in _operator_rules(docs) for r in rule["resources"]}
    default = documents(helm.template().stdout)
    assert not _by_kind(default, "ClusterTrainingRuntime")
    own = documents(
        helm.template(VALUES_DIR / "trainjob.yaml", **{"trainJob.createRuntime": "false"}).stdout
    )
    assert not _by_kind(own, "ClusterTrainingRuntime")


def test_cluster_wide_mode_binds_cluster_wide(helm) -> None:
    docs = documents(helm.template().stdout)
    bindings = {b["roleRef"]["name"] for b in _by_kind(docs, "ClusterRoleBinding")}
    assert bindings == {"ft-finetune-operator", "ft-finetune-operator-discovery"}
    assert not _by_kind(docs, "RoleBinding")
    view = _one(docs, "ClusterRole", "ft-finetune-operator-view")
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    edit = _one(docs, "ClusterRole", "ft-finetune-operator-edit")
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"


def test_namespaced_mode_binds_only_the_watched_namespaces(helm) -> None:
    docs = documents(helm.template(VALUES_DIR / "namespaced.yaml").stdout)
    cluster_bindings = {b["roleRef"]["name"] for b in _by_kind(docs, "ClusterRoleBinding")}
    assert cluster_bindings == {"ft-finetune-operator-discovery"}
    discovery = _one(docs, "ClusterRole", "ft-finetune-operator-discovery")
    assert {r for rule in discovery["rules"] for r in rule["resources"]} == {
        "customresourcedefinitions",
        "namespaces",
        "nodes",  # read-only: their nvidia.com/gpu.product labels (gpuType left out)
    }
    assert {v for rule in discovery["rules"] for v in rule["verbs"]} == {"get", "list", "watch"}
    rbs = _by_kind(docs, "RoleBinding")
    assert sorted(rb["metadata"]["namespace"] for rb in rbs) == ["ml-team-a", "ml-team-b"]
    args = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=ml-team-a" in args
    assert "--namespace=ml-team-b" in args
    pm = _one(docs, "PodMonitor")
    assert pm["spec"]["namespaceSelector"] == {"matchNames": ["ml-team-a", "ml-team-b"]}
    assert not [d for d in docs if d["metadata"]["name"].endswith(("-view", "-edit"))]


def test_monitors_carry_additional_labels(helm) -> None:
    docs = documents(helm.template(VALUES_DIR / "monitoring.yaml").stdout)
    for kind in ("ServiceMonitor", "PodMonitor", "PrometheusRule"):
        assert _one(docs, kind)["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    pm = _one(docs, "PodMonitor")["spec"]
    assert pm["selector"]["matchLabels"]["app.kubernetes.io/name"] == "finetune-trainer"
    (endpoint,) = pm["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"
    targets = {r["targetLabel"] for r in endpoint["relabelings"]}
    assert "finetunejob" in targets
    default = documents(helm.template().stdout)
    assert not [d for d in default if d["kind"] in ("ServiceMonitor", "PodMonitor")]


# ------------------------------------------------------------------ dashboard
def test_dashboard_json_is_generated() -> None:
    p = subprocess.run(
        [sys.executable, str(REPO / "charts" / "dashboard.py")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert p.stdout == DASHBOARD_JSON.read_text(), "dashboard JSON is stale: run `make chart`"


def test_dashboard_configmap(helm) -> None:
    docs = documents(helm.template(VALUES_DIR / "monitoring.yaml").stdout)
    cm = _one(docs, "ConfigMap", "ft-finetune-operator-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "monitoring"
    assert json.loads(cm["data"]["finetune-operator.json"]) == json.loads(
        DASHBOARD_JSON.read_text()
    )


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel."""
    board = json.loads(DASHBOARD_JSON.read_text())
    return [
        (p["title"], t["expr"])
        for p in board["panels"]
        if p["type"] != "row"
        for t in p.get("targets", [])
    ]


def test_dashboard_panels_have_units_and_the_variables() -> None:
    board = json.loads(DASHBOARD_JSON.read_text())
    names = {v["name"]: v for v in board["templating"]["list"]}
    assert names["datasource"]["type"] == "datasource"
    assert names["namespace"]["type"] == "query"
    assert names["job"]["type"] == "query"
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len(panels) >= 12
    for p in panels:
        assert p["fieldConfig"]["defaults"].get("unit"), p["title"]
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("phase", "loss", "eval loss", "tokens per second", "flops", "step time",
                  "memory", "data-loader", "checkpoint", "reconcile"):  # fmt: skip
        assert topic in titles


def substitute(expr: str, namespace: str = ".*", job: str = ".*") -> str:
    """Grafana's variables, as the dashboard would fill them in."""
    return (
        expr.replace("$__rate_interval", "1m").replace("$namespace", namespace).replace("$job", job)
    )


def test_dashboard_promql_parses(prom, tmp_path: Path) -> None:
    """promtool parses every panel's PromQL (as recording rules: it has no query checker)."""
    rules = [
        {"record": f"dashboard:panel_{i}", "expr": substitute(expr)}
        for i, (_title, expr) in enumerate(dashboard_queries())
    ]
    assert len(rules) >= 12, "the dashboard has no queries to check"
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    p = subprocess.run([prom["promtool"], "check", "rules", str(path)], capture_output=True,
                       text=True, check=False)  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr


# ------------------------------------------------------------------ alerts
def rendered_rules(helm, tmp_path: Path, values: Path) -> Path:
    rule = _one(documents(helm.template(values).stdout), "PrometheusRule")
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    return path


def test_promtool_check_rules(helm, prom, tmp_path: Path) -> None:
    path = rendered_rules(helm, tmp_path, VALUES_DIR / "monitoring.yaml")
    p = subprocess.run([prom["promtool"], "check", "rules", str(path)], capture_output=True,
                       text=True, check=False)  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    assert "SUCCESS: 3 rules found" in p.stdout


def test_promtool_test_rules_every_alert(helm, prom, tmp_path: Path) -> None:
    """tests/chart/alerts_test.yaml has firing and quiet cases for every alert (stalled: 20m)."""
    path = rendered_rules(helm, tmp_path, VALUES_DIR / "monitoring.yaml")
    alerts = {r["alert"] for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]}
    tests = yaml.safe_load(ALERTS_TEST.read_text())
    tested = {
        case["alertname"]
        for t in tests["tests"]
        for case in t.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert alerts, "the chart renders no alert"
    assert tested == alerts, f"alerts without a firing test: {alerts - tested}"
    (tmp_path / "alerts_test.yaml").write_text(ALERTS_TEST.read_text())
    p = subprocess.run(
        [prom["promtool"], "test", "rules", "alerts_test.yaml"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stdout + p.stderr
