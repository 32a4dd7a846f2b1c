"""A cancelled SQLite transaction leaves the connection clean, whichever await the cancellation hits.

aiosqlite runs every statement on one worker thread and runs it even when the
task awaiting it has been cancelled: a ``BEGIN`` (or a failing ``COMMIT``) whose
awaiting task is cancelled still happens. These tests hold that worker busy so
a transaction's statement is queued but not yet run, cancel the transaction's
task at that moment, and then check that the connection is out of any
transaction, that the next write works and that a recorder's final flush
(what the runtime does at shutdown, right after cancelling the change
watcher's poll) reaches the store.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import pytest

from gateway.models import Member, RequestRecord
from gateway.manage.service import bootstrap
from gateway.recorder import Recorder
from gateway.store import StoreUnavailable, create_store
from gateway.store.sqlite import SqliteStore

from ...sqlite_hold import HeldWorker

T0 = datetime(2026, 11, 22, 12, 0, 0, 500000, tzinfo=UTC)
WAIT = 5.0  # seconds any step may take before the test calls it a hang


def a_request(n: int) -> RequestRecord:
    return RequestRecord(
        at=T0 + timedelta(seconds=n), key_id=None, method="GET", path=f"/items/{n}", server="app",
        operation="read", decision="allowed", status=200, client_ip="10.0.0.1", duration_ms=1.5,
    )


@pytest.fixture
async def sqlite_store(sqlite_url: str) -> AsyncIterator[SqliteStore]:
    store = create_store(sqlite_url)
    assert isinstance(store, SqliteStore)
    await store.open()
    await bootstrap(store)
    try:
        yield store
    finally:
        await store.close()


async def wait_until(condition: Callable[[], bool]) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


async def assert_clean_and_usable(store: SqliteStore) -> None:
    """A write transaction works, a recorder's close writes everything and no transaction is left open."""
    await asyncio.wait_for(store.add_request_records([a_request(0)]), WAIT)
    recorder = Recorder(store, flush_interval=3600, max_buffer=1000, close_retry_delay=0.01)
    for n in range(1, 7):
        recorder.request(a_request(n))
    await asyncio.wait_for(recorder.close(), WAIT)
    assert (recorder.dropped, recorder.failed_flushes) == (0, 0)
    async with store.read() as tx:
        stored = await tx.list_requests(limit=100)
    assert [r.path for r in reversed(stored)] == [f"/items/{n}" for n in range(7)]
    assert store._db is not None and not store._db.in_transaction
    assert not store._lock.locked()


async def test_a_reader_cancelled_while_its_begin_is_queued(sqlite_store: SqliteStore) -> None:
    """The shutdown case: the change watcher's poll is cancelled while its BEGIN waits for the worker.

    The worker still runs that BEGIN; the transaction must be rolled back
    before the store lock is let go, and the task must still end cancelled.
    """
    held = HeldWorker(sqlite_store)
    await held.hold()
    reader = asyncio.create_task(sqlite_store.changes_since(0))
    await wait_until(sqlite_store._lock.locked)  # the reader holds the lock: its BEGIN is queued
    reader.cancel()
    await asyncio.sleep(0)
    await held.release()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(reader, WAIT)
    assert reader.cancelled()
    await assert_clean_and_usable(sqlite_store)


async def test_a_writer_cancelled_while_its_begin_is_queued(sqlite_store: SqliteStore) -> None:
    """The same for BEGIN IMMEDIATE: the write lock it takes is given back."""
    held = HeldWorker(sqlite_store)
    await held.hold()
    writer = asyncio.create_task(sqlite_store.add_request_records([a_request(99)]))
    await wait_until(sqlite_store._lock.locked)
    writer.cancel()
    await asyncio.sleep(0)
    await held.release()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(writer, WAIT)
    await assert_clean_and_usable(sqlite_store)  # nothing of the cancelled write was kept


async def test_a_writer_cancelled_while_its_failing_commit_is_queued(sqlite_store: SqliteStore) -> None:
    """A COMMIT that fails leaves SQLite's transaction open; cancelled, nobody rolled it back."""
    held = HeldWorker(sqlite_store)
    body_done = asyncio.Event()

    async def write() -> None:
        async with sqlite_store.transaction() as tx:
            # Deferred, the foreign key check fails the COMMIT rather than the INSERT.
            await tx._exec("PRAGMA defer_foreign_keys = ON")
            await tx.put_member(Member("acme", "bob", "no-such-role", T0, T0))
            await held.hold()
            body_done.set()
        # leaving the block queues the COMMIT behind the held worker

    writer = asyncio.create_task(write())
    await asyncio.wait_for(body_done.wait(), WAIT)
    writer.cancel()
    await asyncio.sleep(0)
    await held.release()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(writer, WAIT)
    async with sqlite_store.read() as tx:
        assert await tx.get_member("acme", "bob") is None
    await assert_clean_and_usable(sqlite_store)


async def test_a_transaction_cancelled_in_its_body_or_rollback(sqlite_store: SqliteStore) -> None:
    """Cancelled while a statement of the body is queued, and again while the rollback is: still clean."""
    held = HeldWorker(sqlite_store)
    started = asyncio.Event()

    async def write() -> None:
        async with sqlite_store.transaction() as tx:
            await held.hold()
            started.set()
            await tx.add_request_records([a_request(99)])

    writer = asyncio.create_task(write())
    await asyncio.wait_for(started.wait(), WAIT)
    await asyncio.sleep(0)
    writer.cancel()  # during the INSERT
    await asyncio.sleep(0)
    writer.cancel()  # during the ROLLBACK
    await asyncio.sleep(0)
    await held.release()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(writer, WAIT)
    await assert_clean_and_usable(sqlite_store)


async def test_a_busy_begin_is_still_store_unavailable(sqlite_store: SqliteStore, sqlite_url: str) -> None:
    """Another process holding the write lock: BEGIN IMMEDIATE gives up after the busy timeout, cleanly."""
    other = SqliteStore(sqlite_url, busy_timeout=0.05)
    await other.open()
    mine = SqliteStore(sqlite_url, busy_timeout=0.05)
    await mine.open()
    try:
        async with other.transaction():
            with pytest.raises(StoreUnavailable, match="busy"):
                await mine.add_request_records([a_request(99)])
        await assert_clean_and_usable(mine)
    finally:
        await mine.close()
        await other.close()
