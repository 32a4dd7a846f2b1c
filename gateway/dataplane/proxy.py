"""The proxy listener's one handler: the pipeline of DESIGN.md, top to bottom.

Stages 1-7 are :class:`~gateway.pipeline.authenticate.Authenticator`'s (the
admin API runs the same); stage 8 forwards, stage 9 records. Stages refuse
by raising :class:`Denied`; system faults (store down) have their own
answers; :func:`gateway.pipeline.responses.denial` makes every response the
proxy writes itself. Nothing here waits on a write: stage 9 only
appends to the recorder's buffers.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import ClassVar, Final

from multidict import istr

from ..models import RequestRecord, new_tuple
from ..process.log_format import REQUEST_ID
from ..pipeline.authenticate import Attempt, Authenticator
from ..pipeline.outcomes import Denied, Outcome, decision_of
from ..pipeline.ratelimit import RateLimited, ratelimit_block, ratelimit_headers
from ..pipeline.request_ids import RequestIds, request_id_of
from ..pipeline.responses import denial
from ..pipeline.target import RequestTarget, TargetCanonicalizer
from ..recorder import Recorder
from ..store import StoreUnavailable
from .access_log import log_access
from .forward import Forwarder, upstream_request_headers
from .client_gone import ClientGone
from .http1 import Request, reason_of
from .tunnels import UNSEEN, Admission
from .latency import Histogram

WellKnownHandler = Callable[[Request, str], Awaitable[None]]

log = logging.getLogger("keygate.proxy")

# Keygate's own endpoints (/.well-known/keygate and below it: discovery, the identity exchange, whoami,
# self-revocation): never forwarded.
WELL_KNOWN: Final = "/.well-known/keygate"
_WELL_KNOWN_NEXT: Final = frozenset("/?")
_WELL_KNOWN_LENGTH: Final = len(WELL_KNOWN)
CLIENT_CLOSED: Final = 499  # recorded (never sent) when the client went away mid-request
_ALLOWED: Final = Outcome.ALLOWED
_UPGRADE: Final[str] = istr("Upgrade")  # (a case-insensitive lookup by an istr lowers nothing: see .http1)
# Counted requests: one row of ints per upstream (by name; "" for a request refused before routing),
# one cell per outcome and status class (index status // 100; 0 for a status outside 100-599).
OUTCOMES: Final[tuple[Outcome, ...]] = tuple(Outcome)
STATUS_CLASSES: Final = 6
_CELL_OF: Final = {outcome: i * STATUS_CLASSES for i, outcome in enumerate(OUTCOMES)}
_ROW: Final = len(OUTCOMES) * STATUS_CLASSES


def keygate_own(target: str) -> bool:
    """Whether a request target (a path, with or without its query) is in Keygate's own namespace."""
    return target.startswith(WELL_KNOWN) and (len(target) == _WELL_KNOWN_LENGTH
                                              or target[_WELL_KNOWN_LENGTH] in _WELL_KNOWN_NEXT)


class Gateway:
    """The proxy listener's handler: stages 1-7 (:class:`Authenticator`), then forward and record."""

    LISTENER: ClassVar[str] = "proxy"  # as the access log names it

    def __init__(
        self, *, authenticator: Authenticator, forwarder: Forwarder | None, recorder: Recorder,
        log_requests: bool = False,
        targets: TargetCanonicalizer | None = None,
        well_known: WellKnownHandler | None = None,
    ) -> None:
        self.authenticator = authenticator
        self.parser = authenticator.parser
        self.targets = targets if targets is not None else TargetCanonicalizer()
        self.client_ips = authenticator.client_ips
        self._trusts_proxies = self.client_ips.trusts_anyone
        self.forwarder = forwarder
        self.recorder = recorder
        self._keys = authenticator.lookup.cache  # its generation: see tunnels.Admission
        self.log_requests = log_requests
        self.well_known = well_known
        # Read at scrape time (gateway/admin/metrics.py); a request only adds 1 to one int.
        self.counts: dict[str, list[int]] = {}
        self.request_ids = RequestIds()
        # Per decision, bound once per outcome so a request pays one dict lookup.
        self.latency = {decision: Histogram() for decision in ("allowed", "denied", "failed")}
        self._latency_of = {outcome: self.latency[decision_of(outcome)] for outcome in Outcome}
        self._value_of = {outcome: outcome.value for outcome in Outcome}  # Enum.value is a slow property

    @property
    def decisions(self) -> dict[str, int]:
        """Requests by outcome (every upstream and status class), those counted at least once."""
        totals = [0] * len(OUTCOMES)
        for row in self.counts.values():
            for i in range(len(OUTCOMES)):
                totals[i] += sum(row[i * STATUS_CLASSES:(i + 1) * STATUS_CLASSES])
        return {outcome.value: n for outcome, n in zip(OUTCOMES, totals) if n}

    async def handle(self, request: Request) -> None:
        started = time.perf_counter()
        headers = request.headers
        request_id = request_id_of(headers, self.request_ids)
        # Every record written while this request is handled names it (its connection's task runs one
        # request at a time, and the next sets its own first: no reset needed).
        REQUEST_ID.set(request_id)
        raw = request.raw_path
        if self.well_known is not None and keygate_own(raw):
            # Keygate's own endpoints answer for themselves (and write their own log and audit events).
            await self.well_known(request, request_id)
            return
        peer = request.peer
        generation = self._keys.generation  # before the key is judged (a WebSocket's tunnel is held to it)
        attempt = Attempt()
        request_target: RequestTarget | None = None
        outcome = Outcome.ALLOWED
        reason: str | None = None
        try:
            # The request target in canonical form, decided before anything reads it: the
            # route table (6) judges exactly what the forward stage (8) sends. An ambiguous
            # target is a malformed request (400) whoever sends it, so no key is looked up.
            request_target = self.targets(request.raw_path)
            path = request_target.path
            if self.well_known is not None and path.startswith("/.") and keygate_own(path.lower()):
                # SECURITY: Keygate's own endpoint spelled another way ("//.well-known/keygate/whoami",
                # "/%2Ewell-known/...", "/.WELL-KNOWN/..." for a case-insensitive upstream): not served
                # (the check above saw another path), and never forwarded, which would send the upstream
                # a path in Keygate's namespace.
                raise Denied(Outcome.INVALID_TARGET, "Keygate's own endpoint spelled another way")
            # 1-7. Credential, lookup, status, client IP, allowlist, scope, rate limit.
            await self.authenticator.authenticate(
                attempt, headers, peer, request.method, request_target.path, started, last=request.conn.last_key)
            key, target, client = attempt.key, attempt.target, attempt.client
            # 8. Forward.
            answer = ratelimit_block(attempt.rate) + b"X-Request-Id: %s\r\n" % request_id.encode()  # type: ignore[arg-type]
            upgrade = headers.get(_UPGRADE)
            websocket = upgrade is not None and upgrade.lower() == "websocket"
            upstream_headers = upstream_request_headers(
                request, pass_credentials=target.pass_credentials,  # type: ignore[union-attr]
                identity=key.identity_block, client_ip=client, peer=peer,  # type: ignore[union-attr]
                peer_trusted=self._trusts_proxies and self.client_ips.is_trusted_peer(peer),
                request_id=request_id, pass_method_override=target.pass_method_override,  # type: ignore[union-attr]
            )
            forwarded = request_target.forwarded
            if websocket:
                # Held to its key for as long as it stays open (see .tunnels): what it was let in as.
                admission = Admission(key.record.id, attempt.client_ip, str(client), target,  # type: ignore[union-attr, arg-type]
                                      UNSEEN if attempt.looked_up else generation)
                await self.forwarder.websocket(request, target, forwarded, upstream_headers, answer,  # type: ignore[arg-type, union-attr]
                                               admission, min(key.expires_at, key.revoked_at))  # type: ignore[union-attr]
            else:
                await self.forwarder.forward(request, target, forwarded, upstream_headers, answer)  # type: ignore[arg-type, union-attr]
        except ClientGone:
            # Nobody is left to answer: recorded as allowed with status CLIENT_CLOSED, not as a fault.
            request.status = CLIENT_CLOSED
        except Exception as exc:
            outcome, reason = self._refuse(request, exc, request_id)
        finally:
            if attempt.denied is not None and outcome is _ALLOWED:
                # The client left while the refusal was held (see Authenticator.authenticate): it was refused.
                outcome, reason = attempt.denied.outcome, attempt.denied.reason
            # 9. Record: buffered, written in batches off the request path.
            # (Cancelled because the client went away before its answer: recorded as CLIENT_CLOSED.)
            status = request.status if request.ended or request.status == CLIENT_CLOSED else CLIENT_CLOSED
            record = self._record(request.method, request.raw_path, request_target, attempt, outcome, reason, status,
                                  peer, started)
            if self.log_requests:
                log_access(self.LISTENER, request_id, request, record, attempt.target)

    def _refuse(self, request: Request, exc: Exception, request_id: str) -> tuple[Outcome, str | None]:
        """Answer what stages 1-8 raised (a refusal, the store down, or a bug); the outcome and reason to record."""
        if isinstance(exc, RateLimited):
            self._deny(request, Outcome.RATE_LIMITED, request_id, extra_headers=ratelimit_headers(exc.decision))
            return Outcome.RATE_LIMITED, exc.reason
        if isinstance(exc, Denied):
            self._deny(request, exc.outcome, request_id, retry_after=exc.retry_after)
            return exc.outcome, exc.reason
        if isinstance(exc, StoreUnavailable):
            log.warning(json.dumps({"event": "store_unavailable", "error": str(exc), "request_id": request_id}))
            self._deny(request, Outcome.STORE_UNAVAILABLE, request_id)
            return Outcome.STORE_UNAVAILABLE, str(exc)
        # A bug, not a decision: log it whole, tell the client nothing about it.
        log.error(json.dumps({"event": "internal_error", "request_id": request_id}), exc_info=exc)
        self._deny(request, Outcome.INTERNAL_ERROR, request_id)
        return Outcome.INTERNAL_ERROR, type(exc).__name__

    @staticmethod
    def _deny(request: Request, outcome: Outcome, request_id: str, *, retry_after: float | None = None,
              extra_headers: dict[str, str] | None = None) -> None:
        if request.started:
            request.abort()  # an answer has begun: it cannot become a refusal
            return
        answer = denial(outcome, request_id, retry_after=retry_after, extra_headers=extra_headers)
        if outcome is Outcome.INVALID_UPGRADE:
            # The client meant to leave HTTP on this connection; what it sends next cannot be read as HTTP.
            request.keep_alive = False
        request.send(answer.status, reason_of(answer.status), answer.block, answer.body)

    def _record(
        self, method: str, raw_target: str, request_target: RequestTarget | None, attempt: Attempt,
        outcome: Outcome, reason: str | None, status: int, peer: str, started: float,
    ) -> RequestRecord:
        """Stage 9 for the request ``method raw_target`` (as judged: the authz listener's is the original one)."""
        now = self.recorder.stamp()  # (to the millisecond: see Stamps)
        elapsed = time.perf_counter() - started
        self._latency_of[outcome].observe(elapsed)
        allowed = outcome is _ALLOWED
        client = attempt.client or peer
        if allowed and attempt.key is not None and status != CLIENT_CLOSED:
            self.recorder.key_used(attempt.key.record.id, now, client or None)
        decision = self._value_of[outcome]
        target = attempt.target
        upstream = target.upstream if target is not None else None
        name = upstream.name if upstream is not None else ""
        row = self.counts.get(name)
        if row is None:
            row = self.counts[name] = [0] * _ROW
        status_class = status // 100
        row[_CELL_OF[outcome] + (status_class if 0 < status_class < STATUS_CLASSES else 0)] += 1
        # What was judged and forwarded (the raw target if it was refused), with keys shown as their ids.
        # SECURITY: a key pasted into a path or query must not reach the store or the log.
        path = self.parser.redact(request_target.forwarded if request_target is not None else raw_target)
        # Every field, in RequestRecord's order (see new_tuple), id 0 until the store assigns one.
        # (duration_ms to the microsecond: int(...) / 1000 costs a quarter of round(..., 3).)
        record = new_tuple(RequestRecord, (
            now, attempt.key_id, method, path, target.server if target else None,
            target.operation if target else None, decision, status, client or None, int(elapsed * 1e6 + 0.5) / 1000,
            None if allowed else reason, 0,
        ))
        self.recorder.request(record)
        return record


__all__ = ["Gateway"]
