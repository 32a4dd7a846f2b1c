"""/metrics: Prometheus text with the runtime's counters, read at scrape time, and summed over workers."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.admin.metrics import PUBLISH_INTERVAL, KeygateCollector, SnapshotDir, merge
from tests.proxy_listener import serving

from ..e2e.harness import Keygate, Upstream
from ..redis_server import SHARED_REDIS_URL, RedisServer
from ..webhook_receiver import WebhookReceiver
from .conftest import Admin, admin_on

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples ``name`` that carry ``labels`` (and any others); 0 when there are none."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and wanted <= set(have))


async def scrape(admin: Admin) -> Samples:
    async with admin.client.get("/metrics") as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        return parse(await r.text())


@asynccontextmanager
async def serve_proxy(admin: Admin) -> AsyncIterator[str]:
    """The runtime's proxy listener, in front of the demo upstream."""
    async with serving(admin.rt) as url:
        yield url


@pytest.fixture
async def proxy(admin: Admin) -> AsyncIterator[str]:
    async with serve_proxy(admin) as url:
        yield url


async def send(url: str, key: str | None, method: str = "GET", times: int = 1) -> list[int]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as http:
        statuses = []
        for _ in range(times):
            async with http.request(method, url + "/x", headers=headers) as r:
                statuses.append(r.status)
        return statuses


async def test_requests_by_decision_and_outcome(admin: Admin, proxy: str) -> None:
    """Proxied requests are counted by decision and outcome, and each is one latency observation."""
    _, key = await admin.key(name="ci", operations=["read"], rate_limit="3/hour")
    assert await send(proxy, key, times=4) == [200, 200, 200, 429]
    assert await send(proxy, key, "POST") == [403]
    assert await send(proxy, None) == [401]
    m = await scrape(admin)
    assert value(m, "keygate_requests_total", decision="allowed", reason="") == 3
    assert value(m, "keygate_requests_total", decision="denied", reason="rate_limited") == 1
    assert value(m, "keygate_requests_total", decision="denied", reason="insufficient_scope") == 1
    assert value(m, "keygate_requests_total", decision="denied", reason="no_credentials") == 1
    assert value(m, "keygate_request_duration_seconds_count", decision="allowed") == 3
    assert value(m, "keygate_request_duration_seconds_count", decision="denied") == 3
    assert value(m, "keygate_request_duration_seconds_bucket", decision="denied", le="+Inf") == 3
    assert value(m, "keygate_upstream_duration_seconds_count", upstream="app") == 3
    assert value(m, "keygate_ratelimit_decisions_total", result="allowed") == 3
    assert value(m, "keygate_ratelimit_decisions_total", result="limited") == 1


async def test_cache_and_argon2(admin: Admin, proxy: str) -> None:
    """A key is verified with argon2 once; later requests are cache hits."""
    _, key = await admin.key(name="ci", operations=["read"])
    before = await scrape(admin)  # the fixture's admin key was never used: nothing verified yet
    await send(proxy, key, times=3)
    m = await scrape(admin)
    assert value(m, "keygate_argon2_verifications_total") - value(before, "keygate_argon2_verifications_total") == 1
    assert value(m, "keygate_cache_lookups_total", layer="local", result="hit") - \
        value(before, "keygate_cache_lookups_total", layer="local", result="hit") == 2
    assert value(m, "keygate_cached_keys", layer="local") >= 1


async def test_recorder_queue_and_flushes(admin: Admin, proxy: str) -> None:
    """Records wait in the queue until a flush writes them, and flushed counts them."""
    _, key = await admin.key(name="ci", operations=["read"])
    await admin.rt.recorder.flush()
    await send(proxy, key, times=2)
    queued = await scrape(admin)
    assert value(queued, "keygate_recorder_queue_depth") >= 2
    await admin.rt.recorder.flush()
    flushed = await scrape(admin)
    assert value(flushed, "keygate_recorder_queue_depth") == 0
    assert value(flushed, "keygate_recorder_flushed_total", kind="request") >= 2
    assert value(flushed, "keygate_recorder_dropped_total") == 0


async def test_admin_requests_and_health_gauges(admin: Admin) -> None:
    """Admin API requests have their own counter; store_up, ready and workers are gauges."""
    await admin.call("GET", "/admin/v1/keys")
    await admin.call("GET", "/admin/v1/keys", key=None)
    m = await scrape(admin)
    assert value(m, "keygate_admin_requests_total", decision="allowed", reason="") == 1
    assert value(m, "keygate_admin_requests_total", decision="denied", reason="no_credentials") == 1
    assert value(m, "keygate_requests_total", decision="allowed", reason="") == 0
    assert (value(m, "keygate_store_up"), value(m, "keygate_ready"), value(m, "keygate_workers")) == (1, 1, 1)


async def test_openmetrics_when_asked(admin: Admin) -> None:
    """A scraper that accepts OpenMetrics gets it; anyone else gets Prometheus text 0.0.4."""
    async with admin.client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}) as r:
        assert r.headers["Content-Type"].startswith("application/openmetrics-text")
        assert (await r.text()).endswith("# EOF\n")
    async with admin.client.get("/metrics") as r:
        assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"


async def test_without_redis_there_are_no_redis_numbers(admin: Admin) -> None:
    """A single node (no redis.url) reports no Redis gauge and no Redis cache layer."""
    m = await scrape(admin)
    assert not [name for name, labels in m if name.startswith(("keygate_redis_", "keygate_change_notices",
                                                                 "keygate_ratelimit_degraded"))]
    assert not [labels for name, labels in m if ("layer", "redis") in labels]


async def test_webhook_deliveries_by_event_and_result_and_the_backlog(store_url: str) -> None:
    """Deliveries are counted by event and result; a webhook answering 500 keeps its rows in the backlog."""
    receiver = WebhookReceiver()
    receiver.answers["/down"] = [500] * 100
    hooks = [{"url": receiver.url + "/up", "secret": "s" * 16}, {"url": receiver.url + "/down", "secret": "s" * 16}]
    try:
        async with admin_on(store_url, webhooks=hooks) as admin:  # its root key is one key.created
            assert (await admin.call("POST", "/admin/v1/keys", json={"name": "ci", "role": "admin"})).status == 201
            await receiver.arrived(2, "/up")
            await receiver.arrived(2, "/down")
            async with asyncio.timeout(10):
                # The backlog gauge is recounted after a round's deliveries are counted: wait for both.
                while (sum(admin.rt.webhooks.results.values()) < 4  # type: ignore[union-attr]
                       or admin.rt.webhooks.backlog != 2):  # type: ignore[union-attr]
                    await asyncio.sleep(0.02)
            m = await scrape(admin)
    finally:
        receiver.stop()
    assert value(m, "keygate_webhook_deliveries_total", event="key.created", result="delivered") == 2
    assert value(m, "keygate_webhook_deliveries_total", event="key.created", result="failed") >= 2
    assert value(m, "keygate_webhook_deliveries_total", event="key.created", result="abandoned") == 0
    assert value(m, "keygate_webhook_backlog") == 2


def test_the_webhook_backlog_is_the_stores_not_a_sum_over_workers() -> None:
    """Every worker counts the same outbox: the group shows one count, not one per worker."""
    values, _ = merge({"pid": pid, "values": {"keygate_webhook_backlog": [[n]]}, "histograms": {}}
                      for pid, n in enumerate([3, 4]))
    assert values["keygate_webhook_backlog"][()] == 4


# --- With Redis (PostgreSQL store, a namespace of the shared Redis, or a redis-server of the test's own) ---


def with_redis(url: str, prefix: str) -> dict[str, Any]:
    return {"redis": {"url": url, "prefix": prefix, "timeout": 2}}


@pytest.fixture
async def redis_admin(pg_database: str, redis_prefix: str) -> AsyncIterator[Admin]:
    async with admin_on(pg_database, **with_redis(SHARED_REDIS_URL, redis_prefix)) as a:
        yield a


async def test_cache_lookups_by_layer(redis_admin: Admin) -> None:
    """A key is a miss in both layers once, a Redis hit once the process forgets it, then a local hit."""
    admin = redis_admin
    _, key = await admin.key(name="ci", operations=["read"])
    async with serve_proxy(admin) as proxy:
        before = await scrape(admin)
        assert await send(proxy, key) == [200]  # verified with argon2, written to both layers
        admin.rt.cache.clear()  # as a cold replica would be
        assert await send(proxy, key, times=2) == [200, 200]  # Redis hit, then local hit
        m = await scrape(admin)

    def delta(name: str, **labels: str) -> float:
        return value(m, name, **labels) - value(before, name, **labels)

    assert {(layer, result): delta("keygate_cache_lookups_total", layer=layer, result=result)
            for layer in ("local", "redis") for result in ("hit", "miss", "error")} == {
        ("local", "hit"): 1, ("local", "miss"): 2, ("local", "error"): 0,
        ("redis", "hit"): 1, ("redis", "miss"): 1, ("redis", "error"): 0}
    assert delta("keygate_argon2_verifications_total") == 1
    assert value(m, "keygate_redis_up") == 1


async def test_change_notices_published_and_received(redis_admin: Admin) -> None:
    """A revoke through the admin API is one notice published, received, and one propagation delay observed."""
    admin = redis_admin
    key_id, _ = await admin.key(name="ci", operations=["read"])
    before = await scrape(admin)
    assert (await admin.call("POST", f"/admin/v1/keys/{key_id}/revoke")).status == 200
    deadline = time.monotonic() + 10
    while admin.rt.subscriber is not None and admin.rt.subscriber.received == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)  # the notice makes a round trip through Redis
    m = await scrape(admin)
    assert value(m, "keygate_change_notices_total", direction="published") - \
        value(before, "keygate_change_notices_total", direction="published") == 1
    assert value(m, "keygate_change_notices_total", direction="received") - \
        value(before, "keygate_change_notices_total", direction="received") == 1
    assert value(m, "keygate_change_notices_unpublished_total") == 0
    # The notice carried the change's time: this process observed its delay once.
    assert value(m, "keygate_change_propagation_seconds_count", via="notice") - \
        value(before, "keygate_change_propagation_seconds_count", via="notice") == 1


async def test_redis_down_is_a_gauge_and_degraded_decisions(
    pg_database: str, own_redis: RedisServer, redis_prefix: str,
) -> None:
    """With Redis dead, redis_up is 0, Redis lookups are errors and the fallback's decisions are counted."""
    async with admin_on(pg_database, **with_redis(own_redis.url, redis_prefix)) as admin, \
            serve_proxy(admin) as proxy:
        _, key = await admin.key(name="ci", operations=["read"], rate_limit="2/hour")
        own_redis.kill()
        # ratelimit.on_backend_error = "local": per-process buckets decide, and still limit.
        assert await send(proxy, key, times=3) == [200, 200, 429]
        m = await scrape(admin)
    assert value(m, "keygate_redis_up") == 0
    assert value(m, "keygate_cache_lookups_total", layer="redis", result="error") == 1
    assert value(m, "keygate_ratelimit_degraded_decisions_total", result="allowed") == 2
    assert value(m, "keygate_ratelimit_degraded_decisions_total", result="limited") == 1
    assert value(m, "keygate_ratelimit_decisions_total", result="limited") == 1


def snap(pid: int, requests: int, depth: int, ready: int = 1) -> dict:
    return {"pid": pid, "values": {"keygate_requests": [["allowed", "", "2xx", "app", requests]],
                                   "keygate_recorder_queue_depth": [[depth]], "keygate_ready": [[ready]]},
            "histograms": {"keygate_request_duration_seconds": [["allowed", {"counts": [1, 2], "sum": 0.5}]]}}


def test_merge_sums_counters_and_histograms_and_takes_the_worst_readiness() -> None:
    """Counters, gauges and histogram buckets add up over workers; ready is 1 only if every worker is."""
    values, histograms = merge([snap(1, 3, 2), snap(2, 4, 5, ready=0)])
    assert values["keygate_requests"][("allowed", "", "2xx", "app")] == 7
    assert values["keygate_recorder_queue_depth"][()] == 7
    assert values["keygate_ready"][()] == 0
    assert histograms["keygate_request_duration_seconds"][("allowed",)] == {"counts": [2, 4], "sum": 1.0}


@pytest.mark.parametrize(("ups", "merged"), [([1, 1], 1), ([1, 0], 0), ([0, 0], 0)])
def test_redis_is_up_for_the_group_only_if_up_for_every_worker(ups: list[int], merged: int) -> None:
    """keygate_redis_up merges like store_up: one worker without Redis makes the group's gauge 0."""
    values, _ = merge({"pid": pid, "values": {"keygate_redis_up": [[up]]}, "histograms": {}}
                      for pid, up in enumerate(ups))
    assert values["keygate_redis_up"][()] == merged


def test_a_dead_workers_counters_stay_and_its_gauges_go(tmp_path: Path) -> None:
    """Totals never go down when a worker dies; its queue depth is no longer reported."""
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    dead_pid = int(finished.stdout)
    shared = SnapshotDir(tmp_path)
    shared.publish(snap(dead_pid, 5, 9))
    shared.publish(snap(os.getppid(), 1, 1))
    others = shared.others(pid=os.getpid())
    values, _ = merge(others)
    assert values["keygate_requests"][("allowed", "", "2xx", "app")] == 6
    assert values["keygate_recorder_queue_depth"][()] == 1


def test_a_later_scrape_never_counts_less_whichever_worker_answers(tmp_path: Path) -> None:
    """A scrape answered by one worker never counts less than the scrape before it, answered by another."""
    shared = SnapshotDir(tmp_path)
    first, second = os.getpid(), os.getppid()  # two live pids stand for two workers
    counted = {first: 0, second: 0}
    workers = {pid: KeygateCollector(lambda pid=pid: snap(pid, counted[pid], 0), shared) for pid in counted}
    for pid in counted:
        shared.publish(snap(pid, 0, 0))  # each worker publishes once at start
    counted.update({first: 20, second: 20})
    shared.publish(snap(first, 20, 0))  # the first worker's once-a-second publish came; the second's not yet

    def scrape_via(pid: int) -> float:
        return next(s.value for family in workers[pid].collect() for s in family.samples
                    if s.name == "keygate_requests_total")

    assert [scrape_via(second), scrape_via(first)] == [40, 40]


def test_workers_share_one_view(tmp_path: Path) -> None:
    """With --workers 2 every scrape, whichever worker answers it, counts the requests of both."""
    upstream = Upstream()
    keygate = Keygate(tmp_path, upstream.url, workers=2).start()
    try:
        _, key = asyncio.run(keygate.key(name="ci", operations=["read"]))
        sent = 40
        for _ in range(sent):  # a new connection each: the kernel spreads them over the workers
            request = urllib.request.Request(keygate.proxy_url + "/x", headers={"Authorization": f"Bearer {key}"})
            with urllib.request.urlopen(request, timeout=10) as r:
                assert r.status == 200

        def counted() -> tuple[float, float]:
            with urllib.request.urlopen(keygate.admin_url + "/metrics", timeout=10) as r:
                m = parse(r.read().decode())
            return (value(m, "keygate_requests_total", decision="allowed", reason=""),
                    value(m, "keygate_workers"))

        deadline = time.monotonic() + 20
        while counted() != (sent, 2) and time.monotonic() < deadline:
            time.sleep(0.2)  # other workers publish once a second
        # One right scrape may be the worker that served the last requests counting them live, while
        # its file is still a second old: after two publish rounds every worker's file is current.
        time.sleep(2 * PUBLISH_INTERVAL + 0.5)
        assert [counted() for _ in range(12)] == [(sent, 2)] * 12
    finally:
        assert keygate.stop() == 0
        upstream.stop()


def test_process_numbers_are_the_groups() -> None:
    """process_* over workers: CPU, memory and descriptors add up; start time and descriptor limit are the lowest."""
    def worker(pid: int, cpu: float, rss: float, start: float, max_fds: float) -> dict:
        return {"pid": pid, "values": {"process_cpu_seconds": [[cpu]], "process_resident_memory_bytes": [[rss]],
                                       "process_start_time_seconds": [[start]], "process_max_fds": [[max_fds]]},
                "histograms": {}}

    values, _ = merge([worker(1, 2.5, 100, 1000, 1024), worker(2, 1.5, 50, 990, 4096)])
    assert {name: family[()] for name, family in values.items()} == {
        "process_cpu_seconds": 4.0, "process_resident_memory_bytes": 150, "process_start_time_seconds": 990,
        "process_max_fds": 1024}
