"""Key management through the service layer, against both stores."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from gateway.keys import KeyParser
from gateway.models import KeyStatus
from gateway.manage.service import ConflictError, InvalidInput, KeyService, NotFound, resolve_pepper
from gateway.store import KeyStore

from ...clocks import FakeClock

PARSER = KeyParser(["kg_", "kga_"])


async def actions(store: KeyStore, key_id: str) -> list[str]:
    async with store.read() as tx:
        return [e.action for e in await tx.list_audit(key=key_id)]


async def test_create_returns_the_key_once_and_stores_only_a_hash(service: KeyService, store: KeyStore) -> None:
    """The full key verifies against the stored hash, which is not the secret."""
    record, full = await service.create_key(name="ci", operations=["deploy"], servers=["prod-1"],
                                            ip_allowlist=["10.0.0.0/8"], rate_limit="100/minute", expires="30d")
    parsed = PARSER.parse(full)
    assert parsed.key_id == record.id and record.id.startswith("kg_")
    stored = await store.get_key(record.id)
    assert stored is not None and parsed.secret not in stored.secret_hash
    assert service.hasher.verify(stored.secret_hash, parsed.secret)
    assert stored.public(service.clock())["status"] == "active"
    assert "secret_hash" not in stored.public(service.clock())
    assert stored.expires_at == service.clock() + timedelta(days=30)
    assert await actions(store, record.id) == ["key.create"]


async def test_servers_default_to_everything(service: KeyService) -> None:
    """No servers means every upstream ('*'); a value given twice counts once."""
    everywhere, _ = await service.create_key(name="ci", role="admin")
    listed, _ = await service.create_key(name="ci", operations=["read", "read"],
                                         servers=["prod-1", "prod-1", "prod-2"],
                                         ip_allowlist=["10.1.2.3/8", "10.0.0.0/8"])
    assert everywhere.servers == ("*",)
    assert (listed.operations, listed.servers, listed.ip_allowlist) == (("read",), ("prod-1", "prod-2"), ("10.0.0.0/8",))
    updated = await service.update_key(listed.id, servers=[])
    assert updated.servers == ("*",)


async def test_kind_sets_the_prefix(service: KeyService) -> None:
    """An automation key gets the automation prefix."""
    record, full = await service.create_key(name="nightly", kind="automation", role="admin")
    assert record.id.startswith("kga_") and full.startswith(record.id)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "x"}, "needs a role"),
        ({"name": "x", "role": "nope"}, "no such role"),
        ({"name": "x", "kind": "nope", "role": "admin"}, "kind 'nope'"),
        ({"name": "x", "role": "admin", "ip_allowlist": ["10.0.0.0/33"]}, "allow-ip"),
        ({"name": "x", "role": "admin", "rate_limit": "lots"}, "rate-limit"),
        ({"name": "x", "role": "admin", "rate_limit": "0/minute"}, "rate-limit"),
        ({"name": "x", "role": "admin", "expires": "soon"}, "expires"),
        ({"name": "x", "role": "admin", "user": "bob"}, "not a member"),
        ({"name": "", "role": "admin"}, "name"),
    ],
)
async def test_bad_input_writes_nothing(service: KeyService, store: KeyStore, kwargs: dict, message: str) -> None:
    """Invalid settings are refused with a message naming the problem, and nothing is stored."""
    with pytest.raises(InvalidInput, match=message):
        await service.create_key(**kwargs)
    assert await service.list_keys() == []
    async with store.read() as tx:
        assert [e for e in await tx.list_audit() if e.action != "role.set"] == []


async def test_per_user_key_needs_membership(service: KeyService) -> None:
    """A per-user key can be made once the user is a member of its org."""
    await service.set_member("acme", "bob", "admin")
    record, _ = await service.create_key(name="bob's", org="acme", user="bob", operations=["read"])
    assert (record.org, record.user) == ("acme", "bob")


async def test_revoke_is_immediate_idempotent_and_audited(service: KeyService, store: KeyStore, clock: FakeClock[datetime]) -> None:
    """Revoking sets the status, a second revoke changes nothing, and both steps are audited once."""
    record, _ = await service.create_key(name="ci", role="admin")
    revoked = await service.revoke_key(record.id)
    clock.advance(minutes=1)
    again = await service.revoke_key(record.id)
    assert revoked.status(clock()) is KeyStatus.REVOKED
    assert again.revoked_at == revoked.revoked_at
    assert await actions(store, record.id) == ["key.revoke", "key.create"]
    assert await store.latest_change() >= 1


async def test_revoked_keys_cannot_be_changed(service: KeyService) -> None:
    """Revocation is permanent: updates, role changes and rotation are refused."""
    record, _ = await service.create_key(name="ci", role="admin")
    await service.revoke_key(record.id)
    with pytest.raises(ConflictError):
        await service.update_key(record.id, name="new")
    with pytest.raises(ConflictError):
        await service.set_role(record.id, "admin")
    with pytest.raises(ConflictError):
        await service.rotate_key(record.id)


async def test_unknown_ids_are_not_found(service: KeyService) -> None:
    """Every action on an unknown id says so."""
    for call in (service.get_key("kg_nope00000000"), service.revoke_key("kg_nope00000000"),
                 service.rotate_key("kg_nope00000000"), service.update_key("kg_nope00000000", name="x")):
        with pytest.raises(NotFound):
            await call


async def test_update_changes_only_what_is_given(service: KeyService, store: KeyStore) -> None:
    """An update replaces the given settings, keeps the rest and audits the difference."""
    record, _ = await service.create_key(name="ci", role="admin", operations=["deploy"], servers=["prod-1"])
    updated = await service.update_key(record.id, servers=["prod-2"], rate_limit="10/second", expires="7d")
    assert updated.servers == ("prod-2",) and updated.operations == ("deploy",) and updated.role == "admin"
    assert updated.rate_limit == "10/second"
    async with store.read() as tx:
        event = (await tx.list_audit(key=record.id, action="key.update"))[0]
    assert event.details["servers"] == {"before": ["prod-1"], "after": ["prod-2"]}
    assert "role" not in event.details


async def test_update_cannot_leave_a_key_without_access(service: KeyService) -> None:
    """Removing the role of a key without operations is refused."""
    record, _ = await service.create_key(name="ci", role="admin")
    with pytest.raises(InvalidInput, match="needs a role"):
        await service.update_key(record.id, role=None)


async def test_rotate_revokes_now_by_default(service: KeyService, store: KeyStore, clock: FakeClock[datetime]) -> None:
    """Rotation makes a new key with the same settings and revokes the old one at once."""
    old, old_full = await service.create_key(name="ci", operations=["deploy"], servers=["prod-1"],
                                             ip_allowlist=["10.0.0.0/8"], rate_limit="5/second")
    new, new_full = (await service.rotate_key(old.id))[:2]
    assert new.id != old.id and new_full != old_full
    for field in ("name", "kind", "org", "user", "role", "operations", "servers", "ip_allowlist", "rate_limit"):
        assert getattr(new, field) == getattr(old, field)
    reloaded = await store.get_key(old.id)
    assert reloaded is not None and reloaded.status(clock()) is KeyStatus.REVOKED
    assert await actions(store, old.id) == ["key.rotate", "key.create"]
    assert await actions(store, new.id) == ["key.create"]


async def test_rotate_with_grace_keeps_the_old_key_until_then(service: KeyService, store: KeyStore, clock: FakeClock[datetime]) -> None:
    """With a grace period the old key is rotating (and still works) until it ends, then revoked."""
    old, _ = await service.create_key(name="ci", role="admin")
    await service.rotate_key(old.id, grace="1h")
    reloaded = await store.get_key(old.id)
    assert reloaded is not None and reloaded.status(clock()) is KeyStatus.ROTATING
    assert [k.id for k in await service.list_keys(status="rotating")] == [old.id]
    clock.advance(hours=1)
    assert reloaded.status(clock()) is KeyStatus.REVOKED
    assert await service.list_keys(status="rotating") == []
    assert [k.id for k in await service.list_keys(status="revoked")] == [old.id]


async def test_a_rotating_key_is_not_rotated_again(service: KeyService, store: KeyStore, clock: FakeClock[datetime]) -> None:
    """Its successor exists: a second rotate is refused (409) and changes nothing; the successor rotates."""
    old, _ = await service.create_key(name="ci", role="admin")
    successor = (await service.rotate_key(old.id, grace="1h"))[0]
    clock.advance(minutes=10)
    with pytest.raises(ConflictError, match="already rotating .* rotate the key that replaced it"):
        await service.rotate_key(old.id, grace="1h")
    assert sorted(k.id for k in await service.list_keys()) == sorted([old.id, successor.id])
    assert await actions(store, old.id) == ["key.rotate", "key.create"]
    await service.rotate_key(successor.id)
    clock.advance(hours=1)
    assert [k.name for k in await service.list_keys(status="active")] == ["ci"]


async def test_rotate_refuses_a_bad_grace(service: KeyService) -> None:
    """A grace that is not a duration is refused."""
    old, _ = await service.create_key(name="ci", role="admin")
    with pytest.raises(InvalidInput, match="grace"):
        await service.rotate_key(old.id, grace="a while")


async def test_agent_key_replaces_the_previous_one(service: KeyService, store: KeyStore, clock: FakeClock[datetime]) -> None:
    """Issuing an agent key revokes the user's previous one in the same org, not in others."""
    await service.set_member("acme", "bob", "admin")
    await service.set_member("other", "bob", "admin")
    first, _, replaced = await service.issue_agent_key("acme", "bob")
    elsewhere, _, _ = await service.issue_agent_key("other", "bob")
    second, _, replaced_now = await service.issue_agent_key("acme", "bob")
    assert replaced is None and replaced_now == first.id
    assert second.agent and second.role is None and second.operations == ()
    statuses = {k.id: k.status(clock()) for k in await service.list_keys()}
    assert statuses == {first.id: KeyStatus.REVOKED, second.id: KeyStatus.ACTIVE,
                        elsewhere.id: KeyStatus.ACTIVE}


async def test_agent_key_needs_membership_and_has_no_own_role(service: KeyService) -> None:
    """Agent keys are for members only, and their role follows the member's."""
    with pytest.raises(NotFound, match="not a member"):
        await service.issue_agent_key("acme", "bob")
    await service.set_member("acme", "bob", "admin")
    record, _, _ = await service.issue_agent_key("acme", "bob")
    with pytest.raises(InvalidInput, match="agent key"):
        await service.set_role(record.id, "admin")


async def test_roles_lifecycle(service: KeyService, store: KeyStore) -> None:
    """Roles are set, replaced and deleted; a role in use cannot be deleted."""
    await service.put_role("ci", ["deploy", "servers:read"])
    role = await service.put_role("ci", ["deploy"])
    assert role.grants == ("deploy",)
    record, _ = await service.create_key(name="ci", role="ci")
    with pytest.raises(ConflictError, match="in use"):
        await service.delete_role("ci")
    await service.revoke_key(record.id)
    await service.delete_role("ci")
    with pytest.raises(NotFound):
        await service.get_role("ci")
    async with store.read() as tx:
        assert [e.action for e in await tx.list_audit(key="ci")] == ["role.delete", "role.set", "role.set"]


async def test_admin_role_cannot_be_deleted(service: KeyService) -> None:
    """The built-in admin role is permanent."""
    with pytest.raises(ConflictError):
        await service.delete_role("admin")


async def test_set_role_checks_the_role(service: KeyService) -> None:
    """A key can only be given an existing role."""
    record, _ = await service.create_key(name="ci", role="admin")
    with pytest.raises(InvalidInput, match="no such role"):
        await service.set_role(record.id, "ghost")
    await service.put_role("ci", ["deploy"])
    assert (await service.set_role(record.id, "ci")).role == "ci"


async def test_members_lifecycle(service: KeyService, store: KeyStore) -> None:
    """Members are set with an existing role, changed, listed and removed, each audited."""
    with pytest.raises(InvalidInput):
        await service.set_member("acme", "bob", "ghost")
    await service.set_member("acme", "bob", "admin")
    await service.put_role("dev", ["read"])
    await service.set_member("acme", "bob", "dev")
    assert [(m.user, m.role) for m in await service.list_members("acme")] == [("bob", "dev")]
    await service.remove_member("acme", "bob")
    assert await service.list_members("acme") == []
    with pytest.raises(NotFound):
        await service.remove_member("acme", "bob")
    async with store.read() as tx:
        assert [e.action for e in await tx.list_audit(key="acme/bob")] == ["member.remove", "member.set", "member.set"]


async def test_actor_is_recorded(service: KeyService, store: KeyStore) -> None:
    """Audit events and created_by name the actor."""
    record, _ = await service.create_key(name="ci", role="admin")
    assert record.created_by == "test:alice"
    async with store.read() as tx:
        assert (await tx.list_audit(key=record.id))[0].actor == "test:alice"


async def test_generated_pepper_is_stable(store: KeyStore, settings) -> None:
    """Without a configured pepper one is generated into the store once and reused."""
    first = await resolve_pepper(store, settings)
    assert len(first) >= 32 and await resolve_pepper(store, settings) == first


async def test_admin_role_cannot_be_narrowed(service: KeyService) -> None:
    """The built-in admin role keeps granting '*': setting it is refused."""
    with pytest.raises(ConflictError, match="admin"):
        await service.put_role("admin", ["read"])
    assert (await service.get_role("admin")).grants == ("*",)


async def test_new_agent_key_replaces_one_in_its_grace_period(service: KeyService, clock: FakeClock[datetime]) -> None:
    """An agent key rotated with a grace period is replaced too when a new agent key is issued."""
    await service.set_member("acme", "bob", "admin")
    first, _, _ = await service.issue_agent_key("acme", "bob")
    rotated, _, _ = await service.rotate_key(first.id, grace="1h")
    newest, _, _ = await service.issue_agent_key("acme", "bob")
    active = [k.id for k in await service.list_keys(user="bob", status="active")]
    assert active == [newest.id]
    assert rotated.id != newest.id


async def test_pasted_full_key_names_its_key(service: KeyService) -> None:
    """Every action that takes an id also takes the full key, as people paste it."""
    record, full = await service.create_key(name="ci", role="admin")
    assert (await service.get_key(full)).id == record.id
    assert (await service.revoke_key(full)).id == record.id


async def test_unknown_full_key_is_not_echoed(service: KeyService) -> None:
    """The not-found message names an id-shaped argument, and never anything longer."""
    with pytest.raises(NotFound) as missing:
        await service.get_key("kg_" + "A" * 50)
    assert "AAAAAAAAAAAAAAAA" not in str(missing.value)


class _FailingAudit:
    """A store whose transactions fail when the audit event is written."""

    def __init__(self, store: KeyStore) -> None:
        self._store = store

    def transaction(self):  # type: ignore[no-untyped-def]
        store = self._store

        class _Tx:
            async def __aenter__(self):  # type: ignore[no-untyped-def]
                self._cm = store.transaction()
                self._tx = await self._cm.__aenter__()
                return self

            async def __aexit__(self, *exc):  # type: ignore[no-untyped-def]
                return await self._cm.__aexit__(*exc)

            def __getattr__(self, name):  # type: ignore[no-untyped-def]
                if name == "add_audit":
                    async def fail(**_kwargs):  # type: ignore[no-untyped-def]
                        raise RuntimeError("audit write failed")
                    return fail
                return getattr(self._tx, name)

        return _Tx()

    def __getattr__(self, name):  # type: ignore[no-untyped-def]
        return getattr(self._store, name)


async def test_no_change_without_its_audit_event(store: KeyStore, settings, clock: FakeClock[datetime]) -> None:
    """When the audit event cannot be written, the change it describes is not made either."""
    failing = KeyService(_FailingAudit(store), settings, actor="test", clock=clock)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError):
        await failing.create_key(name="ci", role="admin")
    with pytest.raises(RuntimeError):
        await failing.set_member("acme", "bob", "admin")
    plain = KeyService(store, settings, actor="test", clock=clock)
    assert await plain.list_keys() == []
    assert await plain.list_members("acme") == []


async def test_the_cli_acts_in_every_org_and_its_events_name_the_org_they_are_about(
    service: KeyService, store: KeyStore,
) -> None:
    """The operator at the command line is bounded by no org; events name the org and no actor org."""
    await service.put_role("wide", ["*"])
    record, _ = await service.create_key(name="ci", org="globex", role="wide", servers=["*", "admin"])
    await service.set_member("initech", "bob", "wide")
    await service.revoke_key(record.id)
    async with store.read() as tx:
        events = [e for e in await tx.list_audit() if e.actor != "system:migrate"]
    assert [(e.action, e.target, e.org, e.actor_org) for e in events] == [
        ("key.revoke", record.id, "globex", None), ("member.set", "initech/bob", "initech", None),
        ("key.create", record.id, "globex", None), ("role.set", "wide", None, None),
    ]
    assert await service.list_orgs() == ["globex", "initech"]
