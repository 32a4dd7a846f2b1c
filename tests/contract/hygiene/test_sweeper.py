"""Idle and expiring keys: the sweeper's store queries and events, against both stores, on a test clock."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta

import pytest

from gateway.config.schema import Settings
from gateway.hygiene.sweeper import HygieneSweeper, Swept
from gateway.manage.service import InvalidInput, KeyService
from gateway.store import KeyStore

from ...clocks import FakeClock

HOOK = "https://hooks.example/all"
DAY = 86400


def hygiene_settings(**keys: object) -> Settings:
    return Settings.model_validate({
        "keys": {"argon2": {"time_cost": 1, "memory_cost": 1024, "parallelism": 1}, **keys},
        "webhooks": [{"url": HOOK, "secret": "s" * 16}],
    })


async def events(store: KeyStore, key_id: str, action: str) -> list[dict]:
    async with store.read() as tx:
        return [e.details for e in await tx.list_audit(key=key_id, action=action)]


async def webhooks(store: KeyStore, event: str) -> list[dict]:
    async with store.read() as tx:
        return [json.loads(d.body) for d in await tx.list_webhooks() if d.event == event]


def sweeper(store: KeyStore, settings: Settings, clock: FakeClock[datetime]) -> HygieneSweeper:
    return HygieneSweeper(store, settings, clock=clock)


# -- idle ----------------------------------------------------------------------------------------

async def test_a_key_unused_for_idle_after_is_announced_once_per_idle_spell(
    store: KeyStore, clock: FakeClock[datetime],
) -> None:
    """key.idle (audit and webhook) once when the key falls idle, again only after a use and a new idle spell."""
    settings = hygiene_settings(idle_after="30d")
    service = KeyService(store, settings, actor="test:alice", clock=clock)
    record, _ = await service.create_key(name="ci", role="admin")
    sweep = sweeper(store, settings, clock)
    clock.advance(days=29)
    assert await sweep.sweep() == Swept(0, 0)
    clock.advance(days=1)
    assert await sweep.sweep() == Swept(1, 0)
    assert await sweep.sweep() == Swept(0, 0)  # announced: not again
    async with store.read() as tx:  # nor a candidate any more (else it would fill every batch)
        assert await tx.idle_keys(now=clock.now, idle_after=30 * DAY, limit=10) == []
    stored = await store.get_key(record.id)
    assert stored is not None and stored.idle_notified_at == clock.now and stored.expires_at is None
    assert stored.public(clock.now, settings.keys.idle_after)["status"] == "idle"
    [details] = await events(store, record.id, "key.idle")
    assert details["idle_action"] == "flag" and details["unused_for"] == 30 * DAY
    [body] = await webhooks(store, "key.idle")
    assert body["key_id"] == record.id and body["key"]["status"] == "idle"
    # Used again: a new spell, announced when it too has lasted idle_after.
    await store.record_usage([(record.id, clock.now + timedelta(hours=1), "10.0.0.1")])
    clock.advance(days=30)
    assert await sweep.sweep() == Swept(0, 0)
    clock.advance(hours=1)
    assert await sweep.sweep() == Swept(1, 0)
    assert len(await events(store, record.id, "key.idle")) == 2


@pytest.mark.parametrize(
    ("kind", "announced"),
    [("used recently", False), ("revoked", False), ("expired", False), ("canary", False), ("idle", True)],
)
async def test_which_keys_are_idle(store: KeyStore, clock: FakeClock[datetime], kind: str, announced: bool) -> None:
    """Only live keys unused for idle_after are idle: not revoked, expired or canary keys, nor ones used since."""
    settings = hygiene_settings(idle_after="7d", expiry_warning=0)
    service = KeyService(store, settings, actor="test:alice", clock=clock)
    record, _ = await (service.create_key(name="decoy", canary=True) if kind == "canary"
                       else service.create_key(name=kind, role="admin", expires="8d" if kind == "expired" else "never"))
    if kind == "revoked":
        await service.revoke_key(record.id)
    clock.advance(days=7)
    if kind == "used recently":
        await store.record_usage([(record.id, clock.now - timedelta(days=1), None)])
    if kind == "expired":
        clock.advance(days=2)
    async with store.read() as tx:
        candidates = await tx.idle_keys(now=clock.now, idle_after=7 * DAY, limit=10)
    assert (candidates == [record.id]) is announced
    assert await sweeper(store, settings, clock).sweep() == Swept(int(announced), 0)


async def test_idle_action_expire_expires_the_key_through_the_change_feed(
    store: KeyStore, clock: FakeClock[datetime],
) -> None:
    """With idle_action = "expire" the idle key's expires_at becomes now, audited and in the change feed."""
    settings = hygiene_settings(idle_after="90d", idle_action="expire")
    service = KeyService(store, settings, actor="test:alice", clock=clock)
    record, _ = await service.create_key(name="ci", role="admin", expires="1y")
    before = await store.latest_change()
    clock.advance(days=90)
    assert await sweeper(store, settings, clock).sweep() == Swept(1, 0)
    stored = await store.get_key(record.id)
    assert stored is not None and stored.expires_at == clock.now
    assert stored.public(clock.now, settings.keys.idle_after)["status"] == "expired"
    assert [d["reason"] for d in await events(store, record.id, "key.expire")] == ["idle"]
    assert (await events(store, record.id, "key.idle"))[0]["idle_action"] == "expire"
    assert [(e, t) for _, e, t, _at in await store.changes_since(before)] == [("key", record.id)]


async def test_list_and_status_idle(store: KeyStore, clock: FakeClock[datetime]) -> None:
    """--status idle lists the idle keys (never canaries), active the others; refused while idle_after is 0."""
    settings = hygiene_settings(idle_after="1d")
    service = KeyService(store, settings, actor="test:alice", clock=clock)
    old, _ = await service.create_key(name="old", role="admin")
    decoy, _ = await service.create_key(name="decoy", canary=True)
    clock.advance(days=2)
    new, _ = await service.create_key(name="new", role="admin")
    assert [r.id for r in await service.list_keys(status="idle")] == [old.id]
    assert {r.id for r in await service.list_keys(status="active")} == {new.id, decoy.id}
    off = KeyService(store, hygiene_settings(), actor="test:alice", clock=clock)
    with pytest.raises(InvalidInput, match="keys.idle_after is 0"):
        await off.list_keys(status="idle")


# -- expiring --------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("expires", "advance_days", "warned"),
    [
        ("30d", 22, False),   # 8 days left: not yet
        ("30d", 23, True),    # 7 days left
        ("30d", 31, False),   # already expired
        ("5d", 0, False),     # made to live less than the warning: never
        ("never", 400, False),
    ],
)
async def test_which_keys_are_warned_of_their_expiry(
    store: KeyStore, clock: FakeClock[datetime], expires: str, advance_days: int, warned: bool,
) -> None:
    """key.expiring goes to keys expiring within expiry_warning that were made to live longer than it."""
    settings = hygiene_settings(expiry_warning="7d")
    service = KeyService(store, settings, actor="test:alice", clock=clock)
    record, _ = await service.create_key(name="ci", role="admin", expires=expires)
    clock.advance(days=advance_days)
    async with store.read() as tx:
        assert (await tx.expiring_keys(now=clock.now, warning=7 * DAY, limit=10) == [record.id]) is warned
    assert await sweeper(store, settings, clock).sweep() == Swept(0, int(warned))


async def test_a_new_expiry_is_warned_of_again(store: KeyStore, clock: FakeClock[datetime]) -> None:
    """key.expiring once per expires_at: a sweep later says nothing, an extended expiry warns anew."""
    settings = hygiene_settings(expiry_warning="7d")
    service = KeyService(store, settings, actor="test:alice", clock=clock)
    record, _ = await service.create_key(name="ci", role="admin", expires="30d")
    sweep = sweeper(store, settings, clock)
    clock.advance(days=25)
    assert await sweep.sweep() == Swept(0, 1)
    clock.advance(days=1)
    assert await sweep.sweep() == Swept(0, 0)
    async with store.read() as tx:  # warned: no longer a candidate
        assert await tx.expiring_keys(now=clock.now, warning=7 * DAY, limit=10) == []
    await service.update_key(record.id, expires="10d")
    clock.advance(days=3)
    assert await sweep.sweep() == Swept(0, 1)
    details = await events(store, record.id, "key.expiring")
    assert [d["expires_in"] for d in reversed(details)] == [5 * DAY, 7 * DAY]
    [first, second] = sorted(await webhooks(store, "key.expiring"), key=lambda b: b["time"])
    assert first["details"]["expires_at"] != second["details"]["expires_at"]


# -- several sweepers ----------------------------------------------------------------------

async def test_concurrent_sweepers_send_each_event_once(store: KeyStore, clock: FakeClock[datetime]) -> None:
    """Two sweepers (two workers or replicas) at once: every key is announced once, by one of them."""
    settings = hygiene_settings(idle_after="30d", expiry_warning="7d", idle_action="expire")
    service = KeyService(store, settings, actor="test:alice", clock=clock)
    idle = [(await service.create_key(name=f"idle-{i}", role="admin"))[0].id for i in range(6)]
    clock.advance(days=25)
    expiring = [(await service.create_key(name=f"exp-{i}", role="admin", expires="8d"))[0].id for i in range(6)]
    clock.advance(days=5)  # idle ones 30 days unused; expiring ones 3 days from expiry
    first, second = sweeper(store, settings, clock), sweeper(store, settings, clock)
    first.batch = second.batch = 2  # several batches each, interleaved
    results = await asyncio.gather(first.sweep(), second.sweep())
    assert sum(r.idle for r in results) == len(idle)
    assert sum(r.expiring for r in results) == len(expiring)
    for key_id in idle:
        assert len(await events(store, key_id, "key.idle")) == 1
        assert len(await events(store, key_id, "key.expire")) == 1
    for key_id in expiring:
        assert len(await events(store, key_id, "key.expiring")) == 1
    assert len(await webhooks(store, "key.idle")) == len(idle)
    assert len(await webhooks(store, "key.expiring")) == len(expiring)
