"""The webhook outbox and the hygiene columns of keys: every case runs against SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from gateway.models import KeyRecord, KeyStatus
from gateway.store import KeyStore

T0 = datetime(2026, 12, 1, 12, 0, 0, 250000, tzinfo=UTC)
HOOK = "https://hooks.example/keygate"


def a_key(key_id: str = "kg_AAAAAAAAAAAA", **changes: object) -> KeyRecord:
    record = KeyRecord(
        id=key_id, kind="integration", name="ci", org="acme", user="", role="admin", operations=(),
        servers=("*",), ip_allowlist=(), rate_limit=None, created_by="test", created_at=T0, expires_at=None,
        revoked_at=None, last_used_at=None, last_used_ip=None, secret_hash="$argon2id$x",
    )
    return replace(record, **changes)  # type: ignore[arg-type]


async def test_hygiene_fields_round_trip(store: KeyStore) -> None:
    """canary, leaked_at, idle_notified_at and expiry_warned_for are stored and saved."""
    record = a_key(canary=True, leaked_at=T0, idle_notified_at=T0 + timedelta(seconds=1),
                   expiry_warned_for=T0 + timedelta(days=30))
    async with store.transaction() as tx:
        await tx.insert_key(record)
    async with store.read() as tx:
        loaded = await tx.get_key(record.id)
    assert loaded is not None
    assert (loaded.canary, loaded.leaked_at, loaded.idle_notified_at, loaded.expiry_warned_for) == (
        True, T0, T0 + timedelta(seconds=1), T0 + timedelta(days=30))
    cleared = replace(loaded, leaked_at=None, idle_notified_at=None, expiry_warned_for=None)
    async with store.transaction() as tx:
        await tx.save_key(cleared)
        again = await tx.get_key(record.id)
    assert again is not None and (again.leaked_at, again.idle_notified_at, again.expiry_warned_for) == (None,) * 3
    assert again.canary  # save_key never changes what a key is


@pytest.mark.parametrize(("last_used", "status", "listed"), [
    (None, KeyStatus.IDLE, True),                     # created 91 days ago, never used
    (timedelta(days=89), KeyStatus.IDLE, False),      # used 2 days ago
    (timedelta(days=1), KeyStatus.IDLE, True),        # used 90 days ago: idle from that instant
    (timedelta(days=89), KeyStatus.ACTIVE, True),
    (None, KeyStatus.ACTIVE, False),
])
async def test_idle_status_filter(store: KeyStore, last_used: timedelta | None, status: KeyStatus,
                                  listed: bool) -> None:
    """With idle_after, `active` and `idle` split the live keys by their last use (or creation)."""
    now = T0 + timedelta(days=91)
    record = a_key(last_used_at=None if last_used is None else T0 + last_used)
    async with store.transaction() as tx:
        await tx.insert_key(record)
        found = await tx.list_keys(now=now, status=status, idle_after=90 * 86400)
    assert [k.id for k in found] == ([record.id] if listed else [])
    assert (record.status(now, 90 * 86400) is status) is listed


async def test_idle_status_without_idle_after_lists_nothing(store: KeyStore) -> None:
    """While idleness is off no key is idle, however old."""
    async with store.transaction() as tx:
        await tx.insert_key(a_key())
        assert await tx.list_keys(now=T0 + timedelta(days=3650), status=KeyStatus.IDLE) == []
        assert len(await tx.list_keys(now=T0 + timedelta(days=3650), status=KeyStatus.ACTIVE)) == 1


async def _queue(store: KeyStore, count: int, at: datetime = T0) -> None:
    async with store.transaction() as tx:
        for n in range(count):
            await tx.enqueue_webhook(url=HOOK, event="key.revoked", key_id=f"kg_{n:012d}", body=f'{{"n":{n}}}',
                                     at=at)


async def test_claim_takes_due_deliveries_oldest_first_and_leases_them(store: KeyStore) -> None:
    """A claim returns due rows oldest first; until the lease ends nobody claims them again."""
    await _queue(store, 3)
    lease = T0 + timedelta(seconds=60)
    async with store.transaction() as tx:
        first = await tx.claim_webhooks(now=T0, lease_until=lease, limit=2)
    assert [d.body for d in first] == ['{"n":0}', '{"n":1}']
    assert all(d.attempts == 0 and d.url == HOOK and d.event == "key.revoked" for d in first)
    async with store.transaction() as tx:
        second = await tx.claim_webhooks(now=T0 + timedelta(seconds=1), lease_until=lease, limit=10)
        assert [d.body for d in second] == ['{"n":2}']
        assert await tx.claim_webhooks(now=T0 + timedelta(seconds=59), lease_until=lease, limit=10) == []
        # The lease ran out (the deliverer died): due again.
        again = await tx.claim_webhooks(now=lease, lease_until=lease + timedelta(seconds=60), limit=10)
    assert [d.body for d in again] == ['{"n":0}', '{"n":1}', '{"n":2}']


async def test_delivered_failed_and_abandoned(store: KeyStore) -> None:
    """A delivered row is done; a failure is due again at its retry time; an abandoned one never."""
    await _queue(store, 3)
    async with store.transaction() as tx:
        a, b, c = await tx.claim_webhooks(now=T0, lease_until=T0 + timedelta(seconds=60), limit=10)
        await tx.webhook_delivered(a.id, at=T0, attempts=1)
        await tx.webhook_failed(b.id, attempts=1, error="HTTP 500", retry_at=T0 + timedelta(seconds=2), at=T0)
        await tx.webhook_failed(c.id, attempts=9, error="refused", retry_at=None, at=T0)
        assert await tx.webhook_backlog() == 1
        due = await tx.claim_webhooks(now=T0 + timedelta(seconds=2), lease_until=T0 + timedelta(seconds=62),
                                      limit=10)
        assert [(d.id, d.attempts, d.last_error) for d in due] == [(b.id, 1, "HTTP 500")]
        done = {d.id: d for d in await tx.list_webhooks(pending=False)}
    assert done[a.id].delivered_at == T0 and done[c.id].abandoned_at == T0 and done[c.id].attempts == 9
    assert set(done) == {a.id, c.id}


async def test_prune_removes_only_finished_deliveries(store: KeyStore) -> None:
    """Pruning deletes delivered and abandoned rows older than the cut, never pending ones."""
    await _queue(store, 3)
    async with store.transaction() as tx:
        a, b, _ = await tx.claim_webhooks(now=T0, lease_until=T0, limit=10)
        await tx.webhook_delivered(a.id, at=T0, attempts=1)
        await tx.webhook_failed(b.id, attempts=3, error="x", retry_at=None, at=T0 + timedelta(days=2))
        assert await tx.prune_webhooks(older_than=T0 + timedelta(days=1), batch=100) == 1
        left = await tx.list_webhooks()
    assert sorted(d.body for d in left) == ['{"n":1}', '{"n":2}']


async def test_concurrent_claims_never_share_a_delivery(store: KeyStore) -> None:
    """Two deliverers claiming at once (workers, replicas) split the rows: none is claimed twice."""
    await _queue(store, 40)

    claimed: list[int] = []

    async def claim() -> list[int]:
        # A claim that lost a race for its rows may come back short or empty: go on until all are taken.
        got: list[int] = []
        for _ in range(200):
            if len(claimed) >= 40:
                break
            async with store.transaction() as tx:
                ids = [d.id for d in await tx.claim_webhooks(
                    now=T0, lease_until=T0 + timedelta(minutes=5), limit=3)]
            got += ids
            claimed.extend(ids)
            await asyncio.sleep(0)
        return got

    first, second = await asyncio.gather(claim(), claim())
    assert not set(first) & set(second)
    assert len(first) + len(second) == 40
