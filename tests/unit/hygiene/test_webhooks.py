"""The pure parts of webhook delivery: the signature, the retry schedule, the headers and the lease."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime

import pytest

from gateway import __version__
from gateway.config.schema import WebhookSettings
from gateway.hygiene.webhooks import JITTER, backoff, event_id, headers_for, lease_for, origin, signature
from gateway.models import WebhookDelivery

SECRET = "0123456789abcdef-secret"
BODY = '{"event":"key.revoked","id":"4f1c","key_id":"kg_AAAAAAAAAAAA"}'


def a_delivery(body: str = BODY, event: str = "key.revoked") -> WebhookDelivery:
    at = datetime(2026, 12, 1, tzinfo=UTC)
    return WebhookDelivery(7, "https://hooks.example/k", event, "kg_AAAAAAAAAAAA", body, at, 0, at)


def test_signature_is_the_hex_hmac_sha256_of_the_exact_body() -> None:
    """X-Keygate-Signature is sha256= and the HMAC-SHA256 of the body's bytes under the secret."""
    expected = hmac.new(SECRET.encode(), BODY.encode(), hashlib.sha256).hexdigest()
    assert signature(SECRET, BODY.encode()) == f"sha256={expected}"
    assert signature(SECRET, BODY.encode() + b" ") != signature(SECRET, BODY.encode())
    assert signature(SECRET + "x", BODY.encode()) != signature(SECRET, BODY.encode())


@pytest.mark.parametrize(("attempts", "seconds"), [
    (1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (9, 256.0), (10, 512.0), (11, 600.0), (40, 600.0), (10_000, 600.0),
])
def test_backoff_doubles_from_one_second_up_to_the_cap(attempts: int, seconds: float) -> None:
    """Without jitter the waits are 1 s, 2 s, 4 s, ... and never more than webhook_max_backoff."""
    assert backoff(attempts, 600.0, rand=lambda: 0.0) == seconds


@pytest.mark.parametrize("attempts", [1, 3, 12])
def test_jitter_only_shortens_a_wait_and_by_at_most_a_quarter(attempts: int) -> None:
    """With jitter a wait lies between (1 - JITTER) and 1 times its step, never past the cap."""
    step = min(60.0, 2.0 ** (attempts - 1))
    assert backoff(attempts, 60.0, rand=lambda: 0.999999) == pytest.approx(step * (1 - JITTER), rel=1e-5)
    assert backoff(attempts, 60.0, rand=lambda: 0.5) == step * (1 - JITTER / 2)


def test_headers_name_the_event_its_id_and_sign_the_body() -> None:
    """Each POST says what it is, which event (for dedupe) and carries the signature and our user agent."""
    hook = WebhookSettings(url="https://hooks.example/k", secret=SECRET)
    headers = headers_for(hook, a_delivery(), BODY.encode())
    assert headers == {
        "Content-Type": "application/json",
        "User-Agent": f"keygate/{__version__}",
        "X-Keygate-Event": "key.revoked",
        "X-Keygate-Delivery": "4f1c",
        "X-Keygate-Signature": signature(SECRET, BODY.encode()),
    }


@pytest.mark.parametrize("body", ["not json", "[1, 2]", '{"id": 5}', '{"id": ""}'])
def test_a_body_without_an_event_id_is_named_by_its_outbox_row(body: str) -> None:
    """A body that names no event id still gets a stable X-Keygate-Delivery."""
    assert event_id(body, 7) == "outbox-7"


def test_the_lease_outlasts_the_longest_attempt_twice() -> None:
    """A claim holds its rows for twice the longest webhook timeout (10 s each without webhooks)."""
    hooks = [WebhookSettings(url="https://a.example/", secret=SECRET, timeout=3),
             WebhookSettings(url="https://b.example/", secret=SECRET, timeout=12)]
    assert lease_for(hooks) == 24.0
    assert lease_for([]) == 20.0


@pytest.mark.parametrize(("url", "logged"), [
    ("https://hooks.slack.com/services/T000/B000/XXXXSECRET", "https://hooks.slack.com/..."),
    ("https://events.pagerduty.example/v2?token=SECRET", "https://events.pagerduty.example/..."),
    ("http://127.0.0.1:9000/", "http://127.0.0.1:9000/"),
    ("http://127.0.0.1:9000", "http://127.0.0.1:9000/"),
])
def test_logs_name_a_webhook_by_its_origin_only(url: str, logged: str) -> None:
    """A token in a webhook's path or query never reaches the log."""
    assert origin(url) == logged
