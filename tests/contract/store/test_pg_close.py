"""Closing the PostgreSQL store is bounded: a connection still in use cannot hang a shutdown."""

from __future__ import annotations

import asyncio
import logging

import pytest

from gateway.store import create_store
from gateway.store import postgres


async def test_close_does_not_wait_forever_for_a_connection_in_use(
    pg_database: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(postgres, "CLOSE_TIMEOUT", 0.3)
    store = create_store(pg_database)
    await store.open()
    holding = asyncio.Event()

    async def hold_a_connection() -> None:
        async with store.read():
            holding.set()
            await asyncio.Event().wait()  # never releases: a task that did not stop

    task = asyncio.create_task(hold_a_connection())
    await holding.wait()
    with caplog.at_level(logging.WARNING, logger="keygate.store"):
        await asyncio.wait_for(store.close(), 5)
    assert "store_close_timeout" in caplog.text
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_close_of_an_idle_store_is_quiet(pg_database: str, caplog: pytest.LogCaptureFixture) -> None:
    store = create_store(pg_database)
    await store.open()
    async with store.read():
        pass
    with caplog.at_level(logging.WARNING, logger="keygate.store"):
        await store.close()
    assert "store_close_timeout" not in caplog.text
