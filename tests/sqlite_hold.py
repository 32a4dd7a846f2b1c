"""Holding an SQLite store's aiosqlite worker thread, so statements queue behind it."""

from __future__ import annotations

import asyncio
import threading

from gateway.store.sqlite import SqliteStore

HOLD_LIMIT = 10.0  # seconds: a failing test cannot leave the worker thread blocked for ever


class HeldWorker:
    """Keeps the store's worker thread busy until released.

    aiosqlite runs one connection's statements one after the other on one
    thread; while it runs ``kg_test_hold()`` every statement queued after it
    waits, so a test can cancel a task whose statement is queued but not run.
    """

    def __init__(self, store: SqliteStore) -> None:
        assert store._db is not None, "the store is not open"
        self._db = store._db
        self._gate = threading.Event()
        self._task: asyncio.Task[object] | None = None

    async def hold(self) -> None:
        """Queue the holding statement; once this returns, anything queued after it waits."""
        await self._db.create_function("kg_test_hold", 0, lambda: self._gate.wait(HOLD_LIMIT))
        self._task = asyncio.create_task(self._db.execute("SELECT kg_test_hold()"))
        await asyncio.sleep(0)  # the task's first step puts the statement on the worker's queue

    def open_gate(self) -> None:
        """Let the worker go on (safe from a loop callback)."""
        self._gate.set()

    async def release(self, timeout: float = 5.0) -> None:
        self.open_gate()
        if self._task is not None:
            await asyncio.wait_for(self._task, timeout)
