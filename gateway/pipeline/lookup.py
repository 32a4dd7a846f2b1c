"""Stage 2 — lookup: in-process cache, then the Redis cache, then the store; argon2 only on a miss.

A verified key is cached under a MAC (keyed BLAKE2b) of the full key under the pepper, with everything the
later stages need already parsed (networks, grants, servers, rate limit), so
the hit path does no parsing and no I/O. A miss asks the shared Redis cache
(when configured; see :mod:`gateway.shared_cache`), whose entries prove a
verification already happened somewhere in the fleet, and only then reads
the store and verifies the secret
in a thread pool with bounded concurrency; concurrent misses for the same
key share one verification. Unknown ids and wrong secrets are cached as
negative entries briefly, and a failure limiter per key id and per client
keeps random secrets from burning the CPU.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..cache import KeyCache
from ..keys import CacheKeyer, ParsedKey, SecretHasher
from ..models import KeyRecord
from ..ratelimit_spec import RateLimitSpec, parse_rate_limit
from ..redis_link import RedisUnavailable
from ..shared_cache import NEGATIVE, KeyFacts, SharedKeyCache, Slot
from ..store import KeyStore, StoreUnavailable
from .allowlist import Network, parse_networks
from .outcomes import Denied, Outcome
from .scope import Grants, GrantSet, Servers


@dataclass(frozen=True, slots=True)
class CachedKey:
    """A verified key with its checks precomputed."""

    record: KeyRecord
    networks: tuple[Network, ...]
    grants: Grants
    servers: Servers
    rate_limit: RateLimitSpec
    # Epoch seconds; inf = never. Compared per request, so expiry needs no cache event.
    revoked_at: float
    expires_at: float
    member_role: str | None
    member_missing: bool
    identity_headers: tuple[tuple[str, str], ...]
    # The allowlist's answer per client address, filled as requests come (see check_allowlist).
    allowlist_seen: dict[str, bool] = field(default_factory=dict, compare=False, repr=False)


def _epoch(value: object) -> float:
    return value.timestamp() if value is not None else float("inf")  # type: ignore[attr-defined]


class FailureLimiter:
    """Counts failed lookups per subject in fixed windows; past ``limit`` lookups are refused unverified."""

    def __init__(self, *, limit: int, window: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 max_subjects: int = 100_000) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._max = max_subjects
        self._counts: dict[str, tuple[float, int]] = {}

    def blocked(self, subject: str) -> bool:
        entry = self._counts.get(subject)
        return entry is not None and self._clock() - entry[0] < self.window and entry[1] >= self.limit

    def failed(self, subject: str) -> None:
        now = self._clock()
        start, count = self._counts.get(subject, (now, 0))
        if now - start >= self.window:
            start, count = now, 0
        if len(self._counts) >= self._max and subject not in self._counts:
            self._counts.pop(next(iter(self._counts)))
        self._counts[subject] = (start, count + 1)


class KeyLookup:
    def __init__(
        self, store: KeyStore, *, pepper: bytes, hasher: SecretHasher, cache: KeyCache[CachedKey],
        default_rate_limit: RateLimitSpec, verify_concurrency: int = 2,
        failures_per_key: int = 100, failures_per_client: int = 30, shared: SharedKeyCache | None = None,
    ) -> None:
        self.store = store
        self.cache = cache
        self.shared = shared
        self._cache_key = CacheKeyer(pepper)
        self._hasher = hasher
        self._default_rate_limit = default_rate_limit
        self._executor = ThreadPoolExecutor(max_workers=verify_concurrency, thread_name_prefix="argon2")
        self._verify_slots = asyncio.Semaphore(verify_concurrency)
        self._inflight: dict[str, asyncio.Future[CachedKey | None]] = {}
        self.per_key = FailureLimiter(limit=failures_per_key)
        self.per_client = FailureLimiter(limit=failures_per_client)
        self.verifications = 0
        self.store_reads = 0

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def cached(self, full_key: str) -> CachedKey | None:
        """The hot path: a key verified before, found by the MAC of its text; no parsing, no I/O.

        Only keys that passed parsing and argon2 are cached, so a hit proves
        ``full_key`` is well-formed; a miss says nothing, and is not counted as
        one: :meth:`lookup` follows and counts it (a malformed key never gets there).
        """
        return self.cache.probe(self._cache_key(full_key))

    async def lookup(self, parsed: ParsedKey, client: str) -> CachedKey:
        """The cached key, or Denied(INVALID_TOKEN); StoreUnavailable when it cannot be known."""
        digest = self._cache_key(parsed.full)
        cached = self.cache.get(digest)
        if cached is not None:
            return cached
        if self.cache.is_negative(digest):
            raise Denied(Outcome.INVALID_TOKEN, "negative cache")
        # SECURITY: refuse before any store or argon2 work once a client or an id
        # has failed too often; the answer is the same 401 as for a wrong key.
        if self.per_client.blocked(client) or self.per_key.blocked(parsed.key_id):
            raise Denied(Outcome.INVALID_TOKEN, "too many failed attempts")
        pending = self._inflight.get(digest)
        if pending is None:
            pending = asyncio.ensure_future(self._load(parsed, digest))
            self._inflight[digest] = pending
            pending.add_done_callback(lambda _f: self._inflight.pop(digest, None))
        try:
            found = await asyncio.shield(pending)
        except StoreUnavailable:
            stale = self.cache.get_stale(digest)
            if stale is not None:
                return stale
            raise
        if found is None:
            self.per_client.failed(client)
            raise Denied(Outcome.INVALID_TOKEN, "unknown key or wrong secret")
        return found

    async def _load(self, parsed: ParsedKey, digest: str) -> CachedKey | None:
        generation = self.cache.generation
        slot: Slot | None = None
        if self.shared is not None:
            try:
                slot, found = await self.shared.fetch(parsed.key_id, digest)
            except RedisUnavailable:
                pass  # the store answers instead
            else:
                if found is NEGATIVE:
                    self.cache.put_negative(digest)
                    return None
                if isinstance(found, KeyFacts):
                    # SECURITY: an entry under this digest was written only after argon2
                    # accepted this exact key, so it needs no second verification.
                    entry = self._prepare(found)
                    self.cache.put(digest, found.record.id, entry, generation=generation)
                    return entry
        facts = await self._read(parsed.key_id)
        if facts is None:
            self.cache.put_negative(digest)
            await self._share(slot, None)
            return None
        async with self._verify_slots:
            self.verifications += 1
            ok = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._hasher.verify, facts.record.secret_hash, parsed.secret
            )
        if not ok:
            self.per_key.failed(parsed.key_id)
            self.cache.put_negative(digest)
            await self._share(slot, None)
            return None
        entry = self._prepare(facts)
        # A change notice that arrived while we read and verified wins: this
        # request may use what it read, but the cache must not keep it.
        self.cache.put(digest, facts.record.id, entry, generation=generation)
        await self._share(slot, facts)
        return entry

    async def _read(self, key_id: str) -> KeyFacts | None:
        self.store_reads += 1
        async with self.store.read() as tx:
            record = await tx.get_key(key_id)
            if record is None:
                return None
            role = await tx.get_role(record.role) if record.role else None
            member = await tx.get_member(record.org, record.user) if record.user else None
            member_role = await tx.get_role(member.role) if member else None
        return KeyFacts(record, role.grants if role else None, member is not None,
                        member.role if member else None, member_role.grants if member_role else None)

    async def _share(self, slot: Slot | None, facts: KeyFacts | None) -> None:
        """Tell the fleet what was verified; a Redis failure only costs others an argon2 run."""
        if self.shared is None or slot is None:
            return
        try:
            if facts is None:
                await self.shared.put_negative(slot)
            else:
                await self.shared.put(slot, facts)
        except RedisUnavailable:
            pass

    def _prepare(self, facts: KeyFacts) -> CachedKey:
        """Parse everything the hot path needs, once."""
        record, role_grants, member_role, member_grants = (
            facts.record, facts.role_grants, facts.member_role, facts.member_grants)
        is_member = facts.is_member
        sets: list[GrantSet] = []
        if record.agent:
            # An agent key acts as its user: exactly the member's role.
            sets.append(GrantSet(member_grants or ()))
        else:
            if record.role is not None:
                sets.append(GrantSet(role_grants or ()))  # a missing role grants nothing
            if record.operations:
                sets.append(GrantSet(record.operations))
            if record.user:
                sets.append(GrantSet(member_grants or ()))
        spec = parse_rate_limit(record.rate_limit) if record.rate_limit else self._default_rate_limit
        role_header = member_role if record.agent else record.role
        headers = (
            ("X-Keygate-Key-Id", record.id),
            ("X-Keygate-Key-Name", _header_safe(record.name)),
            ("X-Keygate-Org", record.org),
            ("X-Keygate-User", record.user),
            ("X-Keygate-Role", role_header or ""),
        )
        return CachedKey(
            record=record, networks=parse_networks(record.ip_allowlist), grants=Grants(sets),
            servers=Servers(record.servers), rate_limit=spec, revoked_at=_epoch(record.revoked_at),
            expires_at=_epoch(record.expires_at), member_role=member_role,
            member_missing=bool(record.user) and not is_member, identity_headers=headers,
        )


def _header_safe(text: str) -> str:
    # Names are free text; headers must stay one line of visible ASCII.
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in text)
