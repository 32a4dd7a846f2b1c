"""Keygate's endpoints refuse a key (or a store that cannot be read) with the proxy's own answer, as OAuth JSON."""

from __future__ import annotations

import pytest

from gateway.identity.exchange import _denied
from gateway.pipeline.outcomes import Denied, Outcome


@pytest.mark.parametrize(("denied", "status", "error", "retry_after", "challenge"), [
    (Denied(Outcome.NO_CREDENTIALS), 401, "unauthorized", None, b'WWW-Authenticate: Bearer realm="keygate"\r\n'),
    (Denied(Outcome.INVALID_TOKEN), 401, "invalid_token", None,
     b'WWW-Authenticate: Bearer realm="keygate", error="invalid_token"\r\n'),
    (Denied(Outcome.IP_NOT_ALLOWED), 403, "ip_not_allowed", None, b""),
    (Denied(Outcome.TOO_MANY_ATTEMPTS, retry_after=0.2), 429, "too_many_attempts", 1.0, b""),
    (Denied(Outcome.STORE_UNAVAILABLE, "connection refused"), 503, "temporarily_unavailable", 5.0, b""),
])
def test_a_refused_key_is_answered_as_the_proxy_answers_it(
    denied: Denied, status: int, error: str, retry_after: float | None, challenge: bytes,
) -> None:
    refusal = _denied(denied)
    assert (refusal.status, refusal.error, refusal.retry_after, refusal.headers) == (status, error, retry_after,
                                                                                      challenge)
    assert refusal.reason == denied.reason  # for the log, never the client
