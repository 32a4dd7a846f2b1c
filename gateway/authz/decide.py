"""The authz listener's one handler: stages 1-7 on the original request, then the answer and stage 9.

An ingress (nginx ``auth_request``, ingress-nginx ``auth-url``, Traefik
ForwardAuth, Caddy ``forward_auth``, Envoy's HTTP ``ext_authz``) sends each
client request here before forwarding it. What it says about the original
request is believed only from ``authz.trusted_proxies``:

- method: ``X-Original-Method`` (nginx) or ``X-Forwarded-Method`` (Traefik, Caddy);
- path and query: ``X-Original-URI`` (nginx), ``X-Original-URL`` (ingress-nginx,
  an absolute URL) or ``X-Forwarded-Uri`` (Traefik, Caddy);
- client address: ``X-Forwarded-For``, as on the proxy listener but with
  ``authz.trusted_proxies`` as the trusted hops.

With none of them (Envoy sends the original request line as is), or from any
other peer, the request is judged on what it is. The answer to an allowed
request is 200 with an empty body and the headers the ingress copies
upstream (identity, ``X-Request-Id``, ``RateLimit``); a refusal is the proxy
listener's own answer, byte for byte, so clients cannot tell the modes apart.
"""

from __future__ import annotations

import time
from typing import ClassVar, Final

from multidict import CIMultiDictProxy

from ..dataplane.access_log import log_access
from ..dataplane.client_gone import ClientGone
from ..dataplane.http1 import Request
from ..dataplane.proxy import CLIENT_CLOSED, Gateway
from ..pipeline.authenticate import Attempt
from ..pipeline.outcomes import Denied, Outcome
from ..pipeline.ratelimit import ratelimit_block
from ..pipeline.request_ids import request_id_of
from ..pipeline.target import RequestTarget
from ..process.log_format import REQUEST_ID


# Envoy's HTTP ext_authz removes the headers this names from the upstream request (the key, unless the
# route passes it); nginx, Traefik and Caddy strip it by copying the answer's (absent) Authorization.
_STRIP_KEY: Final = b"X-Envoy-Auth-Headers-To-Remove: authorization\r\n"
_ALLOWED: Final = Outcome.ALLOWED


_METHODS: Final = ("X-Original-Method", "X-Forwarded-Method")
_TARGETS: Final = ("X-Original-URI", "X-Original-URL", "X-Forwarded-Uri")


def original_request(request: Request, trusted: bool) -> tuple[str, str]:
    """The method and raw target the ingress asks about (its headers only when ``trusted``).

    Raises Denied(INVALID_TARGET) when the request names its method or target more than once.
    SECURITY: an ingress sets one of these and may pass the client's own headers along (Traefik
    does by default, nginx passes those it does not set): a second spelling is the client's, and
    believing either could let a client pick the route it is judged on.
    """
    if not trusted:
        return request.method, request.raw_path
    headers = request.headers
    method = _one(headers, _METHODS) or request.method
    target = _one(headers, _TARGETS)
    if target is not None and target[:1] != "/":
        # X-Original-URL, ingress-nginx's "$scheme://$http_host$request_uri": the request target is what
        # follows the authority. Not urlsplit: the client's raw Host ("api.example:80?x", which nginx
        # accepts) would move the real path into a query.
        scheme, sep, rest = target.partition("://")
        slash = rest.find("/")
        if not sep or slash < 0:
            raise Denied(Outcome.INVALID_TARGET, "X-Original-URL without a path")
        target = rest[slash:]
    return method, target or request.raw_path


def _one(headers: CIMultiDictProxy[str], names: tuple[str, ...]) -> str | None:
    found = [value for name in names for value in headers.getall(name, ())]
    if len(found) > 1:
        raise Denied(Outcome.INVALID_TARGET, "original request named twice")
    return found[0] if found else None


class Decider(Gateway):
    """Stages 1-7 and 9 of the proxy (its recorder, counters and refusals), answering instead of forwarding."""

    LISTENER: ClassVar[str] = "authz"

    async def handle(self, request: Request) -> None:  # type: ignore[override]
        started = time.perf_counter()
        headers = request.headers
        request_id = request_id_of(headers, self.request_ids)
        REQUEST_ID.set(request_id)
        peer = request.peer
        method, raw_target = request.method, request.raw_path
        attempt = Attempt()
        request_target: RequestTarget | None = None
        outcome = Outcome.ALLOWED
        reason: str | None = None
        try:
            method, raw_target = original_request(
                request, self._trusts_proxies and self.client_ips.is_trusted_peer(peer))
            request_target = self.targets(raw_target)
            await self.authenticator.authenticate(attempt, headers, peer, method, request_target.path, started)
            key, target = attempt.key, attempt.target
            block = key.identity_block + ratelimit_block(attempt.rate) + b"X-Request-Id: %s\r\n" % request_id.encode()  # type: ignore[union-attr,arg-type,operator]
            credential = headers.get("Authorization") if target.pass_credentials else None  # type: ignore[union-attr]
            block += b"Authorization: %s\r\n" % credential.encode("latin-1") if credential else _STRIP_KEY
            request.send(200, "OK", block, b"")
        except ClientGone:
            request.status = CLIENT_CLOSED
        except Exception as exc:
            outcome, reason = self._refuse(request, exc, request_id)
        finally:
            if attempt.denied is not None and outcome is _ALLOWED:
                outcome, reason = attempt.denied.outcome, attempt.denied.reason
            status = request.status if request.ended or request.status == CLIENT_CLOSED else CLIENT_CLOSED
            record = self._record(method, raw_target, request_target, attempt, outcome, reason, status, peer, started)
            if self.log_requests:
                log_access(self.LISTENER, request_id, request, record, attempt.target)
