"""The progress sweep's pacing: each job once per interval, spread over it, a stuck visit or a
failing one costing the others nothing."""

from __future__ import annotations

import asyncio
import logging

import pytest

from finetune_operator.pacing import sweep

INTERVAL = 0.4


def run(coro: object) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout=20))  # type: ignore[arg-type]


def test_each_job_is_visited_once_a_pass_spread_over_the_interval() -> None:
    seen: list[tuple[float, str]] = []

    async def main() -> float:
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        async def visit(key: str) -> None:
            seen.append((loop.time() - t0, key))

        await sweep(lambda: ["a", "b", "c", "d"], visit, INTERVAL, passes=2)
        return t0

    run(main())
    assert [k for _, k in seen] == ["a", "b", "c", "d"] * 2
    times = [t for t, _ in seen]
    # Each visit starts no earlier than its slot (a sleep never wakes early), so these lower
    # bounds hold however loaded the machine: the first pass waits one interval, like a timer,
    # and its visits are a quarter interval apart, not all at once; the next pass one later.
    slots = [INTERVAL * (1 + p) + i * INTERVAL / 4 for p in (0, 1) for i in range(4)]
    assert all(t >= slot * 0.99 for t, slot in zip(times, slots, strict=True)), (times, slots)


def test_a_stuck_visit_is_never_doubled_and_holds_no_one_else() -> None:
    visits: dict[str, int] = {"stuck": 0, "quick": 0}

    async def main() -> None:
        gate = asyncio.Event()

        async def visit(key: str) -> None:
            visits[key] += 1
            if key == "stuck":
                await gate.wait()
            elif visits["quick"] == 5:
                gate.set()  # the stuck one is let go only after the fifth pass

        await sweep(lambda: ["stuck", "quick"], visit, 0.05, passes=5)

    run(main())
    assert visits["stuck"] == 1  # in flight through every later pass: skipped, not doubled
    assert visits["quick"] == 5


def test_a_failing_visit_is_logged_and_tried_again_next_pass(
    caplog: pytest.LogCaptureFixture,
) -> None:
    visits: list[str] = []

    async def visit(key: str) -> None:
        visits.append(key)
        if key == "broken":
            raise RuntimeError("API server said no")

    with caplog.at_level(logging.ERROR, logger="finetune_operator"):
        run(sweep(lambda: ["broken", "fine"], visit, 0.05, passes=3))
    assert visits == ["broken", "fine"] * 3
    failures = [r for r in caplog.records if "broken" in r.getMessage()]
    assert len(failures) == 3
    assert all("API server said no" in (r.exc_text or "") for r in failures)


def test_jobs_are_read_anew_each_pass() -> None:
    current = ["old"]
    visits: list[str] = []

    async def visit(key: str) -> None:
        visits.append(key)
        current[:] = ["new"]  # created and deleted meanwhile

    run(sweep(lambda: list(current), visit, 0.05, passes=2))
    assert visits == ["old", "new"]


def test_at_most_limit_visits_run_at_once() -> None:
    running = 0
    most = 0

    async def visit(_: int) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.05)
        running -= 1

    run(sweep(lambda: range(40), visit, 0.01, limit=3, passes=1))
    assert most == 3


def test_cancelling_the_sweep_cancels_its_visits() -> None:
    cancelled: list[str] = []

    async def main() -> None:
        started: list[str] = []
        both = asyncio.Event()

        async def visit(key: str) -> None:
            started.append(key)
            if len(started) == 2:
                both.set()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.append(key)
                raise

        task = asyncio.create_task(sweep(lambda: ["a", "b"], visit, 0.05))
        await both.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())
    assert sorted(cancelled) == ["a", "b"]


def test_a_job_skipped_while_its_visit_ran_goes_first_next_pass() -> None:
    order: list[str] = []

    async def main() -> None:
        gate = asyncio.Event()

        async def visit(key: str) -> None:
            order.append(key)
            if key == "slow" and order.count("slow") == 1:
                await gate.wait()  # still running through the second pass
            elif key == "b" and order.count("b") == 2:
                gate.set()  # ... and done before the third

        await sweep(lambda: ["a", "b", "slow"], visit, 0.2, passes=3)

    run(main())
    assert order == ["a", "b", "slow", "a", "b", "slow", "a", "b"]
