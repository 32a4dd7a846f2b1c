"""Allowlist suggestions from the request records the store holds (both stores)."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from gateway.manage.service import InvalidInput, KeyService, NotFound
from gateway.models import RequestRecord
from gateway.store import KeyStore

from ...clocks import FakeClock


def request(at: datetime, key_id: str, client_ip: str | None, decision: str = "allowed") -> RequestRecord:
    return RequestRecord(at, key_id, "GET", "/x", "app", "read", decision, 200 if decision == "allowed" else 403,
                         client_ip, 1.0)


async def test_only_allowed_requests_of_the_window_count(
    service: KeyService, store: KeyStore, clock: FakeClock[datetime],
) -> None:
    """Refused requests (an attacker's?), other keys' and those older than --days are left out."""
    record, _ = await service.create_key(name="ci", role="admin")
    other, _ = await service.create_key(name="other", role="admin")
    now = clock.now
    await store.add_request_records(
        [request(now - timedelta(hours=h), record.id, "203.0.113.7") for h in range(5)]
        + [request(now - timedelta(hours=1), record.id, "203.0.113.9")]
        + [request(now - timedelta(hours=1), record.id, "198.51.100.1", decision="ip_not_allowed")]
        + [request(now - timedelta(hours=1), record.id, "198.51.100.2", decision="rate_limited")]
        + [request(now - timedelta(days=31), record.id, "192.0.2.1")]
        + [request(now - timedelta(hours=1), record.id, None)]
        + [request(now - timedelta(hours=1), other.id, "192.0.2.99")]
    )
    async with store.read() as tx:
        counts = await tx.client_addresses(record.id, since=now - timedelta(days=30), limit=10)
    assert counts == [("203.0.113.7", 5), ("203.0.113.9", 1)]
    found = await service.suggest_allowlist(record.id, days=30, max_blocks=1)
    assert [(str(b.network), b.requests, b.addresses) for b in found.blocks] == [("203.0.113.0/28", 6, 2)]
    assert found.command == f"keygate keys update {record.id} --allow-ip 203.0.113.0/28"
    wider = await service.suggest_allowlist(record.id, days=32, max_blocks=4)
    assert [str(b.network) for b in wider.blocks] == ["192.0.2.1/32", "203.0.113.7/32", "203.0.113.9/32"]


async def test_no_records_is_a_message_not_an_empty_allowlist(service: KeyService) -> None:
    """A key with no allowed requests gets no CIDRs and no command, and a message saying why."""
    record, _ = await service.create_key(name="ci", role="admin")
    found = await service.suggest_allowlist(record.id)
    assert (found.blocks, found.command) == ((), None)
    assert "nothing to suggest" in found.message


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"key_id": "kg_AAAAAAAAAAAA"}, NotFound, "no key with the id"),
        ({"days": 0}, InvalidInput, "days 0: use a whole number from 1 to 366"),
        ({"max_blocks": 17}, InvalidInput, "max 17: use a whole number from 1 to 16"),
    ],
)
async def test_bad_arguments(service: KeyService, kwargs: dict, error: type, message: str) -> None:
    """An unknown key, or --days/--max out of range, is refused with a message naming the value."""
    record, _ = await service.create_key(name="ci", role="admin")
    with pytest.raises(error, match=message):
        await service.suggest_allowlist(**{"key_id": record.id, **kwargs})


async def test_both_families_with_max_one_is_refused(
    service: KeyService, store: KeyStore, clock: FakeClock[datetime],
) -> None:
    """IPv4 and IPv6 addresses cannot share one CIDR: --max 1 is refused, saying so."""
    record, _ = await service.create_key(name="ci", role="admin")
    await store.add_request_records([request(clock.now, record.id, "203.0.113.7"),
                                     request(clock.now, record.id, "2001:db8::7")])
    with pytest.raises(InvalidInput, match="IPv4 and IPv6"):
        await service.suggest_allowlist(record.id, max_blocks=1)
    found = await service.suggest_allowlist(record.id, max_blocks=2)
    assert [str(b.network) for b in found.blocks] == ["203.0.113.7/32", "2001:db8::7/128"]
