"""The plan of ``keygate apply``: the store's state compared with a state file, as service calls in order.

Each change is a call of :class:`KeyService` in dependency order: roles first, as members, keys and
trust policies name them; removals last (keys, trust policies, members, then the roles they freed).
A plan that could not be applied whole (a role or member neither declared nor kept, a role still in
use, a past expiry, a key's unchangeable field) is :class:`StateProblems`, before anything changes.

What ``--prune`` removes, of what the file does not declare:

* roles: any but the built-in ``admin``, when the file has a ``[roles]`` section;
* members: of each org the file has a ``[members.ORG]`` table for;
* trust policies and keys: only those apply created (their ``created_by`` ends in ``via apply``),
  when the file has a ``[trust]`` section or a ``keys`` array. The bootstrap admin key, keys made
  with ``keys create`` or the admin API, agent keys and keys minted by a token exchange are never
  pruned: apply cannot know their owner meant them to go.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .declared import DeclaredKey, DeclaredPolicy, State, StateProblems, policy_entry
from .errors import FieldProblem
from .service import ADMIN_ROLE, KeyService
from ..models import KeyRecord, KeyStatus, Member, Role, TrustPolicy, iso
from ..store import Transaction

VIA = "apply"
PRUNED = "not declared (apply --prune)"
# The actor of keys minted by a token exchange (gateway.identity.exchange): short-lived, never declared.
EXCHANGE_ACTOR = "exchange:"


def managed(created_by: str) -> bool:
    """Whether apply made it (the service's creator: ``cli:alice via apply``)."""
    return created_by.endswith(f" via {VIA}")


@dataclass(frozen=True, slots=True)
class Current:
    """The store's state as far as a state file describes it."""

    roles: dict[str, Role]
    members: dict[str, dict[str, Member]]  # org -> user -> member
    policies: dict[str, TrustPolicy]
    keys: list[KeyRecord]  # every key not revoked (revoked_at unset): agent and exchanged keys too

    def named_keys(self) -> list[KeyRecord]:
        """The keys a state file declares: made by a person or a program, not agent or exchanged keys."""
        return [k for k in self.keys if not k.agent and not k.created_by.startswith(EXCHANGE_ACTOR)]


async def read_current(tx: Transaction, now: datetime) -> Current:
    members: dict[str, dict[str, Member]] = {}
    for org in await tx.list_orgs():
        members[org] = {m.user: m for m in await tx.list_members(org)}
    keys: list[KeyRecord] = []
    # Unrevoked keys are the active ones and the expired ones; a key in a rotation's grace (revoked_at
    # set, in the future) is on its way out and no longer the one its name refers to.
    for status in (KeyStatus.ACTIVE, KeyStatus.EXPIRED):
        after: tuple[datetime, str] | None = None
        while page := await tx.list_keys(now=now, status=status, limit=1000, after=after):
            keys += [k for k in page if k.revoked_at is None]
            after = (page[-1].created_at, page[-1].id)
    return Current(
        roles={r.name: r for r in await tx.list_roles()}, members={o: m for o, m in members.items() if m},
        policies={p.name: p for p in await tx.list_trust_policies()}, keys=keys,
    )


Action = Callable[[KeyService], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Change:
    sign: str  # + create, ~ update, - remove
    text: str  # "create key ci-deploy (acme)"
    action: Action = field(repr=False, compare=False)
    details: tuple[str, ...] = ()  # "servers [prod-1] -> [prod-1, prod-2]"

    def line(self) -> str:
        return f"{self.sign} {self.text}" + (f": {'; '.join(self.details)}" if self.details else "")


@dataclass(slots=True)
class Plan:
    changes: list[Change] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # not declared, left alone without --prune

    def lines(self) -> list[str]:
        if not self.changes:
            lines = ["No changes."]
        else:
            counts = {sign: sum(c.sign == sign for c in self.changes) for sign in "+~-"}
            lines = [c.line() for c in self.changes]
            lines.append(f"Plan: {counts['+']} to create, {counts['~']} to update, {counts['-']} to remove.")
        if self.kept:
            lines.append(f"Not declared, kept (apply --prune removes them): {', '.join(self.kept)}")
        return lines


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(value) + "]"
    return str(value)


def _differences(before: dict[str, Any], after: dict[str, Any], sets: Iterable[str]) -> dict[str, str]:
    """``field old -> new`` by field, for each setting that differs; lists compared as sets (their order means nothing)."""
    sets = set(sets)
    found = {}
    for name, new in after.items():
        old = before[name]
        if not (set(old) == set(new) if name in sets else old == new):
            found[name] = f"{name} {_shown(old)} -> {_shown(new)}"
    return found


class _Planner:
    def __init__(self, state: State, current: Current, *, prune: bool, now: datetime) -> None:
        self.state, self.current, self.prune, self.now = state, current, prune, now
        self.problems: list[FieldProblem] = []
        self.plan = Plan()
        self.first: list[Change] = []  # creations and updates, in dependency order
        self.key_roles: dict[str, str | None] = {}  # key id -> its new role, for keys the plan updates
        self.revoked: set[str] = set()  # keys the plan revokes
        self.removed_policies: set[str] = set()
        self.last: list[Change] = []  # removals, in reverse dependency order

    def problem(self, path: str | None, message: str) -> None:
        self.problems.append(FieldProblem(path, message))

    def undeclared(self, what: str, prunable: bool, action: Action, sign_text: str) -> None:
        if self.prune and prunable:
            self.last.append(Change("-", sign_text, action))
        else:
            self.plan.kept.append(what)

    # -- roles -----------------------------------------------------------
    def roles(self) -> None:
        declared, stored = self.state.roles, self.current.roles
        for role in (declared or {}).values():
            if role.name == ADMIN_ROLE:
                continue  # checked as '*' when read: the built-in role, always there
            before = stored.get(role.name)
            grants = role.grants
            if before is None:
                self.first.append(Change("+", f"create role {role.name}", lambda s, r=role: s.put_role(r.name, r.grants),
                                         (f"grants {_shown(grants)}",)))
            elif set(before.grants) != set(grants):
                self.first.append(Change("~", f"update role {role.name}", lambda s, r=role: s.put_role(r.name, r.grants),
                                         (f"grants {_shown(before.grants)} -> {_shown(grants)}",)))

    def roles_removed(self) -> list[str]:
        if self.state.roles is None or not self.prune:
            return []
        return [n for n in self.current.roles if n != ADMIN_ROLE and n not in self.state.roles]

    def role_known(self, name: str | None) -> bool:
        """Whether the role exists once the plan is applied."""
        if name is None or name == ADMIN_ROLE or name in (self.state.roles or {}):
            return True
        return name in self.current.roles and name not in self.roles_removed()

    def check_role(self, path: str, name: str | None) -> None:
        if not self.role_known(name):
            where = ("not declared in [roles], and --prune deletes every role [roles] leaves out"
                     if name in self.current.roles else "not declared in [roles] and not in the store")
            self.problem(f"{path}.role" if not path.startswith("members.") else path, f"role {name!r}: {where}")

    # -- members ---------------------------------------------------------
    def members(self) -> None:
        for org, users in self.state.members.items():
            stored = self.current.members.get(org, {})
            for member in users.values():
                self.check_role(member.path, member.role)
                before = stored.get(member.user)
                run = lambda s, m=member: s.set_member(m.org, m.user, m.role)  # noqa: E731
                if before is None:
                    self.first.append(Change("+", f"add member {org}/{member.user}", run, (f"role {member.role}",)))
                elif before.role != member.role:
                    self.first.append(Change("~", f"update member {org}/{member.user}", run,
                                             (f"role {before.role} -> {member.role}",)))
            for user in stored:
                if user not in users:
                    self.undeclared(f"member {org}/{user}", True,
                                    lambda s, o=org, u=user: s.remove_member(o, u), f"remove member {org}/{user}")

    def member_known(self, org: str, user: str) -> bool:
        if user in self.state.members.get(org, {}):
            return True
        pruned = self.prune and org in self.state.members
        return user in self.current.members.get(org, {}) and not pruned

    # -- trust policies --------------------------------------------------
    def trust(self) -> None:
        declared = self.state.trust
        for policy in (declared or {}).values():
            self.check_role(policy.path, policy.values["role"])
            before = self.current.policies.get(policy.name)
            if before is None:
                self.first.append(Change("+", f"create trust policy {policy.name} ({policy.values['org']})",
                                         lambda s, p=policy: _put_policy(s, p, replace=False)))
                continue
            old, new = _policy_settings(before), _declared_policy_settings(policy)
            details = _differences(old, new, ("operations", "servers", "ip_allowlist"))
            if details:
                self.first.append(Change("~", f"update trust policy {policy.name}",
                                         lambda s, p=policy: _put_policy(s, p, replace=True), tuple(details.values())))
        if declared is None:
            return
        for name, stored in self.current.policies.items():
            if name not in declared and managed(stored.created_by):
                if self.prune:
                    self.removed_policies.add(name)
                self.undeclared(f"trust policy {name}", True, lambda s, n=name: s.remove_trust_policy(n),
                                f"remove trust policy {name}")

    # -- keys ------------------------------------------------------------
    def keys(self) -> None:
        declared = self.state.keys
        named: dict[tuple[str, str], list[KeyRecord]] = {}
        for record in self.current.named_keys():
            named.setdefault((record.org, record.name), []).append(record)
        for identity, key in (declared or {}).items():
            self.check_role(key.path, key.role)
            if key.user and not self.member_known(key.org, key.user):
                self.problem(f"{key.path}.user", f"user {key.user!r} is not a member of org {key.org!r} "
                                                 f"(declare them in [members.{key.org}])")
            found = named.get(identity, [])
            if len(found) > 1:
                self.problem(key.path, f"{len(found)} keys named {key.name!r} in org {key.org!r} "
                                       f"({', '.join(k.id for k in found)}): rename or revoke all but one")
                continue
            if not found:
                self.check_expiry(key)
                self.first.append(Change("+", f"create key {key.name} ({key.org})",
                                         lambda s, k=key: _create_key(s, k)))
                continue
            self.key_update(key, found[0])
        if declared is None:
            return
        for (org, name), records in sorted(named.items()):
            if (org, name) in declared:
                continue
            for record in records:
                if managed(record.created_by):
                    if self.prune:
                        self.revoked.add(record.id)
                    self.undeclared(f"key {name} ({org}) {record.id}", True,
                                    lambda s, i=record.id: s.revoke_key(i, reason=PRUNED),
                                    f"revoke key {name} ({org}) {record.id}")

    def key_update(self, key: DeclaredKey, record: KeyRecord) -> None:
        for name in ("kind", "user", "canary"):
            if getattr(record, name) != getattr(key, name):
                self.problem(f"{key.path}.{name}", f"key {record.id} has {name} {_shown(getattr(record, name))}: a "
                             f"key's kind, user and canary cannot change (revoke it or give this one another name)")
                return
        old = {"role": record.role, "operations": record.operations, "servers": record.servers,
               "ip_allowlist": record.ip_allowlist, "rate_limit": record.rate_limit, "expires": iso(record.expires_at)}
        new = {"role": key.role, "operations": key.operations, "servers": key.servers,
               "ip_allowlist": key.ip_allowlist, "rate_limit": key.rate_limit, "expires": iso(key.expires_at)}
        details = _differences(old, new, ("operations", "servers", "ip_allowlist"))
        if not details:
            return
        if "expires" in details:
            self.check_expiry(key)
        self.key_roles[record.id] = key.role
        self.first.append(Change("~", f"update key {key.name} ({key.org}) {record.id}",
                                 lambda s, k=key, i=record.id, c=frozenset(details): _update_key(s, i, k, c),
                                 tuple(details.values())))

    def check_expiry(self, key: DeclaredKey) -> None:
        if key.expires_at is not None and key.expires_at <= self.now:
            self.problem(f"{key.path}.expires", f"{iso(key.expires_at)}: that time is already past")

    # -- what frees a role -----------------------------------------------
    def roles_deleted(self) -> None:
        for name in self.roles_removed():
            # What still names the role once the plan is applied (declared entries were checked as read).
            users = [f"key {k.id}" for k in self.current.keys
                     if k.id not in self.revoked and self.key_roles.get(k.id, k.role) == name]
            users += [f"member {org}/{u}" for org, members in self.current.members.items()
                      for u, m in members.items() if m.role == name and org not in self.state.members]
            users += [f"trust policy {p.name}" for p in self.current.policies.values()
                      if p.role == name and p.name not in (self.state.trust or {})
                      and p.name not in self.removed_policies]
            if users:
                self.problem(f"roles.{name}", f"not declared, but --prune cannot delete role {name!r}: still used "
                                              f"by {', '.join(users[:5])}{' ...' if len(users) > 5 else ''}; "
                                              "declare it or reassign them")
            self.last.append(Change("-", f"delete role {name}", lambda s, n=name: s.delete_role(n)))
        if self.state.roles is not None and not self.prune:
            self.plan.kept += [f"role {n}" for n in self.current.roles
                               if n != ADMIN_ROLE and n not in self.state.roles]

    def run(self) -> Plan:
        self.roles()
        self.members()
        self.trust()
        self.keys()
        self.roles_deleted()
        if self.problems:
            raise StateProblems(self.problems[0].message, problems=self.problems)
        # Removals after everything declared: keys revoked before the members and roles they name go.
        order = {"revoke": 0, "remove trust": 1, "remove member": 2, "delete role": 3}
        self.last.sort(key=lambda c: next(v for k, v in order.items() if c.text.startswith(k)))
        self.plan.changes = self.first + self.last
        return self.plan


def _policy_settings(policy: TrustPolicy) -> dict[str, Any]:
    entry = policy_entry(policy)
    entry["lifetime"] = policy.lifetime
    entry["operations"], entry["ip_allowlist"] = list(policy.operations), list(policy.ip_allowlist)
    return entry


def _declared_policy_settings(policy: DeclaredPolicy) -> dict[str, Any]:
    v = policy.values
    return {"issuer": v["issuer"], "audience": v["audience"], "org": v["org"], "role": v["role"],
            "operations": list(v["operations"]), "servers": list(v["servers"]),
            "ip_allowlist": list(v["ip_allowlist"]), "rate_limit": v["rate_limit"], "lifetime": v["lifetime"],
            "jwks_file": v["jwks_file"], "conditions": dict(v["conditions"])}


async def _put_policy(service: KeyService, policy: DeclaredPolicy, *, replace: bool) -> TrustPolicy:
    v = policy.values
    return await service.put_trust_policy(
        v["name"], issuer=v["issuer"], audience=v["audience"], conditions=dict(v["conditions"]), org=v["org"],
        role=v["role"], operations=v["operations"], servers=v["servers"], ip_allowlist=v["ip_allowlist"],
        rate_limit=v["rate_limit"], lifetime=v["lifetime"], jwks_file=v["jwks_file"], replace=replace,
    )


def _expires(key: DeclaredKey) -> str:
    return key.expires_at.isoformat() if key.expires_at is not None else "never"


async def _create_key(service: KeyService, key: DeclaredKey) -> tuple[KeyRecord, str]:
    return await service.create_key(
        name=key.name, kind=key.kind, org=key.org, user=key.user, role=key.role, operations=key.operations,
        servers=() if key.canary else key.servers, ip_allowlist=key.ip_allowlist, rate_limit=key.rate_limit,
        expires=_expires(key), canary=key.canary,
    )


async def _update_key(service: KeyService, key_id: str, key: DeclaredKey, changed: frozenset[str]) -> KeyRecord:
    given: dict[str, Any] = {
        "role": key.role, "operations": key.operations, "servers": key.servers, "ip_allowlist": key.ip_allowlist,
        "rate_limit": key.rate_limit, "expires": _expires(key),
    }
    return await service.update_key(key_id, **{name: value for name, value in given.items() if name in changed})


def plan_changes(state: State, current: Current, *, prune: bool, now: datetime) -> Plan:
    """The changes that make the store match ``state``; :class:`StateProblems` when it cannot."""
    return _Planner(state, current, prune=prune, now=now).run()
