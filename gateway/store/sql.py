"""The SQL both stores share: one set of queries, two dialects.

Queries are written once with ``?`` placeholders; a :class:`Dialect` turns
them into the backend's placeholders and converts the few types that differ
(timestamps, booleans). Each backend supplies a :class:`Connection`.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from .rows import REQUEST_RECORD_ALIKE, REQUEST_RECORD_COLUMNS, request_record_values, sqlite_time_in, sqlite_time_out
from ..models import AuditEvent, KeyRecord, KeyStatus, Member, RequestRecord, Role, TrustPolicy, WebhookDelivery


class Connection(Protocol):
    async def fetch(self, sql: str, args: Sequence[Any]) -> list[Mapping[str, Any]]: ...
    async def execute(self, sql: str, args: Sequence[Any]) -> None: ...
    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...
    async def insert_many(self, head: str, width: int, values: list[Any], alike: tuple[int, ...] = ()) -> None:
        """``head`` (``INSERT INTO t (a, b)``) with one ``VALUES`` row per ``width`` items of ``values``.

        Flat, row after row: the caller builds no tuple per row (one per request record). ``alike``: the
        columns consecutive rows often share, which a store may send once for a run of such rows.
        """


@dataclass(frozen=True)
class Dialect:
    name: str
    placeholders: Callable[[str], str]
    time_in: Callable[[datetime | None], Any]
    time_out: Callable[[Any], datetime | None]
    bool_in: Callable[[bool], Any]
    greatest: str
    for_update: str
    # Serialises concurrent ``migrate`` runs (SQLite's write lock already does).
    migration_lock: str | None
    time_type: str
    migrations_table_exists: str
    # SQL for the seconds from one timestamp column to another.
    seconds_between: Callable[[str, str], str]
    # SQL for a timestamp column's UTC hour as text, "YYYY-MM-DDTHH".
    utc_hour: Callable[[str], str]


def _numbered(sql: str) -> str:
    counter = iter(range(1, 10_000))
    return re.sub(r"\?", lambda _m: f"${next(counter)}", sql)


SQLITE = Dialect(
    name="sqlite",
    placeholders=lambda sql: sql,
    time_in=sqlite_time_in,
    time_out=sqlite_time_out,
    bool_in=lambda value: 1 if value else 0,
    greatest="max",
    for_update="",
    migration_lock=None,
    time_type="TEXT",
    migrations_table_exists="SELECT count(*) AS found FROM sqlite_master WHERE type = 'table' "
                            "AND name = 'schema_migrations'",
    seconds_between=lambda start, end: f"((julianday({end}) - julianday({start})) * 86400.0)",
    # Stored as fixed-width UTC text: the hour is its first 13 characters.
    utc_hour=lambda column: f"substr({column}, 1, 13)",
)

POSTGRES = Dialect(
    name="postgres",
    placeholders=_numbered,
    time_in=lambda value: value,
    time_out=lambda value: value,
    bool_in=lambda value: bool(value),
    greatest="GREATEST",
    for_update=" FOR UPDATE",
    migration_lock="SELECT pg_advisory_xact_lock(4242004201)",
    time_type="TIMESTAMPTZ",
    migrations_table_exists="SELECT to_regclass('schema_migrations') IS NOT NULL AS found",
    seconds_between=lambda start, end: f"EXTRACT(EPOCH FROM ({end} - {start}))",
    # In UTC whatever the session's TimeZone is.
    utc_hour=lambda column: f"to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24')",
)

_INSERT_REQUEST_RECORDS = (
    "INSERT INTO request_records (at, key_id, method, path, server, operation, decision, status, "
    "client_ip, duration_ms, reason)"
)

_KEY_COLUMNS = (
    "id, kind, name, org, user_name, role, operations, servers, ip_allowlist, rate_limit, agent, "
    "secret_hash, created_by, created_at, expires_at, revoked_at, last_used_at, last_used_ip, canary, leaked_at, "
    "idle_notified_at, expiry_warned_for"
)

_DELIVERY_COLUMNS = (
    "id, url, event, key_id, body, created_at, attempts, next_attempt_at, delivered_at, abandoned_at, last_error"
)

_POLICY_COLUMNS = (
    "name, issuer, audience, conditions, org, role, operations, servers, ip_allowlist, rate_limit, lifetime, "
    "jwks_file, created_by, created_at, updated_at"
)


def migrations(dialect: Dialect) -> list[tuple[int, str, list[str]]]:
    """``(version, name, statements)`` for every migration file, in order."""
    folder = resources.files("gateway.store").joinpath("migrations", dialect.name)
    found = []
    for entry in folder.iterdir():
        match = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if match:
            text = entry.read_text(encoding="utf-8")
            # Our migration files keep semicolons out of strings and comments.
            body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("--"))
            statements = [s.strip() for s in body.split(";") if s.strip()]
            found.append((int(match[1]), match[2], statements))
    return sorted(found)


class SqlTransaction:
    """The store's operations inside one transaction (see ``base.Transaction``)."""

    def __init__(self, conn: Connection, dialect: Dialect) -> None:
        self._conn = conn
        self._d = dialect

    async def _fetch(self, sql: str, *args: Any) -> list[Mapping[str, Any]]:
        return await self._conn.fetch(self._d.placeholders(sql), args)

    async def _one(self, sql: str, *args: Any) -> Mapping[str, Any] | None:
        rows = await self._fetch(sql, *args)
        return rows[0] if rows else None

    async def _exec(self, sql: str, *args: Any) -> None:
        await self._conn.execute(self._d.placeholders(sql), args)

    # -- keys ------------------------------------------------------------
    def _key(self, row: Mapping[str, Any]) -> KeyRecord:
        t = self._d.time_out
        return KeyRecord(
            id=row["id"], kind=row["kind"], name=row["name"], org=row["org"], user=row["user_name"],
            role=row["role"], operations=tuple(json.loads(row["operations"])),
            servers=tuple(json.loads(row["servers"])), ip_allowlist=tuple(json.loads(row["ip_allowlist"])),
            rate_limit=row["rate_limit"], agent=bool(row["agent"]), secret_hash=row["secret_hash"],
            created_by=row["created_by"], created_at=t(row["created_at"]), expires_at=t(row["expires_at"]),
            revoked_at=t(row["revoked_at"]), last_used_at=t(row["last_used_at"]),
            last_used_ip=row["last_used_ip"], canary=bool(row["canary"]), leaked_at=t(row["leaked_at"]),
            idle_notified_at=t(row["idle_notified_at"]), expiry_warned_for=t(row["expiry_warned_for"]),
        )

    async def get_key(self, key_id: str, *, for_update: bool = False) -> KeyRecord | None:
        lock = self._d.for_update if for_update else ""
        row = await self._one(f"SELECT {_KEY_COLUMNS} FROM keys WHERE id = ?{lock}", key_id)
        return None if row is None else self._key(row)

    async def insert_key(self, r: KeyRecord) -> None:
        t = self._d.time_in
        await self._exec(
            f"INSERT INTO keys ({_KEY_COLUMNS}) VALUES ({', '.join(['?'] * 22)})",
            r.id, r.kind, r.name, r.org, r.user, r.role, json.dumps(list(r.operations)),
            json.dumps(list(r.servers)), json.dumps(list(r.ip_allowlist)), r.rate_limit,
            self._d.bool_in(r.agent), r.secret_hash, r.created_by, t(r.created_at), t(r.expires_at),
            t(r.revoked_at), t(r.last_used_at), r.last_used_ip, self._d.bool_in(r.canary), t(r.leaked_at),
            t(r.idle_notified_at), t(r.expiry_warned_for),
        )

    async def save_key(self, r: KeyRecord) -> None:
        """Write the fields management may change (never the id, hash, usage or canary flag)."""
        t = self._d.time_in
        await self._exec(
            "UPDATE keys SET name = ?, role = ?, operations = ?, servers = ?, ip_allowlist = ?, "
            "rate_limit = ?, expires_at = ?, revoked_at = ?, leaked_at = ?, idle_notified_at = ?, "
            "expiry_warned_for = ? WHERE id = ?",
            r.name, r.role, json.dumps(list(r.operations)), json.dumps(list(r.servers)),
            json.dumps(list(r.ip_allowlist)), r.rate_limit, t(r.expires_at), t(r.revoked_at), t(r.leaked_at),
            t(r.idle_notified_at), t(r.expiry_warned_for), r.id,
        )

    async def list_keys(
        self, *, now: datetime, org: str | None = None, user: str | None = None,
        status: KeyStatus | None = None, kind: str | None = None, limit: int = 1000, offset: int = 0,
        after: tuple[datetime, str] | None = None, idle_after: float = 0,
    ) -> list[KeyRecord]:
        """Newest first; ``after`` is the (created_at, id) of the last key of the previous page.

        With ``idle_after`` (seconds, 0 = off), ``active`` means unrevoked, unexpired and used (or
        created) within it and ``idle`` the rest of the unrevoked, unexpired keys. ``rotating`` is an
        unexpired key whose revoked_at is still to come (a rotation's grace).
        """
        where, args = ["1 = 1"], []
        if after is not None:
            # Keyset paging: keys created meanwhile do not shift later pages.
            at = self._d.time_in(after[0])
            where.append("(created_at < ? OR (created_at = ? AND id > ?))")
            args += [at, at, after[1]]
        for column, value in (("org", org), ("user_name", user), ("kind", kind)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        at = self._d.time_in(now)
        if status is KeyStatus.REVOKED:
            where.append("revoked_at IS NOT NULL AND revoked_at <= ?")
            args.append(at)
        elif status is KeyStatus.EXPIRED:
            where.append("(revoked_at IS NULL OR revoked_at > ?) AND expires_at IS NOT NULL AND expires_at <= ?")
            args += [at, at]
        elif status is KeyStatus.ROTATING:
            where.append("revoked_at IS NOT NULL AND revoked_at > ? AND (expires_at IS NULL OR expires_at > ?)")
            args += [at, at]
        elif status in (KeyStatus.ACTIVE, KeyStatus.IDLE):
            # A key with a revoked_at still to come is rotating, neither active nor idle.
            where.append("revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?)")
            args += [at]
            if idle_after > 0:
                # A canary is never idle (KeyRecord.status): it is unused by design.
                since = "COALESCE(last_used_at, created_at)"
                where.append(f"({since} > ? OR canary = ?)" if status is KeyStatus.ACTIVE
                             else f"{since} <= ? AND canary = ?")
                args += [self._d.time_in(now - timedelta(seconds=idle_after)), self._d.bool_in(
                    status is KeyStatus.ACTIVE)]
            elif status is KeyStatus.IDLE:
                where.append("1 = 0")  # no key is idle while idleness is off
        rows = await self._fetch(
            f"SELECT {_KEY_COLUMNS} FROM keys WHERE {' AND '.join(where)} "
            "ORDER BY created_at DESC, id LIMIT ? OFFSET ?",
            *args, limit, offset,
        )
        return [self._key(row) for row in rows]

    async def live_agent_keys(self, org: str, user: str, now: datetime) -> list[KeyRecord]:
        """The user's agent keys in ``org`` not yet revoked at ``now``, newest first."""
        rows = await self._fetch(
            f"SELECT {_KEY_COLUMNS} FROM keys WHERE org = ? AND user_name = ? AND agent = ? "
            "AND (revoked_at IS NULL OR revoked_at > ?) ORDER BY created_at DESC",
            org, user, self._d.bool_in(True), self._d.time_in(now),
        )
        return [self._key(row) for row in rows]

    # -- hygiene: idle and expiring keys, allowlist suggestions ------------
    async def idle_keys(self, *, now: datetime, idle_after: float, limit: int) -> list[str]:
        """Ids of live keys (not revoked, expired or canaries) unused for ``idle_after`` seconds whose
        idle spell has not been announced (``idle_notified_at`` unset or before their last activity)."""
        t = self._d.time_in
        rows = await self._fetch(
            "SELECT id FROM keys WHERE (revoked_at IS NULL OR revoked_at > ?) AND (expires_at IS NULL OR "
            "expires_at > ?) AND canary = ? AND COALESCE(last_used_at, created_at) <= ? AND (idle_notified_at IS "
            "NULL OR idle_notified_at < COALESCE(last_used_at, created_at)) ORDER BY id LIMIT ?",
            t(now), t(now), self._d.bool_in(False), t(now - timedelta(seconds=idle_after)), limit,
        )
        return [str(r["id"]) for r in rows]

    async def expiring_keys(self, *, now: datetime, warning: float, limit: int) -> list[str]:
        """Ids of unrevoked keys expiring within ``warning`` seconds, made to live longer than that, and
        not yet warned for their current ``expires_at``."""
        t = self._d.time_in
        rows = await self._fetch(
            "SELECT id FROM keys WHERE revoked_at IS NULL AND expires_at > ? AND expires_at <= ? "
            f"AND {self._d.seconds_between('created_at', 'expires_at')} > ? "
            "AND (expiry_warned_for IS NULL OR expiry_warned_for <> expires_at) ORDER BY id LIMIT ?",
            t(now), t(now + timedelta(seconds=warning)), warning, limit,
        )
        return [str(r["id"]) for r in rows]

    async def client_addresses(self, key_id: str, *, since: datetime, limit: int) -> list[tuple[str, int]]:
        """The client addresses of the key's allowed requests since ``since`` with how many each made,
        most first (at most ``limit``). Refused requests are left out: they may be an attacker's."""
        rows = await self._fetch(
            "SELECT client_ip, COUNT(*) AS n FROM request_records WHERE key_id = ? AND decision = 'allowed' "
            "AND at >= ? AND client_ip IS NOT NULL GROUP BY client_ip ORDER BY n DESC, client_ip LIMIT ?",
            key_id, self._d.time_in(since), limit,
        )
        return [(str(r["client_ip"]), int(r["n"])) for r in rows]

    async def hourly_requests(
        self, key_id: str, *, since: datetime, until: datetime,
    ) -> list[tuple[datetime, str, int]]:
        """The key's request records from ``since`` until before ``until``, counted per UTC hour and
        decision: ``(hour, decision, count)``, oldest hour first, hours without records left out."""
        hour = self._d.utc_hour("at")
        rows = await self._fetch(
            f"SELECT {hour} AS hour, decision, COUNT(*) AS n FROM request_records WHERE key_id = ? AND at >= ? "
            f"AND at < ? GROUP BY {hour}, decision ORDER BY hour, decision",
            key_id, self._d.time_in(since), self._d.time_in(until),
        )
        return [(datetime.strptime(str(r["hour"]), "%Y-%m-%dT%H").replace(tzinfo=UTC), str(r["decision"]),
                 int(r["n"])) for r in rows]

    # -- roles -----------------------------------------------------------
    def _role(self, row: Mapping[str, Any]) -> Role:
        t = self._d.time_out
        return Role(row["name"], tuple(json.loads(row["grants"])), t(row["created_at"]), t(row["updated_at"]))

    async def get_role(self, name: str) -> Role | None:
        row = await self._one("SELECT name, grants, created_at, updated_at FROM roles WHERE name = ?", name)
        return None if row is None else self._role(row)

    async def list_roles(self) -> list[Role]:
        rows = await self._fetch("SELECT name, grants, created_at, updated_at FROM roles ORDER BY name")
        return [self._role(row) for row in rows]

    async def put_role(self, role: Role) -> None:
        t = self._d.time_in
        await self._exec(
            "INSERT INTO roles (name, grants, created_at, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET grants = excluded.grants, updated_at = excluded.updated_at",
            role.name, json.dumps(list(role.grants)), t(role.created_at), t(role.updated_at),
        )

    async def insert_role_if_absent(self, role: Role) -> bool:
        t = self._d.time_in
        rows = await self._fetch(
            "INSERT INTO roles (name, grants, created_at, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (name) DO NOTHING RETURNING name",
            role.name, json.dumps(list(role.grants)), t(role.created_at), t(role.updated_at),
        )
        return bool(rows)

    async def delete_role(self, name: str) -> None:
        await self._exec("DELETE FROM roles WHERE name = ?", name)

    async def role_users(self, name: str) -> tuple[int, int, int]:
        """How many keys (not revoked), members and trust policies use the role."""
        keys = await self._one(
            "SELECT count(*) AS n FROM keys WHERE role = ? AND revoked_at IS NULL", name
        )
        members = await self._one("SELECT count(*) AS n FROM members WHERE role = ?", name)
        policies = await self._one("SELECT count(*) AS n FROM trust_policies WHERE role = ?", name)
        return int(keys["n"]), int(members["n"]), int(policies["n"])  # type: ignore[index]

    # -- members ---------------------------------------------------------
    def _member(self, row: Mapping[str, Any]) -> Member:
        t = self._d.time_out
        return Member(row["org"], row["user_name"], row["role"], t(row["created_at"]), t(row["updated_at"]))

    async def get_member(self, org: str, user: str, *, for_update: bool = False) -> Member | None:
        lock = self._d.for_update if for_update else ""
        row = await self._one(
            "SELECT org, user_name, role, created_at, updated_at FROM members "
            f"WHERE org = ? AND user_name = ?{lock}",
            org, user,
        )
        return None if row is None else self._member(row)

    async def list_members(self, org: str, *, after: str | None = None, limit: int | None = None) -> list[Member]:
        """The org's members by user name; ``after`` is the last user of the previous page."""
        page, args = (" LIMIT ?", [limit]) if limit is not None else ("", [])
        rows = await self._fetch(
            "SELECT org, user_name, role, created_at, updated_at FROM members WHERE org = ? AND user_name > ? "
            f"ORDER BY user_name{page}",
            org, after or "", *args,
        )
        return [self._member(row) for row in rows]

    async def list_orgs(self) -> list[str]:
        """Every org that holds a key or a member, by name."""
        rows = await self._fetch("SELECT org FROM keys UNION SELECT org FROM members ORDER BY org")
        return [str(row["org"]) for row in rows]

    async def member_orgs(self, user: str) -> list[str]:
        rows = await self._fetch("SELECT org FROM members WHERE user_name = ? ORDER BY org", user)
        return [str(row["org"]) for row in rows]

    async def put_member(self, m: Member) -> None:
        t = self._d.time_in
        await self._exec(
            "INSERT INTO members (org, user_name, role, created_at, updated_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (org, user_name) DO UPDATE SET role = excluded.role, updated_at = excluded.updated_at",
            m.org, m.user, m.role, t(m.created_at), t(m.updated_at),
        )

    async def delete_member(self, org: str, user: str) -> None:
        await self._exec("DELETE FROM members WHERE org = ? AND user_name = ?", org, user)

    # -- trust policies and exchanged tokens --------------------------------
    def _policy(self, row: Mapping[str, Any]) -> TrustPolicy:
        t = self._d.time_out
        return TrustPolicy(
            name=row["name"], issuer=row["issuer"], audience=row["audience"],
            # A JSON object: PostgreSQL's JSONB does not keep its order, so it is sorted here.
            conditions=tuple(sorted(json.loads(row["conditions"]).items())), org=row["org"], role=row["role"],
            operations=tuple(json.loads(row["operations"])), servers=tuple(json.loads(row["servers"])),
            ip_allowlist=tuple(json.loads(row["ip_allowlist"])), rate_limit=row["rate_limit"],
            lifetime=int(row["lifetime"]), jwks_file=row["jwks_file"], created_by=row["created_by"],
            created_at=t(row["created_at"]), updated_at=t(row["updated_at"]),
        )

    async def get_trust_policy(self, name: str) -> TrustPolicy | None:
        row = await self._one(f"SELECT {_POLICY_COLUMNS} FROM trust_policies WHERE name = ?", name)
        return None if row is None else self._policy(row)

    async def list_trust_policies(self, *, issuer: str | None = None) -> list[TrustPolicy]:
        """By name; with ``issuer``, only the policies of that issuer (compared exactly)."""
        where, args = ("WHERE issuer = ? ", [issuer]) if issuer is not None else ("", [])
        rows = await self._fetch(f"SELECT {_POLICY_COLUMNS} FROM trust_policies {where}ORDER BY name", *args)
        return [self._policy(row) for row in rows]

    async def put_trust_policy(self, p: TrustPolicy) -> None:
        """Insert, or replace every setting of the policy of that name (its created_by/created_at stay)."""
        t = self._d.time_in
        await self._exec(
            f"INSERT INTO trust_policies ({_POLICY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET issuer = excluded.issuer, audience = excluded.audience, "
            "conditions = excluded.conditions, org = excluded.org, role = excluded.role, "
            "operations = excluded.operations, servers = excluded.servers, ip_allowlist = excluded.ip_allowlist, "
            "rate_limit = excluded.rate_limit, lifetime = excluded.lifetime, jwks_file = excluded.jwks_file, "
            "updated_at = excluded.updated_at",
            p.name, p.issuer, p.audience, json.dumps(dict(p.conditions), sort_keys=True), p.org, p.role,
            json.dumps(list(p.operations)), json.dumps(list(p.servers)), json.dumps(list(p.ip_allowlist)),
            p.rate_limit, p.lifetime, p.jwks_file, p.created_by, t(p.created_at), t(p.updated_at),
        )

    async def delete_trust_policy(self, name: str) -> None:
        await self._exec("DELETE FROM trust_policies WHERE name = ?", name)

    async def claim_token(self, token_id: str, *, policy: str, at: datetime, expires_at: datetime) -> bool:
        """Record the token as exchanged; False when it already was (a replay).

        One statement, so two concurrent exchanges of one token cannot both see it absent.
        """
        t = self._d.time_in
        rows = await self._fetch(
            "INSERT INTO exchanged_tokens (token_id, policy, exchanged_at, expires_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (token_id) DO NOTHING RETURNING token_id",
            token_id, policy, t(at), t(expires_at),
        )
        return bool(rows)

    async def prune_exchanged_tokens(self, *, before: datetime, batch: int) -> int:
        """Delete up to ``batch`` records of exchanged tokens that expired before ``before``."""
        rows = await self._fetch(
            "DELETE FROM exchanged_tokens WHERE token_id IN (SELECT token_id FROM exchanged_tokens "
            "WHERE expires_at < ? ORDER BY expires_at LIMIT ?) RETURNING token_id",
            self._d.time_in(before), batch,
        )
        return len(rows)

    # -- audit -----------------------------------------------------------
    async def add_audit(
        self, *, at: datetime, actor: str, action: str, target: str, details: dict[str, Any],
        org: str | None = None, actor_org: str | None = None,
    ) -> None:
        await self._exec(
            "INSERT INTO audit_events (at, actor, action, target, details, org, actor_org) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            self._d.time_in(at), actor, action, target, json.dumps(details, sort_keys=True), org, actor_org,
        )

    def _time_window(
        self, where: list[str], args: list[Any], since: datetime | None, until: datetime | None,
        before: tuple[datetime, int] | None,
    ) -> None:
        t = self._d.time_in
        if since is not None:
            where.append("at >= ?")
            args.append(t(since))
        if until is not None:
            where.append("at < ?")
            args.append(t(until))
        if before is not None:
            # Keyset paging, newest first: rows written meanwhile do not shift later pages.
            where.append("(at < ? OR (at = ? AND id < ?))")
            args += [t(before[0]), t(before[0]), before[1]]

    async def list_audit(
        self, *, key: str | None = None, org: str | None = None, action: str | None = None,
        since: datetime | None = None, until: datetime | None = None, limit: int = 100, offset: int = 0,
        before: tuple[datetime, int] | None = None,
    ) -> list[AuditEvent]:
        """Newest first. ``key`` matches events about the key and events the key performed
        (through the admin API its id is the actor); ``org`` the events about the org's keys, members
        and trust policies; ``before`` is an (at, id) to start after."""
        where, args = ["1 = 1"], []
        if key is not None:
            where.append("(target = ? OR actor = ?)")
            args += [key, key]
        if org is not None:
            where.append("org = ?")
            args.append(org)
        if action is not None:
            where.append("action = ?")
            args.append(action)
        self._time_window(where, args, since, until, before)
        rows = await self._fetch(
            "SELECT id, at, actor, action, target, details, org, actor_org FROM audit_events "
            f"WHERE {' AND '.join(where)} "
            "ORDER BY at DESC, id DESC LIMIT ? OFFSET ?",
            *args, limit, offset,
        )
        return [
            AuditEvent(int(r["id"]), self._d.time_out(r["at"]), r["actor"], r["action"], r["target"],
                       json.loads(r["details"]), r["org"], r["actor_org"])
            for r in rows
        ]

    # -- webhook outbox ----------------------------------------------------
    def _delivery(self, r: Mapping[str, Any]) -> WebhookDelivery:
        t = self._d.time_out
        return WebhookDelivery(
            int(r["id"]), r["url"], r["event"], r["key_id"], r["body"], t(r["created_at"]), int(r["attempts"]),
            t(r["next_attempt_at"]), t(r["delivered_at"]), t(r["abandoned_at"]), r["last_error"],
        )

    async def enqueue_webhook(self, *, url: str, event: str, key_id: str, body: str, at: datetime) -> None:
        """Queue ``body`` for ``url``, due now; written with the event it announces."""
        t = self._d.time_in
        await self._exec(
            "INSERT INTO webhook_outbox (url, event, key_id, body, created_at, next_attempt_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            url, event, key_id, body, t(at), t(at),
        )

    async def claim_webhooks(self, *, now: datetime, lease_until: datetime, limit: int) -> list[WebhookDelivery]:
        """Up to ``limit`` deliveries due at ``now``, oldest first, made due again only at ``lease_until``.

        The lease is the claim: another deliverer (worker, replica) skips them until it ends, and
        if this one dies mid-delivery they are tried again then. The due condition is repeated
        outside the subquery so that, on PostgreSQL, a concurrent claim of the same rows finds
        them no longer due when it gets their lock.
        """
        t = self._d.time_in
        rows = await self._fetch(
            f"UPDATE webhook_outbox SET next_attempt_at = ? WHERE id IN (SELECT id FROM webhook_outbox "
            "WHERE delivered_at IS NULL AND abandoned_at IS NULL AND next_attempt_at <= ? ORDER BY id LIMIT ?) "
            f"AND next_attempt_at <= ? RETURNING {_DELIVERY_COLUMNS}",
            t(lease_until), t(now), limit, t(now),
        )
        return sorted((self._delivery(r) for r in rows), key=lambda d: d.id)

    async def webhook_delivered(self, delivery_id: int, *, at: datetime, attempts: int) -> None:
        await self._exec(
            "UPDATE webhook_outbox SET delivered_at = ?, attempts = ?, last_error = NULL WHERE id = ?",
            self._d.time_in(at), attempts, delivery_id,
        )

    async def webhook_failed(
        self, delivery_id: int, *, attempts: int, error: str, retry_at: datetime | None, at: datetime,
    ) -> None:
        """A failed attempt: tried again at ``retry_at``, or given up (``retry_at`` None)."""
        t = self._d.time_in
        if retry_at is None:
            await self._exec(
                "UPDATE webhook_outbox SET attempts = ?, last_error = ?, abandoned_at = ? WHERE id = ?",
                attempts, error, t(at), delivery_id,
            )
        else:
            await self._exec(
                "UPDATE webhook_outbox SET attempts = ?, last_error = ?, next_attempt_at = ? WHERE id = ?",
                attempts, error, t(retry_at), delivery_id,
            )

    async def list_webhooks(
        self, *, key_id: str | None = None, pending: bool | None = None, limit: int = 100,
    ) -> list[WebhookDelivery]:
        """Newest first; ``pending`` True = neither delivered nor given up, False = one of those."""
        where, args = ["1 = 1"], []
        if key_id is not None:
            where.append("key_id = ?")
            args.append(key_id)
        if pending is True:
            where.append("delivered_at IS NULL AND abandoned_at IS NULL")
        elif pending is False:
            where.append("(delivered_at IS NOT NULL OR abandoned_at IS NOT NULL)")
        rows = await self._fetch(
            f"SELECT {_DELIVERY_COLUMNS} FROM webhook_outbox WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?",
            *args, limit,
        )
        return [self._delivery(r) for r in rows]

    async def webhook_backlog(self) -> int:
        """Deliveries neither made nor given up."""
        row = await self._one(
            "SELECT COUNT(*) AS n FROM webhook_outbox WHERE delivered_at IS NULL AND abandoned_at IS NULL"
        )
        return int(row["n"]) if row else 0

    async def prune_webhooks(self, *, older_than: datetime, batch: int) -> int:
        """Delete up to ``batch`` deliveries made or given up before ``older_than``."""
        t = self._d.time_in(older_than)
        rows = await self._fetch(
            "DELETE FROM webhook_outbox WHERE id IN (SELECT id FROM webhook_outbox WHERE "
            "(delivered_at IS NOT NULL AND delivered_at < ?) OR (abandoned_at IS NOT NULL AND abandoned_at < ?) "
            "ORDER BY id LIMIT ?) RETURNING id",
            t, t, batch,
        )
        return len(rows)

    # -- change feed and meta -------------------------------------------
    async def add_change(self, *, at: datetime, entity: str, target: str) -> None:
        await self._exec(
            "INSERT INTO changes (at, entity, target) VALUES (?, ?, ?)", self._d.time_in(at), entity, target
        )

    async def get_meta(self, name: str) -> str | None:
        row = await self._one("SELECT value FROM meta WHERE name = ?", name)
        return None if row is None else row["value"]

    async def set_meta_if_absent(self, name: str, value: str) -> str:
        """Store ``value`` unless one is there already; return the one that stays."""
        await self._exec("INSERT INTO meta (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING", name, value)
        stored = await self.get_meta(name)
        assert stored is not None
        return stored

    # -- the proxy's writes ------------------------------------------------
    async def record_usage(self, usage: Sequence[tuple[str, datetime, str | None]]) -> None:
        """Last-used time and IP per key; a late batch never moves the time backwards."""
        g = self._d.greatest
        sql = self._d.placeholders(
            f"UPDATE keys SET last_used_ip = CASE WHEN last_used_at IS NULL OR last_used_at <= ? "
            f"THEN ? ELSE last_used_ip END, last_used_at = {g}(COALESCE(last_used_at, ?), ?) WHERE id = ?"
        )
        t = self._d.time_in
        await self._conn.executemany(sql, [(t(at), ip, t(at), t(at), key_id) for key_id, at, ip in usage])

    async def add_request_records(self, records: Sequence[RequestRecord]) -> None:
        # A record is a tuple in the columns' order, then its id (the store's to assign): its first
        # value as the dialect stores a time, the next ten as they are (a flat list: see insert_many).
        await self._conn.insert_many(_INSERT_REQUEST_RECORDS, REQUEST_RECORD_COLUMNS,
                                     request_record_values(records, self._d.time_in), REQUEST_RECORD_ALIKE)

    async def list_requests(
        self, *, key_id: str | None = None, org: str | None = None, decision: str | None = None,
        since: datetime | None = None, until: datetime | None = None, limit: int = 100,
        before: tuple[datetime, int] | None = None,
    ) -> list[RequestRecord]:
        """Newest first; ``org`` the records of the org's keys; ``before`` is an (at, id) to start after."""
        where, args = ["1 = 1"], []
        for column, value in (("key_id", key_id), ("decision", decision)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if org is not None:
            # A record's org is its key's: one claiming no key, or a key no store holds, is no org's.
            where.append("key_id IN (SELECT id FROM keys WHERE org = ?)")
            args.append(org)
        self._time_window(where, args, since, until, before)
        rows = await self._fetch(
            "SELECT id, at, key_id, method, path, server, operation, decision, status, client_ip, duration_ms, "
            f"reason FROM request_records WHERE {' AND '.join(where)} ORDER BY at DESC, id DESC LIMIT ?",
            *args, limit,
        )
        return [
            RequestRecord(self._d.time_out(r["at"]), r["key_id"], r["method"], r["path"], r["server"],
                          r["operation"], r["decision"], int(r["status"]), r["client_ip"],
                          float(r["duration_ms"]), r["reason"], id=int(r["id"]))
            for r in rows
        ]

    async def prune_audit(self, *, older_than: datetime, batch: int) -> int:
        """Delete up to ``batch`` audit events and ``batch`` request records from before ``older_than``."""
        deleted = 0
        for table in ("audit_events", "request_records"):
            rows = await self._fetch(
                f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} WHERE at < ? ORDER BY id LIMIT ?) "
                "RETURNING id",
                self._d.time_in(older_than), batch,
            )
            deleted += len(rows)
        return deleted

    async def latest_change(self) -> int:
        row = await self._one("SELECT COALESCE(MAX(seq), 0) AS seq FROM changes")
        return int(row["seq"]) if row else 0

    async def changes_since(self, seq: int) -> list[tuple[int, str, str, datetime]]:
        """The changes after ``seq``: their seq, what changed (entity, target) and when it was made."""
        rows = await self._fetch("SELECT seq, entity, target, at FROM changes WHERE seq > ? ORDER BY seq", seq)
        t = self._d.time_out
        return [(int(r["seq"]), r["entity"], r["target"], t(r["at"])) for r in rows]  # type: ignore[misc]


class SqlStore(ABC):
    """What both stores do the same way on top of their transactions."""

    dialect: Dialect
    url: str

    @abstractmethod
    async def open(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    def _tx(self, *, write: bool) -> AbstractAsyncContextManager[SqlTransaction]: ...

    async def ping(self) -> None:
        async with self.read() as tx:
            await tx._fetch("SELECT 1 AS ok")

    def transaction(self) -> AbstractAsyncContextManager[SqlTransaction]:
        return self._tx(write=True)

    def read(self) -> AbstractAsyncContextManager[SqlTransaction]:
        return self._tx(write=False)

    async def _applied(self, tx: SqlTransaction) -> set[int]:
        await tx._exec(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
            f"name TEXT NOT NULL, applied_at {self.dialect.time_type} NOT NULL)"
        )
        return {int(r["version"]) for r in await tx._fetch("SELECT version FROM schema_migrations")}

    async def may(self, privilege: str, table: str) -> bool:
        """Whether the store's role holds ``privilege`` on ``table``: an embedded store may do anything."""
        return True

    async def grant_dataplane(self) -> str | None:
        """Give the data plane's role its rights; an embedded store has no roles."""
        return None

    async def pending_migrations(self) -> list[int]:
        """Read-only, so an application role without DDL rights can ask."""
        async with self.read() as tx:
            exists = await tx._one(self.dialect.migrations_table_exists)
            applied = set()
            if exists is not None and exists["found"]:
                applied = {int(r["version"]) for r in await tx._fetch("SELECT version FROM schema_migrations")}
        return [version for version, _, _ in migrations(self.dialect) if version not in applied]

    async def migrate(self) -> list[int]:
        """Apply pending migrations, each in its own transaction; return their versions."""
        done = []
        for version, name, statements in migrations(self.dialect):
            async with self.transaction() as tx:
                if self.dialect.migration_lock:
                    await tx._exec(self.dialect.migration_lock)
                # Checked under the lock, so concurrent runs apply each step once.
                if version in await self._applied(tx):
                    continue
                for statement in statements:
                    await tx._exec(statement)
                await tx._exec(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                    version, name, self.dialect.time_in(datetime.now(UTC)),
                )
            done.append(version)
        return done

    async def get_key(self, key_id: str) -> KeyRecord | None:
        async with self.read() as tx:
            return await tx.get_key(key_id)

    async def record_usage(self, usage: Sequence[tuple[str, datetime, str | None]]) -> None:
        async with self.transaction() as tx:
            await tx.record_usage(usage)

    async def add_request_records(self, records: Sequence[RequestRecord]) -> None:
        async with self.transaction() as tx:
            await tx.add_request_records(records)

    async def latest_change(self) -> int:
        async with self.read() as tx:
            return await tx.latest_change()

    async def changes_since(self, seq: int) -> list[tuple[int, str, str, datetime]]:
        async with self.read() as tx:
            return await tx.changes_since(seq)
