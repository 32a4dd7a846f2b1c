"""``POST /.well-known/keygate/secret-scanning``: GitHub's secret-scanning partner reports of leaked keys.

GitHub finds text matching our key pattern in public code and POSTs a JSON
array of matches (``token``, ``type``, ``url``, ``source``), signed with
ECDSA P-256 over the raw body (:mod:`.github_keys`). Each real key is
reported leaked (:meth:`KeyService.report_leak`: revoked or flagged per its
kind's ``on_leak``, audited, ``key.leaked`` queued); the answer is GitHub's
feedback array: per distinct token its SHA-256 (never the token), the
report's type and ``true_positive`` or ``false_positive``.

The order, and why:

1. the client's rate limit and the signature headers' presence, before the
   body is read: a flood or an unsigned post costs a dict lookup;
2. the body, whole (at most :data:`MAX_BODY` within :data:`BODY_DEADLINE`),
   then its signature against the key GitHub names: unsigned, forged or
   signed by a key GitHub does not publish is 401 and nothing is read from
   it; GitHub's key list out of reach is 503 with Retry-After (GitHub sends
   the report again), never 401;
3. the shape (400), at most :data:`MAX_TOKENS` matches (413);
4. each distinct token parsed with the key format's checksum first, so
   garbage and other vendors' tokens cost no store query; the rest verified
   as a presented key is (:meth:`KeyLookup.verify_reported`): the store and
   argon2, on the proxy's verification threads, at most half of them at a
   time so proxied keys keep the rest. A real id with a wrong secret is a
   false positive, not a leak of that key: ids are public, and anyone could
   publish an id with a random secret to have its key revoked.

Large batches: the answer is sent :data:`ANSWER_BUDGET` seconds after the
request began at the latest (GitHub waits 30 s for partners who give
feedback). Tokens whose verification is not finished by then are left out
of the feedback (a guessed label would be wrong data; feedback is optional
per token) and are settled after the answer by the same tasks: a store that
fails then is retried with backoff until it answers, and on shutdown the
work is given :data:`DRAIN_GRACE` to finish; whatever is still left is
logged with the key ids (public) so an operator can report them by hand
(``keygate keys report-leak``). Raw tokens are never stored or logged, so
they cannot be kept across a restart. A store that fails before the answer
is 503 with Retry-After for the whole report: GitHub sends it again, and
the keys reported meanwhile are reported again harmlessly (no second
revocation or webhook).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from multidict import CIMultiDictProxy

from ..config.ratelimit_spec import parse_rate_limit
from ..config.schema import Settings
from ..dataplane.http1 import Request
from ..identity.exchange import SECRET_SCANNING_PATH, Refusal, client_bucket, read_body
from ..keys import KeyParser, MalformedKey, ParsedKey
from ..manage.service import KeyService, Notifier, NotFound, hasher_from
from ..pipeline.lookup import KeyLookup
from ..pipeline.ratelimit import RateLimiter
from ..store import KeyStore, StoreUnavailable
from .github_keys import GitHubKeys, KeysUnavailable, UnknownKeyIdentifier, signature_valid

log = logging.getLogger("keygate.leaks")

IDENTIFIER_HEADER = "Github-Public-Key-Identifier"
SIGNATURE_HEADER = "Github-Public-Key-Signature"
# A report of 1000 matches is ~250 KB; past 1 MiB a body is no report we take whole.
MAX_BODY = 1024 * 1024
# Seconds the whole body may take (GitHub sends it at once).
BODY_DEADLINE = 10.0
# Matches in one report: past this the report is refused (413) before any token is looked at.
MAX_TOKENS = 1000
# Seconds after the request began by which the answer is sent, whatever is still being verified:
# within GitHub's 30 s for partners who give feedback, with room for the network and its clock.
ANSWER_BUDGET = 10.0
# Longest wait between two attempts of work left after the answer, while the store is down.
MAX_RETRY_WAIT = 60.0
# Seconds a shutdown waits for work left after an answer.
DRAIN_GRACE = 10.0
TRUE_POSITIVE, FALSE_POSITIVE = "true_positive", "false_positive"
ACTOR = "github:secret-scanning"

NOT_SIGNED = "The report is not signed by GitHub."
KEYS_UNAVAILABLE = "GitHub's signing keys cannot be fetched to check this report; send it again shortly."

_HEADERS = b"Content-Type: application/json; charset=utf-8\r\nCache-Control: no-store\r\n"


@dataclass(frozen=True, slots=True)
class Match:
    """One match of a report."""

    # SECURITY: never in a repr, so never in a log line or a traceback.
    token: str = field(repr=False)
    type: str
    url: str
    source: str | None


def _bad(description: str) -> Refusal:
    return Refusal(400, "invalid_request", description)


def parse_matches(body: bytes) -> list[Match]:
    """The report's matches: a JSON array of objects with string ``token``, ``type`` and ``url`` (GitHub's may be
    empty) and an optional string ``source``. 400 for anything else, 413 past :data:`MAX_TOKENS`."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise _bad("The body is not JSON.") from None
    if not isinstance(document, list):
        raise _bad("The body must be a JSON array of matches.")
    if len(document) > MAX_TOKENS:
        raise Refusal(413, "invalid_request", f"A report may hold at most {MAX_TOKENS} matches.",
                      f"{len(document)} matches")
    matches = []
    for place, item in enumerate(document):
        if not isinstance(item, dict):
            raise _bad(f"Match {place} is not an object.")
        token, kind, url, source = item.get("token"), item.get("type"), item.get("url"), item.get("source")
        if not isinstance(token, str) or not token or not isinstance(kind, str) or not kind:
            raise _bad(f"Match {place}: token and type must be non-empty strings.")
        if not isinstance(url, str) or not (source is None or isinstance(source, str)):
            raise _bad(f"Match {place}: url must be a string, and source a string when given.")
        matches.append(Match(token, kind, url, source))
    return matches


def feedback(match: Match, label: str) -> dict[str, str]:
    """GitHub's feedback on one match: the token as its SHA-256 (SECURITY: never the token itself)."""
    return {"token_hash": hashlib.sha256(match.token.encode("utf-8", "surrogatepass")).hexdigest(),
            "token_type": match.type, "label": label}


@dataclass(slots=True)
class _Report:
    answered: bool = False  # the answer is sent: a failing store is waited for, no longer answered with 503


class LeakReports:
    """The handler of ``POST /.well-known/keygate/secret-scanning`` (dispatched by :class:`WellKnown`)."""

    def __init__(
        self, *, store: KeyStore, settings: Settings, lookup: KeyLookup, parser: KeyParser, limiter: RateLimiter,
        keys: GitHubKeys, notifier: Notifier | None = None, forget_key: Callable[[str], None] | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC), timer: Callable[[], float] = time.monotonic,
        answer_budget: float = ANSWER_BUDGET,
    ) -> None:
        self.store = store
        self.settings = settings
        self.lookup = lookup
        self.parser = parser
        self.limiter = limiter
        self.keys = keys
        self.notifier = notifier
        self.forget_key = forget_key  # drops a reported key from this process's cache at once
        self.clock = clock
        self.timer = timer
        self.answer_budget = answer_budget
        self.per_client = parse_rate_limit(settings.leaks.per_client)
        self.hasher = hasher_from(settings)
        # At most half the verification threads at once (at least one): proxied keys keep the rest.
        self._slots = asyncio.Semaphore(max(1, lookup.verifier.concurrency // 2))
        # Tokens being settled (the key id each claims), also those left after their report's answer.
        self._work: dict[asyncio.Task[bool], str] = {}
        # Tokens by label (for /metrics), and reports refused whole ("refused").
        self.results: dict[str, int] = {TRUE_POSITIVE: 0, FALSE_POSITIVE: 0, "refused": 0}

    @property
    def unfinished(self) -> int:
        """Tokens still being settled."""
        return len(self._work)

    async def handle(self, request: Request, request_id: str, client_ip: str) -> dict[str, Any]:
        """Answer a report; returns what the request's log line says. Refusals are raised as :class:`Refusal`."""
        try:
            return await self._handle(request, request_id, client_ip)
        except (Refusal, StoreUnavailable):
            self.results["refused"] += 1
            raise

    async def close(self) -> None:
        """Give the work left after answers :data:`DRAIN_GRACE` to finish; log the key ids of what is left."""
        if not self._work:
            return
        _, pending = await asyncio.wait(list(self._work), timeout=DRAIN_GRACE)
        if pending:
            key_ids = sorted({self._work[task] for task in pending})
            for task in pending:
                task.cancel()
            # The ids are public; the tokens were never kept. Report these by hand (keygate keys report-leak).
            log.error(json.dumps({"event": "leak_reports_unfinished", "key_ids": key_ids}))

    async def _handle(self, request: Request, request_id: str, client_ip: str) -> dict[str, Any]:
        started = self.timer()
        # 1. Nothing below runs for a flood, or for a post nobody signed.
        decision = await self.limiter.take(f"leaks:client:{client_bucket(client_ip)}", self.per_client)
        if not decision.allowed:
            raise Refusal(429, "temporarily_unavailable", "Too many reports from this address; retry later.",
                          "per-client limit", retry_after=decision.retry_after)
        identifier, signature = _signature_headers(request.headers)
        # 2. The body, and whether GitHub signed exactly these bytes.
        body = await read_body(request, limit=MAX_BODY, deadline=BODY_DEADLINE)
        try:
            key = await self.keys.key_for(identifier)
        except UnknownKeyIdentifier as exc:
            raise Refusal(401, "invalid_signature", NOT_SIGNED, str(exc)) from None
        except KeysUnavailable as exc:
            raise Refusal(503, "temporarily_unavailable", KEYS_UNAVAILABLE, str(exc),
                          retry_after=max(1.0, exc.retry_after)) from None
        # SECURITY: over the raw bytes received, never a re-serialisation of what they parse to.
        if not signature_valid(key, body, signature):
            raise Refusal(401, "invalid_signature", NOT_SIGNED, "signature does not verify")
        # 3. The matches; a token reported twice counts once.
        distinct: dict[str, Match] = {}
        for match in parse_matches(body):
            distinct.setdefault(match.token, match)
        matches = list(distinct.values())
        # 4. Each token.
        report = _Report()
        labels: dict[str, str] = {}
        work: dict[str, asyncio.Task[bool]] = {}
        ids: dict[str, str] = {}  # token -> the key id it claims (public)
        for match in matches:
            try:
                parsed = self.parser.parse(match.token)
            except MalformedKey:
                labels[match.token] = FALSE_POSITIVE  # garbage, or another vendor's: no store query
                self.results[FALSE_POSITIVE] += 1
                continue
            ids[match.token] = parsed.key_id
            work[match.token] = self._spawn(self._settle(report, parsed, match), parsed.key_id)
        if work:
            budget = max(0.0, started + self.answer_budget - self.timer())
            done, pending = await asyncio.wait(work.values(), timeout=budget)
            failures = [task.exception() for task in done if not task.cancelled() and task.exception() is not None]
            if failures:
                # The store failed before the answer: GitHub sends the whole report again (what was
                # reported meanwhile is reported again, harmlessly). A bug is a bug: raised as it is.
                failure = next((f for f in failures if isinstance(f, StoreUnavailable)), failures[0])
                raise failure
            report.answered = True
            labels.update({token: TRUE_POSITIVE if task.result() else FALSE_POSITIVE
                           for token, task in work.items() if task in done})
            if pending:
                log.warning(json.dumps({"event": "leak_report_unfinished_at_answer", "request_id": request_id,
                                        "pending": len(pending), "matches": len(matches)}))
        answer = [feedback(m, labels[m.token]) for m in matches if m.token in labels]
        request.send(200, "OK", _HEADERS, json.dumps(answer).encode())
        leaked = sorted(ids[token] for token in work if labels.get(token) == TRUE_POSITIVE)
        details = {"matches": len(matches), "true_positive": len(leaked),
                   "false_positive": sum(1 for label in labels.values() if label == FALSE_POSITIVE),
                   "pending": len(matches) - len(labels), "leaked": leaked}
        log.info(json.dumps({"event": "leak_report", "request_id": request_id, "client_ip": client_ip, **details}))
        return details

    def _spawn(self, work: Coroutine[Any, Any, bool], key_id: str) -> asyncio.Task[bool]:
        task = asyncio.ensure_future(work)
        self._work[task] = key_id

        def settled(done: asyncio.Task[bool]) -> None:
            self._work.pop(done, None)
            if not done.cancelled():
                done.exception()  # retrieved: a failure before the answer was answered (503), not lost

        task.add_done_callback(settled)
        return task

    async def _settle(self, report: _Report, parsed: ParsedKey, match: Match) -> bool:
        """Whether the token is a real key, reported leaked if so. Before the answer a failing store is raised
        (the report is answered 503); after it, waited for with backoff: the answer cannot be taken back."""
        wait = 1.0
        while True:
            try:
                async with self._slots:
                    real = await self.lookup.verify_reported(parsed)
                if real:
                    real = await self._report(parsed.key_id, match)
                break
            except StoreUnavailable as exc:
                if not report.answered:
                    raise
                log.warning(json.dumps({"event": "leak_report_waiting_for_store", "key_id": parsed.key_id,
                                        "error": str(exc), "retry_in": wait}))
                await asyncio.sleep(wait)
                wait = min(wait * 2, MAX_RETRY_WAIT)
        self.results[TRUE_POSITIVE if real else FALSE_POSITIVE] += 1
        if report.answered:
            log.info(json.dumps({"event": "leak_report_settled", "key_id": parsed.key_id if real else None,
                                 "label": TRUE_POSITIVE if real else FALSE_POSITIVE}))
        return real

    async def _report(self, key_id: str, match: Match) -> bool:
        service = KeyService(self.store, self.settings, actor=ACTOR, clock=self.clock, hasher=self.hasher,
                             notifier=self.notifier)
        try:
            await service.report_leak(key_id, url=match.url, source=match.source, via="github")
        except NotFound:  # verified a moment ago; keys are never deleted, but a store may be restored
            return False
        if self.forget_key is not None:
            self.forget_key(key_id)  # stops here at once (other processes: the change feed, notices)
        return True


def _signature_headers(headers: CIMultiDictProxy[str]) -> tuple[str, str]:
    """The key identifier and signature, each given exactly once; 401 otherwise."""
    identifiers, signatures = headers.getall(IDENTIFIER_HEADER, []), headers.getall(SIGNATURE_HEADER, [])
    if len(identifiers) != 1 or len(signatures) != 1 or not identifiers[0].strip() or not signatures[0].strip():
        raise Refusal(401, "invalid_signature", NOT_SIGNED, "signature headers missing or repeated")
    return identifiers[0].strip(), signatures[0].strip()


__all__ = ["LeakReports", "SECRET_SCANNING_PATH", "feedback", "parse_matches"]
