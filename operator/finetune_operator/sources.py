"""Where a job's data lives: the source URIs of the spec, parsed.

``hf://org/name[@revision]`` (a Hugging Face Hub repo), ``pvc://claim/path`` (a folder or file on
a PersistentVolumeClaim, which the operator mounts at ``PVC_ROOT/<claim>``), ``file:///path`` (a
path the trainer sees as is) and ``builtin://name`` (a model or dataset shipped with the trainer).
The spec's patterns guarantee the shape. Pure: imports no Kubernetes client, kopf or torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune_operator.spec import FineTuneJobSpec

#: Every PersistentVolumeClaim a job names is mounted at PVC_ROOT/<claim>.
PVC_ROOT = "/mnt/pvc"


@dataclass(frozen=True)
class Source:
    """A parsed source URI."""

    scheme: str
    location: str
    revision: str | None = None

    @property
    def claim(self) -> str | None:
        return self.location.split("/", 1)[0] if self.scheme == "pvc" else None


def parse_source(uri: str) -> Source:
    """Split ``scheme://location[@revision]`` (the spec's patterns guarantee the shape)."""
    scheme, _, rest = uri.partition("://")
    if scheme == "hf" and "@" in rest:
        rest, _, revision = rest.partition("@")
        return Source(scheme, rest, revision)
    return Source(scheme, rest)  # file:///abs keeps its leading "/"


def pvc_mount_path(claim: str) -> str:
    return f"{PVC_ROOT}/{claim}"


def local_path(uri: str) -> str:
    """Where a pvc:// or file:// location is seen from inside the trainer."""
    source = parse_source(uri)
    if source.scheme == "file":
        return source.location
    if source.scheme == "pvc":
        claim, _, sub = source.location.partition("/")
        return f"{pvc_mount_path(claim)}/{sub}".rstrip("/")
    raise ValueError(f"{uri} is not a pvc:// or file:// location")


def claims(spec: FineTuneJobSpec) -> list[str]:
    """Every PersistentVolumeClaim the job reads or writes, in a stable order."""
    uris = [spec.model.source, spec.dataset.source, spec.checkpoint.storage]
    uris.append(spec.output.storage if spec.output else None)
    found = [parse_source(u).claim for u in uris if u]
    return sorted({c for c in found if c})
