"""The one outcome-to-HTTP mapping: status codes, RFC 6750 challenges and JSON bodies from DESIGN.md's table."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.pipeline.outcomes import Denied, Outcome
from gateway.pipeline.responses import BUSY_RETRY_AFTER, REALM, STORE_RETRY_AFTER, Denial, answer_of, denial

REQUEST_ID = "req-123"


def body_of(response: Denial) -> dict[str, Any]:
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    assert isinstance(response.body, bytes)
    data = json.loads(response.body)
    assert isinstance(data, dict)
    return data


@pytest.mark.parametrize(
    ("outcome", "status", "challenge"),
    [
        (Outcome.NO_CREDENTIALS, 401, 'Bearer realm="keygate"'),
        (Outcome.INVALID_REQUEST, 400, 'Bearer realm="keygate", error="invalid_request"'),
        (Outcome.INVALID_TOKEN, 401, 'Bearer realm="keygate", error="invalid_token"'),
        (Outcome.INSUFFICIENT_SCOPE, 403, 'Bearer realm="keygate", error="insufficient_scope"'),
        (Outcome.IP_NOT_ALLOWED, 403, None),
        (Outcome.RATE_LIMITED, 429, None),
        (Outcome.TOO_MANY_ATTEMPTS, 429, None),
        (Outcome.VERIFICATION_BUSY, 429, None),
        (Outcome.BODY_TOO_LARGE, 413, None),
        (Outcome.STORE_UNAVAILABLE, 503, None),
        (Outcome.UPSTREAM_UNAVAILABLE, 502, None),
        (Outcome.UPSTREAM_TIMEOUT, 504, None),
    ],
)
def test_status_and_challenge(outcome: Outcome, status: int, challenge: str | None) -> None:
    """Each outcome has DESIGN.md's status code and exactly its WWW-Authenticate challenge, or none."""
    response = denial(outcome, REQUEST_ID)
    assert response.status == status == answer_of(outcome)[0]
    assert response.headers.get("WWW-Authenticate") == challenge


def test_no_credentials_challenge_has_no_error_code() -> None:
    """Without credentials the challenge is the bare realm, with no error attribute (RFC 6750 3.1)."""
    assert denial(Outcome.NO_CREDENTIALS, REQUEST_ID).headers["WWW-Authenticate"] == REALM == 'Bearer realm="keygate"'


@pytest.mark.parametrize(
    ("outcome", "error"),
    [
        (Outcome.INVALID_REQUEST, "invalid_request"),
        (Outcome.INVALID_TOKEN, "invalid_token"),
        (Outcome.INSUFFICIENT_SCOPE, "insufficient_scope"),
        (Outcome.IP_NOT_ALLOWED, "ip_not_allowed"),
        (Outcome.TOO_MANY_ATTEMPTS, "too_many_attempts"),
        (Outcome.VERIFICATION_BUSY, "verification_busy"),
    ],
)
def test_body_error_matches_the_documented_code(outcome: Outcome, error: str) -> None:
    """The JSON body's error field carries the documented code for each refusal."""
    assert body_of(denial(outcome, REQUEST_ID))["error"] == error


@pytest.mark.parametrize("outcome", [o for o in Outcome if o is not Outcome.ALLOWED])
def test_body_is_json_with_error_description_and_request_id(outcome: Outcome) -> None:
    """Every answer the proxy makes is JSON with non-empty error and error_description and the request id."""
    body = body_of(denial(outcome, REQUEST_ID))
    assert set(body) == {"error", "error_description", "request_id"}
    assert body["error"] and body["error_description"]
    assert body["request_id"] == REQUEST_ID


@pytest.mark.parametrize("outcome", [o for o in Outcome if o is not Outcome.ALLOWED])
def test_every_refusal_names_its_request_in_a_header_too(outcome: Outcome) -> None:
    """X-Request-Id on refusals as on allowed answers: the same id as the body's."""
    response = denial(outcome, REQUEST_ID)
    assert response.headers["X-Request-Id"] == body_of(response)["request_id"] == REQUEST_ID
    assert b"X-Request-Id: req-123\r\n" in response.block


@pytest.mark.parametrize("outcome", [o for o in Outcome if o is not Outcome.ALLOWED])
def test_answers_are_not_cached(outcome: Outcome) -> None:
    """Refusals carry Cache-Control: no-store so no cache in between replays them."""
    assert denial(outcome, REQUEST_ID).headers["Cache-Control"] == "no-store"


def test_ip_not_allowed_has_json_error_and_no_challenge() -> None:
    """A refused client address is a 403 with error ip_not_allowed and no WWW-Authenticate."""
    response = denial(Outcome.IP_NOT_ALLOWED, REQUEST_ID)
    assert response.status == 403
    assert "WWW-Authenticate" not in response.headers
    assert body_of(response)["error"] == "ip_not_allowed"


@pytest.mark.parametrize(("retry_after", "header"), [(0.01, "1"), (1, "1"), (1.2, "2"), (59.0, "59"), (0, "1")])
def test_rate_limited_has_retry_after_in_whole_seconds(retry_after: float, header: str) -> None:
    """A 429's Retry-After is the wait rounded up to whole seconds, never 0."""
    response = denial(Outcome.RATE_LIMITED, REQUEST_ID, retry_after=retry_after)
    assert response.status == 429
    assert response.headers["Retry-After"] == header


@pytest.mark.parametrize(("retry_after", "header"), [(0.2, "1"), (1.0, "1"), (37.5, "38")])
def test_too_many_attempts_has_retry_after_and_no_ratelimit_headers(retry_after: float, header: str) -> None:
    """The failure limiter's 429 says when to retry and nothing about any key's bucket."""
    response = denial(Outcome.TOO_MANY_ATTEMPTS, REQUEST_ID, retry_after=retry_after)
    assert response.status == 429 and response.headers["Retry-After"] == header
    assert "RateLimit" not in response.headers and "RateLimit-Policy" not in response.headers


def test_verification_busy_retries_after_one_second() -> None:
    """A shed verification is a 429 with Retry-After 1, whatever the stage passed."""
    assert denial(Outcome.VERIFICATION_BUSY, REQUEST_ID).headers["Retry-After"] == str(BUSY_RETRY_AFTER) == "1"


def test_too_many_attempts_is_one_answer_whatever_the_reason() -> None:
    """Every too_many_attempts answer is the same bytes: it tells nothing about the id it refused."""
    answers = set()
    for reason in ("too many failed attempts", "client", "key id"):
        denied = Denied(Outcome.TOO_MANY_ATTEMPTS, reason, retry_after=1)
        response = denial(denied.outcome, REQUEST_ID, retry_after=denied.retry_after)
        answers.add((response.status, response.body, tuple(sorted(response.headers.items()))))
    assert len(answers) == 1


def test_rate_limited_keeps_ratelimit_headers() -> None:
    """Extra headers (the RateLimit fields) are sent alongside the 429's Retry-After."""
    extra = {"RateLimit-Policy": '"default";q=100;w=60', "RateLimit": '"default";r=0;t=7'}
    response = denial(Outcome.RATE_LIMITED, REQUEST_ID, retry_after=7, extra_headers=extra)
    assert response.headers["RateLimit-Policy"] == extra["RateLimit-Policy"]
    assert response.headers["RateLimit"] == extra["RateLimit"]
    assert response.headers["Retry-After"] == "7"


def test_store_unavailable_has_retry_after() -> None:
    """A 503 for an unreachable store always tells the client when to retry."""
    response = denial(Outcome.STORE_UNAVAILABLE, REQUEST_ID)
    assert response.status == 503
    assert response.headers["Retry-After"] == str(STORE_RETRY_AFTER)
    assert int(response.headers["Retry-After"]) > 0


def test_store_unavailable_never_says_the_key_is_invalid() -> None:
    """The 503 carries no invalid_token challenge or error, so a valid key is never called invalid."""
    response = denial(Outcome.STORE_UNAVAILABLE, REQUEST_ID)
    assert "WWW-Authenticate" not in response.headers
    assert "invalid" not in response.body.decode()  # type: ignore[union-attr]


@pytest.mark.parametrize("outcome", [Outcome.NO_CREDENTIALS, Outcome.INVALID_TOKEN, Outcome.INSUFFICIENT_SCOPE])
def test_no_retry_after_unless_asked(outcome: Outcome) -> None:
    """Refusals that retrying cannot fix carry no Retry-After."""
    assert "Retry-After" not in denial(outcome, REQUEST_ID).headers


def test_request_id_is_the_only_per_request_part() -> None:
    """Two requests' INVALID_TOKEN bodies differ only in their request_id."""
    first = body_of(denial(Outcome.INVALID_TOKEN, "req-1"))
    second = body_of(denial(Outcome.INVALID_TOKEN, "req-2"))
    assert first.pop("request_id") == "req-1" and second.pop("request_id") == "req-2"
    assert first == second


@pytest.mark.parametrize("request_id", ['a"b', "a\\b", "</script>"], ids=["quote", "backslash", "markup"])
def test_request_id_is_json_escaped(request_id: str) -> None:
    """Whatever the request id holds, the body stays valid JSON that gives it back exactly."""
    assert body_of(denial(Outcome.INVALID_TOKEN, request_id))["request_id"] == request_id


def test_extra_headers_cannot_replace_the_challenge() -> None:
    """The outcome's own WWW-Authenticate wins over one passed in extra headers."""
    response = denial(Outcome.INVALID_TOKEN, REQUEST_ID, extra_headers={"WWW-Authenticate": "Basic"})
    assert response.headers["WWW-Authenticate"] == f'{REALM}, error="invalid_token"'
