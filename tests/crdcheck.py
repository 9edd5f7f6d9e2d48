"""Validate a document against the generated CRD the way the API server does, without one.

An independent check of ``crds/finetunejob.yaml`` itself (not of the pydantic model it came from):
apply the schema's defaults, reject unknown fields (kubectl's strict field validation), validate
the OpenAPI schema with ``jsonschema``, then evaluate every ``x-kubernetes-validations`` rule with
cel-python at its node. Returns the paths of the failures.
"""

from __future__ import annotations

import copy
from typing import Any

import celpy
import jsonschema


def _default(schema: dict[str, Any], value: Any) -> Any:
    if isinstance(value, dict) and schema.get("type") == "object":
        props = schema.get("properties", {})
        for key, sub in props.items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = _default(sub, value[key])
    elif isinstance(value, list) and "items" in schema:
        return [_default(schema["items"], v) for v in value]
    return value


def _strict(schema: Any) -> Any:
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if out.get("type") == "object" and "properties" in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _cel(schema: dict[str, Any], value: Any, path: str, failures: list[str]) -> None:
    for rule in schema.get("x-kubernetes-validations", []):
        if "oldSelf" in rule["rule"]:
            continue  # transition rules run only on update
        env = celpy.Environment()
        try:
            ok = env.program(env.compile(rule["rule"])).evaluate({"self": celpy.json_to_cel(value)})
        except celpy.CELEvalError:
            ok = False
        if not ok:
            failures.append(path + rule.get("fieldPath", ""))
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                _cel(sub, value[key], f"{path}.{key}", failures)
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            _cel(schema["items"], item, f"{path}[{i}]", failures)


def status_validator(crd: dict[str, Any]) -> jsonschema.Draft7Validator:
    """A validator for ``status`` as the CRD declares it, unknown fields refused (the API server
    would prune them without a word: a field the operator writes but the CRD lacks is lost)."""
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    return jsonschema.Draft7Validator(_strict(schema))


def crd_failures(crd: dict[str, Any], document: dict[str, Any]) -> list[str]:
    """Dotted paths (".spec.x") the CRD rejects in ``document``; empty when it is accepted."""
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    doc = _default(schema, copy.deepcopy(document))
    failures = [
        "." + ".".join(str(p) for p in error.absolute_path)
        for error in jsonschema.Draft7Validator(_strict(schema)).iter_errors(doc)
    ]
    if not failures:
        _cel(schema, doc, "", failures)
    return failures
