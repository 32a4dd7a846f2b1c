"""Authentication of admin API requests: the proxy's stages 1-7, on the server ``admin``.

:class:`~gateway.pipeline.authenticate.Authenticator` runs them, the very
function the proxy listener calls, so a key means the same thing on both
listeners (the same order, the same allowlist memo, the same held
refusals); only the answer differs: a problem+json body instead of the
proxy's JSON. Every admin request leaves a request record (server
``admin``) in the audit trail, refused ones too.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from aiohttp import web

from ..keys import MalformedKey, looks_like_key_id
from ..models import RequestRecord
from ..pipeline.authenticate import Attempt, Authenticator
from ..pipeline.outcomes import Denied, Outcome
from ..pipeline.prepared import PreparedKey
from ..pipeline.ratelimit import RateLimited, ratelimit_headers
from ..pipeline.responses import STORE_RETRY_AFTER, answer_of, retry_after_header
from ..pipeline.scope import ADMIN_SERVER, Target
from ..recorder import Recorder
from ..store import StoreUnavailable
from .problems import Problem


@dataclass
class AdminAttempt:
    """One admin request: its endpoint's operation and what it got through the stages, for its record."""

    operation: str
    stages: Attempt = field(default_factory=Attempt)
    outcome: Outcome = Outcome.ALLOWED
    reason: str | None = None


ATTEMPT = web.RequestKey("keygate_admin_attempt", AdminAttempt)


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
    """Runs stages 1-7 for one admin request and records it."""

    def __init__(self, authenticator: Authenticator, recorder: Recorder) -> None:
        self.authenticator = authenticator
        self.parser = authenticator.parser
        self.recorder = recorder
        self.decisions: dict[str, int] = {}
        # One target per endpoint's operations: the admin API is the server "admin", whatever its upstreams.
        self._targets: dict[tuple[str, tuple[str, ...]], Target] = {}

    async def authenticate(self, request: web.Request, operation: str, admitting: tuple[str, ...] = ()) -> PreparedKey:
        """The admin key, allowed to perform ``operation`` or one of ``admitting``; else a :class:`Problem`
        (401/403/429/503).

        A 429 is the key's rate limit (with RateLimit headers) or the lookup's
        (too many failed attempts, verification busy: Retry-After only).
        """
        started = time.perf_counter()
        attempt = request[ATTEMPT] = AdminAttempt(operation)
        target = self._targets.get((operation, admitting))
        if target is None:
            # SECURITY: scope on the server "admin": a "*" server list never covers it.
            target = self._targets[operation, admitting] = Target(None, ADMIN_SERVER, operation, False,
                                                                  alternatives=admitting)
        try:
            stages = await self.authenticator.authenticate(
                attempt.stages, request.headers, request.remote or "", request.method, request.path, started,
                target=target)
        except Denied as denied:
            attempt.outcome, attempt.reason = denied.outcome, denied.reason
            raise _denial_problem(denied) from None
        except StoreUnavailable as exc:
            attempt.outcome, attempt.reason = Outcome.STORE_UNAVAILABLE, str(exc)
            raise Problem(503, "temporarily_unavailable", answer_of(Outcome.STORE_UNAVAILABLE)[2],
                          headers={"Retry-After": str(STORE_RETRY_AFTER)}) from None
        return stages.key  # type: ignore[return-value]

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
        if attempt.outcome is Outcome.ALLOWED and attempt.stages.rate is not None:
            response.headers.update(ratelimit_headers(attempt.stages.rate))
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
            shown = self.parser.parse(given).key_id
        except MalformedKey:
            shown = "(not a key id)"
        return request.path.replace(given, shown)

    def _record(self, request: web.Request, attempt: AdminAttempt, status: int, started: float) -> None:
        now = datetime.now(UTC)
        stages = attempt.stages
        client = stages.client or request.remote
        if stages.key is not None and attempt.outcome is Outcome.ALLOWED:
            self.recorder.key_used(stages.key.record.id, now, client)
        self.decisions[attempt.outcome.value] = self.decisions.get(attempt.outcome.value, 0) + 1
        self.recorder.request(RequestRecord(
            at=now, key_id=stages.key_id, method=request.method,
            path=self.parser.redact(self.safe_path(request)), server=ADMIN_SERVER,
            operation=attempt.operation, decision=attempt.outcome.value, status=status, client_ip=client,
            duration_ms=round((time.perf_counter() - started) * 1000.0, 3), reason=attempt.reason,
        ))
