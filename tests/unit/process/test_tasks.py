"""Stopping background tasks: cancelled and awaited, but a shutdown never hangs on one that will not stop."""

from __future__ import annotations

import asyncio
import logging

import pytest

from gateway.process.tasks import running_tasks, stop_task


async def test_a_cancelled_task_is_awaited() -> None:
    finished = []

    async def work() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            finished.append(True)

    task = asyncio.create_task(work())
    await asyncio.sleep(0)
    await stop_task(task)
    assert task.done() and finished == [True]


async def test_a_task_that_swallows_cancellation_is_left_behind_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                pass  # a library bug: the cancellation is lost

    task = asyncio.create_task(stubborn(), name="stubborn")
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="keygate.tasks"):
        await stop_task(task, timeout=0.1)
    assert not task.done()
    assert "task_did_not_stop" in caplog.text and "stubborn" in caplog.text
    assert any(t["task"] == "stubborn" for t in running_tasks())
    release.set()
    task.cancel()
    await asyncio.wait({task})


async def test_a_tasks_own_failure_still_propagates() -> None:
    async def fails() -> None:
        raise ValueError("boom")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    with pytest.raises(ValueError):
        await stop_task(task)
