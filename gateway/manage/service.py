"""Key management: the one implementation of every action, for the CLI and the admin API.

Each action runs in one store transaction that also writes its audit event
and a change-feed entry, so an action without its audit record cannot happen
and running gateways learn of every authorization change. With a notifier
(Redis configured), the changes are also published once the transaction has
committed, so gateways hear of them at once instead of at their next poll.

Each action first checks and normalises its input (with :mod:`.inputs`),
before it reads or writes the store: this is the one place values are
checked, for the CLI and the admin API alike, so both refuse the same input
with the same message, and input refused on its face touches no store.
"""

from __future__ import annotations

import asyncio
import math
import secrets
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, NamedTuple, Protocol, TypeVar

from . import inputs as fields
from .acting import OPERATOR, ORGS_ANY, Actor, kind_operation
from .errors import (
    ConflictError, FieldProblem, Forbidden, InvalidInput, NotFound, Replayed, ServiceError, no_such_key,
)
from .audit import AuditFilter, AuditPage, Position, query_audit, utcnow
from ..config.schema import Settings
from ..keys import KeyParser, MalformedKey, ParsedKey, SecretHasher, generate, looks_like_key_id
from ..models import KeyRecord, KeyStatus, Member, Role, TrustPolicy, iso
from ..store import KeyStore, Transaction, Transactions
from ..config.units import parse_duration
from ..hygiene.events import queue_event
from ..hygiene.due import expiry_unwarned, idle_unannounced
from ..hygiene.allowlist import MAX_ADDRESSES, Suggestion, TooFewBlocks, suggestion
from .usage import MAX_HOURS, Usage, window

ADMIN_ROLE = "admin"
MAX_BLOCKS = 16  # CIDRs an allowlist suggestion may have at most


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()


def hasher_from(settings: Settings) -> SecretHasher:
    a = settings.keys.argon2
    return SecretHasher(time_cost=a.time_cost, memory_cost=a.memory_cost, parallelism=a.parallelism)


async def bootstrap(store: KeyStore, *, clock: Callable[[], datetime] = utcnow) -> list[int]:
    """Apply migrations and make sure the built-in ``admin`` role exists."""
    applied = await store.migrate()
    async with store.transaction() as tx:
        now = clock()
        # Insert-if-absent, so concurrent migrations create (and audit) it once.
        if await tx.insert_role_if_absent(Role(ADMIN_ROLE, ("*",), now, now)):
            await tx.add_audit(at=now, actor="system:migrate", action="role.set", target=ADMIN_ROLE,
                               details={"grants": ["*"]})
    return applied


async def resolve_pepper(store: KeyStore, settings: Settings) -> bytes:
    """The configured pepper, else the one generated into the store on first use (``keygate migrate``'s).

    Read before it is written, so a role that may only read ``meta`` (the data plane's) finds the
    stored one; a pepper that is neither configured nor stored, with such a role, is
    :class:`StoreRefused`.
    """
    if settings.keys.pepper:
        return settings.keys.pepper.encode()
    async with store.read() as tx:
        stored = await tx.get_meta("pepper")
    if stored is not None:
        return stored.encode()
    async with store.transaction() as tx:
        return (await tx.set_meta_if_absent("pepper", secrets.token_urlsafe(48))).encode()


T = TypeVar("T")


class _Checks:
    """Checks an action's values with :mod:`.inputs`, collecting every problem before anything is refused.

    Each problem names the parameter it is about (a list's item by its place: ``operations.1``), so
    the admin API can answer per field; the CLI shows the first.
    """

    def __init__(self) -> None:
        self.problems: list[FieldProblem] = []

    def one(self, field: str, check: Callable[[Any], T], value: Any) -> T:
        try:
            return check(value)
        except fields.InvalidField as exc:
            self.problems.append(FieldProblem(field, str(exc)))
            return value  # unused: done() refuses the input

    def each(self, field: str, check: Callable[[Any], T], values: Iterable[Any]) -> tuple[T, ...]:
        """Every item checked; a value given twice counts once."""
        return tuple(dict.fromkeys(self.one(f"{field}.{place}", check, v) for place, v in enumerate(values)))

    def whole(self, check: Callable[[], T]) -> T | None:
        """A check whose problem is reported for the input as a whole (the admin API names no field for it)."""
        try:
            return check()
        except (fields.InvalidField, InvalidInput) as exc:
            self.problems.append(FieldProblem(None, str(exc)))
            return None

    def done(self) -> None:
        if self.problems:
            raise InvalidInput(self.problems[0].message, problems=self.problems)


def _prefix(settings: Settings, kind: str) -> str:
    """The key prefix of ``kind``."""
    kinds = settings.keys.kinds
    if kind not in kinds:
        raise InvalidInput(f"kind {kind!r}: unknown; configured kinds are {', '.join(sorted(kinds))}")
    return kinds[kind].prefix


def _new_key_values(
    settings: Settings, now: datetime, *, name: str, kind: str | None, org: str, user: str, role: str | None,
    operations: Iterable[str], servers: Iterable[str], ip_allowlist: Iterable[str], rate_limit: str | None,
    expires: str, canary: bool = False,
) -> dict[str, Any]:
    """A new key's settings, checked and normalised without touching the store (so bad input writes nothing)."""
    check = _Checks()
    if canary:
        _no_access_for_canary(check, role=role, operations=operations, servers=servers, ip_allowlist=ip_allowlist,
                              rate_limit=rate_limit)
    kind = kind or settings.keys.default_kind
    # The kind is checked against the configuration, the expiry against the clock: both are
    # refusals of the input as a whole, and the kind's is the one shown first.
    values = dict(
        kind=kind, prefix=check.whole(lambda: _prefix(settings, kind)),
        name=check.one("name", fields.key_name, name), org=check.one("org", fields.org, org),
        user=check.one("user", fields.user, user) if user else "",
        role=check.one("role", fields.role, role) if role is not None else None,
        operations=check.each("operations", fields.operation, operations),
        servers=check.each("servers", fields.server, servers) or ("*",),
        ip_allowlist=check.each("ip_allowlist", fields.cidr, ip_allowlist),
        rate_limit=check.one("rate_limit", fields.rate_limit, rate_limit),
        expires_at=check.whole(lambda: fields.parse_expiry(expires, now)),
    )
    check.done()
    if values["role"] is None and not values["operations"] and not canary:
        raise InvalidInput("a key needs a role (--role) or at least one operation (--operation)")
    return values


# A canary never authorizes: settings that would govern what it may do are refused, not ignored, so
# nobody believes they made a working key (or a canary that grants something).
CANARY_REFUSES = ("role", "operations", "servers", "ip_allowlist", "rate_limit")


def _no_access_for_canary(check: _Checks, **given: Any) -> None:
    for name in CANARY_REFUSES:
        if given[name] not in (None, "", ()):
            check.problems.append(FieldProblem(
                name, f"{name}: a canary key never authorizes, so it takes no {name.replace('_', ' ')}"))


def _key_changes(
    now: datetime, *, name: str | None, role: str | None, operations: Sequence[str] | None,
    servers: Sequence[str] | None, ip_allowlist: Sequence[str] | None, rate_limit: str | None, expires: str | None,
) -> dict[str, Any]:
    """The checked changes of an update; ``None``/UNSET leaves a setting as it is."""
    check = _Checks()
    changes: dict[str, Any] = {k: v for k, v in {
        "name": check.one("name", fields.key_name, name) if name is not None else UNSET,
        "role": (check.one("role", fields.role, role) if role is not None else None) if role is not UNSET else UNSET,
        "operations": check.each("operations", fields.operation, operations) if operations is not None else UNSET,
        "servers": (check.each("servers", fields.server, servers) or ("*",)) if servers is not None else UNSET,
        "ip_allowlist": check.each("ip_allowlist", fields.cidr, ip_allowlist) if ip_allowlist is not None else UNSET,
        "rate_limit": check.one("rate_limit", fields.rate_limit, rate_limit) if rate_limit is not UNSET else UNSET,
        "expires_at": check.whole(lambda: fields.parse_expiry(expires, now)) if expires is not None else UNSET,
    }.items() if v is not UNSET}
    check.done()
    if not changes:
        raise InvalidInput("nothing to change: give at least one setting")
    return changes


def _grace_seconds(grace: str | float | None) -> float:
    try:
        return parse_duration(grace) if grace not in (None, "") else 0.0
    except ValueError as exc:
        raise InvalidInput(f"grace {grace!r}: {exc}") from None


class Notifier(Protocol):
    async def publish(self, changes: Sequence[tuple[str, str]], *, at: datetime | None = None) -> bool: ...


class KeyService:
    """Every management action, performed as ``actor`` (``cli:alice``, an admin key id, ...).

    ``acting`` bounds what the actor may do (:mod:`.acting`): the operator at the command line
    by nothing, an admin key by its org, the kinds it manages and its own grants.
    """

    def __init__(
        self, store: Transactions, settings: Settings, *, actor: str,
        clock: Callable[[], datetime] = utcnow, hasher: SecretHasher | None = None,
        notifier: Notifier | None = None, acting: Actor = OPERATOR, via: str | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.actor = actor
        # How the actor acted when not by one command (``apply``): in every audit event's details, and in
        # what a new key's or trust policy's created_by says (``cli:alice via apply``), which is how
        # ``apply --prune`` knows what it made.
        self.via = via
        self.creator = f"{actor} via {via}" if via else actor
        self.acting = acting
        self.clock = clock
        self.hasher = hasher or hasher_from(settings)
        self.notifier = notifier
        # Changes of each open transaction (entity, target, when), published once it commits.
        self._pending: dict[int, list[tuple[str, str, datetime]]] = {}

    # -- helpers ---------------------------------------------------------
    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Transaction]:
        async with self.store.transaction() as tx:
            self._pending[id(tx)] = changes = []
            try:
                yield tx
            finally:
                del self._pending[id(tx)]
        # Only after the commit: a gateway that hears the notice must read the new state.
        if changes and self.notifier is not None:
            # The time the change feed holds too: subscribers measure the notice's delay from it.
            await self.notifier.publish([(entity, target) for entity, target, _at in changes], at=changes[0][2])

    async def _audit(
        self, tx: Transaction, now: datetime, action: str, target: str, *, in_org: str | None, **details: Any,
    ) -> None:
        """One audit event about ``target`` in the org ``in_org`` (None: shared by every org, as roles are)."""
        if self.via is not None:
            details["via"] = self.via
        await tx.add_audit(at=now, actor=self.actor, action=action, target=target, details=details, org=in_org,
                           actor_org=self.acting.org)

    async def _event(self, tx: Transaction, now: datetime, event: str, record: KeyRecord, **details: Any) -> None:
        """Queue a webhook event about ``record`` in the transaction that makes the change."""
        await queue_event(tx, self.settings, event, now, record, **details)

    async def _changed(self, tx: Transaction, now: datetime, entity: str, target: str) -> None:
        await tx.add_change(at=now, entity=entity, target=target)
        self._pending[id(tx)].append((entity, target, now))

    def key_ref(self, text: str) -> str:
        """The key id ``text`` names: a pasted full key counts as its id.

        People paste a leaked key to revoke it; it must work, and the secret
        must never be echoed back in a message.
        """
        try:
            return KeyParser(k.prefix for k in self.settings.keys.kinds.values()).parse(text).key_id
        except MalformedKey:
            return text

    async def _new_secret(self, tx: Transaction, prefix: str) -> tuple[ParsedKey, str]:
        while True:
            parsed = generate(prefix)
            # 62**12 ids make a clash astronomically unlikely; checking costs one indexed read.
            if await tx.get_key(parsed.key_id) is None:
                break
        secret_hash = await asyncio.to_thread(self.hasher.hash, parsed.secret)
        return parsed, secret_hash

    async def _require_role(self, tx: Transaction, role: str | None) -> None:
        if role is not None and await tx.get_role(role) is None:
            raise InvalidInput(f"role {role!r}: no such role (see `keygate roles list`)")

    def _visible(self, record: KeyRecord | None, key_id: str) -> KeyRecord:
        """``record`` if the actor may see it; else (also for another org's key) the answer of no such key."""
        if record is None or not self.acting.sees_key(record, self.settings.keys.kinds):
            raise no_such_key(key_id)
        return record

    def _check_manages(self, record: KeyRecord, doing: str, *, own: bool = False) -> None:
        """Refuse (403) unless the actor manages keys of the record's kind (or, with ``own``, it is its own)."""
        if self.acting.may(kind_operation(record.kind)) or (own and self.acting.owns(record)):
            return
        raise Forbidden(f"{doing} a key of the kind {record.kind!r} needs the operation "
                        f"{kind_operation(record.kind)} (keys:write covers every kind)")

    async def _key_for_change(self, tx: Transaction, key_id: str, now: datetime, doing: str) -> KeyRecord:
        record = self._visible(await tx.get_key(key_id, for_update=True), key_id)
        self._check_manages(record, doing)
        if record.status(now) is KeyStatus.REVOKED:
            raise ConflictError(f"key {key_id} is revoked; revocation is permanent")
        return record

    async def _grant_sets(self, tx: Transaction, record: KeyRecord) -> list[tuple[str, ...]]:
        """The grant sets the key holds of its own: its role's and its operations, or an agent key's member's.

        A per-user key's member role bounds it too (prepared.py), but is left out here: the role may
        change later, so a key whose own grants reach further than the acting admin key would then do
        more than that admin key ever held.
        """
        if record.agent:
            member = await tx.get_member(record.org, record.user)
            return [await self._role_grants(tx, member.role if member else None)]
        sets = [await self._role_grants(tx, record.role)] if record.role is not None else []
        if record.operations:
            sets.append(record.operations)
        return sets

    @staticmethod
    async def _role_grants(tx: Transaction, name: str | None) -> tuple[str, ...]:
        role = await tx.get_role(name) if name is not None else None
        return role.grants if role is not None else ()

    async def _check_within(self, tx: Transaction, record: KeyRecord, what: str) -> None:
        """Refuse (403) a key that would do more than the acting admin key may."""
        self.acting.check_within(what, await self._grant_sets(tx, record), record.servers)

    def _check_creates(self, kind: str, org: str, user: str) -> None:
        """Refuse (403) a new key in another org, of a kind the actor does not manage, or another user's
        when the actor manages only its own."""
        acting = self.acting
        acting.check_org(org)
        if acting.may(kind_operation(kind)):
            return
        if acting.self_service and org == acting.org:
            if user != acting.user:
                raise Forbidden(f"with keys:self a member creates only their own per-user keys: "
                                f"set user to {acting.user!r}")
            return
        raise Forbidden(f"creating a key of the kind {kind!r} needs the operation {kind_operation(kind)} "
                        "(keys:write covers every kind)")

    # -- keys ------------------------------------------------------------
    async def create_key(
        self, *, name: str, kind: str | None = None, org: str | None = None, user: str = "",
        role: str | None = None, operations: Iterable[str] = (), servers: Iterable[str] = (),
        ip_allowlist: Iterable[str] = (), rate_limit: str | None = None, expires: str = "never",
        canary: bool = False,
    ) -> tuple[KeyRecord, str]:
        """Create a key; returns its record and the full key, which is never available again.

        ``org`` defaults to the acting admin key's org (``default`` at the command line). A ``canary``
        key never authorizes (every use is refused as an unknown key's and raises an alarm); it takes
        no role, operations, servers, allowlist or rate limit.
        """
        now = self.clock()
        operations, servers, ip_allowlist = tuple(operations), tuple(servers), tuple(ip_allowlist)
        values = _new_key_values(
            self.settings, now, name=name, kind=kind, org=org if org is not None else self.acting.home_org,
            user=user, role=role, operations=operations, servers=servers, ip_allowlist=ip_allowlist,
            rate_limit=rate_limit, expires=expires, canary=canary,
        )
        kind, prefix = values.pop("kind"), values.pop("prefix")
        self._check_creates(kind, values["org"], values["user"])
        async with self._transaction() as tx:
            await self._require_role(tx, values["role"])
            if values["user"] and await tx.get_member(values["org"], values["user"]) is None:
                raise InvalidInput(
                    f"user {values['user']!r} is not a member of org {values['org']!r} "
                    "(add them with `keygate members set`)"
                )
            parsed, secret_hash = await self._new_secret(tx, prefix)
            record = KeyRecord(
                id=parsed.key_id, kind=kind, created_by=self.creator, created_at=now, revoked_at=None,
                last_used_at=None, last_used_ip=None, secret_hash=secret_hash, canary=canary, **values,
            )
            await self._check_within(tx, record, "the new key")
            await tx.insert_key(record)
            await self._audit(tx, now, "key.create", record.id, in_org=record.org, **_settings_of(record))
            await self._event(tx, now, "key.created", record, actor=self.actor)
        return record, parsed.full

    async def list_keys(
        self, *, org: str | None = None, user: str | None = None, status: str | None = None,
        kind: str | None = None, limit: int = 1000, offset: int = 0, after: tuple[datetime, str] | None = None,
    ) -> list[KeyRecord]:
        try:
            wanted = KeyStatus(status) if status else None
        except ValueError:
            raise InvalidInput(f"status {status!r}: use active, idle, rotating, expired or revoked") from None
        idle_after = self.settings.keys.idle_after
        if wanted is KeyStatus.IDLE and not idle_after:
            raise InvalidInput("status 'idle': no key is idle while keys.idle_after is 0 (off); set it, e.g. "
                               "KEYGATE_KEYS__IDLE_AFTER=90d")
        acting = self.acting
        # An admin key lists its org's keys (every org's with orgs:any), or only its own user's
        # when it manages only those: a filter naming anything else matches nothing.
        if not acting.any_org:
            if org not in (None, acting.org):
                return []
            org = acting.org
        if not acting.org_wide(self.settings.keys.kinds):
            if user not in (None, acting.user):
                return []
            user = acting.user
        async with self.store.read() as tx:
            return await tx.list_keys(
                now=self.clock(), org=org, user=user, status=wanted, kind=kind, limit=limit, offset=offset,
                after=after, idle_after=idle_after,
            )

    async def get_key(self, key_id: str) -> KeyRecord:
        key_id = self.key_ref(key_id)
        async with self.store.read() as tx:
            record = await tx.get_key(key_id)
        return self._visible(record, key_id)

    async def update_key(
        self, key_id: str, *, name: str | None = None, role: str | None = UNSET,
        operations: Sequence[str] | None = None, servers: Sequence[str] | None = None,
        ip_allowlist: Sequence[str] | None = None, rate_limit: str | None = UNSET,
        expires: str | None = None,
    ) -> KeyRecord:
        """Change the given settings; ``None``/UNSET leaves a setting as it is."""
        key_id = self.key_ref(key_id)
        now = self.clock()
        changes = _key_changes(now, name=name, role=role, operations=operations, servers=servers,
                               ip_allowlist=ip_allowlist, rate_limit=rate_limit, expires=expires)
        async with self._transaction() as tx:
            record = await self._key_for_change(tx, key_id, now, "changing")
            if record.agent and ({"role", "operations"} & changes.keys()):
                raise InvalidInput("an agent key has no role or operations of its own: change the member's role")
            _refuse_canary_access(record, changes.keys())
            await self._require_role(tx, changes.get("role"))
            updated = replace(record, **changes)
            if not updated.agent and not updated.canary and updated.role is None and not updated.operations:
                raise InvalidInput("a key needs a role or at least one operation")
            # The key as changed, whole: an org admin changes only keys within its own reach.
            await self._check_within(tx, updated, "the changed key")
            await tx.save_key(updated)
            await self._audit(tx, now, "key.update", key_id, in_org=record.org, **_diff(record, updated))
            await self._changed(tx, now, "key", key_id)
        return updated

    async def set_role(self, key_id: str, role: str) -> KeyRecord:
        key_id = self.key_ref(key_id)
        now = self.clock()
        check = _Checks()
        role = check.one("role", fields.role, role)
        check.done()
        async with self._transaction() as tx:
            record = await self._key_for_change(tx, key_id, now, "changing")
            if record.agent:
                raise InvalidInput("an agent key has no role of its own: change the member's role")
            _refuse_canary_access(record, {"role"})
            await self._require_role(tx, role)
            updated = replace(record, role=role)
            await self._check_within(tx, updated, "the changed key")
            await tx.save_key(updated)
            await self._audit(tx, now, "key.set_role", key_id, in_org=record.org, before=record.role, after=role)
            await self._changed(tx, now, "key", key_id)
        return updated

    async def revoke_key(self, key_id: str, *, reason: str | None = None) -> KeyRecord:
        """Revoke now. Idempotent: revoking a revoked key changes nothing.

        ``reason`` goes in the audit event when given (``"self"``: the key revoked itself).
        """
        key_id = self.key_ref(key_id)
        now = self.clock()
        async with self._transaction() as tx:
            record = self._visible(await tx.get_key(key_id, for_update=True), key_id)
            # Revoking only takes away: a member may revoke their own keys, whatever they could do.
            self._check_manages(record, "revoking", own=True)
            if record.status(now) is KeyStatus.REVOKED:
                return record
            updated = replace(record, revoked_at=now)
            await tx.save_key(updated)
            because = {"reason": reason} if reason is not None else {}
            await self._audit(tx, now, "key.revoke", key_id, in_org=record.org, **because)
            await self._event(tx, now, "key.revoked", updated, actor=self.actor, **because)
            await self._changed(tx, now, "key", key_id)
        return updated

    # -- leaks (issue 17): a report that a key's full text was found in public ------------------
    async def report_leak(self, key_id: str, *, url: str, source: str | None = None,
                          via: str = "manual") -> LeakReport:
        """Record that the key leaked, where (``url``, ``source``) and how it was learnt (``via``).

        The first report sets ``leaked_at`` and queues ``key.leaked``; the key's kind's ``on_leak``
        revokes it (``key.revoked`` too) or only flags it. A canary key is only flagged: it is a
        decoy, and revoked it would stop raising its alarm. Every report is audited as
        ``key.leaked`` (each sighting's URL is worth keeping), but a report of a key already
        reported or revoked changes nothing more: no second revocation, no second webhook.
        """
        key_id = self.key_ref(key_id)
        now = self.clock()
        check = _Checks()
        via = check.one("via", _leak_via, via)
        url = check.one("url", lambda u: _reported_text("url", u, LEAK_URL_MAX, required=via == "manual"), url)
        source = check.one("source", lambda s: _reported_text("source", s, LEAK_SOURCE_MAX) or None, source or "")
        check.done()
        async with self._transaction() as tx:
            record = self._visible(await tx.get_key(key_id, for_update=True), key_id)
            self._check_manages(record, "reporting a leak of")
            first = record.leaked_at is None
            revoke = _on_leak(self.settings, record) == "revoke" and record.status(now) is not KeyStatus.REVOKED
            result = "revoked" if revoke else "already_revoked" if record.status(now) is KeyStatus.REVOKED \
                else "flagged"
            updated = replace(record, leaked_at=record.leaked_at or now,
                              revoked_at=now if revoke else record.revoked_at)
            report = dict(url=url, source=source, via=via, result=result)
            await self._audit(tx, now, "key.leaked", key_id, in_org=record.org, **report, first_report=first)
            if updated != record:
                await tx.save_key(updated)
                await self._changed(tx, now, "key", key_id)
            if first:
                await self._event(tx, now, "key.leaked", updated, actor=self.actor, **report)
            if revoke:
                await self._event(tx, now, "key.revoked", updated, actor=self.actor, reason="leaked")
        return LeakReport(updated, result, first)

    async def rotate_key(self, key_id: str, *, grace: str | float | None = None) -> tuple[KeyRecord, str, KeyRecord]:
        """A new key with the same settings; the old one is revoked now or after ``grace``.

        Returns ``(new record, full new key, old record)``.
        """
        key_id = self.key_ref(key_id)
        now = self.clock()
        grace_for = _grace_seconds(grace)
        async with self._transaction() as tx:
            old = await self._key_for_change(tx, key_id, now, "rotating")
            if old.status(now) is KeyStatus.EXPIRED:
                raise ConflictError(f"key {key_id} has expired; create a new key instead")
            if old.status(now) is KeyStatus.ROTATING:
                # Its successor exists: a second one would be another live key of the same name and settings.
                raise ConflictError(f"key {key_id} is already rotating (revoked at {iso(old.revoked_at)}); rotate "
                                    "the key that replaced it, or revoke this one to end its grace now")
            revoke_at = now + timedelta(seconds=grace_for)
            old_updated = replace(old, revoked_at=revoke_at)
            await tx.save_key(old_updated)
            parsed, secret_hash = await self._new_secret(tx, _prefix(self.settings, old.kind))
            new = replace(
                old, id=parsed.key_id, secret_hash=secret_hash, created_by=self.creator, created_at=now,
                revoked_at=None, last_used_at=None, last_used_ip=None, idle_notified_at=None, expiry_warned_for=None,
                leaked_at=None,  # the new secret was never out: rotating is how a flagged leak is fixed
            )
            # A rotation hands out a new key: only one within the acting admin key's reach.
            await self._check_within(tx, new, "the rotated key")
            await tx.insert_key(new)
            await self._audit(tx, now, "key.rotate", key_id, in_org=old.org, new_id=new.id, grace_seconds=grace_for)
            await self._audit(tx, now, "key.create", new.id, in_org=new.org, rotated_from=key_id,
                              **_settings_of(new))
            await self._event(tx, now, "key.created", new, actor=self.actor, rotated_from=key_id)
            # Announced now even when a grace defers it: details.revoke_at says when it takes effect.
            await self._event(tx, now, "key.revoked", old_updated, actor=self.actor, reason="rotated",
                              replaced_by=new.id, revoke_at=iso(revoke_at))
            await self._changed(tx, now, "key", key_id)
        return new, parsed.full, old_updated

    async def issue_agent_key(self, org: str, user: str) -> tuple[KeyRecord, str, str | None]:
        """The user's agent key for ``org``; any previous one is revoked in the same transaction.

        Returns ``(record, full key, id of the revoked previous key or None)``.
        """
        now = self.clock()
        org, user = self._org_and_user(org, user)
        self._check_org_visible(org)
        async with self._transaction() as tx:
            record, full, previous = await self._new_agent_key(tx, now, org, user)
            # An agent key does what its member's role grants, on every server.
            await self._check_within(tx, record, "the agent key")
            await self._audit(tx, now, "key.agent", record.id, in_org=org, org=org, user=user, replaced=previous)
        return record, full, previous

    async def login_agent_key(
        self, org: str, user: str, *, issuer: str, subject: str | None, token_id: str, token_expires_at: datetime,
        client_ip: str | None,
    ) -> tuple[KeyRecord, str, str | None]:
        """``keygate login``: a person's verified ID token traded for their agent key in ``org``.

        As :meth:`issue_agent_key` (signing in again rotates the key), with the ID token claimed in
        the same transaction (an ID token signs in once) and audited as ``key.login``.
        """
        now = self.clock()
        org, user = self._org_and_user(org, user)
        async with self._transaction() as tx:
            if not await tx.claim_token(token_id, policy="login", at=now, expires_at=token_expires_at):
                raise Replayed("this ID token has signed in already")
            record, full, previous = await self._new_agent_key(tx, now, org, user)
            # The provider chose the subject: stored as every store can hold it (see _claim_value).
            await self._audit(tx, now, "key.login", record.id, in_org=org, org=org, user=user, replaced=previous, issuer=issuer,
                              subject=_claim_value(subject), client_ip=client_ip)
        return record, full, previous

    def _check_org_visible(self, org: str) -> None:
        """The answer for another org's members (404): the same whether that org exists or not."""
        if not self.acting.sees_org(org):
            raise NotFound(f"no org {org!r} here: this admin key acts within its org {self.acting.org!r}")

    @staticmethod
    def _org_and_user(org: str, user: str) -> tuple[str, str]:
        check = _Checks()
        org, user = check.one("org", fields.org, org), check.one("user", fields.user, user)
        check.done()
        return org, user

    async def member_orgs(self, user: str) -> list[str]:
        """The orgs ``user`` is a member of."""
        async with self.store.read() as tx:
            return await tx.member_orgs(user)

    async def _new_agent_key(self, tx: Transaction, now: datetime, org: str, user: str,
                             ) -> tuple[KeyRecord, str, str | None]:
        """Revoke the member's live agent keys and make a new one; ``(record, full key, a revoked id or None)``."""
        # Locking the membership row serialises concurrent issuances for this user.
        if await tx.get_member(org, user, for_update=True) is None:
            raise NotFound(f"user {user!r} is not a member of org {org!r}")
        # Every live one: a rotated agent key in its grace period counts too.
        live = await tx.live_agent_keys(org, user, now)
        for old in live:
            revoked = replace(old, revoked_at=now)
            await tx.save_key(revoked)
            await self._audit(tx, now, "key.revoke", old.id, in_org=org, reason="replaced by a new agent key")
            await self._event(tx, now, "key.revoked", revoked, actor=self.actor, reason="replaced by a new agent key")
            await self._changed(tx, now, "key", old.id)
        kind = self.settings.keys.default_kind
        parsed, secret_hash = await self._new_secret(tx, _prefix(self.settings, kind))
        record = KeyRecord(
            id=parsed.key_id, kind=kind, name=f"agent key of {user}", org=org, user=user, role=None,
            operations=(), servers=("*",), ip_allowlist=(), rate_limit=None, agent=True,
            created_by=self.creator, created_at=now, expires_at=None, revoked_at=None,
            last_used_at=None, last_used_ip=None, secret_hash=secret_hash,
        )
        await tx.insert_key(record)
        replaced = {"replaced": live[0].id} if live else {}
        await self._event(tx, now, "key.created", record, actor=self.actor, **replaced)
        return record, parsed.full, live[0].id if live else None

    # -- hygiene: the sweeper's actions (gateway.hygiene.sweeper) ---------------------------------
    # Each re-checks its key under the row lock, so of several sweepers (workers, replicas) one acts.
    async def announce_idle(self, key_id: str) -> KeyRecord | None:
        """Send key.idle once for the key's idle spell; with keys.idle_action = "expire", also expire it now.

        None when the key is not (or no longer) idle and unannounced: another sweeper was first, or it was used.
        """
        now, k = self.clock(), self.settings.keys
        async with self._transaction() as tx:
            record = await tx.get_key(key_id, for_update=True)
            if record is None or not idle_unannounced(record, now, k.idle_after):
                return None
            expire = k.idle_action == "expire"
            updated = replace(record, idle_notified_at=now, **({"expires_at": now} if expire else {}))
            await tx.save_key(updated)
            spell = {"last_activity": iso(record.last_activity()), "idle_action": k.idle_action,
                     "unused_for": round((now - record.last_activity()).total_seconds())}
            await self._audit(tx, now, "key.idle", key_id, in_org=record.org, **spell)
            if expire:
                await self._audit(tx, now, "key.expire", key_id, in_org=record.org, reason="idle",
                                  before=iso(record.expires_at))
                await self._changed(tx, now, "key", key_id)  # every gateway refuses it within a second
            await self._event(tx, now, "key.idle", updated, **spell)
        return updated

    async def warn_expiring(self, key_id: str) -> KeyRecord | None:
        """Send key.expiring once for the key's current expiry; None when it is not (or no longer) due."""
        now, warning = self.clock(), self.settings.keys.expiry_warning
        async with self._transaction() as tx:
            record = await tx.get_key(key_id, for_update=True)
            if record is None or not expiry_unwarned(record, now, warning):
                return None
            updated = replace(record, expiry_warned_for=record.expires_at)
            await tx.save_key(updated)
            expiry = {"expires_at": iso(record.expires_at),
                      "expires_in": round((record.expires_at - now).total_seconds())}  # type: ignore[operator]
            await self._audit(tx, now, "key.expiring", key_id, in_org=record.org, **expiry)
            await self._event(tx, now, "key.expiring", updated, **expiry)
        return updated

    async def suggest_allowlist(self, key_id: str, *, days: int = 30, max_blocks: int = 4) -> Suggestion:
        """The narrowest CIDRs (at most ``max_blocks``) covering the addresses of the key's allowed requests
        of the last ``days`` days (refused ones may be an attacker's), and the command that applies them."""
        key_id = self.key_ref(key_id)
        check = _Checks()
        days = check.one("days", lambda d: fields.bounded_int(d, "days", 1, 366), days)
        max_blocks = check.one("max", lambda n: fields.bounded_int(n, "max", 1, MAX_BLOCKS), max_blocks)
        check.done()
        since = self.clock() - timedelta(days=days)
        async with self.store.read() as tx:
            self._visible(await tx.get_key(key_id), key_id)
            counts = await tx.client_addresses(key_id, since=since, limit=MAX_ADDRESSES + 1)
        try:
            return suggestion(key_id, counts, days=days, max_blocks=max_blocks, since=since)
        except TooFewBlocks as exc:
            raise InvalidInput(f"max {max_blocks}: {exc}", problems=[FieldProblem("max", str(exc))]) from None

    async def key_usage(self, key_id: str, *, hours: int = 168) -> Usage:
        """The key's request records of the last ``hours`` UTC hours (the current one included),
        counted per hour and decision."""
        key_id = self.key_ref(key_id)
        check = _Checks()
        hours = check.one("hours", lambda n: fields.bounded_int(n, "hours", 1, MAX_HOURS), hours)
        check.done()
        since, until = window(self.clock(), hours)
        async with self.store.read() as tx:
            self._visible(await tx.get_key(key_id), key_id)
            counts = await tx.hourly_requests(key_id, since=since, until=until)
        return Usage(key_id, hours, since, until, tuple(counts))

    # -- roles -----------------------------------------------------------
    async def list_roles(self) -> list[Role]:
        async with self.store.read() as tx:
            return await tx.list_roles()

    async def get_role(self, name: str) -> Role:
        async with self.store.read() as tx:
            role = await tx.get_role(name)
        if role is None:
            raise NotFound(f"no role named {name!r}")
        return role

    async def put_role(self, name: str, grants: Iterable[str]) -> Role:
        now = self.clock()
        check = _Checks()
        name = check.one("name", fields.role, name)
        grant_list = check.each("grants", fields.operation, grants)
        if not grant_list:
            check.problems.append(FieldProblem("grants", "a role needs at least one grant (--grant)"))
        check.done()
        self._check_changes_roles()
        if name == ADMIN_ROLE:
            raise ConflictError("the built-in admin role always grants '*'; make a new role instead")
        async with self._transaction() as tx:
            before = await tx.get_role(name)
            role = Role(name, grant_list, before.created_at if before else now, now)
            await tx.put_role(role)
            await self._audit(tx, now, "role.set", name, in_org=None, grants=list(grant_list),
                              before=list(before.grants) if before else None)
            await self._changed(tx, now, "role", name)
        return role

    def _check_changes_roles(self) -> None:
        # Roles are the vocabulary every org's keys and members share: one org changing one
        # would change what another org's keys may do.
        if not self.acting.any_org:
            raise Forbidden(f"roles are shared by every org: changing one needs the operation {ORGS_ANY}")

    async def delete_role(self, name: str) -> None:
        now = self.clock()
        self._check_changes_roles()
        if name == ADMIN_ROLE:
            raise ConflictError("the built-in admin role cannot be deleted")
        async with self._transaction() as tx:
            if await tx.get_role(name) is None:
                raise NotFound(f"no role named {name!r}")
            keys, members, policies = await tx.role_users(name)
            if keys or members or policies:
                raise ConflictError(
                    f"role {name!r} is in use by {keys} key(s), {members} member(s) and {policies} trust "
                    "policy(ies); reassign them first"
                )
            await tx.delete_role(name)
            await self._audit(tx, now, "role.delete", name, in_org=None)
            await self._changed(tx, now, "role", name)

    # -- members ---------------------------------------------------------
    async def list_members(self, org: str, *, after: str | None = None, limit: int | None = None) -> list[Member]:
        self._check_org_visible(org)
        async with self.store.read() as tx:
            return await tx.list_members(org, after=after, limit=limit)

    async def set_member(self, org: str, user: str, role: str) -> Member:
        now = self.clock()
        check = _Checks()
        org, user = check.one("org", fields.org, org), check.one("user", fields.user, user)
        role = check.one("role", fields.role, role)
        check.done()
        self._check_org_visible(org)
        async with self._transaction() as tx:
            await self._require_role(tx, role)
            # The member's role bounds their keys and is what their agent key does: an org
            # admin assigns only a role within its own grants.
            self.acting.check_within(f"the role {role!r}", [await self._role_grants(tx, role)], ())
            before = await tx.get_member(org, user, for_update=True)
            member = Member(org, user, role, before.created_at if before else now, now)
            await tx.put_member(member)
            await self._audit(tx, now, "member.set", f"{org}/{user}", in_org=org, role=role,
                              before=before.role if before else None)
            await self._changed(tx, now, "member", f"{org}/{user}")
        return member

    async def remove_member(self, org: str, user: str) -> None:
        """Remove the member; their per-user keys stop working, org-level keys do not."""
        now = self.clock()
        self._check_org_visible(org)
        async with self._transaction() as tx:
            if await tx.get_member(org, user, for_update=True) is None:
                raise NotFound(f"{user!r} is not a member of org {org!r}")
            await tx.delete_member(org, user)
            await self._audit(tx, now, "member.remove", f"{org}/{user}", in_org=org)
            await self._changed(tx, now, "member", f"{org}/{user}")

    # -- trust policies --------------------------------------------------
    # A trust policy yields keys in its org: it is that org's, as its keys are.
    async def list_trust_policies(self) -> list[TrustPolicy]:
        async with self.store.read() as tx:
            policies = await tx.list_trust_policies()
        return [p for p in policies if self.acting.sees_org(p.org)]

    def _visible_policy(self, policy: TrustPolicy | None, name: str) -> TrustPolicy:
        # SECURITY: another org's policy is answered as no policy at all.
        if policy is None or not self.acting.sees_org(policy.org):
            raise NotFound(f"no trust policy named {name!r}")
        return policy

    async def get_trust_policy(self, name: str) -> TrustPolicy:
        async with self.store.read() as tx:
            policy = await tx.get_trust_policy(name)
        return self._visible_policy(policy, name)

    async def put_trust_policy(
        self, name: str, *, issuer: str, audience: str, conditions: Mapping[str, str], org: str,
        role: str | None = None, operations: Iterable[str] = (), servers: Iterable[str] = (),
        ip_allowlist: Iterable[str] = (), rate_limit: str | None = None, lifetime: str | int | None = None,
        jwks_file: str | None = None, replace: bool = False,
    ) -> TrustPolicy:
        """Create the policy, or with ``replace`` replace every setting of an existing one."""
        now = self.clock()
        values = _trust_policy_values(
            name=name, issuer=issuer, audience=audience, conditions=conditions, org=org, role=role,
            operations=operations, servers=servers, ip_allowlist=ip_allowlist, rate_limit=rate_limit,
            lifetime=lifetime, jwks_file=jwks_file,
        )
        acting = self.acting
        acting.check_org(values["org"])
        # A policy mints keys of the exchanged kind: making one is making such keys.
        if not acting.may(kind_operation(EXCHANGED_KIND)):
            raise Forbidden(f"a trust policy yields keys of the kind {EXCHANGED_KIND!r}: it needs the operation "
                            f"{kind_operation(EXCHANGED_KIND)} (keys:write covers every kind)")
        async with self._transaction() as tx:
            before = await tx.get_trust_policy(values["name"])
            if before is not None and not acting.sees_org(before.org):
                # Names are shared by every org, as role names are; which org holds it is not said.
                raise ConflictError(f"trust policy name {values['name']!r} is taken; choose another name")
            if before is not None and not replace:
                raise ConflictError(f"trust policy {values['name']!r} already exists (use --replace to change it)")
            await self._require_role(tx, values["role"])
            sets = [await self._role_grants(tx, values["role"])] if values["role"] is not None else []
            if values["operations"]:
                sets.append(values["operations"])
            acting.check_within("the keys the policy yields", sets, values["servers"])
            policy = TrustPolicy(
                created_by=before.created_by if before else self.creator,
                created_at=before.created_at if before else now, updated_at=now, **values,
            )
            await tx.put_trust_policy(policy)
            await self._audit(tx, now, "trust.set", policy.name, in_org=policy.org, **_policy_settings(policy),
                              before=_policy_settings(before) if before else None)
            await self._changed(tx, now, "trust", policy.name)
        return policy

    async def remove_trust_policy(self, name: str) -> None:
        """Remove the policy; keys it minted live on until they expire (revoke them to end them sooner)."""
        now = self.clock()
        async with self._transaction() as tx:
            before = self._visible_policy(await tx.get_trust_policy(name), name)
            await tx.delete_trust_policy(name)
            await self._audit(tx, now, "trust.remove", name, in_org=before.org, before=_policy_settings(before))
            await self._changed(tx, now, "trust", name)

    async def exchange_token(
        self, policy: TrustPolicy, claims: Mapping[str, Any], *, token_id: str, token_expires_at: datetime,
        client_ip: str | None,
    ) -> tuple[KeyRecord, str]:
        """Mint the short-lived key a verified token is exchanged for; returns its record and the full key.

        The token is recorded as exchanged in the same transaction as the key is made, so a replay
        (:class:`Replayed`) and a failed exchange alike write nothing, and a token whose exchange
        failed can be tried again.
        """
        now = self.clock()
        prefix = _prefix(self.settings, EXCHANGED_KIND)
        async with self._transaction() as tx:
            # SECURITY: the caller verified the token against the policy as it read it; a policy removed
            # or changed since must not mint a key (its conditions may no longer hold).
            if await tx.get_trust_policy(policy.name) != policy:
                raise InvalidInput(f"trust policy {policy.name!r} was removed or changed meanwhile")
            if not await tx.claim_token(token_id, policy=policy.name, at=now, expires_at=token_expires_at):
                raise Replayed("this token has been exchanged already")
            await self._require_role(tx, policy.role)
            parsed, secret_hash = await self._new_secret(tx, prefix)
            record = KeyRecord(
                id=parsed.key_id, kind=EXCHANGED_KIND, name=exchanged_key_name(policy, claims), org=policy.org,
                user="", role=policy.role, operations=policy.operations, servers=policy.servers,
                ip_allowlist=policy.ip_allowlist, rate_limit=policy.rate_limit, created_by=self.creator,
                created_at=now, expires_at=now + timedelta(seconds=policy.lifetime), revoked_at=None,
                last_used_at=None, last_used_ip=None, secret_hash=secret_hash,
            )
            await tx.insert_key(record)
            await self._audit(
                tx, now, "key.exchanged", record.id, in_org=record.org, policy=policy.name, issuer=policy.issuer,
                subject=_claim_value(claims.get("sub")), client_ip=client_ip, token_id=token_id,
                claims=_audited_claims(claims), **_settings_of(record),
            )
            await self._event(tx, now, "key.created", record, actor=self.actor, policy=policy.name)
        return record, parsed.full

    # -- audit -----------------------------------------------------------
    async def audit(self, wanted: AuditFilter, *, limit: int = 100, after: Position | None = None) -> AuditPage:
        """Management events and request records, newest first (the CLI and the admin API share this).

        An admin key sees its org's trail alone: events about its org's keys, members and trust
        policies, and the request records of its org's keys (every org's with orgs:any).
        """
        if wanted.key:
            wanted = replace(wanted, key=self.key_ref(wanted.key))
        if not self.acting.any_org:
            if wanted.org not in (None, self.acting.org):
                return AuditPage([], None)
            wanted = replace(wanted, org=self.acting.org)
        return await query_audit(self.store, wanted, limit=limit, after=after)

    # -- orgs ------------------------------------------------------------
    async def list_orgs(self) -> list[str]:
        """The orgs that hold keys or members, by name: only its own for an admin key without orgs:any."""
        if not self.acting.any_org:
            return [self.acting.org] if self.acting.org is not None else []
        async with self.store.read() as tx:
            return await tx.list_orgs()


class LeakReport(NamedTuple):
    """What :meth:`KeyService.report_leak` did: the key now, ``result`` (revoked, flagged or already_revoked)
    and whether this was the key's first report."""

    record: KeyRecord
    result: str
    first: bool


# Longest URL and source of a leak report kept in the audit trail (GitHub's are far shorter).
LEAK_URL_MAX = 2048
LEAK_SOURCE_MAX = 64


def _leak_via(via: str) -> str:
    if via not in ("manual", "github"):
        raise fields.InvalidField(f"via {via!r}: use manual or github")
    return via


def _reported_text(name: str, text: str, limit: int, *, required: bool = False) -> str:
    """A report's text as every store can hold it and a log can show it: at most ``limit`` printable characters.

    GitHub's reports are signed, but what they carry (the URL of a file) was written by anyone.
    """
    if not isinstance(text, str):
        raise fields.InvalidField(f"{name}: must be text")
    if required and not text.strip():
        raise fields.InvalidField(f"{name}: say where the key was found")
    # Unprintable characters (a NUL, a lone surrogate: no store holds those) are replaced.
    return "".join(c if c.isprintable() else "\ufffd" for c in text)[:limit]


def _on_leak(settings: Settings, record: KeyRecord) -> str:
    """What a leak of ``record`` does: its kind's on_leak (revoke for a kind no longer configured); a canary's only flags."""
    if record.canary:
        return "flag"
    kind = settings.keys.kinds.get(record.kind)
    return kind.on_leak if kind is not None else "revoke"


def _trust_policy_values(
    *, name: str, issuer: str, audience: str, conditions: Mapping[str, str], org: str, role: str | None,
    operations: Iterable[str], servers: Iterable[str], ip_allowlist: Iterable[str], rate_limit: str | None,
    lifetime: str | int | None, jwks_file: str | None,
) -> dict[str, Any]:
    """A trust policy's settings, checked and normalised without touching the store."""
    check = _Checks()
    values: dict[str, Any] = dict(
        name=check.one("name", fields.trust_policy, name), issuer=check.one("issuer", fields.issuer, issuer),
        audience=check.one("audience", fields.audience, audience),
        conditions=_conditions(check, conditions), org=check.one("org", fields.org, org),
        role=check.one("role", fields.role, role) if role is not None else None,
        operations=check.each("operations", fields.operation, operations),
        servers=check.each("servers", fields.server, servers) or ("*",),
        ip_allowlist=check.each("ip_allowlist", fields.cidr, ip_allowlist),
        rate_limit=check.one("rate_limit", fields.rate_limit, rate_limit),
        lifetime=check.one("lifetime", fields.lifetime, lifetime),
        jwks_file=check.one("jwks_file", fields.jwks_file, jwks_file) if jwks_file is not None else None,
    )
    if role is None and not values["operations"]:
        check.problems.append(FieldProblem(
            None, "a trust policy needs a role (--role) or at least one operation (--operation)"))
    check.done()
    return values


def _conditions(check: _Checks, conditions: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The conditions as (claim, pattern) pairs sorted by claim; each problem is about ``conditions.<claim>``."""
    if not isinstance(conditions, Mapping):
        check.problems.append(FieldProblem("conditions", "conditions: give claim names and their patterns"))
        return ()
    pairs = [check.one(f"conditions.{claim}", lambda c: fields.condition(*c), (claim, pattern))
             for claim, pattern in conditions.items()]
    check.one("conditions", fields.subject_condition, conditions)
    return tuple(sorted(pairs, key=lambda pair: str(pair[0])))


# The kind of every key minted by a token exchange.
EXCHANGED_KIND = "automation"
# Claims of GitHub Actions' ID tokens worth keeping in the audit trail of an exchange.
_AUDITED_CLAIMS = ("repository", "repository_owner", "ref", "sha", "run_id", "run_attempt", "workflow",
                   "job_workflow_ref", "environment", "actor", "event_name")


def _claim_value(value: Any) -> str | int | float | bool | None:
    """A claim's value if it is a JSON scalar, as every store can hold it; anything else is left out (None).

    The issuer chose these values, and PostgreSQL's jsonb holds no NUL, no lone surrogate and no NaN
    or Infinity (JSON has none of them; Python's json reads them): such characters are replaced,
    such numbers left out, so a token carrying them is audited rather than answered with a 500.
    """
    if isinstance(value, str):
        return value.replace("\0", "\ufffd").encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value if isinstance(value, int | float | bool) else None


def _audited_claims(claims: Mapping[str, Any]) -> dict[str, Any]:
    """The token's claims that say which workload it was: GitHub's, and a Kubernetes pod's identity."""
    kept: dict[str, Any] = {c: v for c in _AUDITED_CLAIMS if (v := _claim_value(claims.get(c))) is not None}
    kubernetes = claims.get("kubernetes.io")
    if isinstance(kubernetes, Mapping):
        identity: dict[str, Any] = {}
        if (namespace := _claim_value(kubernetes.get("namespace"))) is not None:
            identity["namespace"] = namespace
        account = kubernetes.get("serviceaccount")
        if isinstance(account, Mapping) and (name := _claim_value(account.get("name"))) is not None:
            identity["serviceaccount"] = {"name": name}
        if identity:
            kept["kubernetes.io"] = identity
    return kept


def exchanged_key_name(policy: TrustPolicy, claims: Mapping[str, Any]) -> str:
    """``gh acme/shop@refs/heads/main run 1234`` for GitHub Actions, ``oidc <sub>`` for any other token."""
    text = {k: str(v) for k, v in claims.items() if _claim_value(v) is not None and not isinstance(v, bool)}
    if "repository" in text and "ref" in text:
        name = f"gh {text['repository']}@{text['ref']}" + (f" run {text['run_id']}" if "run_id" in text else "")
    else:
        name = f"oidc {text['sub']}" if text.get("sub") else f"oidc via {policy.name}"
    # The issuer chose these characters: anything unprintable is shown as '?'.
    name = "".join(c if c.isprintable() else "?" for c in name)
    return fields.key_name(name[:fields.KEY_NAME_MAX])


_POLICY_SETTINGS = ("issuer", "audience", "conditions", "org", "role", "operations", "servers", "ip_allowlist",
                    "rate_limit", "lifetime", "jwks_file")


def _policy_settings(policy: TrustPolicy) -> dict[str, Any]:
    public = policy.public()
    return {name: public[name] for name in _POLICY_SETTINGS}


_SETTINGS = ("kind", "name", "org", "user", "role", "operations", "servers", "ip_allowlist", "rate_limit")


def _settings_of(record: KeyRecord) -> dict[str, Any]:
    data = {name: getattr(record, name) for name in _SETTINGS}
    data = {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}
    data["expires_at"] = record.expires_at.isoformat() if record.expires_at else None
    if record.canary:
        data["canary"] = True
    return data


def _refuse_canary_access(record: KeyRecord, changing: Iterable[str]) -> None:
    """A canary stays a decoy: only its name and expiry may change (a real key is a new key)."""
    refused = [name for name in CANARY_REFUSES if name in changing]
    if record.canary and refused:
        raise InvalidInput(f"key {record.id} is a canary: it never authorizes, so its {', '.join(refused)} "
                           "cannot be set (create a real key instead)")


def _diff(before: KeyRecord, after: KeyRecord) -> dict[str, Any]:
    old, new = _settings_of(before), _settings_of(after)
    return {k: {"before": old[k], "after": new[k]} for k in new if old[k] != new[k]}
