"""The Redis key cache against a real Redis: what it stores, how changes orphan it, how a fleet warms from it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from urllib.parse import urlparse

import pytest
import redis.asyncio

from gateway.cache.change_feed import ChangeWatcher
from gateway.cache.local import KeyCache
from gateway.config.schema import RedisSettings, Settings
from gateway.keys import KeyParser, cache_key, generate
from gateway.cache.notices import ChangePublisher
from gateway.pipeline.lookup import KeyLookup
from gateway.pipeline.prepared import PreparedKey
from gateway.pipeline.failures import FailureLimiter
from gateway.pipeline.outcomes import Denied, Outcome
from gateway.config.ratelimit_spec import parse_rate_limit
from gateway.cache.redis_link import RedisLink, RedisUnavailable
from gateway.manage.service import KeyService, bootstrap, resolve_pepper
from gateway.cache.shared import NEGATIVE, KeyFacts, SharedKeyCache, decode_facts, encode_facts
from gateway.store import KeyStore, StoreUnavailable, create_store

from ...e2e.relay import Relay
from ...redis_server import RedisServer, raw_client
from ...waiting import until

PARSER = KeyParser(["kg_", "kga_"])


@pytest.fixture
def redis_settings(redis_on_both: RedisSettings) -> RedisSettings:
    """Every test here holds on one Redis and on a Redis Cluster."""
    return redis_on_both


@pytest.fixture
def shared(link: RedisLink) -> SharedKeyCache:
    return SharedKeyCache(link, ttl=30, negative_ttl=5)


@pytest.fixture
async def raw(redis_settings: RedisSettings) -> AsyncIterator[redis.asyncio.Redis]:
    client = raw_client(redis_settings.url, cluster=redis_settings.cluster)
    yield client
    await client.aclose()


async def facts_of(service: KeyService, **kwargs: object) -> tuple[KeyFacts, str]:
    record, full = await service.create_key(name="ci", role="admin", **kwargs)  # type: ignore[arg-type]
    return KeyFacts(record, ("*",), False, None, None), full


def a_lookup(store: KeyStore, service: KeyService, pepper: bytes, shared: SharedKeyCache | None,
             failures: FailureLimiter | None = None) -> KeyLookup:
    """One worker's lookup: its own in-process cache, the fleet's shared one."""
    cache: KeyCache[PreparedKey] = KeyCache(ttl=30, negative_ttl=5, stale_if_error=300, max_entries=1000)
    return KeyLookup(store, pepper=pepper, hasher=service.hasher, cache=cache,
                     default_rate_limit=parse_rate_limit("100/minute"), shared=shared, failures=failures)


# --- entries -------------------------------------------------------------------------------------


async def test_facts_survive_the_round_trip(service: KeyService) -> None:
    """Encoding and decoding gives back the same facts, without the secret hash."""
    facts, _ = await facts_of(service, expires="30d", operations=["deploy"], ip_allowlist=["10.0.0.0/8"])
    back = decode_facts(encode_facts(facts))
    assert back == facts
    assert back.record.expires_at == facts.record.expires_at
    assert back.record.secret_hash == ""


async def test_a_canary_and_its_hygiene_times_survive_the_round_trip(service: KeyService) -> None:
    """A canary stays a canary through Redis, and every time of its record comes back as a time (the canary's
    alarm renders the record; a time read back as text would break it)."""
    record, _ = await service.create_key(name="decoy", canary=True, expires="30d")
    at = record.created_at
    record = replace(record, leaked_at=at, idle_notified_at=at, expiry_warned_for=record.expires_at)
    back = decode_facts(encode_facts(KeyFacts(record, None, False, None, None))).record
    assert back.canary is True
    assert (back.leaked_at, back.idle_notified_at, back.expiry_warned_for) == (at, at, record.expires_at)
    assert back.public(at) == record.public(at)


async def test_entry_is_keyed_by_digest_and_holds_no_secret(
    shared: SharedKeyCache, service: KeyService, raw: redis.asyncio.Redis, redis_prefix: str
) -> None:
    """Redis sees the MAC digest and the record, never the key, its secret or its hash."""
    facts, full = await facts_of(service)
    digest = cache_key(b"pepper" * 6, full)
    slot, found = await shared.fetch(facts.record.id, digest)
    assert found is None
    await shared.put(slot, facts)
    names = [n.decode() for n in await raw.keys(redis_prefix + "*")]
    assert names == [slot.name] and slot.name.endswith(digest)
    value = await raw.get(slot.name)
    secret = PARSER.parse(full).secret
    assert full.encode() not in value and secret.encode() not in value
    assert b"argon2" not in value
    assert 0 < await raw.pttl(slot.name) <= 30_000


async def test_fetch_finds_what_was_put(shared: SharedKeyCache, service: KeyService) -> None:
    """A put entry is found again under the same key id and digest."""
    facts, _ = await facts_of(service)
    slot, _ = await shared.fetch(facts.record.id, "d1")
    await shared.put(slot, facts)
    assert (await shared.fetch(facts.record.id, "d1"))[1] == facts


async def test_negative_entry_is_found_as_negative(shared: SharedKeyCache) -> None:
    """A negative entry reads back as NEGATIVE."""
    slot, _ = await shared.fetch("kg_AAAAAAAAAAAA", "d1")
    await shared.put_negative(slot)
    assert (await shared.fetch("kg_AAAAAAAAAAAA", "d1"))[1] is NEGATIVE


async def test_unreadable_entry_counts_as_absent(shared: SharedKeyCache, raw: redis.asyncio.Redis) -> None:
    """An entry that does not decode is a miss, not an error."""
    slot, _ = await shared.fetch("kg_AAAAAAAAAAAA", "d1")
    await raw.set(slot.name, b"{not json")
    assert (await shared.fetch("kg_AAAAAAAAAAAA", "d1"))[1] is None


# --- invalidation ----------------------------------------------------------------------------------


async def test_key_change_orphans_only_that_key(shared: SharedKeyCache, service: KeyService) -> None:
    """Invalidating one key id hides its entries and leaves other keys' entries alone."""
    a, _ = await facts_of(service)
    b, _ = await facts_of(service)
    for facts, digest in ((a, "da"), (b, "db")):
        slot, _ = await shared.fetch(facts.record.id, digest)
        await shared.put(slot, facts)
    await shared.invalidate([("key", a.record.id)])
    assert (await shared.fetch(a.record.id, "da"))[1] is None
    assert (await shared.fetch(b.record.id, "db"))[1] == b


@pytest.mark.parametrize("entity", ["role", "member"])
async def test_role_or_member_change_orphans_everything(
    shared: SharedKeyCache, service: KeyService, entity: str
) -> None:
    """A role or member change can affect any key, so every entry goes."""
    a, _ = await facts_of(service)
    slot, _ = await shared.fetch(a.record.id, "da")
    await shared.put(slot, a)
    await shared.invalidate([(entity, "anything")])
    assert (await shared.fetch(a.record.id, "da"))[1] is None


async def test_fill_that_read_before_a_change_is_never_seen(shared: SharedKeyCache, service: KeyService) -> None:
    """A slow fill that started before a revoke writes where no one reads any more."""
    facts, _ = await facts_of(service)
    slot, _ = await shared.fetch(facts.record.id, "d1")
    await shared.invalidate([("key", facts.record.id)])
    await shared.put(slot, facts)  # what the store said before the change
    assert (await shared.fetch(facts.record.id, "d1"))[1] is None


# --- the fleet ---------------------------------------------------------------------------------------


async def test_cold_replica_warms_from_redis_without_argon2(
    store: KeyStore, service: KeyService, shared: SharedKeyCache
) -> None:
    """The second process finds the first one's verification in Redis: no store read, no argon2."""
    pepper = await resolve_pepper(store, service.settings)
    first, second = (a_lookup(store, service, pepper, shared) for _ in range(2))
    _, full = await service.create_key(name="ci", role="admin")
    parsed = PARSER.parse(full)
    await first.lookup(parsed, "127.0.0.1")
    found = await second.lookup(parsed, "127.0.0.1")
    assert found.record.id == parsed.key_id
    assert (first.verifications, second.verifications, second.store_reads) == (1, 0, 0)


async def test_redis_proves_an_attacked_key_on_a_replica_that_never_verified_it(
    store: KeyStore, service: KeyService, shared: SharedKeyCache
) -> None:
    """A key id suspicious on the second process, with no verifications left there: the real key still
    passes, proven by the first process's Redis entry, and the guesses get 429."""
    pepper = await resolve_pepper(store, service.settings)
    first = a_lookup(store, service, pepper, shared)
    second = a_lookup(store, service, pepper, shared,
                      failures=FailureLimiter(per_key=1, verify_per_second=0))
    record, full = await service.create_key(name="ci", role="admin")
    await first.lookup(PARSER.parse(full), "127.0.0.1")
    with pytest.raises(Denied):
        await second.lookup(replace(generate("kg_"), key_id=record.id), "203.0.113.1")
    with pytest.raises(Denied) as guessed:
        await second.lookup(replace(generate("kg_"), key_id=record.id), "203.0.113.2")
    assert guessed.value.outcome is Outcome.TOO_MANY_ATTEMPTS
    assert (await second.lookup(PARSER.parse(full), "203.0.113.2")).record.id == record.id
    assert second.verifications == 1  # the first guess's; the real key needed none


async def test_wrong_secret_is_negative_fleet_wide(store: KeyStore, service: KeyService, shared: SharedKeyCache) -> None:
    """A wrong secret verified once is refused by the next process without argon2."""
    pepper = await resolve_pepper(store, service.settings)
    first, second = (a_lookup(store, service, pepper, shared) for _ in range(2))
    record, _ = await service.create_key(name="ci", role="admin")
    wrong = replace(generate("kg_"), key_id=record.id)
    for lookup in (first, second):
        with pytest.raises(Denied):
            await lookup.lookup(wrong, "127.0.0.1")
    assert (first.verifications, second.verifications) == (1, 0)


async def test_published_revoke_reaches_a_cold_replica(
    store: KeyStore, service: KeyService, shared: SharedKeyCache, link: RedisLink
) -> None:
    """After a published revoke, a process that never saw the key reads the revoked record, not Redis's old one."""
    pepper = await resolve_pepper(store, service.settings)
    first, second = (a_lookup(store, service, pepper, shared) for _ in range(2))
    _, full = await service.create_key(name="ci", role="admin")
    parsed = PARSER.parse(full)
    await first.lookup(parsed, "127.0.0.1")
    publishing = KeyService(store, service.settings, actor="test:bob", notifier=ChangePublisher(link, shared))
    await publishing.revoke_key(parsed.key_id)
    found = await second.lookup(parsed, "127.0.0.1")
    assert found.record.revoked_at is not None
    assert second.verifications == 1


async def test_lookup_uses_the_store_when_redis_is_down(
    store: KeyStore, service: KeyService, own_redis: RedisServer
) -> None:
    """With Redis dead, a lookup reads the store and verifies as if there were no Redis."""
    link = RedisLink(RedisSettings(url=own_redis.url, prefix="kg:", timeout=0.5))
    try:
        pepper = await resolve_pepper(store, service.settings)
        lookup = a_lookup(store, service, pepper, SharedKeyCache(link, ttl=30, negative_ttl=5))
        _, full = await service.create_key(name="ci", role="admin")
        own_redis.kill()
        found = await lookup.lookup(PARSER.parse(full), "127.0.0.1")
        assert found.record.name == "ci"
        assert not link.up
    finally:
        await link.close()


async def test_missed_invalidation_orphans_everything_on_recovery(
    service: KeyService, own_redis: RedisServer
) -> None:
    """An invalidation that failed during a partition is made good, for all keys, once Redis is back."""
    relay = Relay("127.0.0.1", own_redis.port)
    settings = RedisSettings(url=f"redis://127.0.0.1:{relay.port}/0", prefix="kg:", timeout=0.5,
                             reconnect_backoff_max=0.1)
    link = RedisLink(settings)
    try:
        shared = SharedKeyCache(link, ttl=30, negative_ttl=5)
        facts, _ = await facts_of(service)
        slot, _ = await shared.fetch(facts.record.id, "d1")
        await shared.put(slot, facts)
        relay.cut()  # a partition: Redis keeps its data, including the entry
        with pytest.raises(RedisUnavailable):
            await shared.invalidate([("key", facts.record.id)])
        assert shared.dirty and not link.up
        relay.restore()
        assert await until(lambda: link.up and not shared.dirty)
        assert (await shared.fetch(facts.record.id, "d1"))[1] is None
    finally:
        relay.cut()
        await link.close()


async def test_store_down_a_key_verified_elsewhere_still_works(
    pg_database: str, settings: Settings, shared: SharedKeyCache
) -> None:
    """With PostgreSQL cut, a process that never saw a key serves it from Redis; an unverified key is a 503."""
    db = urlparse(pg_database)
    relay = Relay(db.hostname or "127.0.0.1", db.port or 5432)
    relayed = pg_database.replace(f"{db.hostname}:{db.port or 5432}", f"127.0.0.1:{relay.port}")
    store = create_store(relayed, min_size=0, max_size=2, connect_timeout=1)
    await store.open()
    try:
        await bootstrap(store)
        service = KeyService(store, settings, actor="test")
        pepper = await resolve_pepper(store, settings)
        first, second = (a_lookup(store, service, pepper, shared) for _ in range(2))
        _, verified = await service.create_key(name="ci", role="admin")
        _, never_seen = await service.create_key(name="other", role="admin")
        await first.lookup(PARSER.parse(verified), "127.0.0.1")
        relay.cut()
        found = await second.lookup(PARSER.parse(verified), "127.0.0.1")
        assert found.record.name == "ci" and second.verifications == 0
        with pytest.raises(StoreUnavailable):
            await second.lookup(PARSER.parse(never_seen), "127.0.0.1")
    finally:
        relay.cut()
        await store.close()


async def test_a_change_seen_in_the_feed_is_not_cached_again_from_redis_meanwhile(
    store: KeyStore, service: KeyService, shared: SharedKeyCache
) -> None:
    """A change made without Redis reaches a worker through the store's feed. A request whose lookup comes
    between the worker's two steps (orphaning Redis's entry, dropping its own) must not read the key as it
    was from Redis and cache it again: the revoked key would be let in for up to cache.ttl."""
    pepper = await resolve_pepper(store, service.settings)
    lookup = a_lookup(store, service, pepper, shared)
    _, full = await service.create_key(name="ci", role="admin")
    parsed = PARSER.parse(full)
    await lookup.lookup(parsed, "127.0.0.1")  # cached here and in Redis
    watcher = ChangeWatcher(store, lookup.cache, shared=shared)
    watcher.seq = await store.latest_change()  # (polled by hand below: not started)
    await service.revoke_key(parsed.key_id)  # no notifier: like a CLI without redis.url
    invalidate = shared.invalidate
    seen_meanwhile = []

    async def with_a_request_meanwhile(changes: list[tuple[str, str]]) -> None:
        seen_meanwhile.append(await lookup.lookup(parsed, "127.0.0.1"))  # a request in the window
        await invalidate(changes)

    shared.invalidate = with_a_request_meanwhile  # type: ignore[method-assign]
    await watcher.poll()
    assert len(seen_meanwhile) == 1  # (before the change reached this worker, the old key may still pass)
    found = await lookup.lookup(parsed, "127.0.0.1")
    assert found.record.revoked_at is not None


async def test_lookups_keep_off_redis_while_a_missed_invalidation_is_made_good(
    store: KeyStore, service: KeyService, own_redis: RedisServer
) -> None:
    """An invalidation that failed during a partition leaves Redis's entries suspect: from Redis's return
    until they are orphaned, a lookup must read the store, not the key as it was."""
    relay = Relay("127.0.0.1", own_redis.port)
    link = RedisLink(RedisSettings(url=f"redis://127.0.0.1:{relay.port}/0", prefix="kg:", timeout=0.5,
                                   reconnect_backoff_max=0.1))
    during_recovery: list[PreparedKey] = []
    try:
        pepper = await resolve_pepper(store, service.settings)
        _, full = await service.create_key(name="ci", role="admin")
        parsed = PARSER.parse(full)

        async def a_request_as_redis_returns() -> None:  # registered before the shared cache's own recovery
            during_recovery.append(await lookup.lookup(parsed, "127.0.0.1"))

        link.on_recover(a_request_as_redis_returns)
        shared = SharedKeyCache(link, ttl=30, negative_ttl=5)
        lookup = a_lookup(store, service, pepper, shared)
        await lookup.lookup(parsed, "127.0.0.1")  # cached here and in Redis
        watcher = ChangeWatcher(store, lookup.cache, shared=shared)
        watcher.seq = await store.latest_change()
        await service.revoke_key(parsed.key_id)  # no notifier
        relay.cut()  # a partition: Redis keeps its entry of the key as it was
        await watcher.poll()  # dropped here; Redis's bump fails
        assert shared.dirty
        relay.restore()
        assert await until(lambda: during_recovery and not shared.dirty)
        [found] = during_recovery
        assert found.record.revoked_at is not None
    finally:
        relay.cut()
        await link.close()


async def test_a_fault_orphaning_redis_entries_still_drops_the_workers_own(
    store: KeyStore, service: KeyService, shared: SharedKeyCache
) -> None:
    """Redis's entries go first, but a fault there (not an outage: a bug) must not keep the feed from
    dropping this worker's entries; Redis's are then not read until orphaned."""
    pepper = await resolve_pepper(store, service.settings)
    lookup = a_lookup(store, service, pepper, shared)
    _, full = await service.create_key(name="ci", role="admin")
    parsed = PARSER.parse(full)
    await lookup.lookup(parsed, "127.0.0.1")
    watcher = ChangeWatcher(store, lookup.cache, shared=shared)
    watcher.seq = await store.latest_change()
    await service.revoke_key(parsed.key_id)

    async def faulty(changes: list[tuple[str, str]]) -> None:
        raise RuntimeError("a bug")

    shared.invalidate = faulty  # type: ignore[method-assign]
    await watcher.poll()
    assert shared.dirty
    found = await lookup.lookup(parsed, "127.0.0.1")
    assert found.record.revoked_at is not None
