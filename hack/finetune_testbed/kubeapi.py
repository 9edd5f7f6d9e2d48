"""The few API calls ``up`` makes, over HTTPS with the admin's token (no kubectl process: its
discovery of a fresh API server took seconds per call on a busy machine)."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from .log import TestbedError

FIELD_MANAGER = "hack-cluster"


class Api:
    def __init__(self, server: str, token: str, ca: Path) -> None:
        self.server = server
        self.token = token
        self.ctx = ssl.create_default_context(cafile=str(ca))

    def call(
        self, method: str, path: str, body: bytes | None = None, content_type: str | None = None
    ) -> tuple[int, Any]:
        """``(HTTP status, decoded JSON body)``; status 0 when the server cannot be reached."""
        req = urllib.request.Request(self.server + path, data=body, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("Accept", "application/json")
        if content_type:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=30, context=self.ctx) as r:
                return int(r.status), json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, _json_or_text(e.read())
        except (urllib.error.URLError, OSError) as e:
            return 0, {"message": str(e)}

    def get(self, path: str) -> Any:
        """The object at ``path``, or None (not found, or the server does not answer)."""
        status, obj = self.call("GET", path)
        return obj if status == 200 else None

    def apply(self, path: str, manifest: bytes) -> None:
        """Server-side apply (``--force-conflicts``) of one object, JSON or YAML, at ``path``."""
        query = urllib.parse.urlencode({"fieldManager": FIELD_MANAGER, "force": "true"})
        status, out = self.call(
            "PATCH", f"{path}?{query}", manifest, "application/apply-patch+yaml"
        )
        if status not in (200, 201):
            raise TestbedError(f"applying {path} failed ({status}): {_message(out)}")

    def apply_objects(self, objs: list[dict[str, Any]]) -> None:
        for obj in objs:
            meta = obj["metadata"]
            path = resource_path(
                obj["apiVersion"], obj["kind"], meta["name"], meta.get("namespace")
            )
            self.apply(path, json.dumps(obj).encode())

    def parse_yaml(self, document: str) -> dict[str, Any]:
        """One YAML document of a cluster-scoped object as JSON, parsed by the API server (a
        dry-run create: the standard library has no YAML parser; no object is stored)."""
        kind = _top_level(document, "kind")
        path = resource_path(_top_level(document, "apiVersion"), kind, "").rstrip("/")
        status, out = self.call("POST", f"{path}?dryRun=All", document.encode(), "application/yaml")
        if status not in (200, 201):
            raise TestbedError(
                f"the API server cannot read this {kind} ({status}): {_message(out)}"
            )
        for key in ("uid", "resourceVersion", "creationTimestamp", "generation", "managedFields"):
            out["metadata"].pop(key, None)
        out.pop("status", None)
        return dict(out)

    def dry_run_create(self, path: str, obj: dict[str, Any]) -> tuple[int, str]:
        """POST ``obj`` to the collection ``path`` with ``dryRun=All``: status and message."""
        status, out = self.call(
            "POST", f"{path}?dryRun=All", json.dumps(obj).encode(), "application/json"
        )
        return status, _message(out)


def resource_path(api_version: str, kind: str, name: str, namespace: str | None = None) -> str:
    """The URL path of an object. The plural is the lower-cased kind with English's regular
    plural (``-s``; ``-es`` after s, x, ch, sh; ``-ies`` for a consonant and y), true of every
    kind the test bed creates (an object whose name does not match its URL is refused)."""
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    ns = f"/namespaces/{namespace}" if namespace else ""
    return f"{base}{ns}/{plural(kind)}/{name}"


def plural(kind: str) -> str:
    """``WorkloadPriorityClass`` -> ``workloadpriorityclasses``, ``Node`` -> ``nodes``."""
    word = kind.lower()
    if word.endswith(("s", "x", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _top_level(document: str, key: str) -> str:
    """The value of a top-level ``key: value`` line of a YAML document."""
    for line in document.splitlines():
        if line.startswith(f"{key}:"):
            return line.split(":", 1)[1].strip().strip("'\"")
    raise TestbedError(f"no top-level {key!r} in a YAML document")


def _json_or_text(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return {"message": raw.decode(errors="replace")}


def _message(out: Any) -> str:
    if isinstance(out, dict):
        return str(out.get("message", out))
    return str(out)
