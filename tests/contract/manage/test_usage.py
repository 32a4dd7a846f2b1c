"""A key's requests per UTC hour and decision, counted by the store's SQL (both stores)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gateway.manage.service import InvalidInput, KeyService, NotFound
from gateway.models import RequestRecord
from gateway.store import KeyStore

from ...clocks import FakeClock

NOW = datetime(2026, 5, 4, 13, 40, 12, tzinfo=UTC)


def request(at: datetime, key_id: str, decision: str = "allowed") -> RequestRecord:
    return RequestRecord(at, key_id, "GET", "/x", "app", "read", decision, 200 if decision == "allowed" else 403,
                         "203.0.113.7", 1.0)


def hour(h: int) -> datetime:
    return datetime(2026, 5, 4, h, tzinfo=UTC)


async def test_requests_are_counted_per_hour_and_decision(
    service: KeyService, store: KeyStore, clock: FakeClock[datetime],
) -> None:
    """Each UTC hour of the window holds its records by decision; other keys' and older records are left out."""
    clock.now = NOW
    record, _ = await service.create_key(name="ci", role="admin")
    other, _ = await service.create_key(name="other", role="admin")
    await store.add_request_records([
        request(hour(13), record.id), request(NOW, record.id), request(NOW, record.id, "rate_limited"),
        request(hour(11) + timedelta(minutes=59, seconds=59), record.id, "ip_not_allowed"),
        request(hour(11), record.id),
        request(hour(11), other.id),
        # The first hour of a 3-hour window is 11:00; 10:59 is before it.
        request(hour(11) - timedelta(seconds=1), record.id),
    ])
    found = await service.key_usage(record.id, hours=3)
    assert (found.since, found.until) == (hour(11), hour(14))
    assert found.counts == (
        (hour(11), "allowed", 1), (hour(11), "ip_not_allowed", 1),
        (hour(13), "allowed", 2), (hour(13), "rate_limited", 1),
    )
    answer = found.public()
    assert (answer["total"], answer["by_decision"]) == (5, {"allowed": 3, "ip_not_allowed": 1, "rate_limited": 1})
    assert answer["buckets"][0] == {"hour": "2026-05-04T11:00:00Z", "decision": "allowed", "requests": 1}
    wider = await service.key_usage(record.id, hours=168)
    assert wider.since == hour(14) - timedelta(hours=168)
    assert sum(n for _h, _d, n in wider.counts) == 6


async def test_a_key_without_records_has_no_buckets(service: KeyService) -> None:
    """No requests recorded: an empty list, not an error."""
    record, _ = await service.create_key(name="quiet", role="admin")
    assert (await service.key_usage(record.id)).counts == ()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"key_id": "kg_AAAAAAAAAAAA"}, NotFound, "no key with the id"),
        ({"hours": 0}, InvalidInput, "hours 0: use a whole number from 1 to 744"),
        ({"hours": 745}, InvalidInput, "hours 745: use a whole number from 1 to 744"),
    ],
)
async def test_bad_arguments(service: KeyService, kwargs: dict, error: type, message: str) -> None:
    """An unknown key or a window out of range is refused with a message naming the value."""
    record, _ = await service.create_key(name="ci", role="admin")
    with pytest.raises(error, match=message):
        await service.key_usage(**{"key_id": record.id, **kwargs})
