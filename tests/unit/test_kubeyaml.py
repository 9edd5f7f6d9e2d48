"""YAML read as kubectl reads it (go-yaml v2 rules), where PyYAML's YAML 1.1 differs.

tests/integration/test_yaml_like_kubectl.py checks the same cases against the real kubectl and
API server; these pin the rules without a cluster.
"""

from __future__ import annotations

import pytest
import yaml

from finetune_operator import kubeyaml

# (plain scalar, kubectl's value, PyYAML's value): the known differences first.
CASES = [
    ("2e-5", 2e-05, "2e-5"),  # an exponent without a dot: a number for kubectl
    ("1e3", 1000, "1e3"),  # ... an integral one is sent as a JSON integer
    ("2.0e5", 200000, "2.0e5"),  # YAML 1.1 wants a sign in the exponent
    ("y", True, "y"),
    ("N", False, "N"),
    ("0o17", 15, "0o17"),  # Go's octal prefix
    ("012345678", 12345678, "012345678"),  # not octal: go-yaml falls back to a float
    ("1:20", "1:20", 80),  # no base-60 numbers in go-yaml
    ("2024-01-01", "2024-01-01", None),  # a date stays a string (PyYAML: datetime.date)
    # ... and where both agree.
    ("yes", True, True),
    ("off", False, False),
    ("0755", 493, 493),
    ("0x1F", 31, 31),
    ("1_000", 1000, 1000),
    ("~", None, None),
    ("3.5", 3.5, 3.5),
    ("abc", "abc", "abc"),
]


@pytest.mark.parametrize(("text", "kubectl", "pyyaml"), CASES, ids=[c[0] for c in CASES])
def test_plain_scalars_resolve_as_in_kubectl(text: str, kubectl: object, pyyaml: object) -> None:
    (loaded,) = kubeyaml.load_all(f"v: {text}\n")
    assert loaded == {"v": kubectl}
    assert type(loaded["v"]) is type(kubectl)  # 1000 is an int, True a bool, not 1
    if pyyaml is not None:  # PyYAML's reading, which `finetune validate` used before
        assert yaml.safe_load(f"v: {text}\n")["v"] == pyyaml


@pytest.mark.parametrize("text", ["'2e-5'", '"y"', "'0755'", '"~"'])
def test_quoted_scalars_are_strings(text: str) -> None:
    assert kubeyaml.load_all(f"v: {text}\n") == [{"v": text[1:-1]}]


def test_keys_become_json_strings_and_stay_distinct() -> None:
    (loaded,) = kubeyaml.load_all("1: a\nyes: b\nnull: c\n1.5: d\n")
    assert loaded == {"1": "a", "true": "b", "null": "c", "1.5": "d"}


def test_merge_keys_and_multiple_documents() -> None:
    text = "base: &b {p: 1}\nm:\n  <<: *b\n  q: 2\n---\n---\nx: [1, 2.5, 0755]\n"
    assert kubeyaml.load_all(text) == [
        {"base": {"p": 1}, "m": {"p": 1, "q": 2}},
        {"x": [1, 2.5, 493]},
    ]


@pytest.mark.parametrize("text", [".inf", "-.Inf", ".nan"])
def test_values_json_cannot_carry_are_refused_with_their_path(text: str) -> None:
    with pytest.raises(kubeyaml.NotJSONError, match=r"spec\.x\[1\]: .* quote it"):
        kubeyaml.load_all(f"spec:\n  x: [1, {text}]\n")
