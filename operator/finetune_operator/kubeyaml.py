"""Read YAML as kubectl reads it, so ``finetune validate`` sees what the API server will see.

kubectl turns a manifest into JSON before it sends it (``sigs.k8s.io/yaml``, built on go-yaml
v2), and go-yaml v2 resolves an unquoted scalar by its own rules, which are neither PyYAML's
(YAML 1.1) nor YAML 1.2's. The differences that matter for a FineTuneJob:

============================  =======================  ===================
unquoted scalar               kubectl (go-yaml v2)     PyYAML (YAML 1.1)
============================  =======================  ===================
``2e-5``, ``1e3``             number                   string
``y``, ``n``, ``Y``, ``N``    boolean                  string
``0o17``                      integer 15               string
``012345678``                 integer 12345678         string
``1:20``                      string                   integer 80 (base 60)
``2024-01-01``                string                   date
``.inf``, ``.nan``            refused (not JSON)       float
============================  =======================  ===================

Both agree on ``yes``/``no``/``on``/``off`` (booleans), ``0755`` (octal 493), ``0x1F``,
``1_000`` and ``~`` (null). This module resolves plain scalars with go-yaml v2's rules, then
converts the document the way ``sigs.k8s.io/yaml`` does for JSON: keys become strings, a float
with an integral value is a JSON integer. Quoted scalars are always strings, as in every YAML.
"""

from __future__ import annotations

import math
import re
from typing import Any

import yaml

_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_BOOL = "tag:yaml.org,2002:bool"
_NULL = "tag:yaml.org,2002:null"
_MERGE = "tag:yaml.org,2002:merge"

#: go-yaml v2's table of exact words (resolve.go's resolveMap).
_WORDS: dict[str, tuple[str, object]] = {
    **dict.fromkeys(("y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE"), (_BOOL, True)),
    **dict.fromkeys(("on", "On", "ON"), (_BOOL, True)),
    **dict.fromkeys(("n", "N", "no", "No", "NO", "false", "False", "FALSE"), (_BOOL, False)),
    **dict.fromkeys(("off", "Off", "OFF"), (_BOOL, False)),
    **dict.fromkeys(("", "~", "null", "Null", "NULL"), (_NULL, None)),
    **dict.fromkeys((".nan", ".NaN", ".NAN"), (_FLOAT, math.nan)),
    **dict.fromkeys((".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF"), (_FLOAT, math.inf)),
    **dict.fromkeys(("-.inf", "-.Inf", "-.INF"), (_FLOAT, -math.inf)),
    "<<": (_MERGE, "<<"),
}
#: go-yaml v2's yamlStyleFloat: a float needs digits, and an exponent needs no dot.
_YAML_FLOAT = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$")
#: Go's strconv.ParseInt(s, 0, 64) syntax (underscores already removed).
_GO_INT = re.compile(r"^[-+]?(0[xX][0-9a-fA-F]+|0[bB][01]+|0[oO]?[0-7]+|0|[1-9][0-9]*)$")
#: Go's strconv.ParseFloat syntax for a scalar that starts with a dot.
_GO_FLOAT = re.compile(r"^[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$")
_INT64 = (-(2**63), 2**63 - 1)
_UINT64_MAX = 2**64 - 1


class NotJSONError(ValueError):
    """A value that kubectl cannot send as JSON (``.inf``, ``.nan``)."""


def _go_int(text: str) -> int | None:
    """``strconv.ParseInt(text, 0, 64)`` or ParseUint, else None."""
    if not _GO_INT.match(text):
        return None
    sign = -1 if text.startswith("-") else 1
    digits = text.lstrip("+-").lower()
    if digits.startswith("0x"):
        value = int(digits[2:], 16)
    elif digits.startswith("0b"):
        value = int(digits[2:], 2)
    elif digits.startswith("0o"):
        value = int(digits[2:], 8)
    elif len(digits) > 1 and digits.startswith("0"):
        value = int(digits[1:], 8)
    else:
        value = int(digits)
    value *= sign
    if _INT64[0] <= value <= _INT64[1] or 0 <= value <= _UINT64_MAX:
        return value
    return None


def resolve_plain(text: str) -> tuple[str, object]:
    """The tag and value go-yaml v2 gives an unquoted scalar ``text``."""
    if text in _WORDS:
        return _WORDS[text]
    first = text[:1]
    if first == ".":
        if _GO_FLOAT.match(text):
            return _FLOAT, float(text)
        return _STR, text
    if not (first.isdigit() or first in "+-"):
        return _STR, text
    # A date or time (2024-01-01) is neither an integer nor a float: it stays the string it is
    # (go-yaml v2 keeps timestamps as strings when decoding into interface{}).
    plain = text.replace("_", "")
    integer = _go_int(plain)
    if integer is not None:
        return _INT, integer
    if _YAML_FLOAT.match(plain):
        return _FLOAT, float(plain)
    for prefix, sign in (("0b", 1), ("-0b", -1)):  # go-yaml's own binary fallback
        if plain.startswith(prefix) and re.fullmatch("[01]+", plain[len(prefix) :]):
            return _INT, sign * int(plain[len(prefix) :], 2)
    return _STR, text


def _json_key(key: object) -> str:
    """A mapping key as sigs.k8s.io/yaml writes it into JSON."""
    if key is None:
        return "null"
    if isinstance(key, bool):
        return "true" if key else "false"
    if isinstance(key, float):
        return repr(key) if not key.is_integer() else str(int(key))
    return str(key)


class KubectlLoader(yaml.SafeLoader):
    """A SafeLoader whose plain scalars resolve as in go-yaml v2 (see the module docstring)."""

    def resolve(self, kind: Any, value: Any, implicit: Any) -> Any:
        if kind is yaml.ScalarNode and implicit[0]:
            return resolve_plain(value)[0]
        return super().resolve(kind, value, implicit)  # type: ignore[no-untyped-call]

    def construct_mapping(  # type: ignore[override]  # keys are str, a narrower Hashable
        self, node: yaml.MappingNode, deep: bool = False
    ) -> dict[str, Any]:
        """A mapping with JSON's string keys (``1`` and ``yes`` are two keys, not one)."""
        self.flatten_mapping(node)  # merge keys (<<), as go-yaml does
        return {
            _json_key(self.construct_object(k, deep=deep)): self.construct_object(v, deep=deep)
            for k, v in node.value
        }


def _plain_value(_: yaml.SafeLoader, node: yaml.ScalarNode) -> object:
    """The value of a scalar tagged int, float, bool or null (implicitly or explicitly)."""
    return resolve_plain(node.value)[1]


for _tag in (_INT, _FLOAT, _BOOL, _NULL):
    KubectlLoader.add_constructor(_tag, _plain_value)


def to_json_value(value: object, path: str = "") -> object:
    """``value`` as kubectl would send it: string keys, integral floats as integers."""
    if isinstance(value, dict):
        return {k: to_json_value(v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [to_json_value(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, float):
        if not math.isfinite(value):
            where = path.lstrip(".") or "the document"
            raise NotJSONError(f"{where}: {value} cannot be sent as JSON; quote it")
        if value.is_integer() and abs(value) < 1e21:  # Go's JSON writes these without a dot
            return int(value)
    return value


def load_all(text: str) -> list[object]:
    """Every non-empty document in ``text``, as kubectl would send it to the API server.

    Raises ``yaml.YAMLError`` for text that is not YAML and :class:`NotJSONError` for a value
    JSON cannot carry.
    """
    documents = yaml.load_all(text, Loader=KubectlLoader)  # a SafeLoader
    return [to_json_value(d) for d in documents if d is not None]
