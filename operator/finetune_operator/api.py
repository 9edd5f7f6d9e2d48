"""The FineTuneJob resource, and the one edge where documents become typed objects.

:func:`parse` turns a YAML/JSON document into a :class:`FineTuneJob` or raises :class:`SpecError`
listing every problem with its field path. It applies the OpenAPI part of the API (types, ranges,
patterns, unknown fields) through pydantic, then the CEL rules through cel-python: the same rules
the API server enforces from the generated CRD. Pure: no Kubernetes client, kopf or torch.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator
from pydantic_core import ErrorDetails, PydanticCustomError

from finetune_operator import cel
from finetune_operator.spec import PATTERN_HINTS, ApiModel, FineTuneJobSpec
from finetune_operator.status import FineTuneJobStatus

GROUP = "finetune.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ("ftj",)
CATEGORIES = ("finetune",)
#: Longest name whose children (services "<name>-worker-998", labels) stay within 63 characters.
MAX_NAME_LENGTH = 52
#: Services are named after the job, so its name must be a DNS-1035 label.
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
PATTERN_HINTS[NAME_PATTERN] = (
    f"must be a lowercase DNS label starting with a letter (a-z, 0-9, '-'), at most "
    f"{MAX_NAME_LENGTH} characters, so that its pods' and services' names stay within 63"
)


@dataclass(frozen=True, order=True)
class Problem:
    """One thing wrong with a document: where (dotted field path) and what to do."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path or '<document>'}: {self.message}"


class SpecError(ValueError):
    """A document is not a valid FineTuneJob. ``problems`` lists every finding."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(sorted(set(problems)))
        super().__init__("\n".join(str(p) for p in self.problems))


class ObjectMeta(BaseModel):
    """The parts of metav1.ObjectMeta the operator reads; the rest is kept as it is."""

    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)

    name: Annotated[str | None, Field(max_length=MAX_NAME_LENGTH, pattern=NAME_PATTERN)] = None
    generate_name: str | None = Field(default=None, alias="generateName")
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    resource_version: str | None = Field(default=None, alias="resourceVersion")
    creation_timestamp: str | None = Field(default=None, alias="creationTimestamp")
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


class FineTuneJob(ApiModel):
    """FineTuneJob fine-tunes a language model on Kubernetes: one object names the model, the
    data, the method and the GPUs; the operator plans the parallelism and runs it as a Kubeflow
    PyTorchJob (or a Kubeflow Trainer v2 TrainJob), and reports plan, progress and failures in
    status."""

    model_config = ConfigDict(strict=False)
    api_version: Annotated[Literal["finetune.dev/v1alpha1"], Field(alias="apiVersion")] = (
        "finetune.dev/v1alpha1"
    )
    kind: Literal["FineTuneJob"] = "FineTuneJob"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: FineTuneJobSpec
    status: FineTuneJobStatus | None = None

    @model_validator(mode="after")
    def _cel(self, info: ValidationInfo) -> FineTuneJob:
        if (info.context or {}).get("stored"):
            return self  # the API server held it to these rules when it stored it
        old = (info.context or {}).get("old")
        problems = list(cel_problems(self, old))
        if problems:
            raise PydanticCustomError(
                "cel_rule",
                "{summary}",
                {"summary": "; ".join(map(str, problems)), "problems": problems},
            )
        return self

    @property
    def name(self) -> str:
        return self.metadata.name or ""

    def to_document(self) -> dict[str, Any]:
        """The object as the API server stores it (camelCase, defaults filled, unset omitted)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def cel_problems(
    node: BaseModel, old: Mapping[str, Any] | None, path: str = ""
) -> Iterator[Problem]:
    """Every CEL rule on ``node`` and below that fails, with the field path it is about.

    ``old`` is the previous version of the same node as a plain mapping (on update), so that
    transition rules (immutability) can run.
    """
    wire = node.model_dump(by_alias=True, exclude_none=True, mode="json")
    for rule in getattr(type(node), "cel_rules", ()):
        if not cel.holds(rule, wire, old):
            yield Problem(_join(path, rule.field), rule.message)
    for name, field in type(node).model_fields.items():
        key = field.alias or name
        value = getattr(node, name)
        old_value = old.get(key) if isinstance(old, Mapping) else None
        if isinstance(value, BaseModel):
            yield from cel_problems(value, old_value, _join(path, key))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    yield from cel_problems(item, None, f"{_join(path, key)}[{i}]")


def parse(document: Mapping[str, Any], old: Mapping[str, Any] | None = None) -> FineTuneJob:
    """Parse and fully validate a FineTuneJob document; ``old`` is the stored one on update."""
    if old is not None:
        old = _stored_form(old)
    try:
        return FineTuneJob.model_validate(document, context={"old": old})
    except ValidationError as exc:
        raise SpecError(_problems(exc, document)) from None


def parse_stored(document: Mapping[str, Any]) -> FineTuneJob:
    """Parse a FineTuneJob as the API server stored it (the operator's reads and events): typed
    and checked like :func:`parse`, but its CEL rules, which the API server enforced when it
    stored the object, are not evaluated again (they cost ~20 ms of CPU a parse in Python)."""
    try:
        return FineTuneJob.model_validate(document, context={"stored": True})
    except ValidationError as exc:
        raise SpecError(_problems(exc, document)) from None


def _stored_form(document: Mapping[str, Any]) -> Mapping[str, Any]:
    """``document`` with defaults filled, as the API server stores it (and CEL sees oldSelf)."""
    try:
        return FineTuneJob.model_validate(document).to_document()
    except ValidationError:
        return document  # stored before today's rules; compare it as it is


def validate_document(document: Any, old: Mapping[str, Any] | None = None) -> list[Problem]:
    """Every problem with ``document`` as a FineTuneJob (empty when it is valid)."""
    if not isinstance(document, Mapping):
        return [
            Problem("", "a FineTuneJob must be a mapping with apiVersion, kind, metadata, spec")
        ]
    try:
        parse(document, old)
    except SpecError as exc:
        return list(exc.problems)
    return []


# ---------------------------------------------------------------------------------------------
# Turning pydantic's errors into messages that say what to do
# ---------------------------------------------------------------------------------------------


def _join(path: str, key: str) -> str:
    if not key:
        return path
    return f"{path}.{key}" if path else key


def _dotted(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not part.startswith(("function-", "literal[")) and part not in {"str", "int"}:
            out = _join(out, part)
    return out


def _problems(exc: ValidationError, document: Mapping[str, Any]) -> list[Problem]:
    problems: list[Problem] = []
    for error in exc.errors():
        if error["type"] == "cel_rule":
            for problem in error.get("ctx", {}).get("problems", []):
                problems.append(
                    Problem(_join(_dotted(error["loc"]), problem.path), problem.message)
                )
            continue
        problems.append(Problem(_dotted(error["loc"]), _message(error, document)))
    return problems


def _message(error: ErrorDetails, document: Mapping[str, Any]) -> str:
    kind = error["type"]
    loc = tuple(error["loc"])
    value = error.get("input")
    ctx = error.get("ctx", {})
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        hint = _did_you_mean(error["loc"], document)
        return "unknown field" + (f" (did you mean {hint!r}?)" if hint else "")
    if kind == "string_type" and isinstance(value, float | int) and not isinstance(value, bool):
        return f'must be a string: write decimals in quotes, e.g. "{value}"'
    if kind == "string_too_long":
        limit = ctx.get("max_length")
        why = (
            " (its pods' and services' names must stay within 63)"
            if loc == ("metadata", "name")
            else ""
        )
        return f"is {len(str(value))} characters long, at most {limit} allowed{why}"
    if kind == "string_pattern_mismatch":
        hint = PATTERN_HINTS.get(str(ctx.get("pattern")), f"must match {ctx.get('pattern')}")
        return f"{value!r} {hint}"
    if kind == "literal_error":
        return f"{value!r} is not allowed: must be one of {ctx.get('expected')}"
    if kind in {"int_type", "int_parsing", "int_from_float"}:
        return f"must be a whole number, got {value!r}"
    if kind in {"greater_than_equal", "less_than_equal", "greater_than", "less_than"}:
        return f"{value!r} is out of range: {error['msg'][0].lower()}{error['msg'][1:]}"
    return f"{error['msg']} (got {value!r})"


def _did_you_mean(loc: Sequence[int | str], document: Mapping[str, Any]) -> str | None:
    """The closest declared field name to an unknown one."""
    model: type[BaseModel] = FineTuneJob
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = next((f for n, f in model.model_fields.items() if (f.alias or n) == part), None)
        inner = _model_of(field.annotation) if field else None
        if inner is None:
            return None
        model = inner
    names = [f.alias or n for n, f in model.model_fields.items()]
    matches = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.6)
    return matches[0] if matches else None


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found is not None:
            return found
    return None
