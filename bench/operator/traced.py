"""``finetune operator`` with tracemalloc on: where its memory goes, for bench/operator/steady.py
``--trace-memory``. SIGUSR1 writes the largest allocation sites (by file and by line, traced
frames as FINETUNE_TRACE_FRAMES says, 1 by default) as JSON to FINETUNE_TRACE_OUT.

tracemalloc costs memory and time of its own: a traced run's RSS and latencies are not the
operator's; its profile says which parts hold what.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tracemalloc
from pathlib import Path
from types import FrameType

TOP = 40


def _sites(snapshot: tracemalloc.Snapshot, key: str) -> list[dict[str, object]]:
    return [
        {"site": str(stat.traceback), "mib": round(stat.size / 2**20, 2), "blocks": stat.count}
        for stat in snapshot.statistics(key)[:TOP]
    ]


def _dump(_signum: int, _frame: FrameType | None) -> None:
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)]
    )
    traced, peak = tracemalloc.get_traced_memory()
    profile = {
        "traced_mib": round(traced / 2**20, 1),
        "traced_peak_mib": round(peak / 2**20, 1),
        "by_file": _sites(snapshot, "filename"),
        "by_line": _sites(snapshot, "lineno"),
    }
    out = Path(os.environ["FINETUNE_TRACE_OUT"])
    part = out.with_suffix(".part")
    part.write_text(json.dumps(profile, indent=1))
    part.replace(out)


def main() -> None:
    tracemalloc.start(int(os.environ.get("FINETUNE_TRACE_FRAMES", "1")))
    signal.signal(signal.SIGUSR1, _dump)
    from finetune_operator.cli import main as operator  # noqa: PLC0415  (after tracing starts)

    sys.argv = ["finetune", *sys.argv[1:]]
    operator()


if __name__ == "__main__":
    main()
