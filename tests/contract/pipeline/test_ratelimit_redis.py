"""The Redis rate-limit policies against a real Redis: exact under concurrency, local-first within its bound, fallbacks."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio

from gateway.config.schema import RedisSettings
from gateway.pipeline.ratelimit import DEGRADED_HEADER, LocalTokenBuckets, RateLimitDecision, ratelimit_headers
from gateway.pipeline.ratelimit_redis import TAKE_SCRIPT, Fallback, LocalFirstBuckets, RedisTokenBuckets, SharedBuckets
from gateway.config.ratelimit_spec import parse_rate_limit
from gateway.cache.redis_link import RedisLink

from ...clocks import FakeClock
from ...e2e.relay import Relay
from ...redis_server import RedisServer

KEY = "kg_AAAAAAAAAAAA"
HOURLY = parse_rate_limit("20/hour")  # refills one token per 3 minutes: nothing refills during a test


@pytest.fixture
def redis_settings(redis_on_both: RedisSettings) -> RedisSettings:
    """Every test here holds on one Redis and on a Redis Cluster."""
    return redis_on_both


@pytest.fixture
async def links(redis_settings: RedisSettings) -> AsyncIterator[list[RedisLink]]:
    """Three processes' links to one Redis, as three replicas would have, each probed as `keygate serve`
    probes its link at start: a cluster client's first call reads the slot map and connects to the nodes,
    which on a loaded machine took over redis.timeout and turned every decision into the fallback's (CI)."""
    made = [RedisLink(redis_settings) for _ in range(3)]
    for link in made:
        assert await link.probe()
    yield made
    for link in made:
        await link.close()


def exact(link: RedisLink, mode: str = "local") -> RedisTokenBuckets:
    return RedisTokenBuckets(SharedBuckets(link), Fallback(mode))


async def test_exact_policy_allows_exactly_the_capacity_across_processes(links: list[RedisLink]) -> None:
    """Sixty concurrent requests from three processes on a 20/hour key: exactly 20 allowed."""
    limiters = [exact(link) for link in links]
    decisions = await asyncio.gather(*(limiters[i % 3].take(KEY, HOURLY) for i in range(60)))
    assert sum(d.allowed for d in decisions) == 20
    assert not any(d.degraded for d in decisions)


async def test_exact_policy_reports_remaining_and_retry_after(link: RedisLink) -> None:
    """Remaining counts down to 0; a refusal says when one token is back."""
    limiter = exact(link)
    spec = parse_rate_limit("3/minute")
    remaining = [(await limiter.take(KEY, spec)).remaining for _ in range(3)]
    refused = await limiter.take(KEY, spec)
    assert remaining == [2, 1, 0]
    assert not refused.allowed and refused.retry_after is not None and 1 <= refused.retry_after <= 20


async def test_buckets_are_per_key(link: RedisLink) -> None:
    """An empty bucket of one key does not limit another key."""
    limiter = exact(link)
    spec = parse_rate_limit("1/hour")
    assert (await limiter.take(KEY, spec)).allowed
    assert not (await limiter.take(KEY, spec)).allowed
    assert (await limiter.take("kg_BBBBBBBBBBBB", spec)).allowed


async def test_lower_limit_applies_at_once(link: RedisLink) -> None:
    """A key whose limit drops keeps no more tokens than the new capacity."""
    limiter = exact(link)
    await limiter.take(KEY, parse_rate_limit("100/hour"))
    allowed = [(await limiter.take(KEY, parse_rate_limit("2/hour"))).allowed for _ in range(4)]
    assert allowed == [True, True, False, False]


async def test_local_first_never_exceeds_the_limit(links: list[RedisLink]) -> None:
    """Three local-first processes together never allow more than the capacity."""
    limiters = [LocalFirstBuckets(SharedBuckets(link), Fallback("local"), batch=0.1, sync_interval=60)
                for link in links]
    decisions = await asyncio.gather(*(limiters[i % 3].take(KEY, HOURLY) for i in range(90)))
    allowed = sum(d.allowed for d in decisions)
    # Leases of 2 tokens: at most (processes - 1) x lease tokens can sit unused in other processes.
    assert 20 - 2 * 2 <= allowed <= 20


async def test_local_first_asks_redis_once_per_lease(link: RedisLink) -> None:
    """With leases of 10 tokens, 30 requests cost 3 Redis calls."""
    limiter = LocalFirstBuckets(SharedBuckets(link), Fallback("local"), batch=0.1, sync_interval=60)
    spec = parse_rate_limit("100/hour")
    for _ in range(30):
        assert (await limiter.take(KEY, spec)).allowed
    assert limiter.syncs == 3


async def test_local_first_returns_unused_tokens(link: RedisLink) -> None:
    """Tokens of an expired lease go back to the global bucket, where another process can spend them."""
    clock = FakeClock()
    first = LocalFirstBuckets(SharedBuckets(link), Fallback("local"), batch=0.5, sync_interval=1, clock=clock)
    second = exact(link)
    spec = parse_rate_limit("4/hour")
    assert (await first.take(KEY, spec)).allowed  # leases 2, spends 1
    assert [(await second.take(KEY, spec)).allowed for _ in range(3)] == [True, True, False]
    clock.advance(2)
    await first.return_idle()
    assert (await second.take(KEY, spec)).allowed


async def test_local_first_closing_returns_every_lease(link: RedisLink) -> None:
    """A process that stops gives its unused tokens back."""
    first = LocalFirstBuckets(SharedBuckets(link), Fallback("local"), batch=0.5, sync_interval=60)
    spec = parse_rate_limit("4/hour")
    await first.take(KEY, spec)
    await first.close()
    second = exact(link)
    assert [(await second.take(KEY, spec)).allowed for _ in range(4)] == [True, True, True, False]


async def test_local_first_returns_the_other_leases_past_an_unusable_bucket(link: RedisLink) -> None:
    """A lease whose bucket's Redis key now holds another type cannot go back; the leases after it still do
    (returning stopped at the first failure, which meant Redis down until one bucket could fail alone)."""
    shared = SharedBuckets(link)
    first = LocalFirstBuckets(shared, Fallback("local"), batch=0.5, sync_interval=60)
    spec = parse_rate_limit("4/hour")
    broken = "kg_BBBBBBBBBBBB"
    await first.take(broken, spec)  # leases 2 of its bucket, spends 1: returned first
    await first.take(KEY, spec)  # the same of this one
    await link.client.set(shared.name(broken), "not a bucket")
    await first.close()
    second = exact(link)
    assert [(await second.take(KEY, spec)).allowed for _ in range(4)] == [True, True, True, False]


async def test_a_redis_that_lost_its_scripts_gets_it_again(own_redis: RedisServer) -> None:
    """After SCRIPT FLUSH (as after a restart), the script is loaded again and each waiting call runs once."""
    link = RedisLink(RedisSettings(url=own_redis.url, prefix="kg:", timeout=2.0))
    try:
        limiter = exact(link)
        assert (await limiter.take(KEY, HOURLY)).remaining == 19
        await link.client.script_flush()
        decisions = await asyncio.gather(*(limiter.take(KEY, HOURLY) for _ in range(3)))
        assert sorted(d.remaining for d in decisions) == [16, 17, 18]
        assert not any(d.degraded for d in decisions) and link.up
    finally:
        await link.close()


# --- Redis down ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "allowed"), [
    ("local", [True, True, False]),
    ("allow", [True, True, True]),
    ("deny", [False, False, False]),
])
async def test_on_backend_error_decides_when_redis_is_dead(
    own_redis: RedisServer, mode: str, allowed: list[bool]
) -> None:
    """With Redis dead, every decision follows on_backend_error and is marked degraded."""
    link = RedisLink(RedisSettings(url=own_redis.url, prefix="kg:", timeout=0.5))
    try:
        limiter = exact(link, mode)
        own_redis.kill()
        decisions = [await limiter.take(KEY, parse_rate_limit("2/hour")) for _ in range(3)]
        assert [d.allowed for d in decisions] == allowed
        assert all(d.degraded for d in decisions)
        assert limiter.fallback.decisions == 3
        headers = ratelimit_headers(decisions[0])
        assert headers[DEGRADED_HEADER] == "1"
        if mode == "deny":
            # Refused for a second, and the quota not said to be back sooner than that ("t=0" would say now).
            assert headers["Retry-After"] == "1" and headers["RateLimit"] == '"key";r=0;t=1'
    finally:
        await link.close()


async def test_while_the_circuit_is_open_decisions_are_the_fallbacks_at_once(own_redis: RedisServer) -> None:
    """Once a failure opened the circuit, each decision is the fallback's without trying Redis: no round
    trip is attempted (none waited for), and each counts as a call refused while Redis is down."""
    link = RedisLink(RedisSettings(url=own_redis.url, prefix="kg:", timeout=0.5))
    try:
        limiter = exact(link, "deny")
        own_redis.kill()
        assert (await limiter.take(KEY, HOURLY)).degraded and not link.up  # this one found Redis gone
        round_trips, failures = limiter.shared.round_trips, link.failures
        decisions = await asyncio.gather(*(limiter.take(KEY, HOURLY) for _ in range(3)))
        assert [(d.allowed, d.degraded) for d in decisions] == [(False, True)] * 3
        assert limiter.shared.round_trips == round_trips and link.failures == failures + 3
    finally:
        await link.close()


async def test_local_first_falls_back_when_redis_is_dead(own_redis: RedisServer) -> None:
    """A local-first process without a lease and without Redis decides per on_backend_error."""
    link = RedisLink(RedisSettings(url=own_redis.url, prefix="kg:", timeout=0.5))
    try:
        limiter = LocalFirstBuckets(SharedBuckets(link), Fallback("deny"), batch=0.1, sync_interval=60)
        own_redis.kill()
        decision = await limiter.take(KEY, HOURLY)
        assert not decision.allowed and decision.degraded
    finally:
        await link.close()


@pytest.mark.parametrize("failure", ["server killed", "out of memory"])
async def test_a_batch_failing_on_an_open_connection_falls_back_and_opens_the_circuit(
    own_redis: RedisServer, failure: str
) -> None:
    """A batch on the open connection that fails (connection lost, an error reply of the server's: OOM at
    maxmemory) is decided by the fallback, every caller in it, and opens the circuit, as a failed
    RedisLink.run call does. (One bucket's own error is not the server's: see the WRONGTYPE test below.)"""
    link = RedisLink(RedisSettings(url=own_redis.url, prefix="kg:", timeout=2.0, reconnect_backoff_max=0.1))
    blocker = RedisLink(RedisSettings(url=own_redis.url, prefix="kg:", timeout=10))
    try:
        limiter = exact(link, "deny")
        assert not (await limiter.take(KEY, HOURLY)).degraded  # the connection is open
        if failure == "server killed":
            await blocker.client.ping()  # connected: its sleep starts as soon as it is sent
            hang = asyncio.ensure_future(blocker.client.execute_command("DEBUG", "SLEEP", "5"))
            await asyncio.sleep(0.1)
            batch = asyncio.gather(*(limiter.take(KEY, HOURLY) for _ in range(3)))
            await asyncio.sleep(0.1)
            own_redis.kill()
            hang.cancel()
        else:
            await blocker.client.config_set("maxmemory", "1")  # (this test's own server; noeviction)
            batch = asyncio.gather(*(limiter.take(KEY, HOURLY) for _ in range(3)))
        decisions = await batch
        assert [(d.allowed, d.degraded) for d in decisions] == [(False, True)] * 3
        assert not link.up and link.failures == 1
    finally:
        await link.close()
        await blocker.close()


async def test_closing_the_link_with_a_batch_out_decides_it_without_redis_and_reconnects_nothing(
    own_redis: RedisServer
) -> None:
    """At shutdown, callers still waiting get the fallback; no reconnect loop or new connection is left behind."""
    link = RedisLink(RedisSettings(url=own_redis.url, prefix="kg:", timeout=2.0, reconnect_backoff_max=0.05))
    blocker = RedisLink(RedisSettings(url=own_redis.url, prefix="kg:", timeout=10))
    try:
        limiter = exact(link, "deny")
        await limiter.take(KEY, HOURLY)
        await blocker.client.ping()  # connected: its sleep starts as soon as it is sent
        hang = asyncio.ensure_future(blocker.client.execute_command("DEBUG", "SLEEP", "1"))
        await asyncio.sleep(0.05)
        waiting = asyncio.gather(*(limiter.take(KEY, HOURLY) for _ in range(2)))
        await asyncio.sleep(0.02)  # the batch is out
        queued = asyncio.ensure_future(limiter.take(KEY, HOURLY))  # held behind it
        await asyncio.sleep(0)
        await link.close()
        decisions = [*await waiting, await queued]
        assert [(d.allowed, d.degraded) for d in decisions] == [(False, True)] * 3
        await hang
        await asyncio.sleep(0.3)  # a reconnect loop would have pinged by now
        clients = await blocker.client.client_list()
        assert len(clients) == 1  # the blocker's own
    finally:
        await link.close()
        await blocker.close()


async def relay_answering(port: int, answers: list[float | None]) -> asyncio.AbstractServer:
    """A TCP relay to Redis on ``port`` that holds its n-th reply for ``answers[n]`` seconds, or for ever (None)."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)

        async def up() -> None:
            while data := await reader.read(65536):
                up_writer.write(data)

        async def down() -> None:
            n = 0
            while data := await up_reader.read(65536):
                delay = answers[n] if n < len(answers) else None
                n += 1
                if delay is not None:
                    asyncio.get_running_loop().call_later(delay, writer.write, data)

        await asyncio.gather(up(), down(), return_exceptions=True)

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def test_a_request_held_behind_the_batch_out_is_decided_within_the_timeout_of_its_asking(
    own_redis: RedisServer
) -> None:
    """The batch out is answered late but in time, then Redis hangs: the request asked for meanwhile (held)
    gets its fallback redis.timeout after it asked, not after its batch went out."""
    await RedisLink(RedisSettings(url=own_redis.url)).client.script_load(TAKE_SCRIPT)  # one round trip each
    # The warm-up at once, the next late (0.4 s inside the timeout, for a loaded machine), then none.
    relay = await relay_answering(own_redis.port, [0, 0.6])
    link = RedisLink(RedisSettings(url=f"redis://127.0.0.1:{relay.sockets[0].getsockname()[1]}",
                                   prefix="kg:", timeout=1.0))
    try:
        limiter = exact(link, "deny")
        await limiter.take("kg_warm", HOURLY)
        out = asyncio.ensure_future(limiter.take("kg_out", HOURLY))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        held = await limiter.take("kg_held", HOURLY)
        waited = time.monotonic() - started
        assert not (await out).degraded
        assert held.degraded and not held.allowed
        # A timeout counted from when its batch went out (0.6 s) would be 1.55 s.
        assert 0.95 <= waited < 1.35
    finally:
        await link.close()
        relay.close()


async def test_closing_the_link_while_it_connects_decides_the_waiting_without_redis() -> None:
    """A server that takes the connection but never answers AUTH: closing then answers the caller at once."""
    async def silent(_reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    link = RedisLink(RedisSettings(url=f"redis://:pw@127.0.0.1:{server.sockets[0].getsockname()[1]}",
                                   prefix="kg:", timeout=5.0))
    try:
        waiting = asyncio.ensure_future(exact(link, "deny").take(KEY, HOURLY))
        await asyncio.sleep(0.2)  # connected, AUTH unanswered
        await link.close()
        decision = await asyncio.wait_for(waiting, 2)
        assert decision.degraded and not decision.allowed
    finally:
        await link.close()
        server.close()


async def test_a_call_that_cannot_be_sent_is_refused_with_its_batch_not_left_waiting(link: RedisLink) -> None:
    """A key id Redis cannot be sent (not UTF-8) fails its whole batch to the fallback; nobody waits for ever."""
    limiter = exact(link, "deny")
    await limiter.take("kg_warm", HOURLY)
    good, bad = await asyncio.wait_for(
        asyncio.gather(limiter.take("kg_good", HOURLY), limiter.take("kg_\udc80", HOURLY)), 2)
    assert good.degraded and bad.degraded
    assert (await limiter.take("kg_good", HOURLY)).remaining == 19  # nothing was taken; Redis still used


async def test_exact_policy_recovers_when_redis_is_back(own_redis: RedisServer) -> None:
    """After Redis returns (reconnect with backoff), decisions are global again, not degraded."""
    link = RedisLink(RedisSettings(url=own_redis.url, prefix="kg:", timeout=0.5, reconnect_backoff_max=0.1))
    try:
        limiter = exact(link)
        own_redis.kill()
        assert (await limiter.take(KEY, HOURLY)).degraded
        own_redis.start()
        for _ in range(100):
            if link.up:
                break
            await asyncio.sleep(0.05)
        decision = await limiter.take(KEY, HOURLY)
        assert decision.allowed and not decision.degraded
    finally:
        await link.close()


def test_degraded_header_absent_on_normal_decisions() -> None:
    """A decision of the policy in force carries no degraded header."""
    decision = LocalTokenBuckets().take_now(KEY, HOURLY)
    assert DEGRADED_HEADER not in ratelimit_headers(decision)


async def test_local_first_refuses_without_redis_while_the_bucket_is_empty(link: RedisLink) -> None:
    """Once the global bucket is known empty, further refusals cost no Redis call until a token can be back."""
    limiter = LocalFirstBuckets(SharedBuckets(link), Fallback("local"), batch=1, sync_interval=60)
    spec = parse_rate_limit("2/hour")
    decisions = [await limiter.take(KEY, spec) for _ in range(10)]
    assert [d.allowed for d in decisions] == [True, True] + [False] * 8
    assert limiter.syncs == 2


async def test_slow_redis_is_not_waited_for(own_redis: RedisServer) -> None:
    """A Redis that hangs (DEBUG SLEEP) past redis.timeout gets a fallback decision, not a late answer."""
    link = RedisLink(RedisSettings(url=own_redis.url, prefix="kg:", timeout=0.2))
    blocker = RedisLink(RedisSettings(url=own_redis.url, prefix="kg:", timeout=10))
    try:
        limiter = exact(link)
        assert not (await limiter.take(KEY, HOURLY)).degraded
        await blocker.client.ping()  # connected: its sleep starts as soon as it is sent
        hang = asyncio.create_task(blocker.client.execute_command("DEBUG", "SLEEP", "2"))
        await asyncio.sleep(0.1)
        decision = await limiter.take(KEY, HOURLY)
        assert decision.allowed and decision.degraded
        await hang
    finally:
        await link.close()
        await blocker.close()


async def test_concurrent_decisions_of_one_key_are_one_script_run_deciding_as_many(own_redis: RedisServer) -> None:
    """Callers of one key and limit in one batch share one script run asking for as many tokens: each decision
    (allowed, remaining, retry) is the one it would get from a run of its own, one after the other."""
    link = RedisLink(RedisSettings(url=own_redis.url, prefix="kg:", timeout=2.0))
    admin = RedisLink(RedisSettings(url=own_redis.url, prefix="kg:", timeout=2.0))
    try:
        limiter = exact(link)
        other = parse_rate_limit("3/hour")
        await limiter.take("kg_warm", HOURLY)  # the connection and the script are in place
        await admin.client.config_resetstat()
        together = await asyncio.gather(*(limiter.take(KEY, HOURLY) for _ in range(23)),
                                        limiter.take("kg_BBBBBBBBBBBB", HOURLY),
                                        *(limiter.take("kg_CCCCCCCCCCCC", other) for _ in range(4)))
        stats = await admin.client.info("commandstats")
        assert stats["cmdstat_evalsha"]["calls"] == 3  # one run per key, however many callers
        alone = [await limiter.take("kg_DDDDDDDDDDDD", HOURLY) for _ in range(23)]
        alone_other = [await limiter.take("kg_EEEEEEEEEEEE", other) for _ in range(4)]
        shape = lambda ds: [(d.allowed, d.remaining, d.retry_after is not None) for d in ds]  # noqa: E731
        assert shape(together[:23]) == shape(alone)
        assert shape(together[24:]) == shape(alone_other)
        assert shape(together[23:24]) == [(True, 19, False)]
        assert [d.remaining for d in together[:20]] == list(range(19, -1, -1))
    finally:
        await link.close()
        await admin.close()


async def test_a_caller_gone_while_its_run_is_out_leaves_the_others_decisions_as_they_were(link: RedisLink) -> None:
    """A request cancelled (its client gone) while the run it shares is out: the run still spends its token, and
    the other callers get the decisions they would have got with it there."""
    limiter = exact(link, "deny")
    await limiter.take("kg_warm", HOURLY)  # the connection and the script are in place
    callers = [asyncio.ensure_future(limiter.take(KEY, HOURLY)) for _ in range(3)]
    await asyncio.sleep(0)  # all three have asked: one run, out or about to go
    callers[1].cancel()
    first, last = await asyncio.wait_for(asyncio.gather(callers[0], callers[2]), 5)
    assert callers[1].cancelled()
    assert [(d.allowed, d.remaining, d.degraded) for d in (first, last)] == [(True, 19, False), (True, 17, False)]
    assert (await limiter.take(KEY, HOURLY)).remaining == 16


async def test_the_exact_policy_hands_the_pipeline_a_future_that_holds_the_fallbacks_decision_when_redis_is_down(
    own_redis: RedisServer,
) -> None:
    """take_soon (what stage 7 awaits): a future, never an exception; with Redis gone, the fallback decides."""
    link = RedisLink(RedisSettings(url=own_redis.url, prefix="kg:", timeout=0.5))
    try:
        limiter = exact(link, "deny")
        live = limiter.take_soon(KEY, HOURLY)
        assert isinstance(live, asyncio.Future)
        assert (await live).allowed
        own_redis.kill()
        # The first finds it gone; the next ones find the circuit open.
        down = [await limiter.take_soon(KEY, HOURLY) for _ in range(2)]
        assert [(d.allowed, d.degraded) for d in down] == [(False, True), (False, True)]
    finally:
        await link.close()


async def test_decisions_asked_for_while_a_batch_is_out_go_together_when_it_is_back(own_redis: RedisServer) -> None:
    """One batch out at a time: what is asked for in the turns meanwhile waits and goes as one batch."""
    link = RedisLink(RedisSettings(url=own_redis.url, prefix="kg:", timeout=2.0))
    blocker = RedisLink(RedisSettings(url=own_redis.url, prefix="kg:", timeout=10))
    try:
        shared = SharedBuckets(link)
        limiter = RedisTokenBuckets(shared, Fallback("deny"))
        await limiter.take("kg_warm", HOURLY)
        await blocker.client.ping()  # connected: its sleep starts as soon as it is sent
        hang = asyncio.ensure_future(blocker.client.execute_command("DEBUG", "SLEEP", "1"))
        await asyncio.sleep(0.05)
        first = asyncio.ensure_future(limiter.take("kg_first", HOURLY))
        later = []
        for turn in range(4):  # four later turns while the first batch waits behind the sleep
            await asyncio.sleep(0.02)
            later.append(asyncio.ensure_future(limiter.take(f"kg_later{turn}", HOURLY)))
        decisions = await asyncio.gather(first, *later)
        await hang
        assert all(d.allowed and not d.degraded and d.remaining == 19 for d in decisions)
        assert shared.round_trips == 3  # the warm-up, the first, the four later ones together
    finally:
        await link.close()
        await blocker.close()


async def test_concurrent_decisions_share_a_round_trip(link: RedisLink) -> None:
    """Decisions asked for together go to Redis in one pipeline, each still its own script run."""
    shared = SharedBuckets(link)
    limiter = RedisTokenBuckets(shared, Fallback("local"))
    decisions = await asyncio.gather(*(limiter.take(KEY, HOURLY) for _ in range(25)))
    assert sum(d.allowed for d in decisions) == 20
    assert shared.round_trips == 1


async def test_a_bucket_key_holding_another_type_degrades_that_key_alone(
    link: RedisLink, caplog: pytest.LogCaptureFixture
) -> None:
    """One bucket's Redis key overwritten by something else (WRONGTYPE): that key's decisions are the
    fallback's, logged once; every other key in the same round trip keeps Redis's decision, and the circuit
    stays closed (a whole batch falling back, and the circuit opening again after every reconnect, before)."""
    caplog.set_level(logging.WARNING)
    shared = SharedBuckets(link)
    limiter = RedisTokenBuckets(shared, Fallback("deny"))
    assert not (await limiter.take(KEY, HOURLY)).degraded  # the script loaded, every client connected
    broken = "kg_BBBBBBBBBBBB"
    await link.client.set(shared.name(broken), "not a bucket")
    for _ in range(2):
        trips = shared.round_trips
        good, bad = await asyncio.gather(limiter.take(KEY, HOURLY), limiter.take(broken, HOURLY))
        assert shared.round_trips == trips + 1  # both in one batch
        assert good.allowed and not good.degraded
        assert not bad.allowed and bad.degraded  # on_backend_error = "deny"
        assert link.up and link.trips == 0
    assert _events(caplog).count("ratelimit_bucket_unusable") == 1
    assert "redis_unavailable" not in _events(caplog)
    await link.client.delete(shared.name(broken))
    assert not (await limiter.take(broken, HOURLY)).degraded


async def test_a_failover_behind_an_endpoint_is_a_short_outage(own_redis: RedisServer, tmp_path: Path) -> None:
    """README, "Redis Sentinel or a managed endpoint": the old primary becomes a replica of the new one and the
    endpoint sends new connections to the new primary. No connection opened before is used again after the
    outage (the demoted primary still answers PING, and refuses every script and write with READONLY):
    decisions come from the new primary within moments, not degraded for as long as an old connection lives."""
    folder = tmp_path / "new-primary"
    folder.mkdir()
    new_primary = RedisServer(folder).start()
    endpoint = Relay("127.0.0.1", own_redis.port)
    link = RedisLink(RedisSettings(url=f"redis://127.0.0.1:{endpoint.port}/0", prefix="kg:", timeout=0.5,
                                   reconnect_backoff_max=0.1))
    old = redis.asyncio.Redis(port=own_redis.port)
    new = redis.asyncio.Redis(port=new_primary.port)
    try:
        limiter = exact(link, "deny")
        assert not (await limiter.take(KEY, HOURLY)).degraded  # the lean connection is open
        await link.run(lambda client: client.ping())  # and one of redis-py's, idle in its pool
        await old.replicaof("127.0.0.1", new_primary.port)
        endpoint.target = ("127.0.0.1", new_primary.port)
        degraded = 0
        for _ in range(100):
            decision = await limiter.take(KEY, HOURLY)
            if not decision.degraded:
                break
            degraded += 1
            await asyncio.sleep(0.05)
        assert not decision.degraded, "still degraded 5 s after the failover"
        assert 1 <= degraded
        assert decision.remaining == HOURLY.capacity - 1  # the new primary's bucket
        assert await new.exists(limiter.shared.name(KEY)) == 1
        await link.run(lambda client: client.set(link.key("after"), "1"))  # a write through redis-py too
        assert await new.get(link.key("after")) == b"1"
    finally:
        await link.close()
        endpoint.cut()
        await old.aclose()
        await new.aclose()
        new_primary.kill()


async def test_ratelimit_degraded_is_logged_once_per_outage(own_redis: RedisServer,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """README, "When Redis fails": the log says ratelimit_degraded at each outage (an alert keyed on it must fire
    for the second outage of a process too), once each however many decisions are degraded."""
    caplog.set_level(logging.INFO)
    link = RedisLink(RedisSettings(url=own_redis.url, prefix="kg:", timeout=0.5, reconnect_backoff_max=0.1))
    limiter = exact(link)
    limiter.fallback.watch(link)
    try:
        for _outage in range(2):
            assert not (await limiter.take(KEY, HOURLY)).degraded
            caplog.clear()
            own_redis.kill()
            assert all([(await limiter.take(KEY, HOURLY)).degraded for _ in range(3)])
            own_redis.start()
            for _ in range(100):
                if link.up:
                    break
                await asyncio.sleep(0.05)
            assert link.up
            events = [json.loads(r.getMessage())["event"] for r in caplog.records if r.getMessage().startswith("{")]
            assert events.count("ratelimit_degraded") == 1
            assert events.count("redis_unavailable") == 1 and events.count("redis_recovered") == 1
    finally:
        await link.close()


class DelayingRelay:
    """A TCP relay to Redis on ``port`` that hands on every reply ``delay`` seconds late, in order (a far Redis)."""

    def __init__(self, port: int, delay: float) -> None:
        self.target, self.delay = port, delay
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)

            async def up() -> None:
                while data := await reader.read(65536):
                    up_writer.write(data)

            async def down() -> None:
                loop = asyncio.get_running_loop()
                while data := await up_reader.read(65536):
                    loop.call_later(self.delay, writer.write, data)

            await asyncio.gather(up(), down(), return_exceptions=True)

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def _events(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [json.loads(r.getMessage())["event"] for r in caplog.records if r.getMessage().startswith('{"event"')]


async def test_a_redis_that_answers_within_the_timeout_opens_no_circuit_under_load(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Every reply 0.6 x redis.timeout late, requests arriving steadily: Redis is not failing, so the circuit
    stays closed (it opened within moments, every later decision degraded, when the time a batch was held
    behind the one out counted as Redis's), and decisions are Redis's: a batch is held at most a quarter of
    the timeout (held until the reply, most of them waited longer than the timeout in all)."""
    caplog.set_level(logging.INFO)
    await RedisLink(RedisSettings(url=own_redis.url)).client.script_load(TAKE_SCRIPT)
    relay = DelayingRelay(own_redis.port, 0.6)
    link = RedisLink(RedisSettings(url=f"redis://{await relay.start()}", prefix="kg:", timeout=1.0))
    try:
        limiter = exact(link, "deny")
        assert not (await limiter.take("kg_warm", HOURLY)).degraded
        asked = []
        for i in range(100):  # 2 s, over five keys
            asked.append(asyncio.ensure_future(limiter.take(f"kg_key{i % 5}", parse_rate_limit("1000/hour"))))
            await asyncio.sleep(0.02)
        decisions = await asyncio.gather(*asked)
        assert link.up and link.failures == 0
        assert "redis_unavailable" not in _events(caplog)
        assert sum(d.degraded for d in decisions) <= len(decisions) // 10
    finally:
        await link.close()
        relay.close()


async def test_a_redis_further_than_a_third_of_the_timeout_is_judged_up_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every reply 0.55 x redis.timeout late, and a password: a new connection's set-up (AUTH, CLIENT SETINFO)
    is not counted against Redis with the PING or the script call it is opened for. Redis is judged up at
    start, and again after a stall; decisions are Redis's (before, the circuit never closed: set-up and PING,
    or set-up and the script call, took more than redis.timeout together)."""
    caplog.set_level(logging.INFO)
    folder = tmp_path / "redis"
    folder.mkdir()
    server = RedisServer(folder).start()
    await RedisLink(RedisSettings(url=server.url)).client.script_load(TAKE_SCRIPT)
    await RedisLink(RedisSettings(url=server.url)).client.config_set("requirepass", "pw")
    relay = DelayingRelay(server.port, 0.275)
    link = RedisLink(RedisSettings(url=f"redis://:pw@{await relay.start()}", prefix="kg:", timeout=0.5,
                                   reconnect_backoff_max=0.2))
    try:
        assert await link.probe()
        limiter = exact(link, "deny")
        # The first decision opens the lean connection: AUTH, then the call, 1.1 x the timeout in all, so its
        # caller gets the fallback at the timeout; the connection opens all the same, and Redis decides next.
        await limiter.take(KEY, HOURLY)
        await asyncio.sleep(0.4)
        assert not (await limiter.take(KEY, HOURLY)).degraded and link.up
        relay.delay = 1.0  # a stall
        assert (await limiter.take(KEY, HOURLY)).degraded and not link.up
        relay.delay = 0.275
        for _ in range(50):
            if link.up:
                break
            await asyncio.sleep(0.1)
        assert link.up, "the circuit stayed open"
        await limiter.take(KEY, HOURLY)  # (a new lean connection, as above)
        await asyncio.sleep(0.4)
        decisions = [await limiter.take(KEY, HOURLY) for _ in range(3)]
        assert not any(d.degraded for d in decisions)
        assert _events(caplog).count("redis_unavailable") == 1
    finally:
        await link.close()
        relay.close()
        server.kill()


async def link_answering_late(redis: RedisServer) -> tuple[RedisLink, asyncio.AbstractServer]:
    """A link (redis.timeout 1 s) through a relay that holds its second and third replies 0.9 s (in time)."""
    await RedisLink(RedisSettings(url=redis.url)).client.script_load(TAKE_SCRIPT)
    relay = await relay_answering(redis.port, [0, 0.9, 0.9] + [0] * 50)
    link = RedisLink(RedisSettings(url=f"redis://127.0.0.1:{relay.sockets[0].getsockname()[1]}",
                                   prefix="kg:", timeout=1.0, reconnect_backoff_max=0.1))
    return link, relay


async def held_past_the_timeout(limiter: RedisTokenBuckets) -> RateLimitDecision:
    """A batch out 0.9 s; a request asked meanwhile is held (a quarter of the timeout), then its batch is 0.9 s
    on the wire too: its decision, which must be the fallback's, at the timeout of its asking."""
    assert not (await limiter.take("kg_warm", HOURLY)).degraded
    out = asyncio.ensure_future(limiter.take("kg_out", HOURLY))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    held = await limiter.take("kg_held", HOURLY)
    waited = time.monotonic() - started
    assert not (await out).degraded
    assert held.degraded and 0.95 <= waited < 1.35
    return held


async def test_callers_held_past_the_timeout_get_the_fallback_and_redis_is_not_judged_down(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Callers that waited redis.timeout from their asking, most of it held in Keygate's queue, get the
    fallback; Redis answered each batch in time, so the circuit stays closed and the next decision is Redis's."""
    caplog.set_level(logging.INFO)
    link, relay = await link_answering_late(own_redis)
    try:
        limiter = exact(link, "deny")
        await held_past_the_timeout(limiter)
        await asyncio.sleep(0.3)  # its late replies come, and are dropped
        assert link.up and link.failures == 0 and "redis_unavailable" not in _events(caplog)
        assert not (await limiter.take("kg_after", HOURLY)).degraded
    finally:
        await link.close()
        relay.close()


async def test_an_outage_after_decisions_degraded_without_one_is_announced_too(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Callers held past redis.timeout get the fallback with the circuit closed (ratelimit_degraded is logged);
    a real outage after that is logged as one: redis_unavailable and ratelimit_degraded again."""
    caplog.set_level(logging.INFO)
    link, relay = await link_answering_late(own_redis)
    limiter = exact(link, "deny")
    limiter.fallback.watch(link)
    try:
        await held_past_the_timeout(limiter)
        assert link.up and _events(caplog) == ["ratelimit_degraded"]
        caplog.clear()
        own_redis.kill()
        assert all([(await limiter.take(KEY, HOURLY)).degraded for _ in range(3)]) and not link.up
        assert _events(caplog) == ["redis_unavailable", "ratelimit_degraded"]
    finally:
        await link.close()
        relay.close()


async def test_a_far_redis_that_lost_its_script_is_not_judged_down(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Every reply 0.4 x redis.timeout late, then the script flushed (as a restart does): the script is loaded
    and the calls run again in one round trip, within the timeout (three round trips were not)."""
    caplog.set_level(logging.INFO)
    relay = DelayingRelay(own_redis.port, 0.4)
    link = RedisLink(RedisSettings(url=f"redis://{await relay.start()}", prefix="kg:", timeout=1.0))
    direct = RedisLink(RedisSettings(url=own_redis.url))
    try:
        await direct.client.script_load(TAKE_SCRIPT)
        limiter = exact(link, "deny")
        assert not (await limiter.take("kg_warm", HOURLY)).degraded
        await direct.client.script_flush()
        decision = await limiter.take(KEY, HOURLY)
        assert not decision.degraded and decision.allowed and link.up
        assert "redis_unavailable" not in _events(caplog)
    finally:
        await link.close()
        await direct.close()
        relay.close()


async def test_a_decision_waiting_for_a_connection_is_the_fallbacks_at_the_timeout(tmp_path: Path) -> None:
    """No connection open (first use, or after a recovery), every reply 0.9 x redis.timeout late, and a
    password: AUTH, then the call, take 1.8 x the timeout. The caller gets the fallback at the timeout of its
    asking (not after both); the connection is still opened (its set-up is not counted against Redis)."""
    folder = tmp_path / "redis"
    folder.mkdir()
    server = RedisServer(folder).start()
    await RedisLink(RedisSettings(url=server.url)).client.script_load(TAKE_SCRIPT)
    await RedisLink(RedisSettings(url=server.url)).client.config_set("requirepass", "pw")
    relay = DelayingRelay(server.port, 0.9)
    link = RedisLink(RedisSettings(url=f"redis://:pw@{await relay.start()}", prefix="kg:", timeout=1.0))
    try:
        limiter = exact(link, "deny")
        started = time.monotonic()
        decision = await limiter.take(KEY, HOURLY)
        waited = time.monotonic() - started
        assert decision.degraded and 0.95 <= waited < 1.35
    finally:
        await link.close()
        relay.close()
        server.kill()
