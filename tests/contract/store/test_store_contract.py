"""The store contract: every case runs unchanged against SQLite and PostgreSQL."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from gateway.models import KeyRecord, KeyStatus, Member, RequestRecord, Role
from gateway.store import Conflict, KeyStore

T0 = datetime(2026, 11, 22, 12, 0, 0, 500000, tzinfo=UTC)


def a_key(key_id: str = "kg_AAAAAAAAAAAA", **changes: object) -> KeyRecord:
    record = KeyRecord(
        id=key_id, kind="integration", name="ci deploy", org="acme", user="", role="admin",
        operations=("deploy", "servers:read"), servers=("prod-1", "prod-2"),
        ip_allowlist=("10.0.0.0/8", "2001:db8::/32"), rate_limit="100/minute", created_by="test",
        created_at=T0, expires_at=T0 + timedelta(days=30), revoked_at=None, last_used_at=None,
        last_used_ip=None, agent=False, secret_hash="$argon2id$fake",
    )
    return replace(record, **changes)  # type: ignore[arg-type]


async def test_migrate_is_idempotent(store: KeyStore) -> None:
    """Migrating an up-to-date store applies nothing and leaves nothing pending."""
    assert await store.migrate() == []
    assert await store.pending_migrations() == []


async def test_key_round_trips_every_field(store: KeyStore) -> None:
    """A stored key comes back equal, with timezone-aware times and its hash."""
    record = a_key()
    async with store.transaction() as tx:
        await tx.insert_key(record)
    loaded = await store.get_key(record.id)
    assert loaded == record
    assert loaded is not None and loaded.secret_hash == "$argon2id$fake"
    assert loaded.created_at.tzinfo is not None


async def test_unknown_key_is_none(store: KeyStore) -> None:
    """Looking up an id that was never stored gives None, not an error."""
    assert await store.get_key("kg_ZZZZZZZZZZZZ") is None


async def test_duplicate_id_is_a_conflict(store: KeyStore) -> None:
    """Two keys can never share an id."""
    async with store.transaction() as tx:
        await tx.insert_key(a_key())
    with pytest.raises(Conflict):
        async with store.transaction() as tx:
            await tx.insert_key(a_key(name="other"))


async def test_failed_transaction_writes_nothing(store: KeyStore) -> None:
    """An error inside a transaction rolls back everything it did."""
    with pytest.raises(RuntimeError):
        async with store.transaction() as tx:
            await tx.insert_key(a_key())
            await tx.add_audit(at=T0, actor="t", action="key.create", target="kg_AAAAAAAAAAAA", details={})
            raise RuntimeError("boom")
    assert await store.get_key("kg_AAAAAAAAAAAA") is None
    async with store.read() as tx:
        assert await tx.list_audit(key="kg_AAAAAAAAAAAA") == []


async def test_save_key_changes_only_management_fields(store: KeyStore) -> None:
    """save_key writes settings and revocation but never the hash or usage."""
    async with store.transaction() as tx:
        await tx.insert_key(a_key())
    changed = a_key(name="renamed", role=None, operations=("read",), servers=("*",), ip_allowlist=(),
                    rate_limit=None, expires_at=None, revoked_at=T0, secret_hash="$other",
                    last_used_at=T0)
    async with store.transaction() as tx:
        await tx.save_key(changed)
    loaded = await store.get_key("kg_AAAAAAAAAAAA")
    assert loaded == replace(changed, last_used_at=None)
    assert loaded is not None and loaded.secret_hash == "$argon2id$fake"


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({}, {"kg_active00001", "kg_expired0001", "kg_revoked0001", "kg_otherorg001", "kg_peruser0001"}),
        ({"org": "acme"}, {"kg_active00001", "kg_expired0001", "kg_revoked0001", "kg_peruser0001"}),
        ({"org": "acme", "user": "bob"}, {"kg_peruser0001"}),
        ({"kind": "automation"}, {"kg_otherorg001"}),
        ({"status": KeyStatus.ACTIVE}, {"kg_active00001", "kg_otherorg001", "kg_peruser0001"}),
        ({"status": KeyStatus.EXPIRED}, {"kg_expired0001"}),
        ({"status": KeyStatus.REVOKED}, {"kg_revoked0001"}),
    ],
)
async def test_list_keys_filters(store: KeyStore, filters: dict[str, object], expected: set[str]) -> None:
    """Keys are listed by org, user, kind and derived status."""
    now = T0 + timedelta(days=1)
    async with store.transaction() as tx:
        await tx.insert_key(a_key("kg_active00001"))
        await tx.insert_key(a_key("kg_expired0001", expires_at=T0 + timedelta(hours=1)))
        # Revoked (and also expired): revoked wins.
        await tx.insert_key(a_key("kg_revoked0001", revoked_at=T0, expires_at=T0))
        await tx.insert_key(a_key("kg_otherorg001", org="other", kind="automation"))
        await tx.insert_key(a_key("kg_peruser0001", user="bob"))
    async with store.read() as tx:
        found = await tx.list_keys(now=now, **filters)  # type: ignore[arg-type]
    assert {k.id for k in found} == expected


async def test_list_keys_pages_newest_first(store: KeyStore) -> None:
    """Lists come newest first and page with limit and offset."""
    async with store.transaction() as tx:
        for i in range(5):
            await tx.insert_key(a_key(f"kg_page0000000{i}"[:15], created_at=T0 + timedelta(minutes=i)))
    async with store.read() as tx:
        first = await tx.list_keys(now=T0, limit=2)
        second = await tx.list_keys(now=T0, limit=2, offset=2)
    assert [k.id for k in first] == ["kg_page00000004", "kg_page00000003"]
    assert [k.id for k in second] == ["kg_page00000002", "kg_page00000001"]


@pytest.mark.parametrize(("hours", "status", "listed"), [
    (0, KeyStatus.ROTATING, True), (0, KeyStatus.ACTIVE, False), (0, KeyStatus.IDLE, False),
    (0, KeyStatus.REVOKED, False), (2, KeyStatus.REVOKED, True), (2, KeyStatus.ROTATING, False),
])
async def test_future_revocation_is_rotating_until_then(store: KeyStore, hours: int, status: KeyStatus,
                                                         listed: bool) -> None:
    """A key revoked after a grace period is rotating (neither active nor revoked) until then, revoked after."""
    async with store.transaction() as tx:
        await tx.insert_key(a_key(revoked_at=T0 + timedelta(hours=1)))
    async with store.read() as tx:
        found = await tx.list_keys(now=T0 + timedelta(hours=hours), status=status, idle_after=3600 * 24 * 365)
    assert [k.id for k in found] == (["kg_AAAAAAAAAAAA"] if listed else [])
    assert (found[0].status(T0 + timedelta(hours=hours)) is status) if listed else True


async def test_one_unrevoked_agent_key_per_user_and_org(store: KeyStore) -> None:
    """The store itself refuses a second live agent key for the same user and org."""
    agent = a_key("kg_agent000001", user="bob", role=None, operations=(), agent=True)
    async with store.transaction() as tx:
        await tx.insert_key(agent)
    with pytest.raises(Conflict):
        async with store.transaction() as tx:
            await tx.insert_key(replace(agent, id="kg_agent000002"))
    async with store.transaction() as tx:
        await tx.save_key(replace(agent, revoked_at=T0))
        await tx.insert_key(replace(agent, id="kg_agent000002"))
        live = await tx.live_agent_keys("acme", "bob", T0 + timedelta(seconds=1))
    assert [k.id for k in live] == ["kg_agent000002"]


async def test_roles_are_created_replaced_and_deleted(store: KeyStore) -> None:
    """Roles round-trip; put replaces the grants and keeps created_at."""
    async with store.transaction() as tx:
        await tx.put_role(Role("ci", ("deploy", "read"), T0, T0))
        await tx.put_role(Role("ci", ("deploy",), T0 + timedelta(hours=1), T0 + timedelta(hours=1)))
        role = await tx.get_role("ci")
        names = [r.name for r in await tx.list_roles()]
        await tx.delete_role("ci")
        gone = await tx.get_role("ci")
    assert role == Role("ci", ("deploy",), T0, T0 + timedelta(hours=1))
    assert names == ["admin", "ci"]
    assert gone is None


async def test_builtin_admin_role_grants_everything(store: KeyStore) -> None:
    """After migration the admin role exists and grants '*'."""
    async with store.read() as tx:
        role = await tx.get_role("admin")
    assert role is not None and role.grants == ("*",)


async def test_role_users_counts_live_keys_and_members(store: KeyStore) -> None:
    """A role's users are its unrevoked keys and its members (and trust policies: test_trust_store)."""
    async with store.transaction() as tx:
        await tx.put_role(Role("ci", ("deploy",), T0, T0))
        await tx.insert_key(a_key("kg_rolekey0001", role="ci"))
        await tx.insert_key(a_key("kg_rolekey0002", role="ci", revoked_at=T0))
        await tx.put_member(Member("acme", "bob", "ci", T0, T0))
        assert await tx.role_users("ci") == (1, 1, 0)


async def test_members_round_trip(store: KeyStore) -> None:
    """Members are set, updated, listed by org and removed."""
    async with store.transaction() as tx:
        await tx.put_member(Member("acme", "bob", "admin", T0, T0))
        await tx.put_member(Member("acme", "alice", "admin", T0, T0))
        await tx.put_member(Member("other", "carol", "admin", T0, T0))
        await tx.put_role(Role("dev", ("read",), T0, T0))
        await tx.put_member(Member("acme", "bob", "dev", T0, T0 + timedelta(seconds=1)))
        listed = await tx.list_members("acme")
        await tx.delete_member("acme", "alice")
        alice = await tx.get_member("acme", "alice")
    assert [(m.user, m.role) for m in listed] == [("alice", "admin"), ("bob", "dev")]
    assert listed[1].created_at == T0
    assert alice is None


async def test_member_needs_an_existing_role(store: KeyStore) -> None:
    """A member cannot point at a role that does not exist."""
    with pytest.raises(Conflict):
        async with store.transaction() as tx:
            await tx.put_member(Member("acme", "bob", "nope", T0, T0))


async def test_audit_is_filtered_and_newest_first(store: KeyStore) -> None:
    """Audit events filter by key, action and time range and come newest first."""
    async with store.transaction() as tx:
        await tx.add_audit(at=T0, actor="a", action="key.create", target="kg_1", details={"name": "x"})
        await tx.add_audit(at=T0 + timedelta(minutes=1), actor="a", action="key.revoke", target="kg_1", details={})
        await tx.add_audit(at=T0 + timedelta(minutes=2), actor="b", action="key.create", target="kg_2", details={})
    async with store.read() as tx:
        by_key = await tx.list_audit(key="kg_1")
        by_action = await tx.list_audit(action="key.create")
        in_range = await tx.list_audit(since=T0 + timedelta(seconds=30), until=T0 + timedelta(minutes=2))
    assert [e.action for e in by_key] == ["key.revoke", "key.create"]
    assert by_key[1].details == {"name": "x"} and by_key[1].at == T0
    assert [e.target for e in by_action] == ["kg_2", "kg_1"]
    assert [e.action for e in in_range] == ["key.revoke"]


async def test_audit_events_name_their_org_and_the_actors_and_filter_by_org(store: KeyStore) -> None:
    """An event keeps the org it is about and the actor's org; org= selects the org's events only."""
    async with store.transaction() as tx:
        await tx.add_audit(at=T0, actor="kg_1", action="key.create", target="kg_2", details={}, org="acme",
                           actor_org="acme")
        await tx.add_audit(at=T0, actor="kg_9", action="key.create", target="kg_3", details={}, org="globex",
                           actor_org="default")
        await tx.add_audit(at=T0, actor="cli:root", action="role.set", target="ci", details={})
    async with store.read() as tx:
        acme = await tx.list_audit(org="acme")
        every = await tx.list_audit()
    assert [(e.target, e.org, e.actor_org) for e in acme] == [("kg_2", "acme", "acme")]
    assert {(e.target, e.org, e.actor_org) for e in every} >= {
        ("kg_2", "acme", "acme"), ("kg_3", "globex", "default"), ("ci", None, None)}


async def test_request_records_filter_by_their_keys_org(store: KeyStore) -> None:
    """org= selects the records of that org's keys; a record of no key, or of an unknown one, is no org's."""
    async with store.transaction() as tx:
        await tx.insert_key(a_key("kg_acme00000001", org="acme"))
        await tx.insert_key(a_key("kg_glob00000001", org="globex"))
    await store.add_request_records([
        RequestRecord(T0, key_id, "GET", "/", "app", "read", "allowed", 200, "10.0.0.1", 1.0)
        for key_id in ("kg_acme00000001", "kg_glob00000001", None, "kg_unknown0001")
    ])
    async with store.read() as tx:
        acme = await tx.list_requests(org="acme")
        globex = await tx.list_requests(org="globex", key_id="kg_acme00000001")
    assert [r.key_id for r in acme] == ["kg_acme00000001"]
    assert globex == []


async def test_list_orgs_names_every_org_with_keys_or_members(store: KeyStore) -> None:
    """Orgs are those that hold a key or a member, each once, by name."""
    async with store.transaction() as tx:
        await tx.insert_key(a_key("kg_acme00000001", org="acme"))
        await tx.insert_key(a_key("kg_acme00000002", org="acme"))
        await tx.put_member(Member("initech", "bob", "admin", T0, T0))
        await tx.put_member(Member("acme", "alice", "admin", T0, T0))
        assert await tx.list_orgs() == ["acme", "initech"]


async def test_last_used_never_goes_backwards(store: KeyStore) -> None:
    """A late usage batch cannot move last_used_at (or its IP) back in time."""
    async with store.transaction() as tx:
        await tx.insert_key(a_key())
    await store.record_usage([("kg_AAAAAAAAAAAA", T0 + timedelta(minutes=5), "10.0.0.5")])
    await store.record_usage([("kg_AAAAAAAAAAAA", T0 + timedelta(minutes=1), "10.0.0.1")])
    loaded = await store.get_key("kg_AAAAAAAAAAAA")
    assert loaded is not None
    assert (loaded.last_used_at, loaded.last_used_ip) == (T0 + timedelta(minutes=5), "10.0.0.5")
    await store.record_usage([("kg_AAAAAAAAAAAA", T0 + timedelta(minutes=9), "10.0.0.9")])
    loaded = await store.get_key("kg_AAAAAAAAAAAA")
    assert loaded is not None
    assert (loaded.last_used_at, loaded.last_used_ip) == (T0 + timedelta(minutes=9), "10.0.0.9")


async def test_request_records_round_trip(store: KeyStore) -> None:
    """Request records are written in batches and read back newest first."""
    records = [
        RequestRecord(T0 + timedelta(seconds=i), "kg_AAAAAAAAAAAA", "POST", "/deploy", "prod-1", "deploy",
                      "allowed" if i else "denied", 200 if i else 403, "10.0.0.1", 1.5 * i,
                      None if i else "insufficient_scope")
        for i in range(3)
    ]
    await store.add_request_records(records)
    async with store.read() as tx:
        loaded = await tx.list_requests(key_id="kg_AAAAAAAAAAAA")
    assert [r._replace(id=0) for r in loaded] == list(reversed(records))
    assert len({r.id for r in loaded}) == 3 and all(r.id > 0 for r in loaded)


async def test_a_large_batch_of_request_records_is_written_whole_and_in_order(store: KeyStore) -> None:
    """A flush's worth (several SQLite statements of many rows each): every record, every field, in order."""
    records = [
        RequestRecord(T0 + timedelta(milliseconds=i), f"kg_{i % 7:012d}", "GET", f"/p/{i}", "app", "read",
                      "allowed" if i % 3 else "denied", 200 if i % 3 else 401, f"10.0.{i % 256}.1", i / 8,
                      None if i % 3 else "invalid_token")
        for i in range(1234)
    ]
    await store.add_request_records(records)
    async with store.read() as tx:
        loaded = await tx.list_requests(limit=2000)
    assert [r._replace(id=0) for r in reversed(loaded)] == records  # the store numbers them


async def test_change_feed_counts_up(store: KeyStore) -> None:
    """Every change gets a higher sequence number, and changes_since returns the newer ones with their time."""
    start = await store.latest_change()
    later = T0 + timedelta(microseconds=1500)
    async with store.transaction() as tx:
        await tx.add_change(at=T0, entity="key", target="kg_1")
        await tx.add_change(at=later, entity="role", target="ci")
    assert await store.latest_change() == start + 2
    assert [(e, t, at) for _s, e, t, at in await store.changes_since(start)] == [
        ("key", "kg_1", T0), ("role", "ci", later)]
    assert await store.changes_since(start + 2) == []


async def test_meta_keeps_the_first_value(store: KeyStore) -> None:
    """set_meta_if_absent never replaces a stored value (the pepper must not change)."""
    async with store.transaction() as tx:
        assert await tx.set_meta_if_absent("pepper", "first") == "first"
        assert await tx.set_meta_if_absent("pepper", "second") == "first"
        assert await tx.get_meta("pepper") == "first"
