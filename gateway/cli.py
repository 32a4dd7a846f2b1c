"""The ``keygate`` command line.

Management commands work on the configured store directly, so the first
admin key can be made before any server runs. Problems a user can fix are
one line on stderr with exit status 2; an unreachable store is exit status 1.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, AsyncIterator, NoReturn, TypeVar

import click

from .manage.audit import AuditEntry, AuditFilter, parse_time, utcnow
from .config.load import ConfigError, load_settings
from .config.render import masked, render_toml
from .config.schema import Settings
from .models import KeyRecord, Role, TrustPolicy, iso
from .cache.notices import change_publisher
from .cli_output import details, emit_data, emit_json, emit_names, output_options, table
from .identity import login as people
from .identity.credentials import CredentialsError
from .identity.device import LoginError, printable
from .manage.service import UNSET, KeyService, ServiceError, bootstrap, resolve_pepper
from .manage import reconcile
from .manage.declared import StateProblems
from .store import KeyStore, StoreError, StoreUnavailable, Transaction, configured_store
from .store.sqlite import path_from_url

T = TypeVar("T")

EXIT_USAGE = 2
EXIT_UNAVAILABLE = 1
SHOWN_ONCE = "Store it now: this is the only time the full key is shown. Keygate keeps only a hash."
CANARY_NOTE = ("A canary never authorizes: plant it where only an intruder would find it. Every use is answered "
               "as an unknown key and raises key.canary_used (audit event and webhook).")


def fail(message: str, status: int = EXIT_USAGE) -> NoReturn:
    click.echo(f"keygate: {message}", err=True)
    sys.exit(status)


def cli_actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        # Containers often run as a uid without a passwd entry.
        return f"cli:uid-{os.getuid()}"


def settings_from(ctx: click.Context, overrides: dict[str, Any] | None = None, *, serving: bool = False) -> Settings:
    """The settings, else one line per problem and exit 2; ``serving``: also what serve needs (serve, check-config)."""
    try:
        return load_settings(config_file=ctx.obj.get("config_file"), overrides=overrides, serving=serving)
    except ConfigError as exc:
        for line in exc.problems:
            click.echo(f"keygate: invalid configuration: {line}", err=True)
        sys.exit(EXIT_USAGE)


class StoreOnFirstUse:
    """The configured store, opened (and migrated if embedded) when the service first reads or writes.

    The service checks a command's input before it touches the store, so input
    refused on its face neither waits for a database nor creates the embedded
    store's file.
    """

    def __init__(self, settings: Settings, *, needs_store: bool = False) -> None:
        self.settings = settings
        # A command that reads, or changes what must exist, never creates the embedded store's file.
        self.needs_store = needs_store
        self._store: KeyStore | None = None

    async def _opened(self) -> KeyStore:
        if self._store is None:
            if self.needs_store:
                refuse_missing_store(self.settings)
            store = configured_store(self.settings.store)
            await store.open()
            self._store = store
            if await store.pending_migrations():
                if not self.settings.store.url.startswith("sqlite:"):
                    fail("the store's schema is not up to date: run `keygate migrate` first", EXIT_UNAVAILABLE)
                await bootstrap(store)  # the embedded store migrates itself
        return self._store

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        async with (await self._opened()).transaction() as tx:
            yield tx

    @asynccontextmanager
    async def read(self) -> AsyncIterator[Transaction]:
        async with (await self._opened()).read() as tx:
            yield tx

    async def close(self) -> None:
        if self._store is not None:
            await self._store.close()


def refuse_missing_store(settings: Settings) -> None:
    """Exit 1 with one line when the embedded store's file does not exist (opening it would create it).

    Exit 1, as for an unreachable store: the command is right, the store it needs is not there.
    """
    url = settings.store.url
    if not url.startswith("sqlite:///"):
        return
    path = path_from_url(url)
    if not path.exists():
        fail(f"no store at {path.absolute()} (store.url = {url}): nothing has been created yet; "
             "run `keygate keys create` or `keygate serve` first, or point store.url at your store", EXIT_UNAVAILABLE)


def run(coro: Awaitable[T]) -> T:
    """Run ``coro``, turning known failures into one line and an exit status."""
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    except StateProblems as exc:  # a state file: every problem, one line each
        for line in exc.lines():
            click.echo(f"keygate: {line}", err=True)
        sys.exit(EXIT_USAGE)
    except ServiceError as exc:
        fail(str(exc))
    except StoreUnavailable as exc:
        fail(f"store unavailable: {exc}", EXIT_UNAVAILABLE)
    except StoreError as exc:
        fail(f"store refused the change: {exc}")
    except Exception as exc:  # last resort: one line, never a traceback
        fail(f"unexpected error ({type(exc).__name__}): {exc}", EXIT_UNAVAILABLE)


def with_service(ctx: click.Context, action: Callable[[KeyService], Awaitable[T]], *, needs_store: bool = False) -> T:
    """Run ``action`` on the configured store; the service checks the command's input, before the store opens.

    ``needs_store``: the command only reads, or changes what must already be there (revoke, delete ...),
    so a missing embedded store is reported, not created.
    """
    settings = ctx.obj["settings"] = settings_from(ctx)

    async def go() -> T:
        store = StoreOnFirstUse(settings, needs_store=needs_store)
        try:
            # With redis.url set, changes are published to running gateways at once
            # (else they see them at their next change-feed poll).
            async with change_publisher(settings) as notifier:
                return await action(KeyService(store, settings, actor=cli_actor(), notifier=notifier))
        finally:
            await store.close()

    return run(go())


# -- output --------------------------------------------------------------
def _when(value: str | None) -> str:
    return "-" if value is None else value.replace("T", " ")[:19]


def idle_after(ctx: click.Context) -> float:
    """keys.idle_after of the settings the command ran with (status idle is derived from it)."""
    return float(ctx.obj["settings"].keys.idle_after)


def key_table(records: Sequence[KeyRecord], now: datetime, idle_after: float = 0, wide: bool = False) -> None:
    rows = []
    for r in records:
        p = r.public(now, idle_after)
        access = "agent" if r.agent else "canary (never authorizes)" if r.canary else _access(r.role, r.operations)
        rows.append([
            p["id"], p["name"], p["kind"], p["org"] + (f"/{p['user']}" if p["user"] else ""), access,
            ",".join(r.servers), p["status"], _when(p["expires_at"]) if p["expires_at"] else "never",
            _when(p["last_used_at"]),
        ] + ([p["last_used_ip"], ",".join(r.ip_allowlist) or "any", p["rate_limit"] or "default",
              _when(p["created_at"]), p["created_by"], _when(p["revoked_at"])] if wide else []))
    table(["ID", "NAME", "KIND", "ORG/USER", "ACCESS", "SERVERS", "STATUS", "EXPIRES", "LAST USED"]
          + (["LAST IP", "ALLOW IPS", "RATE LIMIT", "CREATED", "CREATED BY", "REVOKED"] if wide else []), rows)


def role_table(found: Sequence[Role], wide: bool = False) -> None:
    table(["ROLE", "GRANTS"] + (["CREATED", "UPDATED"] if wide else []),
          [[r.name, ", ".join(r.grants)] + ([_when(iso(r.created_at)), _when(iso(r.updated_at))] if wide else [])
           for r in found])


def key_details(record: KeyRecord, now: datetime, idle_after: float = 0) -> None:
    details(record.public(now, idle_after))


def _lifetime(seconds: int) -> str:
    """900 -> 15m, 3600 -> 1h, 90 -> 90s: the form --lifetime takes."""
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _conditions(policy: TrustPolicy) -> list[str]:
    return [f"{claim}={pattern}" for claim, pattern in policy.conditions]


def _access(role: str | None, operations: Sequence[str]) -> str:
    return ((role or "") + (f" [{','.join(operations)}]" if operations else "")).strip()


def trust_table(found: Sequence[TrustPolicy], wide: bool = False) -> None:
    table(["NAME", "ISSUER", "AUDIENCE", "CONDITIONS", "ORG", "ACCESS", "SERVERS", "LIFETIME"]
          + (["ALLOW IPS", "RATE LIMIT", "JWKS FILE", "UPDATED"] if wide else []),
          [[p.name, p.issuer, p.audience, ", ".join(_conditions(p)), p.org, _access(p.role, p.operations),
            ",".join(p.servers), _lifetime(p.lifetime)]
           + ([",".join(p.ip_allowlist) or "any", p.rate_limit or "default", p.jwks_file,
               _when(iso(p.updated_at))] if wide else []) for p in found])


def trust_details(policy: TrustPolicy) -> None:
    fields = policy.public()
    fields["conditions"] = _conditions(policy)
    fields["lifetime"] = _lifetime(policy.lifetime)
    details(fields)


def show_new_key(record: KeyRecord, full_key: str, as_json: bool, now: datetime, **extra: Any) -> None:
    if as_json:
        emit_json({**record.public(now), **extra, "key": full_key})
        click.echo(SHOWN_ONCE, err=True)
        return
    click.echo(f"{'Canary key' if record.canary else 'Key'} {record.id} ({record.name!r}):\n\n    {full_key}\n")
    click.echo(SHOWN_ONCE)
    if record.canary:
        click.echo(CANARY_NOTE)
    for label, value in extra.items():
        if value:
            click.echo(f"{label.replace('_', ' ')}: {value}")


# -- confirmation of destructive commands ----------------------------------
yes_option = click.option("--yes", "-y", is_flag=True,
                          help="Do it without asking (needed when stdin is not a terminal, e.g. in a script).")


def refuse_unconfirmed(yes: bool, command: str) -> None:
    """Without --yes, a destructive command asks on a terminal; with no terminal to ask on, it refuses (exit 2)."""
    if not yes and not sys.stdin.isatty():
        fail(f"{command} changes what cannot be undone: add --yes to confirm (stdin is not a terminal to ask on)")


def confirmed(yes: bool, question: str) -> None:
    """Ask ``question`` [y/N] on the terminal unless --yes; anything but yes cancels (exit 1, nothing changed)."""
    if yes:
        return
    if not click.confirm(question, default=False, err=True):
        fail("cancelled: nothing changed", EXIT_UNAVAILABLE)


# -- commands ------------------------------------------------------------
@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_file", metavar="FILE", help="TOML config file (else $KEYGATE_CONFIG, else ./keygate.toml).")
@click.version_option(package_name="keygate")
@click.pass_context
def main(ctx: click.Context, config_file: str | None) -> None:
    """Keygate: an authenticating reverse proxy for API keys."""
    ctx.ensure_object(dict)
    ctx.obj["config_file"] = config_file


@main.command()
@click.option("--print-dataplane-role", is_flag=True,
              help="Print the SQL that creates the data plane's PostgreSQL role and its grants; change nothing.")
@click.pass_context
def migrate(ctx: click.Context, print_dataplane_role: bool) -> None:
    """Apply store migrations, create the built-in admin role and the pepper, and (PostgreSQL) set the
    data plane's role keygate_dataplane to exactly its rights."""
    if print_dataplane_role:
        from .store.dataplane import script

        click.echo(script(), nl=False)
        return
    settings = settings_from(ctx)

    async def go() -> tuple[list[int], str | None]:
        store = configured_store(settings.store)
        await store.open()
        try:
            applied = await bootstrap(store)
            # Stored now, so a data plane that may not write it finds it.
            await resolve_pepper(store, settings)
            return applied, await store.grant_dataplane()
        finally:
            await store.close()

    applied, role_problem = run(go())
    click.echo(f"applied migrations: {', '.join(map(str, applied))}" if applied else "store is up to date")
    if role_problem is not None:
        click.echo(f"warning: {role_problem}", err=True)


@main.command()
@click.option("--workers", type=int, help="Processes sharing the listeners (proxy.workers).")
@click.option("--proxy-listen", metavar="HOST:PORT", help="Proxy listener (proxy.listen).")
@click.option("--admin-listen", metavar="HOST:PORT", help="Admin listener (admin.listen).")
@click.pass_context
def serve(ctx: click.Context, workers: int | None, proxy_listen: str | None, admin_listen: str | None) -> None:
    """Run the proxy and admin listeners until SIGTERM."""
    from .serve import serve as run_server

    settings = settings_from(ctx, {"proxy.workers": workers, "proxy.listen": proxy_listen,
                                   "admin.listen": admin_listen}, serving=True)
    sys.exit(run_server(settings))


@main.command()
@click.option("--proxy-listen", metavar="HOST:PORT", help="Proxy listener (default 127.0.0.1:8000).")
@click.option("--admin-listen", metavar="HOST:PORT", help="Admin listener (default 127.0.0.1:8001).")
@click.pass_context
def quickstart(ctx: click.Context, proxy_listen: str | None, admin_listen: str | None) -> None:
    """Run Keygate on the embedded defaults with a demo upstream and a demo key."""
    from .quickstart import quickstart as run_quickstart

    sys.exit(run_quickstart(ctx.obj.get("config_file"), {"proxy.listen": proxy_listen,
                                                         "admin.listen": admin_listen}))


@main.command("check-config")
@click.option("--settings-only", is_flag=True,
              help="Check only that each setting is valid (what migrate and the key commands need), "
                   "not also what serve needs.")
@click.pass_context
def check_config(ctx: click.Context, settings_only: bool) -> None:
    """Check the settings as `keygate serve` does at start-up and print them, secrets masked.

    Every problem serve would stop on is one line on stderr, all of them at once, and the exit
    status is then 2, as serve's.
    """
    click.echo(render_toml(masked(settings_from(ctx, serving=not settings_only))), nl=False)


# -- keys ------------------------------------------------------------------
@main.group()
def keys() -> None:
    """Create, list, rotate and revoke keys."""


@keys.command("create")
@click.option("--name", required=True, help="What the key is for, e.g. 'deploy from CI'.")
@click.option("--kind", help="Key kind (sets the prefix); default keys.default_kind.")
@click.option("--org", default="default", show_default=True)
@click.option("--user", default="", help="Make a per-user key; the user must be a member of the org.")
@click.option("--role", help="Role whose grants bound the key.")
@click.option("--operation", "operations", multiple=True, help="Operation grant (repeat).")
@click.option("--server", "servers", multiple=True, help="Server the key may act on (repeat; default '*').")
@click.option("--allow-ip", "allow_ips", multiple=True, help="Client CIDR allowed (repeat; default any).")
@click.option("--rate-limit", help="e.g. '100/minute' or '100/minute; burst=150' (default ratelimit.default).")
@click.option("--expires", default="never", show_default=True, help="7d, 30d, 90d, 1y, never or an ISO 8601 date.")
@click.option("--canary", is_flag=True, help="A decoy that never authorizes: any use is answered as an unknown key "
              "and raises key.canary_used (audit event, webhook). Takes no role, operations, servers, "
              "allowlist or rate limit.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def keys_create(ctx: click.Context, name: str, kind: str | None, org: str, user: str, role: str | None,
                operations: tuple[str, ...], servers: tuple[str, ...], allow_ips: tuple[str, ...],
                rate_limit: str | None, expires: str, canary: bool, as_json: bool) -> None:
    """Create a key and print it once."""
    record, full = with_service(ctx, lambda svc: svc.create_key(
        # --role '' is no role, as for update.
        name=name, kind=kind, org=org, user=user, role=role or None, operations=operations, servers=servers,
        ip_allowlist=allow_ips, rate_limit=rate_limit, expires=expires, canary=canary,
    ))
    show_new_key(record, full, as_json, utcnow())


@keys.command("list")
@click.option("--org")
@click.option("--user")
@click.option("--status", type=click.Choice(["active", "idle", "rotating", "expired", "revoked"]),
              help="idle: unused for keys.idle_after (only when that is set); rotating: replaced by "
                   "`keys rotate --grace`, still valid until its revoked_at.")
@click.option("--kind")
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(1, 100_000))
@output_options
@click.pass_context
def keys_list(ctx: click.Context, org: str | None, user: str | None, status: str | None,
              kind: str | None, limit: int, output: str | None) -> None:
    """List keys, newest first (never secrets or hashes)."""
    records = with_service(ctx, lambda svc: svc.list_keys(org=org, user=user, status=status, kind=kind,
                                                          limit=limit), needs_store=True)
    if len(records) == limit:
        click.echo(f"keygate: showing the newest {limit} keys; use --limit or filters for more", err=True)
    now = utcnow()
    if output == "name":
        emit_names("key", [r.id for r in records])
    elif not emit_data(output, [r.public(now, idle_after(ctx)) for r in records]):
        key_table(records, now, idle_after(ctx), wide=output == "wide")


@keys.command("show")
@click.argument("key_id", metavar="ID")
@output_options
@click.pass_context
def keys_show(ctx: click.Context, key_id: str, output: str | None) -> None:
    """Show one key."""
    record = with_service(ctx, lambda svc: svc.get_key(key_id), needs_store=True)
    if output == "name":
        emit_names("key", [record.id])
    elif not emit_data(output, record.public(utcnow(), idle_after(ctx))):
        key_details(record, utcnow(), idle_after(ctx))


@keys.command("update")
@click.argument("key_id", metavar="ID")
@click.option("--name")
@click.option("--role", help="New role ('' to remove it, if the key has operations).")
@click.option("--operation", "operations", multiple=True, help="Replaces the key's operations (repeat).")
@click.option("--server", "servers", multiple=True, help="Replaces the key's servers (repeat).")
@click.option("--allow-ip", "allow_ips", multiple=True, help="Replaces the key's IP allowlist (repeat).")
@click.option("--clear-operations", is_flag=True, help="Remove the key's own operations (its role remains).")
@click.option("--clear-allow-ip", is_flag=True, help="Remove the IP allowlist: any client address.")
@click.option("--rate-limit", help="New rate limit ('' for the configured default).")
@click.option("--expires", help="New expiry: 7d, 30d, 90d, 1y, never or an ISO 8601 date.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def keys_update(ctx: click.Context, key_id: str, name: str | None, role: str | None,
                operations: tuple[str, ...], servers: tuple[str, ...], allow_ips: tuple[str, ...],
                clear_operations: bool, clear_allow_ip: bool, rate_limit: str | None, expires: str | None,
                as_json: bool) -> None:
    """Change a key's settings; what is not given stays as it is."""
    if (clear_operations and operations) or (clear_allow_ip and allow_ips):
        fail("give either a new list or --clear-..., not both")
    record = with_service(ctx, lambda svc: svc.update_key(
        # A command line has no null: --role '' removes the role.
        key_id, name=name, role=UNSET if role is None else (role or None),
        operations=[] if clear_operations else (operations or None), servers=servers or None,
        ip_allowlist=[] if clear_allow_ip else (allow_ips or None),
        rate_limit=UNSET if rate_limit is None else rate_limit, expires=expires,
    ), needs_store=True)
    if as_json:
        emit_json(record.public(utcnow(), idle_after(ctx)))
    else:
        click.echo(f"updated {record.id}")


@keys.command("revoke")
@click.argument("key_id", metavar="ID")
@yes_option
@click.pass_context
def keys_revoke(ctx: click.Context, key_id: str, yes: bool) -> None:
    """Revoke a key now (permanent; revoking twice is harmless). Asks first unless --yes."""
    refuse_unconfirmed(yes, "keys revoke")
    if not yes:
        found = with_service(ctx, lambda svc: svc.get_key(key_id), needs_store=True)
        confirmed(yes, f"Revoke key {found.id} ({found.name})?")
    record = with_service(ctx, lambda svc: svc.revoke_key(key_id), needs_store=True)
    click.echo(f"revoked {record.id}")


@keys.command("report-leak")
@click.argument("key_id", metavar="ID")
@click.option("--url", required=True, help="Where the key was found (a commit, a paste, a log ...).")
@click.option("--source", help="What kind of place that is, e.g. commit, issue_comment, chat.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def keys_report_leak(ctx: click.Context, key_id: str, url: str, source: str | None, as_json: bool) -> None:
    """Report that a key leaked: revoked (or only flagged, per its kind's on_leak), audited, announced by webhook.

    ID may be the full key as it was found; it is never printed.
    """
    report = with_service(ctx, lambda svc: svc.report_leak(key_id, url=url, source=source),
                          needs_store=True)
    if as_json:
        emit_json({**report.record.public(utcnow()), "result": report.result, "first_report": report.first})
    else:
        click.echo(f"{report.record.id} reported leaked: {report.result.replace('_', ' ')}"
                   + ("" if report.first else " (reported before)"))


@keys.command("rotate")
@click.argument("key_id", metavar="ID")
@click.option("--grace", help="Keep the old key working this long, e.g. 1h (default: revoke it now).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def keys_rotate(ctx: click.Context, key_id: str, grace: str | None, as_json: bool) -> None:
    """Replace a key with a new one with the same settings."""
    new, full, old = with_service(ctx, lambda svc: svc.rotate_key(key_id, grace=grace), needs_store=True)
    show_new_key(new, full, as_json, utcnow(), rotated_from=old.id, old_key_revoked_at=iso(old.revoked_at))


@keys.command("set-role")
@click.argument("key_id", metavar="ID")
@click.argument("role")
@click.pass_context
def keys_set_role(ctx: click.Context, key_id: str, role: str) -> None:
    """Give a key another role."""
    record = with_service(ctx, lambda svc: svc.set_role(key_id, role), needs_store=True)
    click.echo(f"{record.id} now has role {record.role}")


@keys.command("suggest-allowlist", short_help="Suggest an IP allowlist from the addresses a key was used from.")
@click.argument("key_id", metavar="ID")
@click.option("--days", default=30, show_default=True, type=click.IntRange(1, 366),
              help="Look at the key's allowed requests of this many days.")
@click.option("--max", "max_blocks", default=4, show_default=True, type=click.IntRange(1, 16),
              help="Most CIDRs to suggest (IPv4 and IPv6 together).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def keys_suggest_allowlist(ctx: click.Context, key_id: str, days: int, max_blocks: int, as_json: bool) -> None:
    """Suggest the narrowest CIDRs covering the addresses a key was used from, and the command to apply them.

    Only allowed requests count (refused ones may be an attacker's). The CIDRs cover every recorded
    address with the least address space possible within --max.
    """
    found = with_service(ctx, lambda svc: svc.suggest_allowlist(key_id, days=days, max_blocks=max_blocks),
                         needs_store=True)
    if as_json:
        emit_json(found.public())
        return
    if not found.blocks:
        click.echo(f"{found.message}.")
        return
    click.echo(f"Allowlist suggestion for {found.key_id}: {found.message}.\n")
    table(["CIDR", "REQUESTS", "ADDRESSES"], [[str(b.network), b.requests, b.addresses] for b in found.blocks])
    click.echo(f"\nApply it (replaces the key's allowlist):\n\n    {found.command}")


@keys.command("agent")
@click.option("--org", required=True)
@click.option("--user", required=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def keys_agent(ctx: click.Context, org: str, user: str, as_json: bool) -> None:
    """Issue a user's agent key for an org, revoking their previous one."""
    record, full, previous = with_service(ctx, lambda svc: svc.issue_agent_key(org, user))
    show_new_key(record, full, as_json, utcnow(), revoked_previous=previous)


# -- roles -----------------------------------------------------------------
@main.group()
def roles() -> None:
    """Manage roles (named sets of operation grants)."""


@roles.command("list")
@output_options
@click.pass_context
def roles_list(ctx: click.Context, output: str | None) -> None:
    """List roles and their grants, by name."""
    found = with_service(ctx, lambda svc: svc.list_roles(), needs_store=True)
    if output == "name":
        emit_names("role", [r.name for r in found])
    elif not emit_data(output, [r.public() for r in found]):
        role_table(found, wide=output == "wide")


@roles.command("show")
@click.argument("name")
@output_options
@click.pass_context
def roles_show(ctx: click.Context, name: str, output: str | None) -> None:
    """Show one role and its grants."""
    role = with_service(ctx, lambda svc: svc.get_role(name), needs_store=True)
    if output == "name":
        emit_names("role", [role.name])
    elif not emit_data(output, role.public()):
        role_table([role], wide=output == "wide")


@roles.command("set")
@click.argument("name")
@click.option("--grant", "grants", multiple=True, required=True, help="Operation grant (repeat).")
@click.pass_context
def roles_set(ctx: click.Context, name: str, grants: tuple[str, ...]) -> None:
    """Create or replace a role."""
    role = with_service(ctx, lambda svc: svc.put_role(name, grants))
    click.echo(f"role {role.name}: {', '.join(role.grants)}")


@roles.command("delete")
@click.argument("name")
@yes_option
@click.pass_context
def roles_delete(ctx: click.Context, name: str, yes: bool) -> None:
    """Delete a role (refused while keys or members use it). Asks first unless --yes."""
    refuse_unconfirmed(yes, "roles delete")
    if not yes:
        role = with_service(ctx, lambda svc: svc.get_role(name), needs_store=True)
        confirmed(yes, f"Delete role {role.name} ({', '.join(role.grants)})?")
    with_service(ctx, lambda svc: svc.delete_role(name), needs_store=True)
    click.echo(f"deleted role {name}")


# -- members ---------------------------------------------------------------
@main.group()
def members() -> None:
    """Manage org members and their roles."""


@members.command("list")
@click.argument("org")
@output_options
@click.pass_context
def members_list(ctx: click.Context, org: str, output: str | None) -> None:
    """List an org's members and their roles."""
    found = with_service(ctx, lambda svc: svc.list_members(org), needs_store=True)
    wide = output == "wide"
    if output == "name":
        emit_names("member", [f"{m.org}/{m.user}" for m in found])
    elif not emit_data(output, [m.public() for m in found]):
        table(["USER", "ROLE", "SINCE"] + (["ORG", "UPDATED"] if wide else []),
              [[m.user, m.role, _when(m.public()["created_at"])]
               + ([m.org, _when(m.public()["updated_at"])] if wide else []) for m in found])


@members.command("set")
@click.argument("org")
@click.argument("user")
@click.argument("role")
@click.pass_context
def members_set(ctx: click.Context, org: str, user: str, role: str) -> None:
    """Make USER a member of ORG with ROLE (or give a member another role)."""
    member = with_service(ctx, lambda svc: svc.set_member(org, user, role))
    click.echo(f"{member.user} is a member of {member.org} with role {member.role}")


@members.command("remove")
@click.argument("org")
@click.argument("user")
@yes_option
@click.pass_context
def members_remove(ctx: click.Context, org: str, user: str, yes: bool) -> None:
    """Remove a member; their per-user keys stop working. Asks first unless --yes."""
    refuse_unconfirmed(yes, "members remove")
    confirmed(yes, f"Remove {user} from {org}? Their per-user keys in {org} stop working.")
    with_service(ctx, lambda svc: svc.remove_member(org, user), needs_store=True)
    click.echo(f"removed {user} from {org}")


# -- trust policies --------------------------------------------------------
@main.group()
def trust() -> None:
    """Manage trust policies: which OIDC tokens (GitHub Actions, Kubernetes, ...) may be exchanged for a key."""


def _claim_conditions(given: Sequence[str]) -> dict[str, str]:
    """``--claim CLAIM=PATTERN`` options as a mapping; the service checks the names and patterns."""
    conditions: dict[str, str] = {}
    for item in given:
        claim, sep, pattern = item.partition("=")
        if not sep:
            fail(f"claim {item!r}: use CLAIM=PATTERN, e.g. repository=acme/shop or ref=refs/heads/*")
        if claim in conditions:
            # A token's claim has one value: two patterns for it would be one too many, not "either".
            fail(f"claim {claim!r}: given twice; a claim takes one pattern (use * or ? for a glob)")
        conditions[claim] = pattern
    return conditions


@trust.command("add")
@click.argument("name")
@click.option("--issuer", required=True, metavar="URL",
              help="The issuer, exactly as the token's iss, e.g. https://token.actions.githubusercontent.com")
@click.option("--audience", required=True, help="Must be among the token's aud.")
@click.option("--claim", "claims", multiple=True, metavar="CLAIM=PATTERN",
              help="A claim condition (repeat; all must hold; * and ? are wildcards). "
                   "At least one on sub or repository.")
@click.option("--org", default="default", show_default=True, help="The org of the keys the policy yields.")
@click.option("--role", help="Role whose grants bound the keys.")
@click.option("--operation", "operations", multiple=True, help="Operation grant of the keys (repeat).")
@click.option("--server", "servers", multiple=True, help="Server the keys may act on (repeat; default '*').")
@click.option("--allow-ip", "allow_ips", multiple=True, help="Client CIDR allowed (repeat; default any).")
@click.option("--rate-limit", help="e.g. '100/minute' (default ratelimit.default).")
@click.option("--ttl", "--lifetime", "lifetime", metavar="DURATION",
              help="How long a key lives: 60s to 1h, e.g. 15m (default 15m).")
@click.option("--jwks-file", metavar="PATH", help="The issuer's JWKS as a local file instead of discovery.")
@click.option("--replace", is_flag=True, help="Replace the policy if it exists (else that is refused).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def trust_add(ctx: click.Context, name: str, issuer: str, audience: str, claims: tuple[str, ...], org: str,
              role: str | None, operations: tuple[str, ...], servers: tuple[str, ...], allow_ips: tuple[str, ...],
              rate_limit: str | None, lifetime: str | None, jwks_file: str | None, replace: bool,
              as_json: bool) -> None:
    """Add a trust policy: tokens of the issuer, for the audience, whose claims match may be exchanged for a key."""
    conditions = _claim_conditions(claims)
    policy = with_service(ctx, lambda svc: svc.put_trust_policy(
        name, issuer=issuer, audience=audience, conditions=conditions, org=org, role=role or None,
        operations=operations, servers=servers, ip_allowlist=allow_ips, rate_limit=rate_limit, lifetime=lifetime,
        jwks_file=jwks_file, replace=replace,
    ))
    if as_json:
        emit_json(policy.public())
    else:
        click.echo(f"saved trust policy {policy.name}")
        trust_details(policy)


@trust.command("list")
@output_options
@click.pass_context
def trust_list(ctx: click.Context, output: str | None) -> None:
    """List trust policies by name."""
    found = with_service(ctx, lambda svc: svc.list_trust_policies(), needs_store=True)
    if output == "name":
        emit_names("trust", [p.name for p in found])
    elif not emit_data(output, [p.public() for p in found]):
        trust_table(found, wide=output == "wide")


@trust.command("show")
@click.argument("name")
@output_options
@click.pass_context
def trust_show(ctx: click.Context, name: str, output: str | None) -> None:
    """Show one trust policy."""
    policy = with_service(ctx, lambda svc: svc.get_trust_policy(name), needs_store=True)
    if output == "name":
        emit_names("trust", [policy.name])
    elif not emit_data(output, policy.public()):
        trust_details(policy)


@trust.command("remove")
@click.argument("name")
@yes_option
@click.pass_context
def trust_remove(ctx: click.Context, name: str, yes: bool) -> None:
    """Remove a trust policy; keys already exchanged under it work until they expire. Asks first unless --yes."""
    refuse_unconfirmed(yes, "trust remove")
    if not yes:
        policy = with_service(ctx, lambda svc: svc.get_trust_policy(name), needs_store=True)
        confirmed(yes, f"Remove trust policy {policy.name} (issuer {policy.issuer})?")
    with_service(ctx, lambda svc: svc.remove_trust_policy(name), needs_store=True)
    click.echo(f"removed trust policy {name}")


# -- declarative state -----------------------------------------------------
@main.command("apply")
@click.option("-f", "--file", "state_file", required=True, metavar="FILE", help="The state file (TOML); - reads stdin.")
@click.option("--dry-run", is_flag=True, help="Print the plan and change nothing.")
@click.option("--prune", is_flag=True, help="Also remove what the file leaves out: roles, the members of the orgs "
              "it lists, and the keys and trust policies apply made (never others).")
@click.pass_context
def apply_command(ctx: click.Context, state_file: str, dry_run: bool, prune: bool) -> None:
    """Make the store match a state file: roles, members, trust policies and named keys; print each new key once."""
    try:
        text = sys.stdin.read() if state_file == "-" else Path(state_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"{state_file}: cannot read it: {getattr(exc, 'strerror', None) or exc}")
    # A dry run only reads: it reports a missing embedded store rather than creating it.
    done = with_service(ctx, lambda svc: reconcile.apply_state(svc, text, prune=prune, dry_run=dry_run,
                                                                show=click.echo), needs_store=dry_run)
    if dry_run:
        click.echo("Dry run: nothing was changed.")
    elif done.plan.changes:
        count = len(done.plan.changes)
        click.echo(f"Applied {count} change{'' if count == 1 else 's'}.")
    for record, full in done.created:
        click.echo()
        show_new_key(record, full, False, utcnow())


@main.command("export")
@click.option("-f", "--file", "output", metavar="FILE",
              help="Write the state file here (default: stdout); the file apply -f reads.")
@click.pass_context
def export_command(ctx: click.Context, output: str | None) -> None:
    """Print the store's roles, members, trust policies and named keys as a state file for apply (no secrets)."""
    # -f, not -o: -o names an output format everywhere else (-o json|yaml|wide|name).
    text = with_service(ctx, reconcile.export_state, needs_store=True)
    if output is None:
        click.echo(text, nl=False)
        return
    try:
        Path(output).write_text(text, encoding="utf-8")
    except OSError as exc:
        fail(f"{output}: cannot write it: {exc.strerror}")


# -- audit -----------------------------------------------------------------
def _time_option(name: str, text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return parse_time(text, utcnow())
    except ValueError as exc:
        fail(f"{name} {exc}")


def _audit_row(entry: AuditEntry) -> list[Any]:
    data = entry.public()
    if entry.type == "event":
        details = json.dumps(data["details"], sort_keys=True) if data["details"] else ""
        return [_when(data["at"]), data["actor"], data["action"], data["target"], details]
    request = f"{data['method']} {data['path']} -> {data['status']}"
    return [_when(data["at"]), data["key_id"] or "", f"request:{data['decision']}", data["server"] or "", request]


@main.command()
@click.option("--key", "key_id", metavar="ID", help="Events about or by this key, and its requests.")
@click.option("--action", help="Events only: e.g. key.create, key.revoke, role.set, member.remove, trust.set")
@click.option("--decision", help="Request records only: e.g. allowed, invalid_token, insufficient_scope")
@click.option("--type", "entry_type", type=click.Choice(["event", "request"]), help="Only events or only requests.")
@click.option("--since", help="30m, 1h, 7d (ago) or an ISO 8601 time")
@click.option("--until", help="30m, 1h, 7d (ago) or an ISO 8601 time")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 10_000))
@output_options
@click.pass_context
def audit(ctx: click.Context, key_id: str | None, action: str | None, decision: str | None,
          entry_type: str | None, since: str | None, until: str | None, limit: int, output: str | None) -> None:
    """Show management events and request records, newest first."""
    wanted = AuditFilter(key=key_id, action=action, decision=decision, type=entry_type,  # type: ignore[arg-type]
                         since=_time_option("since", since), until=_time_option("until", until))
    page = with_service(ctx, lambda svc: svc.audit(wanted, limit=limit), needs_store=True)
    if output == "name":
        for e in page.entries:
            click.echo(f"{e.type}/{e.item.id}")  # event/12 or request/3456
    elif not emit_data(output, [e.public() for e in page.entries]):
        wide = output == "wide"
        table(["TIME", "ACTOR/KEY", "ACTION", "TARGET/SERVER", "DETAILS"] + (["TYPE", "ID", "CLIENT IP"] if wide else []),
              [_audit_row(e) + ([e.type, e.item.id, e.public().get("client_ip")] if wide else [])
               for e in page.entries])


# -- people: keygate login -----------------------------------------------
def _signed_in(coro: Awaitable[T]) -> T:
    """Run a login command: its problems are one line and exit status 1 (a credentials file problem: 2)."""
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    except LoginError as exc:
        fail(str(exc), EXIT_UNAVAILABLE)
    except CredentialsError as exc:
        fail(str(exc))


@main.command("login")
@click.option("--gateway", required=True, metavar="URL", help="The gateway to sign in to, e.g. https://keygate.example.com")
@click.option("--org", help="The org to get your agent key for (needed when you are a member of several).")
def login_command(gateway: str, org: str | None) -> None:
    """Sign in (OAuth device grant at the gateway's sign-in provider) and store your agent key."""
    _signed_in(people.login(gateway, org, click.echo))


@main.command("whoami")
@click.option("--gateway", metavar="URL", help="Which gateway (when signed in to several).")
@click.option("--org", help="Which org (when signed in to several).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def whoami_command(gateway: str | None, org: str | None, as_json: bool) -> None:
    """Who you are at the gateway, as it sees your key now."""
    me = _signed_in(people.whoami(gateway, org))
    if as_json:
        emit_json(me)
    else:
        click.echo(printable(f"{me.get('user') or me.get('name')} in org {me['org']} at {me['gateway']} "
                             f"(key {me['key_id']}{', expires ' + me['expires_at'] if me.get('expires_at') else ''})"))


@main.command("token")
@click.option("--gateway", metavar="URL", help="Which gateway (when signed in to several).")
@click.option("--org", help="Which org (when signed in to several).")
def token_command(gateway: str | None, org: str | None) -> None:
    """Print your key, for curl -H "Authorization: Bearer $(keygate token)" (KEYGATE_TOKEN wins)."""
    try:
        click.echo(people.token(gateway, org))
    except CredentialsError as exc:
        fail(str(exc))


@main.command("logout")
@click.option("--gateway", metavar="URL", help="Which gateway (when signed in to several).")
@click.option("--org", help="Which org (when signed in to several).")
def logout_command(gateway: str | None, org: str | None) -> None:
    """Revoke your key through the gateway and remove it from the credentials file."""
    _signed_in(people.logout(gateway, org, click.echo))


if __name__ == "__main__":  # pragma: no cover
    main()
