"""CEL validation rules, written once and enforced in two places.

Each rule is a Kubernetes ``x-kubernetes-validations`` entry. The CRD generator copies the rules
into the schema, so the API server enforces them; :func:`holds` runs the very same expressions
with cel-python, so ``finetune validate`` and every parse of a spec in Python give the same verdict
without a cluster. Rules must therefore stay inside the CEL subset both implementations share
(standard macros, ``has``, ``size``, ``matches``, ``contains``, ``double()``, ``int()``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

import celpy
from celpy.adapter import json_to_cel
from celpy.evaluation import CELEvalError


@dataclass(frozen=True)
class Rule:
    """One ``x-kubernetes-validations`` entry.

    ``field`` is the path (relative to the node that holds the rule, dotted, no leading dot) that
    the message is about; it becomes the CRD's ``fieldPath``. A rule that mentions ``oldSelf`` is a
    transition rule: Kubernetes runs it only on update.
    """

    rule: str
    message: str
    field: str = ""
    reason: str = "FieldValueInvalid"

    @property
    def is_transition(self) -> bool:
        return "oldSelf" in self.rule

    def to_crd(self) -> dict[str, str]:
        entry = {"rule": self.rule, "message": self.message}
        if self.field:
            entry["fieldPath"] = "." + self.field
        if self.reason != "FieldValueInvalid":
            entry["reason"] = self.reason
        return entry


@cache
def _program(rule: str) -> celpy.Runner:
    env = celpy.Environment()
    return env.program(env.compile(rule))


def holds(rule: Rule, node: Mapping[str, Any], old: Mapping[str, Any] | None = None) -> bool:
    """Whether ``rule`` holds for ``node`` (a plain JSON-like mapping, defaults applied).

    A transition rule holds trivially when there is no old object, as on create. An expression that
    errors (for example a missing field it did not guard with ``has``) counts as a violation, as it
    does in the API server.
    """
    if rule.is_transition and old is None:
        return True
    activation: dict[str, Any] = {"self": json_to_cel(dict(node))}
    if old is not None:
        activation["oldSelf"] = json_to_cel(dict(old))
    try:
        result = _program(rule.rule).evaluate(activation)
    except CELEvalError:
        return False
    return bool(result)
