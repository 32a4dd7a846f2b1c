"""Key events queued for webhooks by the service, in the action's own transaction (both stores)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import pytest

from gateway.config.schema import Settings
from gateway.manage.service import KeyService, NotFound
from gateway.models import iso
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


def events_of(rows: list[tuple[str, str, dict]], url: str = ALL) -> list[tuple[str, str, dict]]:
    """(event, key id, details) of what was queued for ``url``, oldest first."""
    return [(body["event"], body["key_id"], body["details"]) for hook, _, body in rows if hook == url]


async def test_rotate_announces_the_new_key_and_the_old_ones_revocation(
    hooked: KeyService, store: KeyStore, clock: FakeClock[datetime],
) -> None:
    """Rotating without grace: key.created for the new key, key.revoked for the old one, effective now."""
    old, _ = await hooked.create_key(name="ci", role="admin")
    new, _, _ = await hooked.rotate_key(old.id)
    rows = await queued(store)
    assert events_of(rows)[1:] == [
        ("key.created", new.id, {"actor": "test:alice", "rotated_from": old.id}),
        ("key.revoked", old.id, {"actor": "test:alice", "reason": "rotated", "replaced_by": new.id,
                                 "revoke_at": iso(clock())}),
    ]
    assert rows[-1][2]["key"]["status"] == "revoked"


async def test_a_rotate_grace_announces_the_revocation_at_the_rotate_with_its_time(
    hooked: KeyService, store: KeyStore, clock: FakeClock[datetime],
) -> None:
    """With a grace, key.revoked is sent at the rotate; details.revoke_at says when it takes effect."""
    old, _ = await hooked.create_key(name="ci", role="admin")
    new, _, _ = await hooked.rotate_key(old.id, grace="1h")
    revoked = [body for hook, event, body in await queued(store) if hook == LEAKS and event == "key.revoked"]
    assert [(b["key_id"], b["details"]["revoke_at"], b["key"]["status"]) for b in revoked] == [
        (old.id, iso(clock() + timedelta(hours=1)), "rotating")]
    assert revoked[0]["key"]["revoked_at"] == iso(clock() + timedelta(hours=1))


async def test_agent_keys_announce_the_new_key_and_the_one_it_replaces(
    hooked: KeyService, store: KeyStore, clock: FakeClock[datetime],
) -> None:
    """Issuing an agent key is key.created; issuing another revokes the first: key.revoked, then key.created."""
    await hooked.set_member("acme", "alice", "admin")
    first, _, _ = await hooked.issue_agent_key("acme", "alice")
    clock.advance(1)
    second, _, _ = await hooked.issue_agent_key("acme", "alice")
    assert events_of(await queued(store)) == [
        ("key.created", first.id, {"actor": "test:alice"}),
        ("key.revoked", first.id, {"actor": "test:alice", "reason": "replaced by a new agent key"}),
        ("key.created", second.id, {"actor": "test:alice", "replaced": first.id}),
    ]


async def test_signing_in_announces_the_agent_key(
    hooked: KeyService, store: KeyStore, clock: FakeClock[datetime],
) -> None:
    """`keygate login`'s agent key is key.created like any other."""
    await hooked.set_member("acme", "alice", "admin")
    record, _, _ = await hooked.login_agent_key("acme", "alice", issuer="https://login.example", subject="u-1",
                                                token_id="t1", token_expires_at=clock() + timedelta(minutes=5),
                                                client_ip="192.0.2.7")
    assert events_of(await queued(store)) == [("key.created", record.id, {"actor": "test:alice"})]


async def test_a_key_minted_by_the_token_exchange_is_announced(
    hooked: KeyService, store: KeyStore, clock: FakeClock[datetime],
) -> None:
    """A key minted for an exchanged OIDC token is key.created, naming its trust policy."""
    policy = await hooked.put_trust_policy(
        "shop-deploy", issuer="https://token.actions.githubusercontent.com", audience="https://keygate.example",
        conditions={"repository": "acme/shop"}, org="acme", role="admin", operations=[], servers=[],
        ip_allowlist=[], rate_limit=None, lifetime="15m")
    record, _ = await hooked.exchange_token(policy, {"repository": "acme/shop", "sub": "repo:acme/shop"},
                                            token_id="t1", token_expires_at=clock() + timedelta(minutes=5),
                                            client_ip="203.0.113.9")
    [(event, key_id, details)] = events_of(await queued(store))
    assert (event, key_id, details) == ("key.created", record.id, {"actor": "test:alice", "policy": "shop-deploy"})
    assert (await queued(store))[0][2]["key"]["kind"] == "automation"
