"""Authentication of admin API requests: the proxy's own stages, on the server ``admin``.

The order is the proxy's (DESIGN.md "The proxy pipeline"): credential,
lookup, status, client IP, IP allowlist, scope, rate limit. Each stage is the
very unit the proxy runs, so a key means the same thing on both listeners;
only the answer differs: a problem+json body instead of the proxy's JSON.
Every admin request leaves a request record (server ``admin``) in the audit
trail, refused ones too.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from aiohttp import web

from ..keys import MalformedKey, looks_like_key_id
from ..models import RequestRecord
from ..pipeline.allowlist import check_allowlist
from ..pipeline.client_ip import IPAddress
from ..pipeline.credential import bearer_credential
from ..pipeline.lookup import CachedKey
from ..pipeline.outcomes import Denied, Outcome
from ..pipeline.ratelimit import RateLimited, check_rate_limit, ratelimit_headers
from ..pipeline.scope import ADMIN_SERVER, check_access
from ..pipeline.status import check_status
from ..dataplane.proxy import Gateway
from ..pipeline.responses import answer_of, retry_after_header
from ..store import StoreUnavailable
from .problems import STORE_RETRY_AFTER, Problem


@dataclass
class Attempt:
    """What one admin request got through the stages, for its request record."""

    operation: str
    key_id: str | None = None
    key: CachedKey | None = None
    client_ip: IPAddress | None = None
    outcome: Outcome = Outcome.ALLOWED
    reason: str | None = None
    rate_headers: dict[str, str] = field(default_factory=dict)


ATTEMPT = web.RequestKey("keygate_admin_attempt", Attempt)


def _denial_problem(denied: Denied) -> Problem:
    status, code, description, challenge = answer_of(denied.outcome)
    headers = {"WWW-Authenticate": challenge} if challenge else {}
    wait = retry_after_header(denied.outcome, denied.retry_after)
    if wait is not None:
        headers["Retry-After"] = wait
    if isinstance(denied, RateLimited):
        headers |= ratelimit_headers(denied.decision)
    return Problem(status, code, description, headers=headers)


class AdminAuth:
    """Runs the stages for one admin request and records it."""

    def __init__(self, gateway: Gateway, *, clock: Callable[[], float] = time.time) -> None:
        self.gateway = gateway
        self._clock = clock
        self.decisions: dict[str, int] = {}

    async def authenticate(self, request: web.Request, operation: str) -> CachedKey:
        """The admin key, allowed to perform ``operation``; else a :class:`Problem` (401/403/429/503).

        A 429 is the key's rate limit (with RateLimit headers) or the lookup's
        (too many failed attempts, verification busy: Retry-After only).
        """
        started = time.perf_counter()
        gw = self.gateway
        attempt = request[ATTEMPT] = Attempt(operation)
        try:
            parsed = bearer_credential(request.headers, gw.parser)
            attempt.key_id = parsed.key_id
            attempt.client_ip = gw.client_ips.resolve(request.remote, request.headers.getall("X-Forwarded-For", ()))
            key = attempt.key = await gw.lookup.lookup(parsed, str(attempt.client_ip))
            check_status(key, self._clock())
            check_allowlist(key.networks, attempt.client_ip)
            # SECURITY: scope on the server "admin": a "*" server list never covers it.
            check_access(key.servers, key.grants, ADMIN_SERVER, operation)
            decision = await check_rate_limit(gw.limiter, key.record.id, key.rate_limit)  # type: ignore[arg-type]
        except Denied as denied:
            attempt.outcome, attempt.reason = denied.outcome, denied.reason
            await gw.lookup.delay_refusal(denied, started)
            raise _denial_problem(denied) from None
        except StoreUnavailable as exc:
            attempt.outcome, attempt.reason = Outcome.STORE_UNAVAILABLE, str(exc)
            raise Problem(503, "temporarily_unavailable", answer_of(Outcome.STORE_UNAVAILABLE)[2],
                          headers={"Retry-After": str(STORE_RETRY_AFTER)}) from None
        attempt.rate_headers = ratelimit_headers(decision)
        return key

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        """Adds the RateLimit headers to allowed answers and leaves a request record for every request."""
        started = time.perf_counter()
        response = await handler(request)
        attempt = request.get(ATTEMPT)
        if attempt is None:  # not an authenticated endpoint (openapi.json, unknown path)
            return response
        if attempt.outcome is Outcome.ALLOWED:
            response.headers.update(attempt.rate_headers)
        self._record(request, attempt, response.status, started)
        return response

    def safe_path(self, request: web.Request) -> str:
        """The path with a key in it shown as its id only."""
        given = request.match_info.get("id")
        if given is None or looks_like_key_id(given):
            return request.path
        # SECURITY: a pasted (or mistyped) full key in the path must not reach the
        # audit trail: keep its id if it parses, else nothing of it.
        try:
            shown = self.gateway.parser.parse(given).key_id
        except MalformedKey:
            shown = "(not a key id)"
        return request.path.replace(given, shown)

    def _record(self, request: web.Request, attempt: Attempt, status: int, started: float) -> None:
        now = datetime.now(UTC)
        client = str(attempt.client_ip) if attempt.client_ip is not None else request.remote
        recorder = self.gateway.recorder
        if attempt.key is not None and attempt.outcome is Outcome.ALLOWED:
            recorder.key_used(attempt.key.record.id, now, client)
        self.decisions[attempt.outcome.value] = self.decisions.get(attempt.outcome.value, 0) + 1
        recorder.request(RequestRecord(
            at=now, key_id=attempt.key_id, method=request.method,
            path=self.gateway.parser.redact(self.safe_path(request)), server=ADMIN_SERVER,
            operation=attempt.operation, decision=attempt.outcome.value, status=status, client_ip=client,
            duration_ms=round((time.perf_counter() - started) * 1000.0, 3), reason=attempt.reason,
        ))
