"""The audit trail on both stores: one stream of events and request records, its paging and its pruning."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from gateway.manage.audit import TOKEN_GRACE, AuditFilter, AuditPruner, Position, query_audit
from gateway.models import RequestRecord
from gateway.store import KeyStore

from ...clocks import FakeClock

T0 = datetime(2020, 1, 1, 12, 0, 0, tzinfo=UTC)
# Leaves out the events of the store's set-up (the built-in admin role), which are much newer.
BEFORE_SETUP = T0 + timedelta(days=1)
ALL = AuditFilter(until=BEFORE_SETUP)

def request(at: datetime, key_id: str = "kg_1", decision: str = "allowed") -> RequestRecord:
    return RequestRecord(at, key_id, "GET", "/x", "app", "read", decision, 200, "10.0.0.1", 1.0)

async def fill(store: KeyStore) -> None:
    """Events and requests interleaved in time, two of them at the same instant."""
    async with store.transaction() as tx:
        await tx.add_audit(at=T0, actor="cli:root", action="key.create", target="kg_1", details={})
        await tx.add_audit(at=T0 + timedelta(minutes=2), actor="kg_1", action="key.revoke", target="kg_2",
                           details={})
        await tx.add_audit(at=T0 + timedelta(minutes=3), actor="cli:root", action="role.set", target="ci",
                           details={})
    await store.add_request_records([
        request(T0 + timedelta(minutes=1)),
        request(T0 + timedelta(minutes=2), decision="invalid_token"),
        request(T0 + timedelta(minutes=4), key_id="kg_2"),
    ])

def summary(entries: list) -> list[tuple[str, str]]:
    return [(e.type, e.item.action if e.type == "event" else e.item.decision) for e in entries]

async def test_one_stream_newest_first(store: KeyStore) -> None:
    """Events and request records come merged, newest first; at one instant the event comes first."""
    await fill(store)
    page = await query_audit(store, ALL, limit=100)
    assert summary(page.entries) == [
        ("request", "allowed"), ("event", "role.set"), ("event", "key.revoke"), ("request", "invalid_token"),
        ("request", "allowed"), ("event", "key.create"),
    ]
    assert page.next is None

@pytest.mark.parametrize(
    ("wanted", "expected"),
    [
        # A key's trail: events about it, events it performed (as an admin key), and its requests.
        (AuditFilter(key="kg_1"), [("event", "key.revoke"), ("request", "invalid_token"), ("request", "allowed"),
                                   ("event", "key.create")]),
        (AuditFilter(action="key.revoke"), [("event", "key.revoke")]),
        (AuditFilter(decision="invalid_token"), [("request", "invalid_token")]),
        (AuditFilter(type="event", key="kg_2"), [("event", "key.revoke")]),
        (AuditFilter(type="request", key="kg_2"), [("request", "allowed")]),
        (AuditFilter(since=T0 + timedelta(minutes=2), until=T0 + timedelta(minutes=4)),
         [("event", "role.set"), ("event", "key.revoke"), ("request", "invalid_token")]),
        (AuditFilter(action="key.revoke", decision="allowed"), []),
    ],
)
async def test_filters(store: KeyStore, wanted: AuditFilter, expected: list[tuple[str, str]]) -> None:
    """key, action, decision, type and the time range narrow the stream."""
    await fill(store)
    wanted = replace(wanted, until=wanted.until or BEFORE_SETUP)
    assert summary((await query_audit(store, wanted, limit=100)).entries) == expected

@pytest.mark.parametrize("limit", [1, 2, 4])
async def test_pages_walk_the_stream_once(store: KeyStore, limit: int) -> None:
    """Following the cursor gives every entry exactly once, even when entries arrive between pages."""
    await fill(store)
    everything = summary((await query_audit(store, ALL, limit=100)).entries)
    seen: list[tuple[str, str]] = []
    after: Position | None = None
    while True:
        page = await query_audit(store, ALL, limit=limit, after=after)
        assert len(page.entries) <= limit
        seen += summary(page.entries)
        await store.add_request_records([request(T0 + timedelta(minutes=30), decision="late")])
        if page.next is None:
            break
        after = Position.decode(page.next.encode())
    assert seen == everything

async def test_prune_deletes_only_what_is_past_retention(store: KeyStore) -> None:
    """Entries older than retention_days go, in batches; newer ones stay."""
    async with store.transaction() as tx:
        for day in range(5):
            await tx.add_audit(at=T0 - timedelta(days=10 + day), actor="a", action="key.create", target="kg_1",
                               details={})
        await tx.add_audit(at=T0 - timedelta(days=2), actor="a", action="key.revoke", target="kg_1", details={})
    await store.add_request_records([request(T0 - timedelta(days=10 + d)) for d in range(3)] +
                                    [request(T0 - timedelta(hours=1))])
    pruner = AuditPruner(store, retention_days=7, interval=3600, batch=2, clock=FakeClock(T0))
    assert await pruner.prune() == 8
    left = (await query_audit(store, ALL, limit=100)).entries
    assert summary(left) == [("request", "allowed"), ("event", "key.revoke")]
    assert await pruner.prune() == 0

async def test_retention_zero_keeps_everything(store: KeyStore) -> None:
    """retention_days = 0 means keep forever: no audit event or request record is deleted."""
    async with store.transaction() as tx:
        await tx.add_audit(at=T0 - timedelta(days=9999), actor="a", action="key.create", target="kg_1", details={})
    pruner = AuditPruner(store, retention_days=0, interval=0.01, clock=FakeClock(T0))
    await pruner.start()
    assert await pruner.prune() == 0
    await pruner.close()
    assert len((await query_audit(store, ALL, limit=10)).entries) == 1

async def test_the_periodic_task_prunes(store: KeyStore) -> None:
    """Started, the pruner deletes expired entries on its own, again after each interval."""
    pruner = AuditPruner(store, retention_days=1, interval=0.01, clock=FakeClock(T0))
    await pruner.start()
    try:
        for _ in range(2):  # once at start, and again for entries that expire later
            await store.add_request_records([request(T0 - timedelta(days=3))])
            async with asyncio.timeout(10):
                while (await query_audit(store, ALL, limit=10)).entries:
                    await asyncio.sleep(0.01)
    finally:
        await pruner.close()

async def test_expired_exchanged_tokens_are_pruned_even_when_audit_is_kept_forever(store: KeyStore) -> None:
    """The task runs with retention_days = 0 too, and forgets tokens past expiry and grace, not sooner."""
    async with store.transaction() as tx:
        await tx.claim_token("old", policy="p", at=T0, expires_at=T0 - timedelta(seconds=TOKEN_GRACE + 1))
        await tx.claim_token("recent", policy="p", at=T0, expires_at=T0 - timedelta(seconds=TOKEN_GRACE - 1))
        await tx.add_audit(at=T0 - timedelta(days=9999), actor="a", action="key.create", target="kg_1", details={})
    pruner = AuditPruner(store, retention_days=0, interval=0.01, clock=FakeClock(T0))
    await pruner.start()
    try:
        async with asyncio.timeout(10):
            while pruner.pruned == 0:
                await asyncio.sleep(0.01)
    finally:
        await pruner.close()
    async with store.transaction() as tx:
        assert await tx.claim_token("old", policy="p", at=T0, expires_at=T0) is True
        assert await tx.claim_token("recent", policy="p", at=T0, expires_at=T0) is False
    assert pruner.pruned == 1
    assert len((await query_audit(store, ALL, limit=10)).entries) == 1
