"""Validation of user-supplied key, role and member values."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from gateway.manage import inputs as fields
from gateway.manage.inputs import InvalidField
from gateway.config.ratelimit_spec import InvalidRateLimit, RateLimitSpec, parse_rate_limit

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7d", NOW + timedelta(days=7)),
        ("30d", NOW + timedelta(days=30)),
        ("90d", NOW + timedelta(days=90)),
        ("1y", NOW + timedelta(days=365)),
        ("12h", NOW + timedelta(hours=12)),
        ("2w", NOW + timedelta(weeks=2)),
        ("never", None),
        ("NEVER", None),
        ("2027-01-31", datetime(2027, 1, 31, tzinfo=UTC)),
        ("2027-01-31T10:30:00", datetime(2027, 1, 31, 10, 30, tzinfo=UTC)),
        ("2027-01-31T10:30:00Z", datetime(2027, 1, 31, 10, 30, tzinfo=UTC)),
        ("2027-01-31T10:30:00+02:00", datetime(2027, 1, 31, 8, 30, tzinfo=UTC)),
    ],
)
def test_expiry_forms(text: str, expected: datetime | None) -> None:
    """Presets, durations, never and ISO 8601 dates (UTC unless offset) are understood."""
    assert fields.parse_expiry(text, NOW) == expected


@pytest.mark.parametrize("text", ["soon", "30", "30x", "0d", "2027-13-01", "2020-01-01", "", "31/01/2027"])
def test_bad_expiry_is_refused(text: str) -> None:
    """Unknown forms, zero durations and past times are refused with the allowed forms named."""
    with pytest.raises(InvalidField, match="expires"):
        fields.parse_expiry(text, NOW)


def test_expiry_keeps_offset_meaning() -> None:
    """A date-time with an offset names that instant."""
    tz = timezone(timedelta(hours=-5))
    assert fields.parse_expiry("2027-01-01T00:00:00-05:00", NOW) == datetime(2027, 1, 1, tzinfo=tz)


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("100/minute", RateLimitSpec(100, 60.0)),
        ("5/second", RateLimitSpec(5, 1.0)),
        ("1000/hour", RateLimitSpec(1000, 3600.0)),
        ("10/day", RateLimitSpec(10, 86400.0)),
        ("100/minute; burst=150", RateLimitSpec(100, 60.0, 150)),
        ("100 / Minute;burst=100", RateLimitSpec(100, 60.0, 100)),
    ],
)
def test_rate_limit_specs(text: str, spec: RateLimitSpec) -> None:
    """Rate limits parse into limit, window and optional burst."""
    assert parse_rate_limit(text) == spec


@pytest.mark.parametrize("text", ["lots", "0/minute", "100", "100/fortnight", "-1/minute", "100/minute; burst=5", "",
                                  "9" * 5000 + "/second", "1/second; burst=" + "9" * 5000,
                                  "0" * 4400 + "1/second"])
def test_bad_rate_limits_are_refused(text: str) -> None:
    """Malformed, zero and burst-below-limit specs are refused (a 5000-digit one too: not int()'s ValueError)."""
    with pytest.raises(InvalidRateLimit) as refused:
        parse_rate_limit(text)
    assert len(str(refused.value)) < 200


@pytest.mark.parametrize(("text", "refused"), [
    ("1000000000/second", False),
    ("1000000000/second; burst=01000000000", False),
    ("1000000001/second", True),
    ("1/second; burst=1000000001", True),
    ("99999999999999999999999999/second", True),
])
def test_a_limit_being_set_is_at_most_a_billion_a_window(text: str, refused: bool) -> None:
    """Settings, keys and policies take at most a billion a window; one stored before the bound still reads."""
    parse_rate_limit(text)
    if refused:
        with pytest.raises(InvalidField, match="more than 1000000000 a window"):
            fields.rate_limit(text)
    else:
        assert fields.rate_limit(text) == str(parse_rate_limit(text))


def test_rate_limit_is_stored_canonically() -> None:
    """The stored spec is the canonical text, and empty means the default."""
    assert fields.rate_limit("100 / MINUTE") == "100/minute"
    assert fields.rate_limit("") is None
    with pytest.raises(InvalidField, match="rate-limit"):
        fields.rate_limit("lots")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("10.0.0.0/8", "10.0.0.0/8"), ("10.1.2.3/8", "10.0.0.0/8"), ("192.168.1.7", "192.168.1.7/32"),
     ("2001:db8::/32", "2001:db8::/32"), ("::1", "::1/128")],
)
def test_cidrs_are_normalised(text: str, expected: str) -> None:
    """Addresses become host networks and host bits are cleared."""
    assert fields.cidr(text) == expected


@pytest.mark.parametrize("text", ["10.0.0.0/33", "300.1.1.1", "example.com", "", "10.0.0.0/8/8"])
def test_bad_cidrs_are_refused(text: str) -> None:
    """Anything that is not an IPv4/IPv6 address or network is refused."""
    with pytest.raises(InvalidField, match="allow-ip"):
        fields.cidr(text)


@pytest.mark.parametrize("text", ["deploy", "servers:read", "servers:*", "*:read", "*", "push"])
def test_operations_accept_grants_and_wildcards(text: str) -> None:
    """Plain, namespaced and wildcard operations are valid."""
    assert fields.operation(text) == text


@pytest.mark.parametrize("text", ["", "Deploy", "de ploy", ":read", "a" * 65])
def test_bad_operations_are_refused(text: str) -> None:
    """Operations outside the grammar are refused."""
    with pytest.raises(InvalidField, match="operation"):
        fields.operation(text)
