"""The runtime's shutdown, on both stores: records made just before it are written, not lost."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestServer

from gateway.config.schema import Settings
from gateway.manage.service import KeyService, bootstrap
from gateway.quickstart import demo_app
from gateway.runtime import Runtime, runtime
from gateway.store import create_store
from gateway.store.sqlite import SqliteStore
from tests.proxy_listener import serving

from ..sqlite_hold import HeldWorker

RELEASE_AFTER = 0.3  # seconds into the shutdown the held store lets the change watcher's poll go on


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    server = TestServer(demo_app())
    await server.start_server()
    try:
        yield str(server.make_url("/"))
    finally:
        await server.close()


async def hold_the_watchers_poll(runtime_: Runtime, store_url: str) -> Callable[[], Awaitable[None]]:
    """Make the change watcher's next poll wait on the store, so shutdown cancels it mid-transaction.

    SQLite: the connection's worker thread is held, so the poll's BEGIN is
    queued but not run when the watcher is cancelled; it is let go
    RELEASE_AFTER seconds into the shutdown. PostgreSQL: another session
    locks the change feed's table, so the poll's query is running, waiting for
    the lock, when the watcher is cancelled. Returns what undoes the hold.
    """
    watcher, store = runtime_.watcher, runtime_.store
    if isinstance(store, SqliteStore):
        held = HeldWorker(store)
        await held.hold()
        watcher.interval = 0.001
        for _ in range(5000):
            if store._lock.locked():  # a transaction is waiting for the worker
                break
            await asyncio.sleep(0.001)
        else:
            raise AssertionError("the change watcher never began a transaction")
        asyncio.get_running_loop().call_later(RELEASE_AFTER, held.open_gate)
        return held.release

    locker = await asyncpg.connect(store_url)
    await locker.execute("BEGIN; LOCK TABLE changes IN ACCESS EXCLUSIVE MODE")
    watcher.interval = 0.001
    for _ in range(500):
        await locker.execute("SELECT pg_stat_clear_snapshot()")  # else a transaction sees its first snapshot
        waiting = await locker.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND query LIKE '%FROM changes%'")
        if waiting:
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("the change watcher's poll never waited for the lock")

    async def release() -> None:
        await locker.execute("ROLLBACK")
        await locker.close()
    return release


async def test_records_made_just_before_shutdown_are_stored(
    store_url: str, upstream: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """Requests proxied right before the runtime closes, with no explicit flush and the change
    watcher cancelled in the middle of a store transaction: the final flush writes all of them."""
    settings = Settings.model_validate({
        "store": {"url": store_url}, "keys": {"argon2": {"memory_cost": 1024}},
        "upstreams": [{"name": "app", "url": upstream}],
        "recorder": {"flush_interval": 3600},  # only the shutdown flushes
    })
    if store_url.startswith("postgres"):
        store = create_store(store_url)
        await store.open()
        await bootstrap(store)
        await store.close()
    release: Callable[[], Awaitable[None]] | None = None
    paths = [f"/items/{n}" for n in range(5)]
    caplog.set_level(logging.WARNING)
    try:
        async with runtime(settings) as runtime_:
            _, key = await KeyService(runtime_.store, runtime_.settings, actor="test").create_key(
                name="ci", role="admin")
            async with serving(runtime_) as url, aiohttp.ClientSession() as http:
                for path in paths:
                    async with http.get(url + path, headers={"Authorization": f"Bearer {key}"}) as r:
                        assert r.status == 200
            assert runtime_.recorder.pending == len(paths) + 1  # the requests and the key's last use
            assert runtime_.recorder.flushed_requests == 0
            release = await hold_the_watchers_poll(runtime_, store_url)
            recorder = runtime_.recorder
    finally:
        if release is not None:
            await release()

    events = [r.getMessage() for r in caplog.records]
    assert not [e for e in events if "recorder_" in e or "task_did_not_stop" in e or "store_close" in e]
    assert (recorder.flushed_requests, recorder.flushed_usage, recorder.dropped) == (len(paths), 1, 0)
    store = create_store(store_url)
    await store.open()
    try:
        async with store.read() as tx:
            stored = await tx.list_requests(limit=100)
            keys = await tx.list_keys(now=datetime.now(UTC))
    finally:
        await store.close()
    assert sorted(r.path for r in stored) == paths
    assert [k.last_used_at is not None for k in keys] == [True]
