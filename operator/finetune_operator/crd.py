"""Generate the FineTuneJob CustomResourceDefinition from the typed model.

Pydantic's JSON Schema is turned into a structural OpenAPI v3 schema: references inlined,
``anyOf [X, null]`` collapsed to X (absent means unset), titles dropped, descriptions kept on every
node, the CEL rules of each model attached as ``x-kubernetes-validations``.
``crds/finetunejob.yaml`` is this module's output (``make crds``); a test fails when the two
differ. Pure.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import yaml
from pydantic import BaseModel

from finetune_operator import api
from finetune_operator.spec import ApiModel, FineTuneJobSpec
from finetune_operator.status import FineTuneJobStatus

_DROP = {"title", "$defs", "discriminator"}

PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase",
     "description": "Staging, Planned, Queued, Pending, Running, Succeeded, Failed or Suspended."},
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.source",
     "description": "The base model."},
    {"name": "GPUs", "type": "integer", "jsonPath": ".status.plan.world",
     "description": "Training processes (GPUs) in the plan."},
    {"name": "Plan", "type": "string", "jsonPath": ".status.plan.summary",
     "description": "The parallelism plan."},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress.summary",
     "description": "Steps done of the total."},
    {"name": "Loss", "type": "string", "jsonPath": ".status.progress.loss",
     "description": "Latest training loss."},
    {"name": "Reason", "type": "string", "jsonPath": ".status.failure.reason",
     "description": "Why the job is stuck or failed (empty while all is well)."},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Message", "type": "string", "jsonPath": ".status.failure.message", "priority": 1,
     "description": "What happened and what to do about it (kubectl get -o wide)."},
]  # fmt: skip


def _rules_by_title() -> dict[str, list[dict[str, str]]]:
    """CEL rules of every API model, keyed by the model's JSON-Schema title (its class name)."""
    seen: dict[str, list[dict[str, str]]] = {}
    stack: list[type[BaseModel]] = [FineTuneJobSpec]
    while stack:
        model = stack.pop()
        if model.__name__ in seen:
            continue
        seen[model.__name__] = [r.to_crd() for r in getattr(model, "cel_rules", ())]
        for field in model.model_fields.values():
            inner = api._model_of(field.annotation)
            if inner is not None and issubclass(inner, ApiModel):
                stack.append(inner)
    return seen


def _structural(node: Any, defs: dict[str, Any], rules: dict[str, list[dict[str, str]]]) -> Any:
    """Rewrite one JSON-Schema node as structural OpenAPI v3."""
    if isinstance(node, list):
        return [_structural(n, defs, rules) for n in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        # The field's own description wins over the model's; the model's title names its rules.
        merged = {**target, **{k: v for k, v in node.items() if k != "title"}}
        return _structural(merged, defs, rules)
    if "anyOf" in node:
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express a union of {options} structurally")
        if node.get("default", 0) is None:
            del node["default"]
        return _structural({**options[0], **node}, defs, rules)
    title = node.get("title")
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "const":
            out["enum"] = [value]
        elif key == "properties":
            out[key] = {k: _structural(v, defs, rules) for k, v in value.items()}
        elif key in {"items", "additionalProperties"} and isinstance(value, dict):
            out[key] = _structural(value, defs, rules)
        elif key == "default" and value is None:
            continue
        else:
            out[key] = value
    if out.get("type") == "object" and "properties" in out and title in rules and rules[title]:
        out["x-kubernetes-validations"] = rules[title]
    if out.get("type") == "object" and "properties" in out:
        out.pop("additionalProperties", None)  # structural schemas prune unknown fields
    return out


def _schema_of(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return dict(_structural(raw, defs, _rules_by_title()))


def openapi_schema() -> dict[str, Any]:
    """The ``openAPIV3Schema`` of the FineTuneJob CRD."""
    spec = _schema_of(FineTuneJobSpec)
    spec["description"] = (FineTuneJobSpec.__doc__ or "").strip()
    status = _schema_of(FineTuneJobStatus)
    status["description"] = (FineTuneJobStatus.__doc__ or "").strip()
    return {
        "type": "object",
        "description": " ".join((api.FineTuneJob.__doc__ or "").split()),
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion: finetune.dev/v1alpha1."},
            "kind": {"type": "string", "description": "Kind: FineTuneJob."},
            # The API server allows only name and generateName constraints under metadata.
            "metadata": {
                "type": "object",
                "properties": {
                    "name": {
                        "type": "string",
                        "maxLength": api.MAX_NAME_LENGTH,
                        "pattern": api.NAME_PATTERN,
                    }
                },
            },
            "spec": spec,
            "status": status,
        },
    }


#: Annotation with the SHA-256 of the CRD's spec: the Helm chart compares it with a CRD that is
#: already in the cluster (applied with kubectl) to say whether that one is its own version.
SPEC_HASH_ANNOTATION = "finetune.dev/spec-sha256"


def spec_hash(crd_spec: dict[str, Any]) -> str:
    """SHA-256 of a CRD's spec, keys sorted (the same spec always gives the same hash)."""
    canonical = json.dumps(crd_spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def crd() -> dict[str, Any]:
    """The whole CustomResourceDefinition object."""
    spec = _crd_spec()
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{api.PLURAL}.{api.GROUP}",
            "labels": {"app.kubernetes.io/name": "finetune-operator"},
            "annotations": {SPEC_HASH_ANNOTATION: spec_hash(spec)},
        },
        "spec": spec,
    }


def _crd_spec() -> dict[str, Any]:
    """The CRD's spec: names, scope, and the one version with its schema and columns."""
    return {
        "group": api.GROUP,
        "names": {
            "kind": api.KIND,
            "listKind": f"{api.KIND}List",
            "plural": api.PLURAL,
            "singular": api.SINGULAR,
            "shortNames": list(api.SHORT_NAMES),
            "categories": list(api.CATEGORIES),
        },
        "scope": "Namespaced",
        "versions": [
            {
                "name": api.VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": PRINTER_COLUMNS,
                "schema": {"openAPIV3Schema": openapi_schema()},
            }
        ],
    }


_NUMBER_LIKE = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")


class _Dumper(yaml.SafeDumper):
    """Quotes strings that a YAML 1.2 reader (kubectl) would take for numbers, e.g. 2e-5."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = '"' if _NUMBER_LIKE.fullmatch(value) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def crd_yaml() -> str:
    """The CRD as the YAML committed in ``crds/finetunejob.yaml``."""
    header = "# Generated from finetune_operator.spec by `make crds`. Do not edit.\n"
    return header + yaml.dump(crd(), Dumper=_Dumper, sort_keys=False, width=100)
