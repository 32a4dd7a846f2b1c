"""`keygate login`'s agent key through the service layer, against both stores: rotation, audit, once per ID token."""

from __future__ import annotations

from datetime import timedelta

import pytest

from gateway.manage.service import KeyService, NotFound, Replayed
from gateway.models import KeyStatus

from ...clocks import FakeClock

ISSUER = "https://login.example"


async def login(service: KeyService, clock: FakeClock, token_id: str, org: str = "acme",
                user: str = "alice@example.com"):  # type: ignore[no-untyped-def]
    return await service.login_agent_key(org, user, issuer=ISSUER, subject="u-1", token_id=token_id,
                                         token_expires_at=clock() + timedelta(minutes=5), client_ip="192.0.2.7")


async def test_signing_in_again_rotates_the_agent_key_and_each_is_audited(
    service: KeyService, clock: FakeClock,
) -> None:
    await service.put_role("dev", ["read"])
    await service.set_member("acme", "alice@example.com", "dev")
    first, _, replaced = await login(service, clock, "t1")
    assert replaced is None and first.agent and first.user == "alice@example.com"
    clock.advance(1)
    second, full, replaced = await login(service, clock, "t2")
    assert replaced == first.id and full.startswith(second.id)
    assert (await service.get_key(first.id)).status(clock()) is KeyStatus.REVOKED
    assert (await service.get_key(second.id)).status(clock()) is KeyStatus.ACTIVE
    async with service.store.read() as tx:
        events = [(e.action, e.target, e.details) for e in await tx.list_audit(limit=20)]
    assert ("key.login", second.id, {"org": "acme", "user": "alice@example.com", "replaced": first.id,
                                     "issuer": ISSUER, "subject": "u-1", "client_ip": "192.0.2.7"}) in events
    assert ("key.revoke", first.id, {"reason": "replaced by a new agent key"}) in events


async def test_an_id_token_signs_in_once_and_a_replay_writes_nothing(service: KeyService, clock: FakeClock) -> None:
    await service.put_role("dev", ["read"])
    await service.set_member("acme", "alice@example.com", "dev")
    key, _, _ = await login(service, clock, "same")
    with pytest.raises(Replayed):
        await login(service, clock, "same")
    assert [k.id for k in await service.list_keys() if k.agent] == [key.id]
    assert (await service.get_key(key.id)).status(clock()) is KeyStatus.ACTIVE


async def test_a_person_who_is_not_a_member_gets_no_key(service: KeyService, clock: FakeClock) -> None:
    with pytest.raises(NotFound, match="not a member of org 'acme'"):
        await login(service, clock, "t1", user="mallory@example.com")
    assert await service.list_keys() == []
    # The ID token was not spent by the refusal: the transaction wrote nothing.
    await service.put_role("dev", ["read"])
    await service.set_member("acme", "mallory@example.com", "dev")
    await login(service, clock, "t1", user="mallory@example.com")


async def test_member_orgs_lists_the_persons_orgs(service: KeyService) -> None:
    await service.put_role("dev", ["read"])
    for org in ("ops", "acme"):
        await service.set_member(org, "carol@example.com", "dev")
    await service.set_member("acme", "alice@example.com", "dev")
    assert await service.member_orgs("carol@example.com") == ["acme", "ops"]
    assert await service.member_orgs("nobody@example.com") == []


async def test_a_subject_no_store_can_hold_is_audited_as_it_can_be(service: KeyService, clock: FakeClock) -> None:
    """The provider chooses sub: a NUL in it (PostgreSQL's jsonb holds none) is audited as U+FFFD, not a 500."""
    await service.put_role("dev", ["read"])
    await service.set_member("acme", "alice@example.com", "dev")
    key, _, _ = await service.login_agent_key(
        "acme", "alice@example.com", issuer=ISSUER, subject="u\x001", token_id="t-nul",
        token_expires_at=clock() + timedelta(minutes=5), client_ip=None)
    async with service.store.read() as tx:
        (event,) = [e for e in await tx.list_audit(limit=20) if e.target == key.id]
    assert event.details["subject"] == "u\ufffd1"
