"""The one place that turns an outcome into the HTTP answer the proxy makes itself.

Public messages are constants: the body never says why a key was refused
beyond the outcome, so unknown, wrong-secret, revoked and expired keys get
byte-identical answers. The two 429s of the lookup (too many failed
attempts, verification busy) say no more: the first is answered the same
whether the claimed id exists or not.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Final, NamedTuple

from .outcomes import Outcome

REALM: Final = 'Bearer realm="keygate"'
JSON: Final = "application/json; charset=utf-8"

# outcome -> (status, error code, description, WWW-Authenticate)
_ANSWERS: Final[dict[Outcome, tuple[int, str, str, str | None]]] = {
    Outcome.NO_CREDENTIALS: (401, "unauthorized", "Send an API key: Authorization: Bearer <key>.", REALM),
    Outcome.INVALID_REQUEST: (
        400, "invalid_request", "Send exactly one Authorization header of the form 'Bearer <key>'.",
        f'{REALM}, error="invalid_request"',
    ),
    Outcome.INVALID_TARGET: (
        400, "invalid_request",
        "The request path is ambiguous or malformed: a fragment, an encoded slash or backslash, an encoded "
        "control character, path parameters, a bad percent-encoding, letter case that selects another "
        "route, a resource name (a path segment that names what a key may act on) with characters other "
        "than letters, digits and -._~, or Keygate's own /.well-known/keygate/ spelled another way.", None,
    ),
    Outcome.INVALID_UPGRADE: (
        400, "invalid_request",
        "A WebSocket upgrade must be a GET with Connection: Upgrade, Sec-WebSocket-Key and "
        "Sec-WebSocket-Version: 13.", None,
    ),
    Outcome.INVALID_BODY: (400, "invalid_request", "The request body is not well-formed HTTP.", None),
    Outcome.INVALID_TOKEN: (
        401, "invalid_token", "The API key is invalid, expired or revoked.", f'{REALM}, error="invalid_token"',
    ),
    Outcome.TOO_MANY_ATTEMPTS: (
        429, "too_many_attempts", "Too many failed attempts from this address or for this key; retry later.", None,
    ),
    Outcome.IP_NOT_ALLOWED: (403, "ip_not_allowed", "This API key may not be used from this address.", None),
    Outcome.INSUFFICIENT_SCOPE: (
        403, "insufficient_scope", "This API key may not perform this operation on this server.",
        f'{REALM}, error="insufficient_scope"',
    ),
    Outcome.RATE_LIMITED: (429, "rate_limited", "Too many requests for this API key; retry later.", None),
    Outcome.BODY_TOO_LARGE: (413, "request_too_large", "The request body is larger than allowed.", None),
    Outcome.CLIENT_TIMEOUT: (408, "request_timeout", "The request body did not arrive in time.", None),
    Outcome.STORE_UNAVAILABLE: (
        503, "temporarily_unavailable", "Keys cannot be checked right now; retry shortly.", None,
    ),
    Outcome.VERIFICATION_BUSY: (
        429, "verification_busy", "Too many keys are being verified right now; retry shortly.", None,
    ),
    Outcome.UPSTREAM_UNAVAILABLE: (502, "bad_gateway", "The upstream service could not be reached.", None),
    Outcome.UPSTREAM_TIMEOUT: (504, "gateway_timeout", "The upstream service did not answer in time.", None),
    Outcome.INTERNAL_ERROR: (500, "internal_error", "Keygate failed to handle this request.", None),
}

STORE_RETRY_AFTER: Final = 5
# A shed verification is worth retrying as soon as the queue drains.
BUSY_RETRY_AFTER: Final = 1


def answer_of(outcome: Outcome) -> tuple[int, str, str, str | None]:
    """``(status, error code, public description, WWW-Authenticate or None)`` for ``outcome``."""
    return _ANSWERS[outcome]


def retry_after_header(outcome: Outcome, retry_after: float | None) -> str | None:
    """The ``Retry-After`` value (whole seconds, at least 1) an answer for ``outcome`` carries, or None."""
    if outcome is Outcome.STORE_UNAVAILABLE:
        return str(STORE_RETRY_AFTER)
    if outcome is Outcome.VERIFICATION_BUSY:
        return str(BUSY_RETRY_AFTER)
    if retry_after is None:
        return None
    return str(max(1, math.ceil(retry_after)))


class Denial(NamedTuple):
    """The proxy's own answer to a refused request; the server adds framing and ``Connection``."""

    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def block(self) -> bytes:
        """The headers as ``Name: value`` lines."""
        return "".join([f"{name}: {value}\r\n" for name, value in self.headers.items()]).encode("utf-8")


def denial(
    outcome: Outcome, request_id: str, *, retry_after: float | None = None,
    extra_headers: Mapping[str, str] | None = None,
) -> Denial:
    status, error, description, challenge = _ANSWERS[outcome]
    headers = dict(extra_headers or {})
    if challenge:
        headers["WWW-Authenticate"] = challenge
    wait = retry_after_header(outcome, retry_after)
    if wait is not None:
        headers["Retry-After"] = wait
    headers["Cache-Control"] = "no-store"
    headers["Content-Type"] = JSON
    # As on every allowed answer: a client that logs X-Request-Id finds its refusals too.
    # (request_id_of's ids are tokens of [A-Za-z0-9._:-]: safe in a header line.)
    headers["X-Request-Id"] = request_id
    body = json.dumps({"error": error, "error_description": description, "request_id": request_id})
    return Denial(status, headers, body.encode("utf-8"))
