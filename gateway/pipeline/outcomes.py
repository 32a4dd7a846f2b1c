"""What a stage decides: a request is allowed, or refused with a typed denial.

A *denial is data*: stages raise :class:`Denied` with an :class:`Outcome`,
and only :mod:`gateway.pipeline.responses` turns it into HTTP. Anything else that
goes wrong (store down, bug) is a system fault with its own answer.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final


class Outcome(StrEnum):
    ALLOWED = "allowed"
    NO_CREDENTIALS = "no_credentials"
    INVALID_REQUEST = "invalid_request"
    INVALID_TARGET = "invalid_target"
    INVALID_UPGRADE = "invalid_upgrade"
    # The request body's framing broke off (a malformed chunk): nothing whole was forwarded.
    INVALID_BODY = "invalid_body"
    INVALID_TOKEN = "invalid_token"
    # Failed too often (client, network or key id) and no verification left for now: no argon2 was run.
    TOO_MANY_ATTEMPTS = "too_many_attempts"
    IP_NOT_ALLOWED = "ip_not_allowed"
    INSUFFICIENT_SCOPE = "insufficient_scope"
    RATE_LIMITED = "rate_limited"
    BODY_TOO_LARGE = "body_too_large"
    CLIENT_TIMEOUT = "client_timeout"
    STORE_UNAVAILABLE = "store_unavailable"
    # The argon2 queue is full: the miss is shed rather than queued without bound.
    VERIFICATION_BUSY = "verification_busy"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    INTERNAL_ERROR = "internal_error"


class Denied(Exception):
    """A stage refused the request; ``reason`` is for logs and audit records only."""

    def __init__(self, outcome: Outcome, reason: str = "", *, retry_after: float | None = None) -> None:
        super().__init__(outcome.value if not reason else f"{outcome.value}: {reason}")
        self.outcome = outcome
        self.reason = reason or outcome.value
        self.retry_after = retry_after


# How /metrics groups outcomes: let through, refused, or failed on our side or upstream.
_FAILED: Final = frozenset({
    Outcome.STORE_UNAVAILABLE, Outcome.VERIFICATION_BUSY, Outcome.UPSTREAM_UNAVAILABLE, Outcome.UPSTREAM_TIMEOUT,
    Outcome.INTERNAL_ERROR,
})
# Outcomes only a request that passed the rate-limit stage can have (the forward stage's).
PAST_RATE_LIMIT: Final = frozenset({
    Outcome.ALLOWED, Outcome.BODY_TOO_LARGE, Outcome.CLIENT_TIMEOUT, Outcome.UPSTREAM_UNAVAILABLE,
    Outcome.UPSTREAM_TIMEOUT, Outcome.INVALID_UPGRADE, Outcome.INVALID_BODY,
})


def decision_of(outcome: Outcome) -> str:
    """``allowed``, ``denied`` or ``failed``."""
    if outcome is Outcome.ALLOWED:
        return "allowed"
    return "failed" if outcome in _FAILED else "denied"
