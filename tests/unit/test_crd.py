"""The committed CRD is the generated one, and it follows the Kubernetes API conventions."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import yaml

from finetune_operator import crd
from helpers import ROOT


def _schema(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for key, sub in node.get("properties", {}).items():
        yield from _nodes(sub, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from _nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _nodes(node["additionalProperties"], f"{path}{{}}")


def test_the_walk_reaches_every_kind_of_node(committed_crd: dict[str, Any]) -> None:
    """The checks below hold for every node _nodes yields: it must yield them all."""
    paths = [path for path, _ in _nodes(_schema(committed_crd))]
    assert len(paths) == len(set(paths)) > 100
    assert {
        ".spec.parallelism.tensorParallel",
        ".spec.resources.tolerations[].key",
        ".spec.resources.nodeSelector{}",
        ".status.conditions[].lastTransitionTime",
        ".status.plan.estMFU",
    } <= set(paths)


def test_committed_crd_is_the_generated_one() -> None:
    committed = (ROOT / "crds" / "finetunejob.yaml").read_text(encoding="utf-8")
    assert committed == crd.crd_yaml(), "crds/finetunejob.yaml is stale: run `make crds`"


def test_every_field_has_a_description(committed_crd: dict[str, Any]) -> None:
    undocumented = [
        path
        for path, node in _nodes(_schema(committed_crd))
        if not path.endswith(("[]", "{}"))
        and not path.startswith(".metadata")  # the API server forbids documenting metadata
        and not node.get("description", "").strip()
    ]
    assert undocumented == []


def test_schema_is_structural(committed_crd: dict[str, Any]) -> None:
    for path, node in _nodes(_schema(committed_crd)):
        assert "type" in node, f"{path} has no type"
        assert not {"$ref", "anyOf", "oneOf", "allOf", "title"} & node.keys(), path
        if node["type"] == "object" and "properties" in node:
            assert "additionalProperties" not in node, path


def test_no_floats_in_spec(committed_crd: dict[str, Any]) -> None:
    spec = _schema(committed_crd)["properties"]["spec"]
    assert [p for p, n in _nodes(spec, ".spec") if n["type"] == "number"] == []


def test_strings_used_by_cel_are_bounded(committed_crd: dict[str, Any]) -> None:
    """The API server refuses CEL whose cost it cannot bound: strings need maxLength."""
    spec = _schema(committed_crd)["properties"]["spec"]
    unbounded = [
        p
        for p, n in _nodes(spec, ".spec")
        if n["type"] == "string" and "enum" not in n and "maxLength" not in n
    ]
    assert unbounded == []


def test_names_printer_columns_and_subresources(committed_crd: dict[str, Any]) -> None:
    spec = committed_crd["spec"]
    assert committed_crd["metadata"]["name"] == "finetunejobs.finetune.dev"
    assert spec["names"]["shortNames"] == ["ftj"]
    assert spec["names"]["categories"] == ["finetune"]
    version = spec["versions"][0]
    assert version["name"] == "v1alpha1"
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == [
        "Phase", "Model", "GPUs", "Plan", "Progress", "Loss", "Reason", "Age", "Message"
    ]  # fmt: skip
    wide = {c["name"]: c.get("priority", 0) for c in version["additionalPrinterColumns"]}
    assert wide["Message"] == 1  # only in kubectl get -o wide
    assert wide["Reason"] == 0


def test_cross_field_and_immutability_rules_are_in_the_crd(committed_crd: dict[str, Any]) -> None:
    rules = [
        r["rule"]
        for _, node in _nodes(_schema(committed_crd))
        for r in node.get("x-kubernetes-validations", [])
    ]
    text = "\n".join(rules)
    assert "has(self.epochs) != has(self.maxSteps)" in text
    assert "tensorParallel <= self.resources.gpusPerNode" in text
    assert "self.type == 'lora'" in text
    assert sum("oldSelf" in r for r in rules) >= 4  # model, dataset, method, seed, checkpoint


def test_conditions_are_a_map_list(committed_crd: dict[str, Any]) -> None:
    conditions = _schema(committed_crd)["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]


def test_crd_yaml_round_trips() -> None:
    assert yaml.safe_load(crd.crd_yaml()) == crd.crd()


def test_the_spec_hash_annotation_names_this_very_spec(committed_crd: dict[str, Any]) -> None:
    """The chart compares it with a CRD already in the cluster to tell whether it is its own."""
    annotations = committed_crd["metadata"]["annotations"]
    assert annotations[crd.SPEC_HASH_ANNOTATION] == crd.spec_hash(committed_crd["spec"])
    other = copy.deepcopy(committed_crd["spec"])
    other["versions"][0]["additionalPrinterColumns"].pop()
    assert crd.spec_hash(other) != crd.spec_hash(committed_crd["spec"])
