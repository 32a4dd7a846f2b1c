"""Stage 2 — lookup: in-process cache, then the Redis cache, then the store; argon2 only on a miss.

A verified key is cached under a MAC (keyed BLAKE2b) of the full key under the pepper, with everything the
later stages need already parsed (:mod:`.prepared`), so the hit path does
no parsing and no I/O. A miss asks the shared Redis cache
(when configured; see :mod:`gateway.cache.shared`), whose entries prove a
verification already happened somewhere in the fleet, and only then reads
the store and verifies the secret with argon2 (:mod:`.verify`: its own
threads, bounded concurrency and queue); concurrent misses for the same
key share one verification. Unknown ids and wrong secrets are cached as
negative entries briefly.

Failures are counted per client, network and key id (:mod:`.failures`). A
suspicious miss still goes through when its text is proven -- by the Redis
entry, or because this process verified exactly this text for this id
before (a key id's secret never changes: rotation makes a new id) -- and
otherwise only as far as a few verifications per key id per second allow,
counted apart for clean and for suspicious addresses; the rest get 429
before any store or argon2 work, and each such 429 counts as a failure of
its address. So a proven key is never refused for others' failures, and
an unproven one only competes with guesses from clean addresses.

Every ``invalid_token`` refusal is held until as long after the request
began as nearly every verification takes -- their running mean plus four
mean deviations, as TCP sets its retransmission timer from round trips
(RFC 6298) -- (:meth:`KeyLookup.delay_refusal`), so the answer's timing
does not tell an unknown id from a wrong secret, on a busy machine too; a
throttled guess is held 1 s, so a flood of them gets few answers and
leaves the event loop to the keys it serves.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Callable

from ..cache.local import KeyCache
from ..keys import CacheKeyer, ParsedKey, SecretHasher
from ..config.ratelimit_spec import RateLimitSpec
from ..cache.redis_link import RedisUnavailable
from ..cache.shared import NEGATIVE, KeyFacts, SharedKeyCache, Slot
from ..store import KeyStore, StoreUnavailable
from .prepared import PreparedKey, prepare
from .failures import FailureLimiter
from .outcomes import Denied, Outcome
from .verify import SecretVerifier

__all__ = ["KeyLookup", "MAX_REFUSAL_DELAY", "THROTTLED_HOLD"]

# An invalid_token refusal is never held longer than this, whatever a verification has been taking.
MAX_REFUSAL_DELAY = 1.0
# A throttled guess is answered this long after it arrived: the shortest Retry-After a 429 can carry
# (whole seconds), so the wait never contradicts it.
THROTTLED_HOLD = 1.0
# Weights of the newest verification in the running mean of their durations and in the running
# mean of its deviations (RFC 6298's alpha and beta), and how many deviations the hold adds to the
# mean (its K): a wrong secret is answered when its verification ends or the hold does, whichever
# is later, so the hold must outlast nearly every verification, or on a machine whose verification
# times vary (a busy one) wrong secrets would be answered later than unknown ids, on average.
PACE_WEIGHT = 0.125
DEVIATION_WEIGHT = 0.25
DEVIATIONS = 4
# A verification counts as at most this many times the running mean: one that stalled (a store
# hiccup, a collection pause) would otherwise weigh 1 1/8 times its length in the hold (an eighth
# through the mean, four quarters through the deviation) and hold every refusal for dozens of
# verifications after it; a lasting slowdown still raises the hold by 3/8 of the mean per
# verification (on a busy machine, ten verifications took it from 8 to 250 ms).
OUTLIER = 4.0
# Suspicion levels of a miss (0: none): only its key id is over its limit, or its address or network is.
CLEAN, SUSPECT = 1, 2


class KeyLookup:
    def __init__(
        self, store: KeyStore, *, pepper: bytes, hasher: SecretHasher, cache: KeyCache[PreparedKey],
        default_rate_limit: RateLimitSpec, verify_concurrency: int = 0, verify_queue: int = 64,
        failures: FailureLimiter | None = None, shared: SharedKeyCache | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.store = store
        self.cache = cache
        self.shared = shared
        self.cache_key = CacheKeyer(pepper)
        self._default_rate_limit = default_rate_limit
        self._clock = clock  # time.perf_counter's, which the proxy and admin API take their start times from
        self.verifier = SecretVerifier(hasher, concurrency=verify_concurrency, queue=verify_queue)
        self.failures = failures if failures is not None else FailureLimiter()
        # (digest, suspicion level) -> the load in progress; see lookup() for why the level is part of the key.
        self._inflight: dict[tuple[str, int], asyncio.Future[PreparedKey | None]] = {}
        # key id -> digest of the one text argon2 accepted for it, oldest first; bounded like the cache.
        self._proven: dict[str, str] = {}
        # How long an invalid_token refusal is held, in seconds: the running mean of how long a
        # verified miss takes (store read + argon2) plus DEVIATIONS running mean deviations.
        self.pace = 0.0
        self._mean = 0.0
        self._deviation = 0.0
        self.verifications = 0
        self.store_reads = 0
        self.proven_hits = 0  # misses that skipped argon2 because the text was proven before
        self.throttled = 0  # misses refused by the failure limiter, without store or argon2 work
        # digest of a canary key -> until when its uses are not counted again (see canary_used).
        self._canary_quiet: dict[str, float] = {}

    def close(self) -> None:
        self.verifier.close()

    def canary_used(self, full_key: str, client: str) -> None:
        """Count a canary key's use against ``client`` as an unknown key's would be counted.

        SECURITY: a canary must be refused exactly as an unknown key is, and the failure limiter
        is observable (after enough failures an address gets 429): an unknown key is a failure of
        its address once, and its repeats within ``cache.negative_ttl`` hit the negative cache
        uncounted; so is a canary's use. Only canaries with their right secret get here: bounded.
        """
        digest = self.cache_key(full_key)
        now = self._clock()
        if now < self._canary_quiet.get(digest, -1.0):
            return
        self.failures.failed(client)
        self._canary_quiet[digest] = now + self.cache.negative_ttl

    async def calibrate(self) -> None:
        """Seed :attr:`pace` with one throwaway verification, so refusals are paced from the first request
        (at three times its length, its deviation taken as half of it, until verifications tell more)."""
        self._observe(await self.verifier.calibrate())

    @property
    def shed(self) -> int:
        """Misses refused because the argon2 queue was full."""
        return self.verifier.shed

    async def delay_refusal(self, denied: Denied, started: float) -> None:
        """Hold a refusal of the lookup or status stage, asleep (no CPU), for :meth:`refusal_delay`.

        SECURITY: ``invalid_token`` is held until ``started`` + :attr:`pace`, longer
        than nearly every verification: an unknown id costs a store read, a wrong
        secret a store read and argon2, and answered at once the difference
        tells which ids exist; held, both look alike (a hold only as long as an
        average verification would leave wrong secrets later whenever theirs
        ran long) -- and so do revoked, expired and negatively
        cached keys. ``too_many_attempts`` is held 1 s: a client that keeps
        guessing gets one answer per connection per second rather than as
        many as the event loop can make, so a flood cannot take the event
        loop from the keys it serves. (Not until the id's next verification
        is due: then every held guess for it would come back at that same
        instant, a wave per id per second.) Other refusals tell nothing
        about an id and are answered at once.
        """
        wait = self.refusal_delay(denied, started)
        if wait > 0:
            await asyncio.sleep(wait)

    def refusal_delay(self, denied: Denied, started: float) -> float:
        """Seconds :meth:`delay_refusal` holds ``denied`` from now (never past ``started`` + 1 s); 0 if not held."""
        if denied.outcome is Outcome.INVALID_TOKEN:
            hold = min(self.pace, MAX_REFUSAL_DELAY)
        elif denied.outcome is Outcome.TOO_MANY_ATTEMPTS:
            hold = THROTTLED_HOLD
        else:
            return 0.0
        return max(0.0, started + hold - self._clock())

    async def lookup(self, parsed: ParsedKey, client: str) -> PreparedKey:
        """The cached key, or Denied (INVALID_TOKEN, TOO_MANY_ATTEMPTS, VERIFICATION_BUSY);
        StoreUnavailable when it cannot be known."""
        digest = self.cache_key(parsed.full)
        cached = self.cache.get(digest)
        if cached is not None:
            return cached
        if self.cache.is_negative(digest):
            raise Denied(Outcome.INVALID_TOKEN, "negative cache")
        suspicion = self.failures.suspicion(client, parsed.key_id)
        # 0: nothing suspicious; CLEAN: only the key id (the request draws on the id's budget for
        # clean addresses); SUSPECT: the address or its network (the budget for suspicious ones).
        level = 0 if suspicion is None else SUSPECT if self.failures.address_suspicious(client) else CLEAN
        # A load started for an unsuspicious request serves any other for free (it is never
        # throttled); otherwise only one of the same level: a load throttled on one budget must
        # not refuse a request entitled to the other.
        pending = self._inflight.get((digest, 0))
        if pending is None and level:
            pending = self._inflight.get((digest, level))
        if pending is None:
            flight, key_id = (digest, level), parsed.key_id
            self.failures.began(key_id)
            pending = asyncio.ensure_future(self._load(parsed, digest, suspicion, level))
            self._inflight[flight] = pending

            def settled(_done: asyncio.Future[PreparedKey | None]) -> None:
                self._inflight.pop(flight, None)
                self.failures.ended(key_id)

            pending.add_done_callback(settled)
        try:
            found = await asyncio.shield(pending)
        except StoreUnavailable:
            stale = self.cache.get_stale(digest)
            if stale is not None:
                return stale
            raise
        except Denied as denied:
            if denied.outcome is Outcome.TOO_MANY_ATTEMPTS:
                self.throttled += 1
                # SECURITY: a throttled guess is a failure of its address (not of the key id), so an
                # address that only gets 429s turns suspicious and leaves the clean budget alone.
                self.failures.throttled(client)
            raise
        if found is None:
            self.failures.failed(client)
            raise Denied(Outcome.INVALID_TOKEN, "unknown key or wrong secret")
        return found

    async def verify_reported(self, parsed: ParsedKey) -> bool:
        """Whether ``parsed`` is the full text of a stored key: a presented key's proof, for a leak report.

        The checks of :meth:`lookup` -- the cache's proof of a text verified before, else the store
        and argon2 on the same verification threads -- without what guards the request path: no
        failure limit (a report is signed, and refusing one would lose it), no queue to be shed
        from (the caller bounds its own concurrency) and no refusal delay (nobody times the answer).
        A key id alone proves nothing: ids are public. StoreUnavailable when it cannot be known.
        """
        digest = self.cache_key(parsed.full)
        if self.cache.get(digest) is not None or self._is_proven(parsed.key_id, digest):
            return True  # SECURITY: argon2 accepted exactly this text for this id before
        if self.cache.is_negative(digest):
            return False
        self.store_reads += 1
        async with self.store.read() as tx:
            record = await tx.get_key(parsed.key_id)
        if record is None:
            return False
        self.verifications += 1
        return await self.verifier.verify(record.secret_hash, parsed.secret)

    async def _load(self, parsed: ParsedKey, digest: str, suspicion: float | None, level: int) -> PreparedKey | None:
        started = self._clock()
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
                    entry = prepare(found, self._default_rate_limit)
                    self.cache.put(digest, found.record.id, entry, generation=generation)
                    return entry
        if self._is_proven(parsed.key_id, digest):
            # SECURITY: this exact text passed argon2 for this id before, and an id's secret
            # never changes; only what may have changed since (status, roles) is read again.
            facts = await self._read(parsed.key_id)
            if facts is None:
                return None
            self.proven_hits += 1
            return await self._admit(facts, digest, slot, generation)
        if suspicion is not None:
            # SECURITY: taken before the store is read, so the answer is the same whether
            # the id exists or not; without it a flood of guesses would buy argon2 runs.
            wait = self.failures.take_verification(parsed.key_id, suspicion, clean=level == CLEAN)
            if wait > 0:
                raise Denied(Outcome.TOO_MANY_ATTEMPTS, "too many failed attempts", retry_after=wait)
        with self.verifier.admit():
            facts = await self._read(parsed.key_id)
            if facts is None:
                self.cache.put_negative(digest)
                await self._share(slot, None)
                return None
            self.verifications += 1
            ok = await self.verifier.verify(facts.record.secret_hash, parsed.secret)
        self._observe(self._clock() - started)
        if not ok:
            self.failures.wrong_secret(parsed.key_id)
            self.cache.put_negative(digest)
            await self._share(slot, None)
            return None
        self._remember(parsed.key_id, digest)
        return await self._admit(facts, digest, slot, generation)

    async def _admit(self, facts: KeyFacts, digest: str, slot: Slot | None, generation: int) -> PreparedKey:
        entry = prepare(facts, self._default_rate_limit)
        # A change notice that arrived while we read and verified wins: this
        # request may use what it read, but the cache must not keep it.
        self.cache.put(digest, facts.record.id, entry, generation=generation)
        await self._share(slot, facts)
        return entry

    def _is_proven(self, key_id: str, digest: str) -> bool:
        known = self._proven.get(key_id)
        # SECURITY: constant time, though the digest is a MAC nobody can aim at without the pepper.
        return known is not None and hmac.compare_digest(known, digest)

    def _remember(self, key_id: str, digest: str) -> None:
        self._proven.pop(key_id, None)
        while len(self._proven) >= self.cache.max_entries:
            self._proven.pop(next(iter(self._proven)))
        self._proven[key_id] = digest

    def _observe(self, seconds: float) -> None:
        if self._mean == 0.0:
            self._mean, self._deviation = seconds, seconds / 2  # RFC 6298 2.2: the first measurement
        else:
            seconds = min(seconds, OUTLIER * self._mean)
            self._deviation += DEVIATION_WEIGHT * (abs(seconds - self._mean) - self._deviation)
            self._mean += PACE_WEIGHT * (seconds - self._mean)
        self.pace = self._mean + DEVIATIONS * self._deviation

    async def current(self, key_id: str) -> PreparedKey | None:
        """The key with this id as the store has it now (no secret checked: the caller was let in with it), or None.

        Raises StoreUnavailable.
        """
        facts = await self._read(key_id)
        return None if facts is None else prepare(facts, self._default_rate_limit)

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
