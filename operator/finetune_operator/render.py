"""How a FineTuneJob looks to a user in the terminal (rich renderables; no I/O)."""

from __future__ import annotations

from datetime import UTC, datetime

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from finetune_operator.api import FineTuneJob
from finetune_operator.objects import Event

PHASE_STYLE = {
    "Succeeded": "green",
    "Failed": "red",
    "Running": "cyan",
    "Suspended": "yellow",
    "Pending": "magenta",
    "Planned": "blue",
}


def age(timestamp: str | None, now: datetime | None = None) -> str:
    """kubectl-style age: 42s, 7m, 3h, 2d."""
    if not timestamp:
        return ""
    then = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    seconds = int(((now or datetime.now(UTC)) - then).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def _phase(job: FineTuneJob) -> Text:
    phase = job.status.phase if job.status and job.status.phase else "Pending"
    return Text(phase, style=PHASE_STYLE.get(phase, ""))


def jobs_table(jobs: list[FineTuneJob], *, namespaces: bool = False) -> Table:
    """The `finetune get` table: the same story as `kubectl get ftj`."""
    table = Table(box=None, header_style="bold")
    if namespaces:
        table.add_column("NAMESPACE")
    for column in ("NAME", "PHASE", "MODEL", "GPUS", "PLAN", "PROGRESS", "LOSS", "AGE"):
        table.add_column(column)
    for job in jobs:
        status = job.status
        plan = status.plan if status else None
        progress = status.progress if status else None
        res = job.spec.resources
        row: list[str | Text] = [
            job.name,
            _phase(job),
            job.spec.model.source,
            str(plan.world if plan else res.num_nodes * res.gpus_per_node),
            plan.summary if plan else "",
            (progress.summary or "") if progress else "",
            (progress.loss or "") if progress else "",
            age(job.metadata.creation_timestamp),
        ]
        table.add_row(*([job.metadata.namespace or ""] if namespaces else []), *row)
    return table


def describe(job: FineTuneJob, events: list[Event]) -> RenderableType:
    """The `finetune describe` view: what runs, how it was planned, where it stands, why."""
    spec, status = job.spec, job.status
    res = spec.resources
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("Name", f"{job.metadata.namespace}/{job.name}")
    head.add_row("Phase", _phase(job))
    head.add_row("Model", f"{spec.model.source} ({spec.method.type})")
    head.add_row("Dataset", f"{spec.dataset.source} ({spec.dataset.format})")
    head.add_row("GPUs", f"{res.num_nodes} x {res.gpus_per_node} {res.gpu_type}")
    parts: list[RenderableType] = [head]
    if status and status.plan:
        head.add_row("Plan", status.plan.summary)
        head.add_row("", Text(status.plan.reason, style="dim"))
    if status and status.progress:
        p = status.progress
        eta = f", ETA {p.eta_seconds}s" if p.eta_seconds is not None else ""
        head.add_row("Progress", f"{p.summary or p.step}, loss {p.loss}{eta}")
    if status and status.checkpoint and status.checkpoint.step is not None:
        saved = status.checkpoint
        where = f" in {saved.latest}" if saved.latest else ""
        when = f" ({age(saved.time)} ago)" if saved.time else ""
        head.add_row("Checkpoint", f"step {saved.step}{where}{when}")
    if status and status.failure:
        head.add_row("Failure", Text(f"{status.failure.reason}: {status.failure.message}", "red"))
    if status and status.conditions:
        conditions = Table(title="Conditions", box=None, header_style="bold", title_justify="left")
        for column in ("TYPE", "STATUS", "REASON", "MESSAGE"):
            conditions.add_column(column)
        for c in status.conditions:
            conditions.add_row(c.type, c.status, c.reason, c.message)
        parts.append(conditions)
    if events:
        table = Table(title="Events", box=None, header_style="bold", title_justify="left")
        for column in ("TYPE", "REASON", "AGE", "MESSAGE"):
            table.add_column(column)
        for e in events:
            table.add_row(e.type, e.reason, age(e.time), e.message)
        parts.append(table)
    return Group(*parts)
