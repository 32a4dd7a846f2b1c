"""Key events queued for webhooks by the service, in the action's own transaction (both stores)."""

from __future__ import annotations

import json
from datetime import datetime

import pytest

from gateway.config.schema import Settings
from gateway.manage.service import KeyService, NotFound
from gateway.store import KeyStore

from ...clocks import FakeClock

ALL = "https://hooks.example/all"
LEAKS = "https://hooks.example/leaks"


@pytest.fixture
def hooked(store: KeyStore, clock: FakeClock[datetime]) -> KeyService:
    settings = Settings(webhooks=[
        {"url": ALL, "secret": "s" * 16},
        {"url": LEAKS, "secret": "t" * 16, "events": ["key.leaked", "key.revoked"]},
    ])
    return KeyService(store, settings, actor="test:alice", clock=clock)


async def queued(store: KeyStore) -> list[tuple[str, str, dict]]:
    async with store.read() as tx:
        rows = await tx.list_webhooks()
    return [(d.url, d.event, json.loads(d.body)) for d in reversed(rows)]


async def test_create_and_revoke_queue_events_for_the_webhooks_that_asked(hooked: KeyService, store: KeyStore) -> None:
    """key.created goes to the webhook of every event; key.revoked to both; each body names the key."""
    record, full = await hooked.create_key(name="ci", role="admin")
    await hooked.revoke_key(record.id)
    rows = await queued(store)
    assert [(url, event) for url, event, _ in rows] == [
        (ALL, "key.created"), (ALL, "key.revoked"), (LEAKS, "key.revoked")]
    created, revoked, revoked_too = (body for _, _, body in rows)
    assert created["key_id"] == record.id and created["key"]["status"] == "active"
    assert created["event"] == "key.created" and created["time"].endswith("Z")
    assert created["details"] == {"actor": "test:alice"}
    assert revoked["key"]["status"] == "revoked"
    assert revoked == revoked_too  # one event, the same body (and id) for every webhook
    assert full not in json.dumps(rows) and "secret_hash" not in json.dumps(rows)


async def test_no_webhooks_queue_nothing(service: KeyService, store: KeyStore) -> None:
    """Without webhooks configured nothing is written to the outbox."""
    record, _ = await service.create_key(name="ci", role="admin")
    await service.revoke_key(record.id)
    assert await queued(store) == []


async def test_a_refused_action_queues_nothing(hooked: KeyService, store: KeyStore) -> None:
    """An action that fails queues no event: the event rides in the action's transaction."""
    with pytest.raises(NotFound):
        await hooked.revoke_key("kg_AAAAAAAAAAAA")
    record, _ = await hooked.create_key(name="ci", role="admin")
    await hooked.revoke_key(record.id)
    await hooked.revoke_key(record.id)  # revoking a revoked key changes nothing, says nothing
    assert [event for _, event, _ in await queued(store)] == ["key.created", "key.revoked", "key.revoked"]
