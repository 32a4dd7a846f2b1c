"""Upstream clocks on one coarse timer: they time out like ``asyncio.timeout()``, pause, and leave nothing behind."""

from __future__ import annotations

import asyncio

import pytest

from gateway.dataplane.deadlines import Deadlines

RES = 0.01


async def test_a_clock_that_runs_out_raises_timeout_error_never_early() -> None:
    deadlines = Deadlines(resolution=RES)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        with deadlines.clock(0.05):
            await asyncio.sleep(10)
    assert loop.time() - started >= 0.05
    assert len(deadlines) == 0


async def test_a_clock_that_does_not_run_out_leaves_the_task_uncancelled() -> None:
    deadlines = Deadlines(resolution=RES)
    with deadlines.clock(0.2):
        await asyncio.sleep(0.01)
    # No cancellation is left pending for the task's next await, and the timer stopped.
    await asyncio.sleep(0.05)
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    assert len(deadlines) == 0 and deadlines._timer is None


async def test_a_stopped_clock_does_not_count_until_restarted() -> None:
    deadlines = Deadlines(resolution=RES)
    with deadlines.clock(0.05) as clock:
        clock.stop()  # waiting on the client: not the upstream's time
        await asyncio.sleep(0.15)
        clock.restart()
        await asyncio.sleep(0.01)
    with pytest.raises(TimeoutError):
        with deadlines.clock(0.05) as clock:
            clock.stop()
            await asyncio.sleep(0.02)
            clock.restart()
            await asyncio.sleep(10)


async def test_restart_extends_the_deadline() -> None:
    deadlines = Deadlines(resolution=RES)
    with deadlines.clock(0.08) as clock:
        for _ in range(5):  # 0.2 s in all, but never 0.08 s without progress
            await asyncio.sleep(0.04)
            clock.restart()


async def test_someone_elses_cancellation_stays_a_cancellation() -> None:
    deadlines = Deadlines(resolution=RES)

    async def waits() -> None:
        with deadlines.clock(10):
            await asyncio.sleep(10)

    task = asyncio.create_task(waits())
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(deadlines) == 0


async def test_only_the_late_task_times_out() -> None:
    deadlines = Deadlines(resolution=RES)

    async def waits(seconds: float, work: float) -> str:
        try:
            with deadlines.clock(seconds):
                await asyncio.sleep(work)
        except TimeoutError:
            return "timeout"
        return "done"

    results = await asyncio.gather(waits(0.05, 0.2), *(waits(1.0, 0.1) for _ in range(20)))
    assert results == ["timeout"] + ["done"] * 20



async def test_a_cancellation_pending_before_the_clock_does_not_hide_the_timeout() -> None:
    """Like asyncio.timeout(): a swallowed earlier cancellation still leaves the clock's own as a TimeoutError."""
    deadlines = Deadlines(resolution=RES)
    task = asyncio.current_task()
    assert task is not None
    task.cancel()
    try:
        await asyncio.sleep(1)
    except asyncio.CancelledError:
        pass  # swallowed, without uncancel(): cancelling() stays 1
    assert task.cancelling() == 1
    with pytest.raises(TimeoutError):
        with deadlines.clock(0.03):
            await asyncio.sleep(10)
    assert task.cancelling() == 1
    task.uncancel()
