"""A rolling restart under load loses nothing: three replicas x two workers on PostgreSQL and Redis, each
restarted in turn with SIGTERM while a client keeps sending.

The client behaves as a load balancer does: a request whose connection is
refused, or reset before any answer came (a connection the kernel queued on a
listener that was closing), goes to the next replica. Everything it got an
answer for is "acknowledged" and is checked: no 5xx, no 401/403 for a key
that is allowed (and no 200 for one that is not), a request record for every
acknowledged request, and last-used times that never go backwards.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime

import aiohttp
import pytest

from gateway.store import create_store

from ..e2e.harness import Upstream
from ..redis_server import SHARED_REDIS_URL, drop_prefix, unique_prefix
from .fleet import Fleet

CLIENTS = 4  # concurrent request loops


@pytest.fixture(scope="module")
def fleet(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    prefix = unique_prefix()
    fleet = Fleet(tmp_path_factory.mktemp("fleet"), upstream, SHARED_REDIS_URL, prefix, policy="redis")
    try:
        yield fleet.start()
    finally:
        fleet.stop()
        drop_prefix(SHARED_REDIS_URL, prefix)


class Balancer:
    """Round-robin over the replicas, retrying a refused or reset connection on the next one."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self._next = itertools.count()
        self.retries = 0

    async def get(self, http: aiohttp.ClientSession, path: str, key: str) -> int:
        for _ in range(60):
            url = self.urls[next(self._next) % len(self.urls)]
            try:
                async with http.get(url + path, headers={"Authorization": f"Bearer {key}"}) as r:
                    await r.read()
                    return r.status
            except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                # Nothing came back: as a load balancer does for a GET, try another replica.
                self.retries += 1
                await asyncio.sleep(0.01)
        raise AssertionError(f"no replica answered {path}")


async def test_rolling_restart_loses_nothing(fleet: Fleet) -> None:
    """Every replica restarted under load: no 5xx, no wrong 401/403, every answered request recorded,
    last-used times monotonic."""
    good_id, good = fleet.create_key("--role", "admin", "--rate-limit", "1000000/minute")
    _, scoped = fleet.create_key("--operation", "deploy", "--rate-limit", "1000000/minute")
    revoked_id, revoked = fleet.create_key("--role", "admin")
    fleet.cli("keys", "revoke", revoked_id, "--yes")
    balancer = Balancer([r.proxy_url for r in fleet.replicas])
    expected = {"good": 200, "scoped": 403, "revoked": 401}
    keys = {"good": good, "scoped": scoped, "revoked": revoked}
    answered: dict[str, Counter[int]] = {name: Counter() for name in keys}
    acknowledged: list[str] = []  # paths the good key got an answer for
    last_used: list[datetime] = []
    stop = asyncio.Event()
    store = create_store(fleet.store_url)
    await store.open()

    async def client(number: int) -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            for n in itertools.count():
                if stop.is_set():
                    return
                name = "good" if n % 4 else ("scoped", "revoked")[(n // 4) % 2]
                path = f"/echo/{number}/{n}"
                status = await balancer.get(http, path, keys[name])
                answered[name][status] += 1
                if name == "good":
                    acknowledged.append(path)

    async def watch_last_used() -> None:
        while not stop.is_set():
            async with store.read() as tx:
                record = await tx.get_key(good_id)
            if record is not None and record.last_used_at is not None:
                last_used.append(record.last_used_at)
            await asyncio.sleep(0.05)

    tasks = [asyncio.create_task(client(i)) for i in range(CLIENTS)] + [asyncio.create_task(watch_last_used())]
    try:
        await asyncio.sleep(1.0)
        for replica in fleet.replicas:
            assert await asyncio.to_thread(replica.stop) == 0  # SIGTERM: drain, flush, exit 0
            await asyncio.to_thread(replica.start)
            await asyncio.sleep(0.5)
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    started = time.monotonic()

    for name, statuses in answered.items():
        assert set(statuses) == {expected[name]}, (name, statuses)
    assert len(acknowledged) > 200, "too little load to prove anything"
    assert balancer.retries > 0, "no replica was ever down under load"
    # The recorder flushes every 0.2 s, and at every SIGTERM.
    recorded: set[str] = set()
    while time.monotonic() - started < 10:
        async with store.read() as tx:
            records = await tx.list_requests(key_id=good_id, limit=1_000_000)
        recorded = {r.path for r in records}
        if recorded >= set(acknowledged):
            break
        await asyncio.sleep(0.2)
    await store.close()
    missing = set(acknowledged) - recorded
    assert not missing, f"{len(missing)} acknowledged requests without a record, e.g. {sorted(missing)[:3]}"
    assert len(last_used) > 10
    assert all(a <= b for a, b in zip(last_used, last_used[1:])), "last_used_at went backwards"
