"""How a FineTuneJob looks to a user in the terminal (rich renderables; no I/O)."""

from __future__ import annotations

from dataclasses import dataclass
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
    "Staging": "blue",
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


#: Spaces between two columns of `finetune get` (kubectl's gap is three).
GAP = 2
#: The narrowest a shortened column gets (with its ellipsis).
_MIN_SHORTENED = 8


@dataclass(frozen=True)
class _Column:
    header: str
    cells: list[str | Text]
    #: Columns are dropped in this order (lowest first) while the table is wider than the
    #: terminal; None: never dropped. NAME and PHASE always stay.
    drop: int | None = None
    #: Whether it may be shortened (with an ellipsis) rather than dropped.
    shorten: bool = False

    def width(self) -> int:
        return max([len(self.header), *(len(str(c)) for c in self.cells)])


def _fit(columns: list[_Column], width: int) -> list[tuple[_Column, int]]:
    """The columns that fit ``width``, each with its width: shorten what may be shortened (MODEL,
    REASON, then PLAN), drop what must go (lowest ``drop`` first); names are never cut (a name
    longer than the terminal overflows it rather than being cut)."""
    kept = [(c, c.width()) for c in columns]

    def total() -> int:
        return sum(w for _, w in kept) + GAP * (len(kept) - 1)

    droppable = sorted((c for c in columns if c.drop is not None), key=lambda c: c.drop or 0)
    for column in droppable:
        if total() <= width:
            break
        at = next(i for i, (c, _) in enumerate(kept) if c is column)
        if column.shorten:
            floor = max(len(column.header), _MIN_SHORTENED)
            kept[at] = (column, max(floor, kept[at][1] - (total() - width)))
            if total() <= width:
                break
        del kept[at]
    return kept


def progress_cell(job: FineTuneJob) -> str:
    """PROGRESS: steps done of the total; while running without metrics, say so."""
    status = job.status
    if status is not None and status.progress is not None:
        return status.progress.summary or str(status.progress.step)
    if status is not None and status.phase == "Running":
        return "no metrics yet"
    return ""


def progress_note(job: FineTuneJob) -> str:
    """What `finetune watch` prints beside its bar: the loss, or why there is no bar yet."""
    status = job.status
    phase = status.phase if status and status.phase else "Pending"
    if status is not None and status.progress is not None:
        progress = status.progress
        steps = f"step {progress.summary or progress.step}"
        return f"{steps}, loss {progress.loss}" if progress.loss else steps
    if phase in {"Pending", "Planned"}:
        why = f": {status.failure.message}" if status and status.failure else ""
        return f"waiting for the pods to start{why}"
    if phase == "Staging":
        why = f": {status.failure.message}" if status and status.failure else ""
        return f"staging the model and dataset into the cache{why}"
    if phase == "Running":
        return (
            "no metrics from the trainer yet (the operator reads the master pod's /metrics "
            "every few seconds once training runs; if this lasts, the trainer serves none or the "
            f"operator cannot reach the pod: see finetune logs {job.name})"
        )
    return ""


def jobs_table(
    jobs: list[FineTuneJob], *, namespaces: bool = False, width: int | None = None
) -> Table:
    """The `finetune get` table: the same story as `kubectl get ftj`, one line a job, fitted
    to ``width`` columns (the terminal's) by shortening or leaving out the least telling."""
    statuses = [job.status for job in jobs]
    failures = [s.failure if s else None for s in statuses]
    plans = [s.plan if s else None for s in statuses]
    columns = [
        *([_Column("NAMESPACE", [j.metadata.namespace or "" for j in jobs], drop=5)]
          if namespaces else []),
        _Column("NAME", [j.name for j in jobs]),
        _Column("PHASE", [_phase(j) for j in jobs]),
        _Column("MODEL", [j.spec.model.source for j in jobs], drop=0, shorten=True),
        _Column("GPUS", [
            str(p.world if p else j.spec.resources.num_nodes * j.spec.resources.gpus_per_node)
            for j, p in zip(jobs, plans, strict=True)
        ], drop=2),
        _Column("PLAN", [p.summary if p else "" for p in plans], drop=6, shorten=True),
        _Column("PROGRESS", [progress_cell(j) for j in jobs], drop=7),
        _Column("LOSS", [
            (s.progress.loss or "") if s and s.progress else "" for s in statuses
        ], drop=4),
        *([_Column("REASON", [f.reason if f else "" for f in failures], drop=3, shorten=True)]
          if any(failures) else []),
        _Column("AGE", [age(j.metadata.creation_timestamp) for j in jobs], drop=1),
    ]  # fmt: skip
    fitted = _fit(columns, width) if width else [(c, c.width()) for c in columns]
    table = Table(box=None, header_style="bold", padding=(0, GAP, 0, 0), pad_edge=False)
    for column, w in fitted:
        table.add_column(column.header, width=w, no_wrap=True, overflow="ellipsis")
    for i in range(len(jobs)):
        table.add_row(*(column.cells[i] for column, _ in fitted))
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
    gpu: str
    if res.gpu_type is not None:
        gpu = res.gpu_type
    elif status and status.inferred_gpu_type:
        gpu = f"{status.inferred_gpu_type.gpu_type} (inferred from the nodes)"
    else:
        gpu = "(gpuType left out: inferred from the nodes)"
    head.add_row("GPUs", f"{res.num_nodes} x {res.gpus_per_node} {gpu}")
    parts: list[RenderableType] = [head]
    if status and status.staging:
        staged = next((c for c in status.conditions or [] if c.type == "Staged"), None)
        head.add_row("Staged", staged.message if staged else status.staging.cache or "")
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
