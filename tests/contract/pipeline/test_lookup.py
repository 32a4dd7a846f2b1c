"""The lookup stage and change feed against both stores: argon2 only on a miss, invalidation on change,
failures that cost only the one failing."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace

import pytest

from gateway.cache.local import KeyCache
from gateway.cache.change_feed import ChangeWatcher
from gateway.keys import KeyParser, ParsedKey, SecretHasher, generate
from gateway.pipeline.failures import FailureLimiter
from gateway.pipeline.lookup import KeyLookup
from gateway.pipeline.prepared import PreparedKey
from gateway.pipeline.outcomes import Denied, Outcome
from gateway.config.ratelimit_spec import parse_rate_limit
from gateway.manage.service import KeyService, resolve_pepper
from gateway.store import KeyStore

from ...clocks import FakeClock
from ...waiting import until

PARSER = KeyParser(["kg_", "kga_"])
PER_CLIENT, PER_KEY = 5, 3


@pytest.fixture
def ticks() -> FakeClock:
    return FakeClock()


def make_lookup(store: KeyStore, service: KeyService, pepper: bytes, ticks: FakeClock, **options: object) -> KeyLookup:
    cache: KeyCache[PreparedKey] = KeyCache(ttl=30, negative_ttl=5, stale_if_error=300, max_entries=1000)
    failures = FailureLimiter(per_client=PER_CLIENT, per_network=50, per_key=PER_KEY, window=60,
                              verify_per_second=1, clock=ticks)
    return KeyLookup(store, pepper=pepper, hasher=options.pop("hasher", service.hasher),  # type: ignore[arg-type]
                     cache=cache, default_rate_limit=parse_rate_limit("100/minute"), failures=failures,
                     **options)  # type: ignore[arg-type]


@pytest.fixture
async def lookup(store: KeyStore, service: KeyService, ticks: FakeClock) -> AsyncIterator[KeyLookup]:
    instance = make_lookup(store, service, await resolve_pepper(store, service.settings), ticks)
    yield instance
    instance.close()


def guess(key_id: str) -> ParsedKey:
    """A well-formed key (valid checksum) claiming ``key_id`` with a random secret."""
    return replace(generate("kg_"), key_id=key_id)


async def outcome_of(lookup: KeyLookup, parsed: ParsedKey, client: str) -> Outcome:
    try:
        await lookup.lookup(parsed, client)
    except Denied as denied:
        return denied.outcome
    return Outcome.ALLOWED


async def fail_from(lookup: KeyLookup, client: str, times: int) -> None:
    """``times`` failed lookups (unknown ids) from ``client``."""
    for _ in range(times):
        assert await outcome_of(lookup, generate("kg_"), client) is Outcome.INVALID_TOKEN


# --- hits, misses and plain 401s ------------------------------------------------------------


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


async def test_refusals_are_paced_by_verifications_only(lookup: KeyLookup, service: KeyService) -> None:
    """The refusal pace follows misses that ran argon2; unknown ids, which do not, leave it alone."""
    await fail_from(lookup, "192.0.2.1", 3)
    assert lookup.pace == 0.0
    record, _ = await service.create_key(name="ci", role="admin")
    await outcome_of(lookup, guess(record.id), "192.0.2.1")
    assert lookup.pace > 0.0
    assert lookup.refusal_delay(Denied(Outcome.INVALID_TOKEN), lookup._clock()) > 0.0


# --- failures: only the one failing pays ------------------------------------------------------


async def test_wrong_secrets_throttle_the_id_without_argon2(lookup: KeyLookup, service: KeyService,
                                                           ticks: FakeClock) -> None:
    """Past per_key wrong secrets an id gets one verification per second; the other guesses get 429, no argon2."""
    record, _ = await service.create_key(name="ci", role="admin")
    outcomes = [await outcome_of(lookup, guess(record.id), f"10.{i}.0.1") for i in range(PER_KEY + 4)]
    assert outcomes == [Outcome.INVALID_TOKEN] * (PER_KEY + 1) + [Outcome.TOO_MANY_ATTEMPTS] * 3
    assert lookup.verifications == PER_KEY + 1 and lookup.throttled == 3
    ticks.now += 1.0
    assert await outcome_of(lookup, guess(record.id), "10.9.0.1") is Outcome.INVALID_TOKEN
    assert lookup.verifications == PER_KEY + 2


async def test_a_burst_of_guesses_runs_per_key_verifications(lookup: KeyLookup, service: KeyService) -> None:
    """Fifty guesses for one id at once: unsettled guesses count, so per_key of them (+ the id's budget) run argon2."""
    record, _ = await service.create_key(name="ci", role="admin")
    outcomes = await asyncio.gather(*(outcome_of(lookup, guess(record.id), f"10.{i}.0.1") for i in range(50)))
    assert lookup.verifications == lookup.store_reads == PER_KEY + 1
    assert outcomes.count(Outcome.INVALID_TOKEN) == PER_KEY + 1
    assert outcomes.count(Outcome.TOO_MANY_ATTEMPTS) == 50 - PER_KEY - 1


async def test_throttled_answer_says_when_to_retry(lookup: KeyLookup, service: KeyService) -> None:
    """A 429 for too many attempts carries the wait until the id's next verification (1/s)."""
    record, _ = await service.create_key(name="ci", role="admin")
    for _ in range(PER_KEY + 1):
        await outcome_of(lookup, guess(record.id), "10.0.0.1")
    with pytest.raises(Denied) as denied:
        await lookup.lookup(guess(record.id), "10.0.0.1")
    assert denied.value.outcome is Outcome.TOO_MANY_ATTEMPTS
    assert denied.value.retry_after is not None and 0 < denied.value.retry_after <= 1.0


async def test_a_verified_key_passes_while_its_id_is_attacked(lookup: KeyLookup, service: KeyService) -> None:
    """Once its cache entry lapsed, a key verified before is let through without argon2, attack or not."""
    record, full = await service.create_key(name="ci", role="admin")
    await lookup.lookup(PARSER.parse(full), "192.0.2.1")
    for i in range(PER_KEY + 10):
        await outcome_of(lookup, guess(record.id), f"10.{i}.0.1")
    assert lookup.throttled > 0
    lookup.cache.clear()  # the entry lapsed (cache.ttl)
    verifications = lookup.verifications
    for client in ("192.0.2.1", "10.0.0.1"):  # its own address, and one of the attacker's
        assert (await lookup.lookup(PARSER.parse(full), client)).record.id == record.id
        lookup.cache.clear()
    assert lookup.verifications == verifications and lookup.proven_hits == 2


async def test_a_proven_key_still_reads_its_status(lookup: KeyLookup, service: KeyService) -> None:
    """Skipping argon2 never skips the store: a key revoked since is seen as revoked."""
    record, full = await service.create_key(name="ci", role="admin")
    await lookup.lookup(PARSER.parse(full), "192.0.2.1")
    await service.revoke_key(record.id)
    lookup.cache.clear()
    assert (await lookup.lookup(PARSER.parse(full), "192.0.2.1")).revoked_at < float("inf")
    assert lookup.verifications == 1 and lookup.proven_hits == 1


async def test_a_never_used_key_works_from_a_suspicious_address(lookup: KeyLookup, service: KeyService) -> None:
    """A client past per_client failures still gets a new key verified: one verification per id per second."""
    await fail_from(lookup, "198.51.100.7", PER_CLIENT + 3)
    _, full = await service.create_key(name="ci", role="admin")
    assert (await lookup.lookup(PARSER.parse(full), "198.51.100.7")).record.name == "ci"


async def test_a_flood_from_one_address_leaves_a_never_verified_key_its_verification(
    lookup: KeyLookup, service: KeyService, ticks: FakeClock,
) -> None:
    """A key this lookup never verified, its id flooded with wrong secrets from one address past per_key and
    on, second after second: the attacker's 429s make its address suspicious, so it guesses on its own
    budget, and the owner, from a clean address, gets its key verified at the first try."""
    record, full = await service.create_key(name="ci", role="admin")
    attacker = "198.51.100.7"
    for second in range(3):
        outcomes = [await outcome_of(lookup, guess(record.id), attacker) for _ in range(20)]
        assert outcomes.count(Outcome.TOO_MANY_ATTEMPTS) >= 20 - PER_KEY - 2, second
        ticks.now += 1.0
        # The next second's verifications are due again: the attacker is first to send.
        assert await outcome_of(lookup, guess(record.id), attacker) is Outcome.INVALID_TOKEN
    assert (await lookup.lookup(PARSER.parse(full), "192.0.2.1")).record.id == record.id
    assert lookup.proven_hits == 0  # really verified: this lookup had never seen the key
    assert lookup.failures.suspicion(attacker, generate("kg_").key_id) is not None  # the address itself


async def test_throttled_guesses_count_against_their_address_not_the_key(
    lookup: KeyLookup, service: KeyService,
) -> None:
    """A 429 too_many_attempts is a failure of its client (so a lone attacker soon becomes suspicious), but no
    wrong secret: the id's count is only the secrets argon2 refused."""
    record, _ = await service.create_key(name="ci", role="admin")
    for i in range(PER_KEY + 1):  # the id past per_key, from addresses that stay clean
        await outcome_of(lookup, guess(record.id), f"10.{i}.0.1")
    attacker = "203.0.113.9"
    outcomes = [await outcome_of(lookup, guess(record.id), attacker) for _ in range(PER_CLIENT)]
    assert outcomes == [Outcome.TOO_MANY_ATTEMPTS] * PER_CLIENT  # the clean budget is spent for this second
    assert lookup.failures.suspicion(attacker, generate("kg_").key_id) is not None  # the address itself
    assert lookup.failures.keys.count(record.id) == PER_KEY + 1 == lookup.verifications


@pytest.mark.parametrize("known", [True, False], ids=["known-id", "unknown-id"])
async def test_suspicious_ids_are_answered_alike_whether_they_exist_or_not(
    lookup: KeyLookup, service: KeyService, known: bool,
) -> None:
    """From a suspicious address, a known and an unknown id get the same answers: one 401, then 429."""
    await fail_from(lookup, "198.51.100.7", PER_CLIENT)
    key_id = (await service.create_key(name="ci", role="admin"))[0].id if known else generate("kg_").key_id
    reads = lookup.store_reads
    outcomes = [await outcome_of(lookup, guess(key_id), "198.51.100.7") for _ in range(3)]
    assert outcomes == [Outcome.INVALID_TOKEN, Outcome.TOO_MANY_ATTEMPTS, Outcome.TOO_MANY_ATTEMPTS]
    assert lookup.store_reads == reads + 1  # the 429s cost no store read either
    assert lookup.verifications == (1 if known else 0)


async def test_failures_from_one_address_do_not_throttle_another(lookup: KeyLookup, service: KeyService) -> None:
    """Another client's failures never make this client's lookups suspicious."""
    await fail_from(lookup, "198.51.100.7", PER_CLIENT + 3)
    record, _ = await service.create_key(name="ci", role="admin")
    outcomes = [await outcome_of(lookup, guess(record.id), "203.0.113.9") for _ in range(PER_KEY)]
    assert outcomes == [Outcome.INVALID_TOKEN] * PER_KEY and lookup.throttled == 0


async def test_unknown_ids_are_not_counted_against_a_key(lookup: KeyLookup, service: KeyService) -> None:
    """Only wrong secrets count per key id: unknown ids from many clients leave every id unsuspicious."""
    for i in range(PER_KEY + 3):
        await fail_from(lookup, f"10.{i}.0.1", 1)
    assert len(lookup.failures.keys) == 0


# --- 429 verification busy: argon2 has a bounded queue -----------------------------------------


class GatedHasher:
    """argon2 that waits for a gate before verifying: a verification that takes as long as the test wants.

    Around a SecretHasher, not a subclass of it: the compiled build's SecretHasher is a native class.
    """

    def __init__(self) -> None:
        self._hasher = SecretHasher(time_cost=1, memory_cost=1024, parallelism=1)
        self.gate = threading.Event()

    def hash(self, secret: str) -> str:
        return self._hasher.hash(secret)

    def verify(self, secret_hash: str, secret: str) -> bool:
        self.gate.wait(10)
        return self._hasher.verify(secret_hash, secret)


@pytest.fixture
def gated() -> Iterator[GatedHasher]:
    hasher = GatedHasher()
    yield hasher
    hasher.gate.set()  # never leave a thread waiting


async def test_misses_past_the_queue_are_shed(store: KeyStore, service: KeyService, ticks: FakeClock,
                                              gated: GatedHasher) -> None:
    """With every thread busy and the queue full, a miss gets 429 verification_busy at once; hits still answer."""
    lookup = make_lookup(store, service, await resolve_pepper(store, service.settings), ticks,
                         hasher=gated, verify_concurrency=1, verify_queue=1)
    try:
        _, hot = await service.create_key(name="hot", role="admin")
        gated.gate.set()
        await lookup.lookup(PARSER.parse(hot), "127.0.0.1")  # cached from now on
        gated.gate.clear()
        keys = [PARSER.parse((await service.create_key(name=f"k{i}", role="admin"))[1]) for i in range(3)]
        waiting = [asyncio.ensure_future(lookup.lookup(key, "127.0.0.1")) for key in keys[:2]]
        while lookup.verifier.admitted < 2:
            await asyncio.sleep(0.01)
        for parsed in (keys[2], generate("kg_")):  # a known and an unknown id alike
            assert await outcome_of(lookup, parsed, "127.0.0.1") is Outcome.VERIFICATION_BUSY
        assert lookup.shed == 2
        assert (await lookup.lookup(PARSER.parse(hot), "127.0.0.1")).record.name == "hot"
        gated.gate.set()
        assert [found.record.name for found in await asyncio.gather(*waiting)] == ["k0", "k1"]
        assert lookup.verifier.admitted == 0
    finally:
        gated.gate.set()
        lookup.close()


# --- invalidation ------------------------------------------------------------------------------


async def revoked(lookup: KeyLookup, parsed: ParsedKey) -> bool:
    return (await lookup.lookup(parsed, "127.0.0.1")).revoked_at < float("inf")


async def may_read(lookup: KeyLookup, parsed: ParsedKey) -> bool:
    return (await lookup.lookup(parsed, "127.0.0.1")).grants.allows("read")


async def test_change_feed_invalidates_the_key(lookup: KeyLookup, service: KeyService, store: KeyStore) -> None:
    """A revoke seen through the change feed drops the cached entry, so the next lookup sees it."""
    record, full = await service.create_key(name="ci", role="admin")
    parsed = PARSER.parse(full)
    watcher = ChangeWatcher(store, lookup.cache, interval=0.05)
    await watcher.start()
    try:
        assert (await lookup.lookup(parsed, "127.0.0.1")).revoked_at == float("inf")
        await service.revoke_key(record.id)
        assert await until(lambda: revoked(lookup, parsed))
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
        assert await until(lambda: may_read(lookup, parsed))
    finally:
        await watcher.close()


@pytest.mark.parametrize(("clock_offset", "observed"), [(0.4, 0.4), (-2.0, 0.0)])
async def test_change_feed_observes_each_changes_delay(
    store: KeyStore, clock_offset: float, observed: float,
) -> None:
    """Each change the feed applies is one delay: now minus the time the store holds for it (never negative)."""
    made = datetime(2026, 12, 1, 12, 0, 0, 250000, tzinfo=UTC)
    delays: list[float] = []
    cache: KeyCache[object] = KeyCache(ttl=30, negative_ttl=5, stale_if_error=300, max_entries=100)
    watcher = ChangeWatcher(store, cache, observe_delay=delays.append, clock=lambda: made.timestamp() + clock_offset)
    watcher.seq = await store.latest_change()
    async with store.transaction() as tx:
        await tx.add_change(at=made, entity="key", target="kg_AAAAAAAAAAAA")
        await tx.add_change(at=made, entity="role", target="ci")
    await watcher.poll()
    assert delays == [pytest.approx(observed)] * 2
