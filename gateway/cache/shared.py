"""The Redis key cache shared by every worker of every replica, between the in-process cache and the store.

An entry is what the store said about a verified key (its record without
the secret hash, its role's grants, its membership), stored under a name
built from the MAC of the full key under the pepper (keyed BLAKE2b) -- never the key itself. Only a process
that has just verified the secret with argon2 writes an entry, so finding
one proves the secret was verified: a hit needs no argon2, and a cold
replica warms from Redis instead of re-hashing every key. That makes Redis
trusted like the store: whoever can write to it can forge entries.

Invalidation without deletion: an entry's name carries two counters, the
global generation (bumped by role and member changes, which can affect any
key) and the key id's epoch (bumped by a change to that key)::

    <prefix>vk:<generation>:<epoch>:<digest>

Reading resolves both counters and the entry in one script call and returns
the name a fill must use; bumping a counter orphans every entry written
under the old one at once, including a fill that read the store before the
change and writes after it -- it writes to a name nobody reads any more.
(Both counters are read before the store is, which is all that needs: a
change bumps them after its commit.) Orphans expire with ``cache.ttl``.
Negative entries ("no such key or wrong secret") live under the same names
for ``cache.negative_ttl``.

On a Redis Cluster a script may only touch one hash slot, so a key id's
names carry it as their hash tag and the generation, which lives in a slot
of its own, is read by a call of its own just before the script::

    <prefix>generation
    <prefix>epoch:{<key id>}
    <prefix>vk:{<key id>}:<generation>:<epoch>:<digest>
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from ..models import KeyRecord
from .redis_link import RedisLink, RedisUnavailable

log = logging.getLogger("keygate.redis")

NEGATIVE = b"-"
# Epoch counters must outlive every entry written under them; past that an
# idle key's counter may go (it then reads as 0 again, and every entry ever
# written under epoch 0 has long expired).
EPOCH_TTL_MIN = 86_400

# KEYS: generation counter, the key id's epoch counter. ARGV: entry-name prefix, digest.
_FETCH = """
local generation = redis.call('GET', KEYS[1]) or '0'
local epoch = redis.call('GET', KEYS[2]) or '0'
local name = ARGV[1] .. generation .. ':' .. epoch .. ':' .. ARGV[2]
return {name, redis.call('GET', name)}
"""
# On a cluster, every key in the key id's slot. KEYS: the key id's epoch counter.
# ARGV: the key id's entry-name prefix (same hash tag), the generation (read just before), digest.
_FETCH_IN_SLOT = """
local epoch = redis.call('GET', KEYS[1]) or '0'
local name = ARGV[1] .. ARGV[2] .. ':' .. epoch .. ':' .. ARGV[3]
return {name, redis.call('GET', name)}
"""


@dataclass(frozen=True, slots=True)
class KeyFacts:
    """Everything the store says about a key that its checks need."""

    record: KeyRecord
    role_grants: tuple[str, ...] | None
    is_member: bool
    member_role: str | None
    member_grants: tuple[str, ...] | None


_RECORD_FIELDS = tuple(f.name for f in fields(KeyRecord) if f.name != "secret_hash")
# Every time of the record (the annotations are text: ``from __future__ import annotations``).
_TIMES = frozenset(f.name for f in fields(KeyRecord) if "datetime" in str(f.type))


def encode_facts(facts: KeyFacts) -> bytes:
    # SECURITY: the secret hash stays in the store; Redis gets only what the checks use.
    record = {}
    for name in _RECORD_FIELDS:
        value = getattr(facts.record, name)
        record[name] = value.isoformat() if isinstance(value, datetime) else value
    return json.dumps({
        "record": record, "role_grants": facts.role_grants, "is_member": facts.is_member,
        "member_role": facts.member_role, "member_grants": facts.member_grants,
    }, separators=(",", ":")).encode()


def decode_facts(data: bytes) -> KeyFacts:
    raw = json.loads(data)
    record: dict[str, Any] = {}
    for name in _RECORD_FIELDS:
        value = raw["record"][name]
        if name in _TIMES and value is not None:
            value = datetime.fromisoformat(value)
        elif isinstance(value, list):
            value = tuple(value)
        record[name] = value
    grants = lambda v: tuple(v) if v is not None else None  # noqa: E731
    return KeyFacts(KeyRecord(**record), grants(raw["role_grants"]), bool(raw["is_member"]),
                    raw["member_role"], grants(raw["member_grants"]))


@dataclass(frozen=True, slots=True)
class Slot:
    """Where an entry for one digest lives right now; a fill writes here."""

    name: str


class SharedKeyCache:
    def __init__(self, link: RedisLink, *, ttl: float, negative_ttl: float) -> None:
        self.link = link
        self.ttl_ms = max(1, int(ttl * 1000))
        self.negative_ttl_ms = int(negative_ttl * 1000)
        self.epoch_ttl = max(EPOCH_TTL_MIN, int(ttl * 4) + 60)
        self._generation = link.key("generation")
        self._fetch = link.client.register_script(_FETCH_IN_SLOT if link.cluster else _FETCH)
        # Plain counters for /metrics: lookups Redis answered (hit, miss) or could not (errors).
        self.hits = 0
        self.misses = 0
        self.errors = 0
        # An invalidation that could not reach Redis leaves entries that may be
        # stale; the first thing to do when Redis is back is orphan them all.
        self.dirty = False
        link.on_recover(self._recovered)

    def _epoch(self, key_id: str) -> str:
        return self.link.tagged("epoch:", key_id)

    def _entries(self, key_id: str) -> str:
        return self.link.tagged("vk:", key_id) + ":" if self.link.cluster else self.link.key("vk:")

    async def fetch(self, key_id: str, digest: str) -> tuple[Slot, KeyFacts | None | bytes]:
        """The slot for ``digest`` and what it holds: facts, :data:`NEGATIVE`, or None.

        Raises :class:`RedisUnavailable`; an entry that does not decode counts as absent.
        """
        if self.dirty:
            # SECURITY: an invalidation missed Redis, so any entry there may predate a change (a revoked
            # key as it was); until they are orphaned on recovery (_recovered), the store answers.
            raise RedisUnavailable("the shared key cache missed an invalidation")

        async def read(r: Any) -> list[Any]:
            if not self.link.cluster:
                return await self._fetch(keys=[self._generation, self._epoch(key_id)],
                                         args=[self._entries(key_id), digest])
            generation = await r.get(self._generation) or b"0"
            return await self._fetch(keys=[self._epoch(key_id)], args=[self._entries(key_id), generation, digest])

        try:
            name, value = await self.link.run(read)
        except RedisUnavailable:
            self.errors += 1
            raise
        slot = Slot(name.decode() if isinstance(name, bytes) else name)
        if value is None:
            self.misses += 1
            return slot, None
        self.hits += 1
        if value == NEGATIVE:
            return slot, NEGATIVE
        try:
            return slot, decode_facts(value)
        except (ValueError, KeyError, TypeError) as exc:
            # Written by another version, or damaged: the store has the truth.
            log.warning(json.dumps({"event": "redis_cache_entry_unreadable", "error": str(exc)}))
            return slot, None

    async def put(self, slot: Slot, facts: KeyFacts) -> None:
        await self.link.run(lambda r: r.set(slot.name, encode_facts(facts), px=self.ttl_ms))

    async def put_negative(self, slot: Slot) -> None:
        if self.negative_ttl_ms > 0:
            await self.link.run(lambda r: r.set(slot.name, NEGATIVE, px=self.negative_ttl_ms))

    async def invalidate(self, changes: list[tuple[str, str]]) -> None:
        """Orphan the entries of changed keys (entity ``key``) or all entries (role, member changes)."""
        keys = [target for entity, target in changes if entity == "key"]
        everything = len(keys) < len(changes)

        async def bump(r: Any) -> None:
            # Not a transaction: each bump stands alone, and on a cluster the counters live in many slots.
            async with r.pipeline(transaction=False) as pipe:
                for key_id in keys:
                    pipe.incr(self._epoch(key_id))
                    pipe.expire(self._epoch(key_id), self.epoch_ttl)
                if everything:
                    pipe.incr(self._generation)
                await pipe.execute()

        try:
            await self.link.run(bump)
        except RedisUnavailable:
            self.dirty = True
            raise

    async def invalidate_all(self) -> None:
        await self.link.run(lambda r: r.incr(self._generation))

    async def _recovered(self) -> None:
        if self.dirty:
            await self.invalidate_all()
            self.dirty = False
            log.info(json.dumps({"event": "redis_cache_orphaned", "reason": "invalidation missed while down"}))
