"""Organizations administer themselves: an org admin acts within its org, on the kinds it manages,
never handing out more than it holds; a member manages their own per-user keys; a cross-org admin
(orgs:any) acts everywhere. On both stores, through every endpoint."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from .conftest import Admin

KEYS = "/admin/v1/keys"
# roles:* too: changing a role needs orgs:any besides roles:write.
ORG_ADMIN = ["keys:*", "members:write", "roles:*", "audit:read", "trust:*", "deploy", "read"]
POLICY = {"issuer": "https://token.actions.githubusercontent.com", "audience": "https://keygate.example.com",
          "operations": ["deploy"]}


@dataclass
class Org:
    """One org's admin key and what the org holds."""

    name: str
    admin: str = ""  # the full org admin key
    admin_id: str = ""
    key_id: str = ""  # an org-level key of the org
    user_key_id: str = ""  # a per-user key of its member
    member: str = ""
    policy: str = ""
    secrets: list[str] = field(default_factory=list)  # every id and name only this org may see


@dataclass
class World:
    admin: Admin
    acme: Org
    globex: Org

    def other(self, org: Org) -> Org:
        return self.globex if org is self.acme else self.acme

    async def call(self, who: Org | str, method: str, path: str, **kwargs: Any) -> Any:
        key = who.admin if isinstance(who, Org) else who
        return await self.admin.call(method, path, key=key, **kwargs)


async def _org(admin: Admin, name: str, member: str) -> Org:
    org = Org(name, member=member, policy=f"{name}-deploys")
    org.admin_id, org.admin = await admin.key(name=f"{name} admin", org=name, role="org-admin",
                                              servers=["admin", "*"])
    org.key_id, _ = await admin.key(name=f"{name} ci", org=name, operations=["deploy"])
    await admin.cli.set_member(name, member, "developer")
    org.user_key_id, _ = await admin.key(name=f"{member} laptop", org=name, user=member, operations=["read"])
    await admin.cli.put_trust_policy(org.policy, **POLICY, conditions={"repository": f"{name}/shop"}, org=name)
    org.secrets = [org.admin_id, org.key_id, org.user_key_id, f"{name} ci", f"{member} laptop", org.policy,
                   f"{name}/shop", member]
    return org


@pytest.fixture
async def world(admin: Admin) -> World:
    """acme and globex, each with an org admin, an org-level key, a member with a per-user key and a policy."""
    await admin.cli.put_role("org-admin", ORG_ADMIN)
    await admin.cli.put_role("developer", ["deploy", "read", "keys:self"])
    await admin.cli.put_role("wide", ["deploy", "read", "write", "exec"])
    acme, globex = await _org(admin, "acme", "alice"), await _org(admin, "globex", "gina")
    # Each org admin acts once, so the audit trail holds something of each org.
    for org in (acme, globex):
        reply = await admin.call("POST", f"{KEYS}/{org.key_id}/rotate", key=org.admin, json={"grace": "1h"})
        assert reply.status == 201, reply.body
        org.secrets.append(reply.body["id"])
    await admin.rt.recorder.flush()
    return World(admin, acme, globex)


def org_of(world: World, name: str) -> Org:
    return world.acme if name == "acme" else world.globex


# -- lists: an org admin sees its org, never the other's ---------------------------------------
LISTS = [
    "/admin/v1/keys", "/admin/v1/keys?limit=2", "/admin/v1/keys?status=active", "/admin/v1/orgs/{own}/members",
    "/admin/v1/trust-policies", "/admin/v1/audit?limit=500", "/admin/v1/audit?type=request&limit=500",
    "/admin/v1/audit?type=event&limit=500", "/admin/v1/orgs", "/admin/v1/whoami",
]


@pytest.mark.parametrize("who", ["acme", "globex"])
@pytest.mark.parametrize("path", LISTS)
async def test_lists_never_show_the_other_org(world: World, who: str, path: str) -> None:
    """No id, name, member, policy or audit entry of the other org appears in any list, page or count."""
    me = org_of(world, who)
    reply = await world.call(me, "GET", path.format(own=me.name))
    assert reply.status == 200, reply.body
    text = json.dumps(reply.body)
    leaked = [s for s in world.other(me).secrets + [world.other(me).name] if s in text]
    assert leaked == []


@pytest.mark.parametrize("who", ["acme", "globex"])
async def test_lists_show_the_own_org_whole(world: World, who: str) -> None:
    """The org admin's lists hold its own org's keys, members, policies and audit events."""
    me = org_of(world, who)
    keys = await world.call(me, "GET", KEYS, params={"limit": 500})
    assert {me.admin_id, me.key_id, me.user_key_id} <= {k["id"] for k in keys.body["items"]}
    assert {k["org"] for k in keys.body["items"]} == {me.name}
    members = await world.call(me, "GET", f"/admin/v1/orgs/{me.name}/members")
    assert [m["user"] for m in members.body["items"]] == [me.member]
    policies = await world.call(me, "GET", "/admin/v1/trust-policies")
    assert [p["name"] for p in policies.body["items"]] == [me.policy]
    events = await world.call(me, "GET", "/admin/v1/audit", params={"type": "event", "limit": 500})
    assert {e["org"] for e in events.body["items"]} == {me.name}
    assert ("key.rotate", me.admin_id, me.name) in {(e["action"], e["actor"], e["actor_org"])
                                                    for e in events.body["items"]}
    orgs = await world.call(me, "GET", "/admin/v1/orgs")
    assert orgs.body["items"] == [me.name]


@pytest.mark.parametrize(("who", "query"), [
    ("acme", {"org": "globex"}), ("globex", {"org": "acme"}), ("acme", {"org": "globex", "limit": "1"}),
])
async def test_a_filter_naming_another_org_matches_nothing(world: World, who: str, query: dict[str, str]) -> None:
    """Asking for the other org's keys or audit trail answers an empty page, not its contents."""
    me = org_of(world, who)
    for path in (KEYS, "/admin/v1/audit"):
        reply = await world.call(me, "GET", path, params=query)
        assert reply.status == 200 and reply.body == {"items": [], "next_cursor": None}


async def test_a_cross_org_admin_sees_and_switches_between_every_org(world: World) -> None:
    """orgs:any (the admin role's "*") lists every org's keys and trail, and filters them by org."""
    keys = await world.admin.call("GET", KEYS, params={"limit": 500})
    assert {"acme", "globex", "default"} <= {k["org"] for k in keys.body["items"]}
    only = await world.admin.call("GET", KEYS, params={"org": "globex", "limit": 500})
    assert {k["org"] for k in only.body["items"]} == {"globex"}
    events = await world.admin.call("GET", "/admin/v1/audit", params={"org": "acme", "type": "event"})
    assert events.body["items"] and {e["org"] for e in events.body["items"]} == {"acme"}
    orgs = await world.admin.call("GET", "/admin/v1/orgs")
    assert orgs.body["items"] == ["acme", "default", "globex"]
    me = await world.admin.call("GET", "/admin/v1/whoami")
    assert me.body == {"id": world.admin.root_id, "org": "default", "user": "", "any_org": True,
                       "self_service": False}
    assert (await world.admin.call("GET", f"{KEYS}/{world.globex.key_id}")).status == 200


# -- reads and changes of the other org's things: 404, as for what does not exist -------------
CROSS_ORG_404 = [
    ("GET", "/admin/v1/keys/{key}", None),
    ("PATCH", "/admin/v1/keys/{key}", {"name": "mine now"}),
    ("POST", "/admin/v1/keys/{key}/revoke", None),
    ("POST", "/admin/v1/keys/{key}/rotate", {}),
    ("POST", "/admin/v1/keys/{key}/report-leak", {"url": "https://paste.example/1"}),
    ("GET", "/admin/v1/keys/{key}/allowlist-suggestion", None),
    ("GET", "/admin/v1/keys/{key}/usage", None),
    ("GET", "/admin/v1/keys/{user_key}", None),
    ("POST", "/admin/v1/keys/{user_key}/revoke", None),
    ("GET", "/admin/v1/orgs/{org}/members", None),
    ("PUT", "/admin/v1/orgs/{org}/members/{member}", {"role": "developer"}),
    ("PUT", "/admin/v1/orgs/{org}/members/newcomer", {"role": "developer"}),
    ("DELETE", "/admin/v1/orgs/{org}/members/{member}", None),
    ("POST", "/admin/v1/orgs/{org}/members/{member}/agent-key", None),
    ("GET", "/admin/v1/trust-policies/{policy}", None),
    ("DELETE", "/admin/v1/trust-policies/{policy}", None),
]
# The same requests for things that exist nowhere: the other org's answers must be these, byte for byte.
NOWHERE = {"key": "kg_AAAAAAAAAAAA", "user_key": "kg_AAAAAAAAAAAA", "org": "initech", "member": "nobody",
           "policy": "no-such-policy"}


@pytest.mark.parametrize("who", ["acme", "globex"])
@pytest.mark.parametrize(("method", "path", "body"), CROSS_ORG_404)
async def test_the_other_orgs_things_are_404_like_things_that_do_not_exist(
    world: World, who: str, method: str, path: str, body: dict[str, Any] | None,
) -> None:
    """A read or change of the other org's key, member or policy is the 404 of a missing one; nothing changes."""
    me, other = org_of(world, who), world.other(org_of(world, who))
    theirs = {"key": other.key_id, "user_key": other.user_key_id, "org": other.name, "member": other.member,
              "policy": other.policy}
    before = await world.admin.call("GET", KEYS, params={"org": other.name, "limit": 500})
    reply = await world.call(me, method, path.format(**theirs), json=body)
    missing = await world.call(me, method, path.format(**NOWHERE), json=body)
    assert reply.status == 404, reply.body
    # Only the name asked for differs: the same type, title and words.
    shown = reply.body["detail"]
    for name, value in sorted(theirs.items(), key=lambda item: -len(item[1])):
        shown = shown.replace(value, NOWHERE[name])
    assert missing.status == 404 and shown == missing.body["detail"]
    assert reply.body["type"] == missing.body["type"] and reply.body["title"] == missing.body["title"]
    after = await world.admin.call("GET", KEYS, params={"org": other.name, "limit": 500})
    assert after.body == before.body
    assert [m.user for m in await world.admin.cli.list_members(other.name)] == [other.member]
    assert other.policy in [p.name for p in await world.admin.cli.list_trust_policies()]


# -- making things in the other org: 403 ------------------------------------------------------
CROSS_ORG_403 = [
    ("POST", KEYS, {"name": "planted", "org": "{other}", "operations": ["deploy"]}),
    ("POST", KEYS, {"name": "planted", "org": "{other}", "kind": "automation", "operations": ["read"]}),
    ("PUT", "/admin/v1/trust-policies/planted", {**POLICY, "conditions": {"repository": "x/y"}, "org": "{other}"}),
    ("PUT", "/admin/v1/roles/planted", {"grants": ["read"]}),
    ("DELETE", "/admin/v1/roles/wide", None),
]


@pytest.mark.parametrize("who", ["acme", "globex"])
@pytest.mark.parametrize(("method", "path", "body"), CROSS_ORG_403)
async def test_making_things_for_another_org_is_403(
    world: World, who: str, method: str, path: str, body: dict[str, Any] | None,
) -> None:
    """A key or trust policy in another org, and any role change (roles are every org's), are refused."""
    me = org_of(world, who)
    sent = json.loads(json.dumps(body).replace("{other}", world.other(me).name)) if body else None
    reply = await world.call(me, method, path, json=sent)
    assert reply.status == 403, reply.body
    assert reply.body["type"] == "urn:keygate:problem:forbidden" and "orgs:any" in reply.body["detail"]
    assert "planted" not in json.dumps((await world.admin.call("GET", KEYS, params={"limit": 500})).body)
    assert "planted" not in [p.name for p in await world.admin.cli.list_trust_policies()]
    assert {r.name for r in await world.admin.cli.list_roles()} >= {"wide"}
    assert "planted" not in {r.name for r in await world.admin.cli.list_roles()}


async def test_a_new_key_goes_to_the_admin_keys_own_org(world: World) -> None:
    """Without an org, a key is made in the acting admin key's org, and audited with both orgs."""
    reply = await world.call(world.acme, "POST", KEYS, json={"name": "no org given", "operations": ["deploy"]})
    assert reply.status == 201 and reply.body["org"] == "acme"
    events = await world.admin.audit(type="event", key=reply.body["id"])
    assert [(e["action"], e["org"], e["actor"], e["actor_org"]) for e in events] == [
        ("key.create", "acme", world.acme.admin_id, "acme")]


async def test_a_cross_org_admin_changes_any_org_and_roles(world: World) -> None:
    """orgs:any makes keys and members in any org, changes roles, and is audited as from its org."""
    made = await world.admin.call("POST", KEYS, json={"name": "for globex", "org": "globex",
                                                      "operations": ["write"], "servers": ["*"]})
    assert made.status == 201
    assert (await world.admin.call("PUT", "/admin/v1/orgs/globex/members/gus", json={"role": "wide"})).status == 200
    assert (await world.admin.call("PUT", "/admin/v1/roles/ops", json={"grants": ["read"]})).status == 200
    events = await world.admin.audit(type="event", key=made.body["id"])
    assert [(e["org"], e["actor_org"]) for e in events] == [("globex", "default")]


# -- who may make which kind --------------------------------------------------------------------
KINDS = [
    # grants of the admin key (besides keys:read, deploy), kind, allowed
    (["keys:write:automation"], "automation", True),
    (["keys:write:automation"], "integration", False),
    (["keys:write:integration"], "integration", True),
    (["keys:write:integration"], "automation", False),
    (["keys:write"], "automation", True),
    (["keys:write"], "integration", True),
    (["keys:write:*"], "automation", True),
    (["keys:*"], "integration", True),
    (["keys:write:automation", "keys:write:integration"], "integration", True),
]


@pytest.mark.parametrize(("grants", "kind", "allowed"), KINDS)
async def test_keys_write_of_a_kind_manages_that_kind_only(
    world: World, grants: list[str], kind: str, allowed: bool,
) -> None:
    """keys:write:<kind> creates, changes, rotates and revokes keys of that kind; keys:write of every kind."""
    _, manager = await world.admin.key(name="manager", org="acme", operations=["keys:read", "deploy", *grants],
                                       servers=["admin", "*"])
    target, _ = await world.admin.key(name="target", org="acme", kind=kind, operations=["deploy"])
    created = await world.call(manager, "POST", KEYS, json={"name": "made", "kind": kind, "operations": ["deploy"]})
    patched = await world.call(manager, "PATCH", f"{KEYS}/{target}", json={"name": "renamed"})
    rotated = await world.call(manager, "POST", f"{KEYS}/{target}/rotate", json={"grace": "1h"})
    revoked = await world.call(manager, "POST", f"{KEYS}/{target}/revoke")
    statuses = [created.status, patched.status, rotated.status, revoked.status]
    assert statuses == ([201, 200, 201, 200] if allowed else [403, 403, 403, 403])
    if not allowed:
        assert f"keys:write:{kind}" in created.body["detail"] and f"keys:write:{kind}" in revoked.body["detail"]
        assert (await world.admin.cli.get_key(target)).revoked_at is None


async def test_without_any_keys_write_a_key_manager_is_refused_at_the_door(world: World) -> None:
    """A key with keys:read only may not create, change or revoke: 403 insufficient_scope."""
    _, reader = await world.admin.key(name="reader", org="acme", operations=["keys:read"], servers=["admin"])
    reply = await world.call(reader, "POST", KEYS, json={"name": "x", "operations": ["keys:read"]})
    assert reply.status == 403 and reply.body["type"].endswith("insufficient_scope")


# -- permissions only narrow ---------------------------------------------------------------------
WIDER = [
    # body of a new key made by acme's org admin, allowed, what the refusal names
    ({"operations": ["deploy"]}, True, None),
    ({"operations": ["deploy", "read"], "servers": ["app", "admin"]}, True, None),
    ({"role": "developer", "servers": ["*"]}, True, None),
    ({"role": "wide", "operations": ["deploy"]}, True, None),  # the role's grants narrowed by its operations
    ({"operations": ["write"]}, False, "'write'"),
    ({"operations": ["deploy", "exec"]}, False, "'exec'"),
    ({"operations": ["*"]}, False, "'*'"),
    ({"operations": ["*:read"]}, False, "'*:read'"),
    ({"operations": ["orgs:any"]}, False, "'orgs:any'"),
    # A member's role may change later: a per-user key's own grants must lie within the admin's too.
    ({"user": "alice", "operations": ["write"]}, False, "'write'"),
    ({"role": "wide"}, False, "'write', 'exec'"),
    ({"role": "admin"}, False, "'*'"),
    ({"operations": ["deploy"], "servers": ["billing"]}, True, None),  # acme's admin holds "*"
]


@pytest.mark.parametrize(("body", "allowed", "named"), WIDER)
async def test_an_org_admin_cannot_mint_a_wider_key_than_itself(
    world: World, body: dict[str, Any], allowed: bool, named: str | None,
) -> None:
    """A new key's effective grants must lie within the org admin's own; the refusal names what exceeds."""
    reply = await world.call(world.acme, "POST", KEYS, json={"name": "narrow", **body})
    assert reply.status == (201 if allowed else 403), reply.body
    if not allowed:
        assert reply.body["type"] == "urn:keygate:problem:forbidden"
        assert named in reply.body["detail"] and "would do more than this admin key may" in reply.body["detail"]


SERVERS = [
    # servers of the org admin key, servers of the new key, allowed
    (["admin", "app"], ["app"], True),
    (["admin", "app"], ["*"], False),
    (["admin", "app"], ["app", "billing"], False),
    (["admin"], ["app"], False),
    (["admin", "*"], ["*", "admin"], True),
]


@pytest.mark.parametrize(("mine", "theirs", "allowed"), SERVERS)
async def test_an_org_admin_hands_out_only_its_own_servers(
    world: World, mine: list[str], theirs: list[str], allowed: bool,
) -> None:
    """A new key's servers must be among the org admin's; "*" only from one holding "*"."""
    _, manager = await world.admin.key(name="manager", org="acme", role="org-admin", servers=mine)
    reply = await world.call(manager, "POST", KEYS, json={"name": "n", "operations": ["deploy"], "servers": theirs})
    assert reply.status == (201 if allowed else 403), reply.body
    if not allowed:
        assert "servers" in reply.body["detail"]


CHANGES = [
    ("PATCH", "/admin/v1/keys/{key}", {"operations": ["write"]}, 403),
    ("PATCH", "/admin/v1/keys/{key}", {"role": "wide", "operations": ["deploy"]}, 200),
    ("PATCH", "/admin/v1/keys/{key}", {"servers": ["*"]}, 200),
    ("PUT", "/admin/v1/orgs/acme/members/alice", {"role": "wide"}, 403),
    ("PUT", "/admin/v1/orgs/acme/members/arnold", {"role": "admin"}, 403),
    ("PUT", "/admin/v1/orgs/acme/members/arnold", {"role": "developer"}, 200),
    ("PUT", "/admin/v1/trust-policies/acme-deploys",
     {**POLICY, "conditions": {"repository": "acme/shop"}, "org": "acme", "operations": ["write"]}, 403),
    ("PUT", "/admin/v1/trust-policies/acme-deploys",
     {**POLICY, "conditions": {"repository": "acme/shop"}, "org": "acme", "role": "developer"}, 200),
]


@pytest.mark.parametrize(("method", "path", "body", "status"), CHANGES)
async def test_changes_and_role_assignments_stay_within_the_org_admins_grants(
    world: World, method: str, path: str, body: dict[str, Any], status: int,
) -> None:
    """A changed key, a member's role and a policy's keys may not reach beyond the org admin's grants."""
    reply = await world.call(world.acme, method, path.format(key=world.acme.key_id), json=body)
    assert reply.status == status, reply.body
    if status == 403:
        assert "would do more than this admin key may" in reply.body["detail"]


async def test_an_agent_key_beyond_the_org_admin_is_not_issued(world: World) -> None:
    """An org admin cannot issue the agent key of a member whose role grants more than it holds."""
    await world.admin.cli.set_member("acme", "wanda", "wide")
    refused = await world.call(world.acme, "POST", "/admin/v1/orgs/acme/members/wanda/agent-key")
    assert refused.status == 403 and "'write', 'exec'" in refused.body["detail"]
    issued = await world.call(world.acme, "POST", "/admin/v1/orgs/acme/members/alice/agent-key")
    assert issued.status == 201 and issued.body["user"] == "alice"


# -- self-service: a member's own per-user keys ---------------------------------------------------
@pytest.fixture(params=["agent", "per-user"])
async def alice(world: World, request: pytest.FixtureRequest) -> str:
    """alice (role developer: deploy, read, keys:self) acting with her agent key or a per-user admin key."""
    if request.param == "agent":
        _, full, _ = await world.admin.cli.issue_agent_key("acme", "alice")
        return full
    _, full = await world.admin.key(name="alice admin", org="acme", user="alice",
                                    operations=["keys:self", "deploy", "read"], servers=["admin", "*"])
    return full


async def test_a_member_lists_only_their_own_keys(world: World, alice: str) -> None:
    """keys:self lists the member's own per-user keys, none of the org's others."""
    await world.admin.cli.set_member("acme", "bob", "developer")
    bobs, _ = await world.admin.key(name="bob laptop", org="acme", user="bob", operations=["read"])
    listed = await world.call(alice, "GET", KEYS, params={"limit": 500})
    assert listed.status == 200
    assert {k["user"] for k in listed.body["items"]} == {"alice"} and world.acme.user_key_id in str(listed.body)
    assert (await world.call(alice, "GET", KEYS, params={"user": "bob"})).body["items"] == []
    assert (await world.call(alice, "GET", f"{KEYS}/{bobs}")).status == 404
    assert (await world.call(alice, "GET", f"{KEYS}/{world.acme.key_id}")).status == 404
    assert (await world.call(alice, "GET", f"{KEYS}/{world.acme.user_key_id}")).status == 200
    me = await world.call(alice, "GET", "/admin/v1/whoami")
    assert me.body["org"] == "acme" and me.body["user"] == "alice" and me.body["self_service"]


SELF_CREATE = [
    ({"user": "alice", "operations": ["deploy"]}, 201),
    ({"user": "alice", "role": "developer"}, 201),
    ({"user": "alice", "operations": ["deploy"], "kind": "automation"}, 201),
    ({"user": "bob", "operations": ["deploy"]}, 403),
    ({"operations": ["deploy"]}, 403),  # an org-level key is not hers
    ({"user": "alice", "org": "globex", "operations": ["deploy"]}, 403),
    ({"user": "alice", "operations": ["write"]}, 403),  # beyond her member role
    ({"user": "alice", "role": "wide", "operations": ["read"]}, 201),  # narrowed by its own operations
    ({"user": "alice", "role": "wide"}, 403),
]


@pytest.mark.parametrize(("body", "status"), SELF_CREATE)
async def test_a_member_creates_only_their_own_keys_within_their_role(
    world: World, alice: str, body: dict[str, Any], status: int,
) -> None:
    """keys:self creates per-user keys of the member's own, bounded by what the member may do."""
    await world.admin.cli.set_member("acme", "bob", "developer")
    reply = await world.call(alice, "POST", KEYS, json={"name": "mine", **body})
    assert reply.status == status, reply.body
    if status == 201:
        assert (reply.body["org"], reply.body["user"]) == ("acme", "alice")


async def test_a_member_revokes_their_own_keys_but_never_anothers(world: World, alice: str) -> None:
    """keys:self revokes the member's own per-user keys; another user's is 404 and stays live."""
    await world.admin.cli.set_member("acme", "bob", "developer")
    bobs, _ = await world.admin.key(name="bob laptop", org="acme", user="bob", operations=["read"])
    assert (await world.call(alice, "POST", f"{KEYS}/{bobs}/revoke")).status == 404
    assert (await world.call(alice, "POST", f"{KEYS}/{world.acme.key_id}/revoke")).status == 404
    assert (await world.call(alice, "POST", f"{KEYS}/{world.globex.user_key_id}/revoke")).status == 404
    # The org-level key was rotated with a grace by the world fixture: rotating, still live.
    for key_id, live in ((bobs, "active"), (world.acme.key_id, "rotating"), (world.globex.user_key_id, "active")):
        assert (await world.admin.cli.get_key(key_id)).status(world.admin.cli.clock()) == live
    mine = await world.call(alice, "POST", f"{KEYS}/{world.acme.user_key_id}/revoke")
    assert mine.status == 200 and mine.body["status"] == "revoked"


SELF_REFUSED = [
    ("PATCH", "/admin/v1/keys/{own}", {"name": "x"}),
    ("POST", "/admin/v1/keys/{own}/rotate", {}),
    ("GET", "/admin/v1/roles", None),
    ("GET", "/admin/v1/orgs/acme/members", None),
    ("PUT", "/admin/v1/orgs/acme/members/alice", {"role": "wide"}),
    ("GET", "/admin/v1/audit", None),
    ("GET", "/admin/v1/trust-policies", None),
]


@pytest.mark.parametrize(("method", "path", "body"), SELF_REFUSED)
async def test_self_service_is_only_keys_self(
    world: World, method: str, path: str, body: dict[str, Any] | None,
) -> None:
    """An agent key reaches the admin API for keys:self alone, even when its member's role grants everything."""
    await world.admin.cli.set_member("acme", "root-person", "admin")
    record, agent, _ = await world.admin.cli.issue_agent_key("acme", "root-person")
    own, _ = await world.admin.key(name="own", org="acme", user="root-person", operations=["read"])
    reply = await world.call(agent, method, path.format(own=own), json=body)
    assert reply.status == 403 and reply.body["type"].endswith("insufficient_scope"), reply.body
    listed = await world.call(agent, "GET", KEYS)
    assert listed.status == 200 and {k["user"] for k in listed.body["items"]} == {"root-person"}
    assert record.id in {k["id"] for k in listed.body["items"]}


async def test_an_agent_key_without_keys_self_never_reaches_the_admin_api(world: World) -> None:
    """A member whose role lacks keys:self: their agent key is refused on the admin API, as before."""
    await world.admin.cli.set_member("acme", "reader", "wide")
    _, agent, _ = await world.admin.cli.issue_agent_key("acme", "reader")
    reply = await world.call(agent, "GET", KEYS)
    assert reply.status == 403 and reply.body["type"].endswith("insufficient_scope")


@pytest.mark.parametrize(("grants", "status"), [
    (["trust:write", "deploy"], 403),
    (["trust:write", "deploy", "keys:write:integration"], 403),
    (["trust:write", "deploy", "keys:write:automation"], 200),
    (["trust:write", "deploy", "keys:write"], 200),
])
async def test_a_trust_policy_is_made_only_by_who_may_make_automation_keys(
    world: World, grants: list[str], status: int,
) -> None:
    """A policy mints automation keys: making one needs keys:write:automation besides trust:write."""
    _, writer = await world.admin.key(name="writer", org="acme", operations=grants, servers=["admin", "*"])
    body = {**POLICY, "conditions": {"repository": "acme/new"}, "org": "acme"}
    reply = await world.call(writer, "PUT", "/admin/v1/trust-policies/acme-new", json=body)
    assert reply.status == status, reply.body
    if status == 403:
        assert "keys:write:automation" in reply.body["detail"]
