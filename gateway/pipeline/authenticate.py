"""Stages 1-7 of DESIGN.md's pipeline, in its order, as one function: who is calling, and may they?

:meth:`Authenticator.authenticate` is the only code that runs the stages.
The proxy listener (:mod:`gateway.dataplane.proxy`) and the admin API
(:mod:`gateway.admin.auth`) call it, so a key means the same thing on every
listener; they differ only in how they answer (JSON or problem+json) and
in what they do with an allowed request. Each stage is one small unit of
this package; every ordering choice is commented where it is made.

A stage refuses by raising :class:`~.outcomes.Denied` (a typed denial; the
caller turns it into HTTP with :mod:`.responses`); a store that cannot be
read raises :class:`~gateway.store.StoreUnavailable`. What the stages found
before a refusal (the claimed key id, the client address, the route) stays
in the :class:`Attempt`, for the request record.

The hot path lives here too, not in the callers: a key verified before is
found by the MAC of its text without parsing, and in-process token buckets
decide without an await.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import cast

from multidict import CIMultiDictProxy

from ..cache.local import KeyCache
from ..keys import CacheKeyer, KeyParser, LastKey
from .allowlist import check_allowlist
from .canary import CanaryAlarm, canary_use, refuse_canary
from .client_ip import ClientIpResolver, IPAddress
from .credential import bearer_credential, common_bearer
from .lookup import KeyLookup
from .outcomes import Denied
from .prepared import PreparedKey
from .ratelimit import RateLimitDecision, RateLimited, RateLimiter
from ..config.ratelimit_spec import RateLimitSpec
from .scope import RouteTable, Target, check_scope
from .status import check_status

__all__ = ["Attempt", "Authenticator"]


class Attempt:
    """One request's way through the stages, filled in as each one passes.

    Read by the request record whether the request was allowed or refused:
    ``key_id`` is set once a key was claimed (stage 1), ``key`` once it was
    found (2), ``client`` once the address is known (4), ``target`` once the
    route is (6) and ``rate`` when the bucket allowed it (7); ``denied`` is
    the refusal, set before it is held, so a client that hangs up while it
    is held is still recorded as refused. A plain object with slots: one is
    made per request.
    """

    __slots__ = ("key_id", "key", "looked_up", "client_ip", "client", "target", "rate", "denied")

    def __init__(self) -> None:
        self.key_id: str | None = None
        self.key: PreparedKey | None = None
        self.looked_up = False  # the key came from a lookup (a cache miss), not the cache
        self.client_ip: IPAddress | None = None
        self.client: str | None = None  # the client address as text: lookup, allowlist memo, headers, record
        self.target: Target | None = None
        self.rate: RateLimitDecision | None = None
        self.denied: Denied | None = None


class Authenticator:
    """Stages 1-7, built once per process from the pieces the runtime owns."""

    def __init__(
        self, *, parser: KeyParser, lookup: KeyLookup, client_ips: ClientIpResolver, routes: RouteTable,
        limiter: RateLimiter, clock: Callable[[], float] = time.time, alarm: CanaryAlarm | None = None,
    ) -> None:
        self.parser = parser
        self.lookup = lookup
        self.client_ips = client_ips
        self.routes = routes
        self.limiter = limiter
        self._clock = clock  # epoch seconds, for revocation and expiry (stage 3)
        self.alarm = alarm  # where a canary key's uses go (the recorder's buffer)
        # In-process buckets decide without I/O: called directly, not awaited.
        self._take_now: Callable[[str, RateLimitSpec], RateLimitDecision] | None = getattr(limiter, "take_now", None)
        # The exact Redis policy hands back a future this coroutine awaits itself: no coroutine of its own
        # to suspend and resume per request (see SharedBuckets.decide).
        self._take_soon: Callable[[str, RateLimitSpec], Awaitable[RateLimitDecision]] | None = \
            getattr(limiter, "take_soon", None)
        # The hot path's cache probe (stages 1-2), made here rather than by a KeyLookup method: lookup.py is
        # not compiled (see pyproject.toml), and a call into it ran an interpreted frame per request. A miss
        # is not counted here: KeyLookup.lookup follows and counts it (a malformed key never gets there).
        self._cache_key: CacheKeyer = lookup.cache_key
        self._cache: KeyCache[PreparedKey] = lookup.cache

    def with_client_ips(self, client_ips: ClientIpResolver) -> Authenticator:
        """The same stages over the same lookup, routes and buckets, trusting other hops for the client address."""
        return Authenticator(parser=self.parser, lookup=self.lookup, client_ips=client_ips, routes=self.routes,
                             limiter=self.limiter, clock=self._clock, alarm=self.alarm)

    def refuse_canary(
        self, key: PreparedKey, client: str | None, method: str, path: str, headers: CIMultiDictProxy[str],
        full_key: str, counted_as: str,
    ) -> Denied:
        """The refusal of a canary key's use (an unknown key's, counted by the failure limiter as one against
        ``counted_as``, the lookup's client), its alarm raised (see :mod:`.canary`)."""
        self.lookup.canary_used(full_key, counted_as)
        return refuse_canary(canary_use(key, self.parser, client, method, path, headers, self._clock()), self.alarm)

    async def authenticate(
        self, attempt: Attempt, headers: CIMultiDictProxy[str], peer: str, method: str, path: str,
        started: float, *, target: Target | None = None, last: LastKey | None = None,
    ) -> Attempt:
        """Run stages 1-7 for one request; ``attempt``, complete, if every stage allows it.

        ``path`` is the canonical request target (:mod:`.target`); the route
        table (stage 6) reads it unless ``target`` is given (the admin API's
        endpoints name their server and operation themselves). ``started``
        is when the request began (``time.perf_counter``): a refusal of the
        lookup or status stage is held from then (see
        :meth:`KeyLookup.delay_refusal`) before it is raised. ``last`` is the
        key its connection presented last (see :class:`~gateway.keys.LastKey`).
        """
        try:
            # 4. The client address is resolved before the stages that may refuse: it refuses
            #    nothing itself, so the order of refusals stays DESIGN's (1, 2, 3, 5, 6, 7),
            #    and the lookup's failure limiter (2) counts failures per real client
            #    behind trusted proxies.
            client_ip, client = self.client_ips.client(peer, headers)
            attempt.client_ip, attempt.client = client_ip, client
            # 1-2, hot path: a key verified before is found by the MAC of its text. Only keys
            #    that passed parsing and argon2 are cached, so a hit proves the syntax too.
            token = common_bearer(headers)
            if token is None:
                key = None
            elif last is None:
                key = self._cache.probe(self._cache_key(token))
            else:
                key = self._cache.probe(self._cache_key.remembered(token, last))
            if key is None:
                # 1. Credential: one Bearer key of valid syntax; no I/O, so garbage costs nothing.
                parsed = bearer_credential(headers, self.parser)
                attempt.key_id = parsed.key_id
                token = parsed.full
                # 2. Lookup: in-process cache, Redis cache, store; argon2 only on a miss.
                key = await self.lookup.lookup(parsed, str(client))
                attempt.looked_up = True
            attempt.key = key
            key_id = attempt.key_id = key.record.id
            # 3a. Canary first, whatever its status: a decoy is refused as an unknown key is
            #     (nothing after this may answer differently), and its every use is an alarm.
            if key.canary:  # (token is the key's text on both paths above)
                raise self.refuse_canary(key, client, method, path, headers, cast(str, token), str(client))
            # 3. Status before the allowlist: a revoked or expired key is invalid_token (401)
            #    from every address, so a 403 never tells an outsider that a dead key exists.
            check_status(key, self._clock())
            # 5. IP allowlist before scope: a key used from the wrong place learns nothing
            #    about what it could do from the right one.
            check_allowlist(key.networks, client_ip, key.allowlist_seen, client)
            # 6. Scope: the route (server, operation) is matched only now, so a request that
            #    is not authenticated learns nothing about the route table.
            if target is None:
                target = self.routes.match(method, path)
            attempt.target = target
            check_scope(key.servers, key.grants, target)
            # 7. Rate limit last: only keys that passed every check above are charged, so a
            #    refused request never spends the bucket of the key it claims.
            take_now = self._take_now
            if take_now is not None:
                rate = take_now(key_id, key.rate_limit)
            else:
                take_soon = self._take_soon
                rate = await (take_soon(key_id, key.rate_limit) if take_soon is not None
                              else self.limiter.take(key_id, key.rate_limit))
            if not rate.allowed:
                raise RateLimited(rate)
            attempt.rate = rate
            return attempt
        except Denied as denied:
            attempt.denied = denied
            # SECURITY: invalid_token is held as long as a verification takes, and throttled
            # guesses 1 s, on every listener alike (see KeyLookup.delay_refusal).
            await self.lookup.delay_refusal(denied, started)
            # Named, not a bare raise: after an await in an except block the compiled build (mypyc)
            # has lost the exception a bare raise would re-raise (tests/unit/test_compiled_modules.py).
            raise denied
