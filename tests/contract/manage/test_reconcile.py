"""keygate apply / export through the service layer, against both stores."""

from __future__ import annotations

from datetime import datetime

import pytest

from gateway.config.schema import Settings
from gateway.keys import KeyParser
from gateway.manage.declared import StateProblems
from gateway.manage.reconcile import ApplyFailed, apply_state, export_state
from gateway.manage.acting import Operator, kind_operation
from gateway.manage.service import KeyService
from gateway.models import KeyRecord
from gateway.store import KeyStore

from ...clocks import FakeClock

PARSER = KeyParser(["kg_", "kga_"])

STATE = """
[roles.deployer]
grants = ["deploy", "servers:read"]

[members.acme]
alice = "deployer"

[trust.shop-deploy]
issuer = "https://token.actions.githubusercontent.com"
audience = "https://keygate.example.com"
org = "acme"
operations = ["deploy"]
servers = ["prod-1"]
lifetime = "15m"
conditions = { repository = "acme/shop", ref = "refs/heads/main" }

[[keys]]
name = "ci-deploy"
org = "acme"
role = "deployer"
servers = ["prod-1"]
ip_allowlist = ["10.1.2.3/8"]
rate_limit = "100/minute"
expires = 2027-06-30

[[keys]]
name = "alice laptop"
org = "acme"
user = "alice"
operations = ["servers:read"]
"""


async def events(store: KeyStore) -> list[tuple[str, str, dict]]:
    """Every audit event but the bootstrap's, oldest first."""
    async with store.read() as tx:
        found = await tx.list_audit(limit=1000)
    return [(e.actor, e.action, e.details) for e in reversed(found) if e.actor != "system:migrate"]


async def named(service: KeyService) -> dict[str, KeyRecord]:
    return {k.name: k for k in await service.list_keys() if k.status(service.clock()) != "revoked"}


async def test_apply_creates_everything_and_returns_each_secret_once(service: KeyService, store: KeyStore) -> None:
    """Every declared item is made through the service, audited with via=apply; each new key's full text is returned."""
    shown: list[str] = []
    done = await apply_state(service, STATE, show=shown.append)
    assert shown[:5] == ["+ create role deployer: grants [deploy, servers:read]", "+ add member acme/alice: role deployer",
                         "+ create trust policy shop-deploy (acme)", "+ create key ci-deploy (acme)",
                         "+ create key alice laptop (acme)"]
    assert sorted(r.name for r, _ in done.created) == ["alice laptop", "ci-deploy"]
    for record, full in done.created:
        stored = await store.get_key(record.id)
        assert stored is not None and service.hasher.verify(stored.secret_hash, PARSER.parse(full).secret)
        assert stored.created_by == "test:alice via apply"
    keys = await named(service)
    ci = keys["ci-deploy"]
    assert (ci.org, ci.role, ci.servers, ci.ip_allowlist, ci.rate_limit) == (
        "acme", "deployer", ("prod-1",), ("10.0.0.0/8",), "100/minute")
    assert ci.expires_at == datetime.fromisoformat("2027-06-30T00:00:00+00:00")
    assert (await service.get_role("deployer")).grants == ("deploy", "servers:read")
    assert [(m.user, m.role) for m in await service.list_members("acme")] == [("alice", "deployer")]
    assert (await service.get_trust_policy("shop-deploy")).lifetime == 900
    audited = await events(store)
    assert [a for _, a, _ in audited] == ["role.set", "member.set", "trust.set", "key.create", "key.create"]
    assert all(actor == "test:alice" and details["via"] == "apply" for actor, _, details in audited)


async def test_second_apply_changes_nothing_and_audits_nothing(service: KeyService, store: KeyStore) -> None:
    """Applying the same file again plans no change and writes no audit event."""
    await apply_state(service, STATE)
    before = await events(store)
    shown: list[str] = []
    done = await apply_state(service, STATE, show=shown.append)
    assert shown == ["No changes."] and done.plan.changes == [] and done.created == []
    assert await events(store) == before


async def test_one_changed_field_is_one_update(service: KeyService, store: KeyStore) -> None:
    """A changed rate limit is one key.update of that key, with the difference in the plan."""
    await apply_state(service, STATE)
    before = len(await events(store))
    shown: list[str] = []
    await apply_state(service, STATE.replace("100/minute", "200/minute"), show=shown.append)
    key_id = (await named(service))["ci-deploy"].id
    assert shown[0] == f"~ update key ci-deploy (acme) {key_id}: rate_limit 100/minute -> 200/minute"
    audited = (await events(store))[before:]
    assert [(a, d["rate_limit"]) for _, a, d in audited] == [("key.update", {"before": "100/minute",
                                                                             "after": "200/minute"})]


async def test_list_order_is_no_change(service: KeyService) -> None:
    """Lists are sets: the same grants, servers and networks in another order change nothing."""
    listed = STATE.replace('servers = ["prod-1"]\nip_allowlist = ["10.1.2.3/8"]',
                           'servers = ["prod-1", "prod-2"]\nip_allowlist = ["10.1.2.3/8", "192.168.0.0/16"]')
    await apply_state(service, listed)
    reordered = (listed.replace('["deploy", "servers:read"]', '["servers:read", "deploy"]')
                 .replace('["prod-1", "prod-2"]', '["prod-2", "prod-1"]')
                 .replace('["10.1.2.3/8", "192.168.0.0/16"]', '["192.168.0.0/16", "10.0.0.0/8"]'))
    done = await apply_state(service, reordered)
    assert done.plan.changes == []


async def test_dry_run_changes_nothing(service: KeyService, store: KeyStore) -> None:
    """--dry-run prints the plan and writes nothing."""
    shown: list[str] = []
    done = await apply_state(service, STATE, dry_run=True, show=shown.append)
    assert len(done.plan.changes) == 5 and shown[-1] == "Plan: 5 to create, 0 to update, 0 to remove."
    assert await events(store) == [] and await service.list_keys() == []
    assert [r.name for r in await service.list_roles()] == ["admin"]


TRIMMED = """
[roles.deployer]
grants = ["deploy", "servers:read"]

[members.acme]
bob = "deployer"

[trust]

[[keys]]
name = "ci-deploy"
org = "acme"
role = "deployer"
servers = ["prod-1"]
ip_allowlist = ["10.0.0.0/8"]
rate_limit = "100/minute"
expires = 2027-06-30
"""


async def test_prune_removes_only_what_apply_made(service: KeyService, store: KeyStore) -> None:
    """--prune revokes apply's undeclared keys and policies and the undeclared members of a listed org;
    keys made otherwise (the bootstrap admin key) stay, and without --prune everything stays."""
    admin_key, _ = await service.create_key(name="bootstrap admin", role="admin", org="acme")
    await service.set_member("other", "zed", "admin")
    await apply_state(service, STATE)
    laptop = (await named(service))["alice laptop"]

    kept = await apply_state(service, TRIMMED)
    assert [c.line() for c in kept.plan.changes] == ["+ add member acme/bob: role deployer"]
    assert sorted(kept.plan.kept) == sorted([f"key alice laptop (acme) {laptop.id}", "member acme/alice",
                                             "trust policy shop-deploy"])

    pruned = await apply_state(service, TRIMMED, prune=True)
    assert [c.line() for c in pruned.plan.changes] == [
        f"- revoke key alice laptop (acme) {laptop.id}", "- remove trust policy shop-deploy",
        "- remove member acme/alice"]
    assert sorted(await named(service)) == ["bootstrap admin", "ci-deploy"]
    assert (await service.get_key(admin_key.id)).revoked_at is None
    assert [m.user for m in await service.list_members("acme")] == ["bob"]
    assert [m.user for m in await service.list_members("other")] == ["zed"]  # an org the file does not list
    assert await service.list_trust_policies() == []
    assert (await apply_state(service, TRIMMED, prune=True)).plan.changes == []


async def test_prune_deletes_undeclared_roles_after_what_used_them(service: KeyService) -> None:
    """A role the file no longer declares is deleted last, after the keys and members that used it changed."""
    await apply_state(service, STATE)
    renamed = STATE.replace("deployer", "shipper")
    done = await apply_state(service, renamed, prune=True)
    assert done.plan.changes[-1].line() == "- delete role deployer"
    assert sorted(r.name for r in await service.list_roles()) == ["admin", "shipper"]
    assert (await named(service))["ci-deploy"].role == "shipper"


async def test_prune_refuses_to_delete_a_role_still_in_use(service: KeyService) -> None:
    """A role still used by a key apply does not manage is a problem: nothing is applied."""
    await apply_state(service, STATE)
    manual, _ = await service.create_key(name="by hand", role="deployer")
    with pytest.raises(StateProblems) as refused:
        await apply_state(service, STATE.replace("deployer", "shipper"), prune=True)
    assert any(line.startswith("roles.deployer: ") and manual.id in line for line in refused.value.lines())
    assert "shipper" not in [r.name for r in await service.list_roles()]


async def test_export_round_trip_is_no_change(service: KeyService, store: KeyStore) -> None:
    """apply of an export to the same store changes nothing, also for keys and roles made by hand."""
    await apply_state(service, STATE)
    await service.create_key(name="by hand", operations=["read"], expires="30d")
    await service.create_key(name="decoy", canary=True)
    await service.put_role("reader", ["*:read"])
    await service.issue_agent_key("acme", "alice")  # agent keys are not declared
    exported = await export_state(service)
    assert "agent key of alice" not in exported
    before = await events(store)
    done = await apply_state(service, exported, prune=True)
    assert done.plan.changes == [] and await events(store) == before


async def test_export_holds_no_secret_material(service: KeyService, store: KeyStore) -> None:
    """No full key, secret or hash appears in an export."""
    done = await apply_state(service, STATE)
    exported = await export_state(service)
    for record, full in done.created:
        stored = await store.get_key(record.id)
        assert stored is not None
        assert full not in exported and PARSER.parse(full).secret not in exported
        assert stored.secret_hash not in exported
    assert "argon2" not in exported and "secret" not in exported.split("\n", 3)[-1]


class _NoTrustPolicies(Operator):
    """The operator, but refused trust policies by the service (as an admin key without automation:write is)."""

    def may(self, operation: str) -> bool:
        return operation != kind_operation("automation")


async def test_a_refused_change_applies_nothing(service: KeyService, store: KeyStore, settings: Settings,
                                                clock: FakeClock[datetime]) -> None:
    """When the service refuses a change midway, the one transaction is rolled back: no change, no audit."""
    refusing = KeyService(store, settings, actor="test:alice", clock=clock, acting=_NoTrustPolicies())
    with pytest.raises(ApplyFailed, match=r"^\+ create trust policy shop-deploy \(acme\): .*nothing was applied"):
        await apply_state(refusing, STATE)
    assert await events(store) == []
    assert [r.name for r in await service.list_roles()] == ["admin"]
    assert await service.list_members("acme") == []


async def test_unchangeable_field_is_a_problem(service: KeyService) -> None:
    """A declared key whose kind differs from the stored key of that name is refused, not replaced."""
    await service.create_key(name="ci-deploy", role="admin", org="acme", kind="automation")
    with pytest.raises(StateProblems) as refused:
        await apply_state(service, STATE)
    assert any(line.startswith("keys[0].kind: ") for line in refused.value.lines())
    assert [k.name for k in await service.list_keys()] == ["ci-deploy"]


async def test_expiry_is_checked_only_when_it_is_set(service: KeyService, clock: FakeClock[datetime]) -> None:
    """A key that has expired, declared as it is, is no change; declaring a past expiry for a new key is refused."""
    await service.create_key(name="short", operations=["read"], expires="1d")
    clock.advance(days=2)
    exported = await export_state(service)
    assert (await apply_state(service, exported)).plan.changes == []
    with pytest.raises(StateProblems) as refused:
        await apply_state(service, exported.replace('name = "short"', 'name = "new"'))
    assert [line.split(": ")[0] for line in refused.value.lines()] == ["keys[0].expires"]
    assert "already past" in refused.value.lines()[0]


async def test_role_member_and_policy_changes_are_one_update_each(service: KeyService, store: KeyStore) -> None:
    """A changed role, member and trust policy are updated in place, each one audited event."""
    await apply_state(service, STATE.replace('alice = "deployer"', 'alice = "deployer"\nbob = "admin"'))
    before = len(await events(store))
    changed = (STATE.replace('grants = ["deploy", "servers:read"]', 'grants = ["deploy"]')
               .replace('alice = "deployer"', 'alice = "deployer"\nbob = "deployer"')
               .replace('servers = ["prod-1"]\nlifetime', 'servers = ["prod-1", "prod-2"]\nlifetime'))
    done = await apply_state(service, changed)
    assert [c.line() for c in done.plan.changes] == [
        "~ update role deployer: grants [deploy, servers:read] -> [deploy]",
        "~ update member acme/bob: role admin -> deployer",
        "~ update trust policy shop-deploy: servers [prod-1] -> [prod-1, prod-2]"]
    assert [a for _, a, _ in (await events(store))[before:]] == ["role.set", "member.set", "trust.set"]
    assert (await service.get_trust_policy("shop-deploy")).servers == ("prod-1", "prod-2")
    assert (await apply_state(service, changed)).plan.changes == []
