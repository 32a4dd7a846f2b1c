"""The admin API's endpoints (DESIGN.md "Admin API"): thin adapters onto :class:`KeyService`.

Every action is the service's, the same one the CLI runs, and so are the
checks of its values; a handler only maps the parsed input to a service call
and the result to the answer's model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

from ..manage.audit import AuditFilter, Position, parse_time
from ..manage.cursor import cursor_time, decode_cursor, encode_cursor
from ..models import KeyRecord, Role, TrustPolicy, iso
from ..manage.service import UNSET
from . import models as m
from .endpoints import Call, Endpoint, invalid

T = TypeVar("T")


def _cursor_values(cursor: str | None, types: Sequence[type]) -> list[str | int] | None:
    if cursor is None:
        return None
    try:
        return decode_cursor(cursor, types)
    except ValueError as exc:
        raise invalid([{"field": "query.cursor", "message": str(exc)}]) from None


def _page(items: Sequence[T], limit: int, position: Callable[[T], list[str | int]]) -> dict[str, Any]:
    """The first ``limit`` of ``items`` (fetched as limit + 1) and the cursor after them."""
    shown = list(items[:limit])
    more = len(items) > limit
    return {"items": shown, "next_cursor": encode_cursor(position(shown[-1])) if more and shown else None}


def _public(call: Call, record: KeyRecord, **extra: Any) -> dict[str, Any]:
    return {**record.public(call.service.clock(), call.service.settings.keys.idle_after), **extra}


# -- keys ------------------------------------------------------------------
async def create_key(call: Call) -> dict[str, Any]:
    body: m.KeyCreate = call.body
    record, full = await call.service.create_key(**body.model_dump())
    return _public(call, record, key=full)


async def list_keys(call: Call) -> dict[str, Any]:
    q: m.KeyListQuery = call.query
    after = _cursor_values(q.cursor, (str, str))
    try:
        position = (cursor_time(after[0]), str(after[1])) if after else None
    except ValueError as exc:
        raise invalid([{"field": "query.cursor", "message": str(exc)}]) from None
    records = await call.service.list_keys(org=q.org, user=q.user, status=q.status, kind=q.kind,
                                           limit=q.limit + 1, after=position)
    page = _page(records, q.limit, lambda r: [r.created_at.isoformat(), r.id])
    page["items"] = [_public(call, r) for r in page["items"]]
    return page


async def get_key(call: Call) -> dict[str, Any]:
    return _public(call, await call.service.get_key(call.params["id"]))


async def patch_key(call: Call) -> dict[str, Any]:
    body: m.KeyPatch = call.body
    given = body.model_dump(exclude_unset=True)
    record = await call.service.update_key(
        call.params["id"], name=given.get("name"), role=given.get("role", UNSET),
        operations=given.get("operations"), servers=given.get("servers"), ip_allowlist=given.get("ip_allowlist"),
        rate_limit=given.get("rate_limit", UNSET), expires=given.get("expires"),
    )
    return _public(call, record)


async def revoke_key(call: Call) -> dict[str, Any]:
    return _public(call, await call.service.revoke_key(call.params["id"]))


async def rotate_key(call: Call) -> dict[str, Any]:
    body: m.KeyRotate = call.body
    new, full, old = await call.service.rotate_key(call.params["id"], grace=body.grace)
    return _public(call, new, rotated_from=old.id, old_key_revoked_at=iso(old.revoked_at),
                   old_key=_public(call, old), key=full)


async def allowlist_suggestion(call: Call) -> dict[str, Any]:
    q: m.SuggestionQuery = call.query
    return (await call.service.suggest_allowlist(call.params["id"], days=q.days, max_blocks=q.max)).public()


async def key_usage(call: Call) -> dict[str, Any]:
    q: m.UsageQuery = call.query
    return (await call.service.key_usage(call.params["id"], hours=q.hours)).public()


async def report_leak(call: Call) -> dict[str, Any]:
    body: m.LeakReportIn = call.body
    report = await call.service.report_leak(call.params["id"], url=body.url, source=body.source)
    return _public(call, report.record, result=report.result, first_report=report.first)


# -- roles -----------------------------------------------------------------
async def list_roles(call: Call) -> dict[str, Any]:
    # Roles are few (a handful per deployment): paged here, not in the store.
    return _page_by_name(await call.service.list_roles(), call.query)


def _page_by_name(items: Sequence[Role | TrustPolicy], q: m.PageQuery) -> dict[str, Any]:
    """One page of ``items`` (sorted by name), after the cursor's name."""
    after = _cursor_values(q.cursor, (str,))
    items = [i for i in items if after is None or i.name > str(after[0])]
    page = _page(items[: q.limit + 1], q.limit, lambda i: [i.name])
    page["items"] = [i.public() for i in page["items"]]
    return page


async def get_role(call: Call) -> dict[str, Any]:
    return (await call.service.get_role(call.params["name"])).public()


async def put_role(call: Call) -> dict[str, Any]:
    body: m.RolePut = call.body
    return (await call.service.put_role(call.params["name"], body.grants)).public()


async def delete_role(call: Call) -> None:
    await call.service.delete_role(call.params["name"])


# -- members ---------------------------------------------------------------
async def list_members(call: Call) -> dict[str, Any]:
    q: m.PageQuery = call.query
    after = _cursor_values(q.cursor, (str,))
    members = await call.service.list_members(call.params["org"], after=str(after[0]) if after else None,
                                              limit=q.limit + 1)
    page = _page(members, q.limit, lambda x: [x.user])
    page["items"] = [x.public() for x in page["items"]]
    return page


async def put_member(call: Call) -> dict[str, Any]:
    body: m.MemberPut = call.body
    return (await call.service.set_member(call.params["org"], call.params["user"], body.role)).public()


async def delete_member(call: Call) -> None:
    await call.service.remove_member(call.params["org"], call.params["user"])


async def issue_agent_key(call: Call) -> dict[str, Any]:
    record, full, previous = await call.service.issue_agent_key(call.params["org"], call.params["user"])
    return _public(call, record, revoked_previous=previous, key=full)


# -- trust policies --------------------------------------------------------
async def list_trust_policies(call: Call) -> dict[str, Any]:
    # Policies are few (one per repository or cluster that deploys): paged here, as roles are.
    return _page_by_name(await call.service.list_trust_policies(), call.query)


async def get_trust_policy(call: Call) -> dict[str, Any]:
    return (await call.service.get_trust_policy(call.params["name"])).public()


async def put_trust_policy(call: Call) -> dict[str, Any]:
    body: m.TrustPolicyPut = call.body
    # PUT states the whole policy: it creates or replaces, as PUT /roles/{name} does.
    policy = await call.service.put_trust_policy(call.params["name"], **body.model_dump(), replace=True)
    return policy.public()


async def delete_trust_policy(call: Call) -> None:
    await call.service.remove_trust_policy(call.params["name"])


# -- audit -----------------------------------------------------------------
def _time(name: str, text: str | None, now: datetime) -> datetime | None:
    if text is None:
        return None
    try:
        return parse_time(text, now)
    except ValueError as exc:
        raise invalid([{"field": f"query.{name}", "message": str(exc)}]) from None


async def audit(call: Call) -> dict[str, Any]:
    q: m.AuditQuery = call.query
    now = call.service.clock()
    try:
        after = Position.decode(q.cursor) if q.cursor is not None else None
    except ValueError as exc:
        raise invalid([{"field": "query.cursor", "message": str(exc)}]) from None
    wanted = AuditFilter(key=q.key, org=q.org, action=q.action, decision=q.decision, type=q.type,
                         since=_time("since", q.since, now), until=_time("until", q.until, now))
    page = await call.service.audit(wanted, limit=q.limit, after=after)
    return {"items": [e.public() for e in page.entries], "next_cursor": page.next.encode() if page.next else None}


# -- the caller ----------------------------------------------------------------
async def whoami(call: Call) -> dict[str, Any]:
    acting = call.service.acting
    return {"id": call.service.actor, "org": acting.org, "user": acting.user, "any_org": acting.any_org,
            "self_service": acting.self_service}


async def list_orgs(call: Call) -> dict[str, Any]:
    return {"items": await call.service.list_orgs()}


KEY_ID = "A key's id (its display prefix, e.g. kg_7Hq2ZrT9xLmP); a pasted full key counts as its id."

# What an org admin's keys, members, policies and audit trail are: the words every endpoint repeats.
IN_ORG = "An admin key acts within its own org unless granted `orgs:any`"
WITHIN = ("would do more than the admin key itself may (its effective grants and servers), unless that has "
          "`orgs:any`")
OTHER_ORG_KEY = "another org's key is answered 404, as a key that does not exist"

ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("POST", "/keys", "Create a key", create_key, "keys:write", m.KeyCreated, status=201,
             body=m.KeyCreate, location="/keys/{id}", per_kind=True, self_service=True,
             description="Answers with the full key in `key`, the only time it is shown. "
                         f"{IN_ORG}: `org` defaults to its org, and another org is refused (403). "
                         "A key of a kind needs `keys:write:<kind>` (`keys:write` covers every kind); with "
                         "`keys:self` a member creates their own per-user keys (`user` set to theirs). "
                         f"Refused (403) when the key {WITHIN}."),
    Endpoint("GET", "/keys", "List keys, newest first", list_keys, "keys:read", m.KeyPage, query=m.KeyListQuery,
             self_service=True,
             description=f"{IN_ORG}: it lists its org's keys only (a filter naming another org matches "
                         "nothing). With `keys:self` alone, only the member's own per-user keys."),
    Endpoint("GET", "/keys/{id}", "One key", get_key, "keys:read", m.KeyOut, self_service=True,
             description=f"{KEY_ID} {IN_ORG}: {OTHER_ORG_KEY}. With `keys:self` alone, only the member's own."),
    Endpoint("PATCH", "/keys/{id}", "Change a key's settings", patch_key, "keys:write", m.KeyOut,
             body=m.KeyPatch, conflicts=True, per_kind=True,
             description="A revoked key cannot change (409). Needs `keys:write:<kind>` for the key's kind "
                         f"(`keys:write` covers every kind). {IN_ORG}: {OTHER_ORG_KEY}. Refused (403) when "
                         f"the changed key {WITHIN}."),
    Endpoint("POST", "/keys/{id}/revoke", "Revoke a key now (idempotent, permanent)", revoke_key, "keys:write",
             m.KeyOut, per_kind=True, self_service=True,
             description="Needs `keys:write:<kind>` for the key's kind (`keys:write` covers every kind), or "
                         f"`keys:self` for the member's own per-user keys. {IN_ORG}: {OTHER_ORG_KEY}."),
    Endpoint("POST", "/keys/{id}/report-leak", "Report that a key leaked", report_leak, "keys:write",
             m.KeyLeakReported, body=m.LeakReportIn, per_kind=True,
             description="Revokes the key, or only flags it per its kind's on_leak; audited as key.leaked and "
             "announced by webhook (the first report). Reporting again changes nothing more. Needs "
             f"`keys:write:<kind>` for the key's kind. {IN_ORG}: {OTHER_ORG_KEY}."),
    Endpoint("POST", "/keys/{id}/rotate", "Replace a key with a new one with the same settings", rotate_key,
             "keys:write", m.KeyRotated, status=201, body=m.KeyRotate, body_required=False, conflicts=True,
             location="/keys/{id}", per_kind=True,
             description="The old key is revoked now, or after `grace`. A revoked or expired key cannot be "
                         "rotated (409). Needs `keys:write:<kind>` for the key's kind (`keys:write` covers "
                         f"every kind). {IN_ORG}: {OTHER_ORG_KEY}. Refused (403) when the new key "
                         f"{WITHIN}."),
    Endpoint("GET", "/keys/{id}/allowlist-suggestion", "Suggest an IP allowlist for a key", allowlist_suggestion,
             "keys:read", m.AllowlistSuggestionOut, query=m.SuggestionQuery,
             description="The narrowest CIDRs (at most `max`, IPv4 and IPv6) covering the client addresses of the "
                         "key's allowed requests of the last `days` days, with the requests each covers, and the "
                         "`keygate keys update --allow-ip` command that applies them. "
                         f"{IN_ORG}: {OTHER_ORG_KEY}."),
    Endpoint("GET", "/keys/{id}/usage", "A key's requests per hour by decision", key_usage, "keys:read",
             m.UsageOut, query=m.UsageQuery, self_service=True,
             description="The key's request records of the last `hours` UTC hours (the current one included), "
                         "counted per hour and decision, for a chart of its use. Records older than "
                         "`audit.retention_days` are deleted and count as none. "
                         f"{IN_ORG}: {OTHER_ORG_KEY}. With `keys:self` alone, only the member's own."),
    Endpoint("GET", "/roles", "List roles", list_roles, "roles:read", m.RolePage, query=m.PageQuery,
             description="Roles are shared by every org."),
    Endpoint("GET", "/roles/{name}", "One role", get_role, "roles:read", m.RoleOut),
    Endpoint("PUT", "/roles/{name}", "Create or replace a role", put_role, "roles:write", m.RoleOut,
             body=m.RolePut, conflicts=True,
             description="The built-in admin role cannot change (409). Roles are shared by every org: "
                         "changing one needs `orgs:any` too (403 without)."),
    Endpoint("DELETE", "/roles/{name}", "Delete a role", delete_role, "roles:write", None, status=204,
             conflicts=True,
             description="A role still used by keys or members cannot be deleted (409). Needs `orgs:any` "
                         "too (403 without)."),
    Endpoint("GET", "/orgs", "The orgs the admin key may act in", list_orgs, "keys:read", m.OrgList,
             self_service=True,
             description="Every org that holds keys or members for an admin key with `orgs:any`; its own "
                         "org for any other."),
    Endpoint("GET", "/orgs/{org}/members", "List an org's members", list_members, "roles:read", m.MemberPage,
             query=m.PageQuery,
             description="Needs roles:read: a member list is who holds which role (DESIGN.md lists no "
                         f"members:read). {IN_ORG}: another org is answered 404."),
    Endpoint("PUT", "/orgs/{org}/members/{user}", "Add a member or change their role", put_member,
             "members:write", m.MemberOut, body=m.MemberPut,
             description=f"{IN_ORG}: another org is answered 404. Refused (403) when the role grants more "
                         "than the admin key holds, unless it has `orgs:any`."),
    Endpoint("DELETE", "/orgs/{org}/members/{user}", "Remove a member (their per-user keys stop working)",
             delete_member, "members:write", None, status=204,
             description=f"{IN_ORG}: another org is answered 404."),
    Endpoint("POST", "/orgs/{org}/members/{user}/agent-key", "Issue the member's agent key", issue_agent_key,
             "members:write", m.AgentKeyIssued, status=201, location="/keys/{id}",
             description="Revokes the member's previous agent key in the same transaction. "
                         f"{IN_ORG}: another org is answered 404. Refused (403) when the agent key "
                         f"{WITHIN}."),
    Endpoint("GET", "/trust-policies", "List trust policies", list_trust_policies, "trust:read",
             m.TrustPolicyPage, query=m.PageQuery,
             description=f"A policy yields keys in its org and is that org's. {IN_ORG}: it lists its org's "
                         "policies only."),
    Endpoint("GET", "/trust-policies/{name}", "One trust policy", get_trust_policy, "trust:read",
             m.TrustPolicyOut, description=f"{IN_ORG}: another org's policy is answered 404."),
    Endpoint("PUT", "/trust-policies/{name}", "Create or replace a trust policy", put_trust_policy, "trust:write",
             m.TrustPolicyOut, body=m.TrustPolicyPut, conflicts=True,
             description="Which OIDC tokens may be exchanged for a short-lived key at "
                         "`POST /.well-known/keygate/token` on the proxy listener, and the key they yield. "
                         "The role must exist. The keys are of the kind automation: needs "
                         f"`keys:write:automation` too. {IN_ORG}: another org is refused (403), a name another "
                         f"org holds is taken (409). Refused (403) when a key it yields {WITHIN}."),
    Endpoint("DELETE", "/trust-policies/{name}", "Remove a trust policy", delete_trust_policy, "trust:write", None,
             status=204, description="Keys already exchanged under it keep working until they expire. "
                                     f"{IN_ORG}: another org's policy is answered 404."),
    Endpoint("GET", "/audit", "Management events and request records, newest first", audit, "audit:read",
             m.AuditPage, query=m.AuditQuery,
             description=f"{IN_ORG}: it reads events about its org's keys, members and trust policies and "
                         "the request records of its org's keys, nothing else."),
    Endpoint("GET", "/whoami", "The admin key making this request", whoami, "keys:read", m.WhoAmI,
             per_kind=True, self_service=True,
             description="Its org, its user, whether it acts in any org (`orgs:any`) and whether it manages "
                         "its own per-user keys (`keys:self`)."),
)
