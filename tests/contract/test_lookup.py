"""The lookup stage and change feed against both stores: argon2 only on a miss, invalidation on change."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from gateway.cache import KeyCache
from gateway.invalidation import ChangeWatcher
from gateway.keys import KeyParser, generate
from gateway.pipeline.lookup import CachedKey, KeyLookup
from gateway.pipeline.outcomes import Denied, Outcome
from gateway.ratelimit_spec import parse_rate_limit
from gateway.service import KeyService, resolve_pepper
from gateway.store import KeyStore

PARSER = KeyParser(["kg_", "kga_"])


@pytest.fixture
async def lookup(store: KeyStore, service: KeyService) -> KeyLookup:
    cache: KeyCache[CachedKey] = KeyCache(ttl=30, negative_ttl=5, stale_if_error=300, max_entries=1000)
    return KeyLookup(store, pepper=await resolve_pepper(store, service.settings), hasher=service.hasher,
                     cache=cache, default_rate_limit=parse_rate_limit("100/minute"),
                     failures_per_key=3, failures_per_client=5)


async def test_argon2_runs_once_per_key(lookup: KeyLookup, service: KeyService) -> None:
    """The first lookup reads the store and verifies; later ones are cache hits with no I/O."""
    _, full = await service.create_key(name="ci", role="admin")
    parsed = PARSER.parse(full)
    for _ in range(5):
        found = await lookup.lookup(parsed, "127.0.0.1")
    assert found.record.name == "ci"
    assert (lookup.store_reads, lookup.verifications) == (1, 1)


async def test_concurrent_misses_share_one_verification(lookup: KeyLookup, service: KeyService) -> None:
    """Many requests for an uncached key at once cost one store read and one argon2 call."""
    _, full = await service.create_key(name="ci", role="admin")
    parsed = PARSER.parse(full)
    results = await asyncio.gather(*(lookup.lookup(parsed, "127.0.0.1") for _ in range(20)))
    assert {r.record.id for r in results} == {parsed.key_id}
    assert (lookup.store_reads, lookup.verifications) == (1, 1)


async def test_wrong_secret_is_refused_and_cached_negatively(lookup: KeyLookup, service: KeyService) -> None:
    """A wrong secret is refused; repeating it costs no further argon2 call."""
    record, _ = await service.create_key(name="ci", role="admin")
    wrong = replace(generate("kg_"), key_id=record.id)
    for _ in range(3):
        with pytest.raises(Denied) as denied:
            await lookup.lookup(wrong, "127.0.0.1")
        assert denied.value.outcome is Outcome.INVALID_TOKEN
    assert lookup.verifications == 1


async def test_unknown_id_never_runs_argon2(lookup: KeyLookup) -> None:
    """A well-formed key with an unknown id is refused after one store read, without argon2."""
    with pytest.raises(Denied):
        await lookup.lookup(generate("kg_"), "127.0.0.1")
    assert (lookup.store_reads, lookup.verifications) == (1, 0)


async def test_failure_limiter_stops_random_secrets(lookup: KeyLookup, service: KeyService) -> None:
    """After too many wrong secrets for one id, further guesses are refused without argon2."""
    record, full = await service.create_key(name="ci", role="admin")
    for i in range(6):
        with pytest.raises(Denied):
            await lookup.lookup(replace(generate("kg_"), key_id=record.id), f"10.0.0.{i}")
    assert lookup.verifications == 3  # failures_per_key
    # The real key, already cached or not, is the same 401 while the id is blocked...
    with pytest.raises(Denied):
        await lookup.lookup(PARSER.parse(full), "10.0.1.1")


async def test_failure_limiter_per_client(lookup: KeyLookup) -> None:
    """One client trying many unknown keys is stopped before the store is read again."""
    for _ in range(8):
        with pytest.raises(Denied):
            await lookup.lookup(generate("kg_"), "192.0.2.1")
    assert lookup.store_reads == 5  # failures_per_client
    with pytest.raises(Denied):
        await lookup.lookup(generate("kg_"), "192.0.2.2")
    assert lookup.store_reads == 6  # other clients are not affected


async def test_change_feed_invalidates_the_key(lookup: KeyLookup, service: KeyService, store: KeyStore) -> None:
    """A revoke seen through the change feed drops the cached entry, so the next lookup sees it."""
    record, full = await service.create_key(name="ci", role="admin")
    parsed = PARSER.parse(full)
    watcher = ChangeWatcher(store, lookup.cache, interval=0.05)
    await watcher.start()
    try:
        assert (await lookup.lookup(parsed, "127.0.0.1")).revoked_at == float("inf")
        await service.revoke_key(record.id)
        await asyncio.sleep(0.3)
        assert (await lookup.lookup(parsed, "127.0.0.1")).revoked_at < float("inf")
    finally:
        await watcher.close()


async def test_role_change_clears_the_cache(lookup: KeyLookup, service: KeyService, store: KeyStore) -> None:
    """A role change through the change feed empties the cache (it can affect many keys)."""
    await service.put_role("ci", ["deploy"])
    _, full = await service.create_key(name="ci", role="ci")
    parsed = PARSER.parse(full)
    watcher = ChangeWatcher(store, lookup.cache, interval=0.05)
    await watcher.start()
    try:
        assert not (await lookup.lookup(parsed, "127.0.0.1")).grants.allows("read")
        await service.put_role("ci", ["deploy", "read"])
        await asyncio.sleep(0.3)
        assert (await lookup.lookup(parsed, "127.0.0.1")).grants.allows("read")
    finally:
        await watcher.close()
