"""Helpers for the chart tests: the real tools (helm, kubeconform, promtool) and offline schemas.

kubeconform's built-in schemas live on the internet; here every schema is generated offline:
Kubernetes' own from the OpenAPI v3 documents shipped in the ``k8s.io/kubernetes`` Go module
(the version hack/k8s builds), the monitoring CRDs (ServiceMonitor, PodMonitor, PrometheusRule)
from the ``prometheus-operator`` Go module, and the FineTuneJob CRD from ``crds/``. Strict like
kubeconform's ``-strict`` schemas: an object with declared properties accepts no others, unless
it says ``x-kubernetes-preserve-unknown-fields``.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "finetune-operator"
KUBE_VERSION = "1.31.4"
PROMETHEUS_OPERATOR = "github.com/prometheus-operator/prometheus-operator@v0.79.2"
#: kubeconform's schema location template for the generated files.
SCHEMA_TEMPLATE = "{{ .ResourceKind }}_{{ .Group }}_{{ .ResourceAPIVersion }}.json"
#: The Kubernetes API groups the chart uses (OpenAPI v3 file stems).
K8S_GROUPS = (
    "api__v1",
    "apis__apps__v1",
    "apis__rbac.authorization.k8s.io__v1",
    "apis__apiextensions.k8s.io__v1",
)
MONITORING_CRDS = ("servicemonitors", "podmonitors", "prometheusrules")
#: Kubeflow Trainer v2, whose ClusterTrainingRuntime the chart installs with child: trainjob.
TRAINER_V2 = "github.com/kubeflow/trainer/v2@v2.2.0"


def kubernetes_version() -> str:
    """The k8s.io/kubernetes version hack/k8s builds (so schemas match the test bed)."""
    text = (REPO / "hack" / "k8s" / "go.mod").read_text(encoding="utf-8")
    found = re.search(r"k8s\.io/kubernetes (v1\.\d+\.\d+)", text)
    return found.group(1) if found else f"v{KUBE_VERSION}"


def go_module_dir(module: str) -> Path:
    """``go mod download`` a module (cached in GOMODCACHE) and return its source folder."""
    out = subprocess.run(
        ["go", "mod", "download", "-json", module],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
        cwd="/",
    )
    if out.returncode != 0:
        raise RuntimeError(f"go mod download {module} failed: {out.stdout}{out.stderr}")
    return Path(json.loads(out.stdout)["Dir"])


def _strict(schema: Any) -> Any:
    """Close every object that declares properties; rewrite OpenAPI refs to JSON-schema ones.

    Walks schema keywords only, so a property that happens to be called ``$ref`` or
    ``x-kubernetes-int-or-string`` (JSONSchemaProps has both) is left alone.
    """
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in ("properties", "patternProperties", "definitions"):
        if isinstance(out.get(key), dict):
            out[key] = {name: _strict(sub) for name, sub in out[key].items()}
    for key in ("additionalProperties", "items", "not"):
        if isinstance(out.get(key), dict):
            out[key] = _strict(out[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if isinstance(out.get(key), list):
            out[key] = [_strict(sub) for sub in out[key]]
    ref = out.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
        out["$ref"] = "#/definitions/" + ref.removeprefix("#/components/schemas/")
    if out.pop("x-kubernetes-int-or-string", False) is True:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    preserve = out.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


def _write(dest: Path, kind: str, group: str, version: str, schema: dict[str, Any]) -> None:
    # kubeconform's {{ .Group }} of a core object (apiVersion v1) is "v1".
    name = f"{kind.lower()}_{group or version}_{version}.json"
    (dest / name).write_text(json.dumps(schema), encoding="utf-8")


def write_kubernetes_schemas(dest: Path) -> int:
    spec_dir = go_module_dir(f"k8s.io/kubernetes@{kubernetes_version()}") / "api/openapi-spec/v3"
    written = 0
    for stem in K8S_GROUPS:
        doc = json.loads((spec_dir / f"{stem}_openapi.json").read_text(encoding="utf-8"))
        definitions = {k: _strict(v) for k, v in doc["components"]["schemas"].items()}
        for name, schema in doc["components"]["schemas"].items():
            for gvk in schema.get("x-kubernetes-group-version-kind", []):
                if name.endswith("List") or gvk["kind"].endswith("List"):
                    continue
                full = {
                    "$schema": "http://json-schema.org/draft-07/schema#",
                    **_strict(schema),
                    "definitions": definitions,
                }
                _write(dest, gvk["kind"], gvk["group"], gvk["version"], full)
                written += 1
    return written


def write_crd_schemas(dest: Path, crd: dict[str, Any]) -> None:
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    for version in crd["spec"]["versions"]:
        schema = _strict(version["schema"]["openAPIV3Schema"])
        schema["$schema"] = "http://json-schema.org/draft-07/schema#"
        _write(dest, kind, group, version["name"], schema)


def write_all_schemas(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    if write_kubernetes_schemas(dest) == 0:
        raise RuntimeError("no Kubernetes schemas generated")
    write_crd_schemas(dest, yaml.safe_load((REPO / "crds" / "finetunejob.yaml").read_text()))
    crd_dir = go_module_dir(PROMETHEUS_OPERATOR) / "example" / "prometheus-operator-crd"
    for plural in MONITORING_CRDS:
        path = crd_dir / f"monitoring.coreos.com_{plural}.yaml"
        write_crd_schemas(dest, yaml.safe_load(path.read_text(encoding="utf-8")))
    runtimes = go_module_dir(TRAINER_V2) / "manifests" / "base" / "crds"
    path = runtimes / "trainer.kubeflow.org_clustertrainingruntimes.yaml"
    write_crd_schemas(dest, yaml.safe_load(path.read_text(encoding="utf-8")))


def tool_paths() -> dict[str, str]:
    """helm, kubeconform and kubectl as ``hack/cluster build --tools`` builds them (cached)."""
    out = subprocess.run(
        [str(REPO / "hack" / "cluster"), "build", "--tools"],
        capture_output=True,
        text=True,
        check=False,
        timeout=3600,
    )
    if out.returncode != 0:
        raise RuntimeError(f"hack/cluster build --tools failed:\n{out.stderr[-4000:]}")
    paths = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            paths[parts[0]] = parts[1]
    return paths


def prometheus_paths() -> dict[str, str]:
    """prometheus and promtool from Debian's package (hack/prometheus installs it if missing)."""
    out = subprocess.run(
        [str(REPO / "hack" / "prometheus")], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"hack/prometheus failed:\n{out.stderr[-4000:]}")
    return dict(json.loads(out.stdout))


def documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]
