"""Stage 1 — credential: find the one ``Authorization: Bearer`` key and check its syntax.

No cache, store or argon2 work is spent here: a key with a wrong prefix,
length, charset or checksum is refused by :class:`gateway.keys.KeyParser`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final, Protocol

from multidict import CIMultiDictProxy, istr

from ..keys import MalformedKey, ParsedKey
from .outcomes import Denied, Outcome

# RFC 6750 section 2.1: credentials = "Bearer" 1*SP b64token
_BEARER: Final = re.compile(r"([A-Za-z]+) +([A-Za-z0-9\-._~+/]+=*)")
# (an istr: a case-insensitive lookup lowers nothing per request; see gateway/dataplane/http1.py)
_AUTHORIZATION: Final[str] = istr("Authorization")


class ParsesKeys(Protocol):
    """What this stage needs of :class:`gateway.keys.KeyParser`: its ``parse``."""

    def parse(self, text: str) -> ParsedKey: ...


def common_bearer(headers: CIMultiDictProxy[str]) -> str | None:
    """The token of the one ``Authorization: Bearer <token>`` header in its usual spelling, else None.

    For the hot path only: it checks no syntax, so its answer is good only as
    a cache lookup (a hit proves the token is a verified key); anything else
    goes through :func:`bearer_credential`.
    """
    values = headers.getall(_AUTHORIZATION, ())
    if len(values) == 1:
        value = values[0]
        if value.startswith("Bearer ") and value.isascii():
            return value[7:]
    return None


def bearer_credential(headers: CIMultiDictProxy[str] | Mapping[str, str], parser: ParsesKeys) -> ParsedKey:
    """The parsed key, or a denial: no credentials (401), malformed (400) or invalid key (401)."""
    values = headers.getall("Authorization", ()) if hasattr(headers, "getall") else (
        [headers["Authorization"]] if "Authorization" in headers else []
    )
    if not values:
        raise Denied(Outcome.NO_CREDENTIALS)
    if len(values) > 1:
        # SECURITY: two credentials could be read differently by us and upstream.
        raise Denied(Outcome.INVALID_REQUEST, "more than one Authorization header")
    value = values[0].strip()
    if not value:
        raise Denied(Outcome.NO_CREDENTIALS, "empty Authorization header")
    match = _BEARER.fullmatch(value)
    scheme = match[1] if match else re.split(r"[ \t]", value, maxsplit=1)[0]
    # Auth schemes are case-insensitive (RFC 9110 section 11.1): "bearer" is Bearer.
    if scheme.lower() != "bearer":
        # Another scheme (Basic, ...) is "no Bearer credentials" (RFC 6750 section 3.1).
        raise Denied(Outcome.NO_CREDENTIALS, "not a Bearer credential")
    if match is None:
        raise Denied(Outcome.INVALID_REQUEST, "malformed Bearer credential")
    try:
        return parser.parse(match[2])
    except MalformedKey as exc:
        raise Denied(Outcome.INVALID_TOKEN, str(exc)) from None
