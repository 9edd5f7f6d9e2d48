"""Visit every job once per interval, spread evenly over it: the operator's progress sweep.

One loop for all jobs instead of one timer per job: the visits of a pass start ``interval / n``
apart (a thousand jobs make a steady trickle of scrapes and status writes, not a storm every
15 s), at most ``limit`` visits run at once, and a job whose last visit has not ended (a master
that does not answer, a slow API server) is skipped, never visited twice at once, and goes
first next pass (each pass visits the longest unvisited first). A visit that raises is logged
and costs the others nothing; the job is visited again next pass.

Pure asyncio: the jobs and the visit are handed in (the operator hands its FineTuneJob index and
the progress handler), so the pacing is tested on its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable, Iterable
from typing import TypeVar

K = TypeVar("K", bound=Hashable)
log = logging.getLogger("finetune_operator")

#: Visits in flight at once (each is mostly waiting: on a scrape, or on a progress thread).
LIMIT = 64


async def sweep(
    jobs: Callable[[], Iterable[K]],
    visit: Callable[[K], Awaitable[None]],
    interval: float,
    *,
    limit: int = LIMIT,
    passes: int | None = None,
) -> None:
    """Visit each of ``jobs()`` (read anew at each pass) once per ``interval`` seconds, the
    first pass one interval from now; forever, or ``passes`` times (then wait for the visits
    still running)."""
    loop = asyncio.get_running_loop()
    running: dict[K, asyncio.Task[None]] = {}
    slots = asyncio.Semaphore(limit)

    async def one(key: K) -> None:
        try:
            await visit(key)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("progress of %s failed; trying again in %.0f s", key, interval)
        finally:
            slots.release()
            running.pop(key, None)

    last: dict[K, float] = {}  # when each job's last visit started
    start = loop.time() + interval
    done = 0
    try:
        while passes is None or done < passes:
            await asyncio.sleep(max(0.0, start - loop.time()))
            now = list(jobs())
            last = {k: last[k] for k in now if k in last}  # a deleted job is forgotten
            # the longest unvisited first: one skipped last pass (still running) or new goes early
            keys = sorted((k for k in now if k not in running), key=lambda k: last.get(k, 0.0))
            gap = interval / max(len(keys), 1)
            for i, key in enumerate(keys):
                await asyncio.sleep(max(0.0, start + i * gap - loop.time()))
                await slots.acquire()
                last[key] = loop.time()
                running[key] = asyncio.create_task(one(key))
            done += 1
            start = max(start + interval, loop.time())
        if running:
            await asyncio.wait(list(running.values()))
    finally:
        for task in list(running.values()):
            task.cancel()
