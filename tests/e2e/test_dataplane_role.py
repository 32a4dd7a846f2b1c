"""``keygate serve`` with only the data plane's PostgreSQL role: every proxy behaviour works, management writes
are refused by PostgreSQL itself and answered cleanly.

One database migrated by the owner (``keygate migrate``, which sets up
``keygate_dataplane``), one log-in user that is only a member of that role,
one gateway started with that user.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from gateway.manage.service import KeyService, resolve_pepper
from gateway.models import KeyRecord, RequestRecord
from gateway.store import StoreRefused, create_store

from ..conftest import PG_ADMIN_URL, create_pg_database, drop_pg_database, pg_url_for
from .conftest import bearer
from .harness import CHEAP, KEYGATE, Keygate, Upstream, clean_env


def as_user(url: str, user: str) -> str:
    """``url`` with another user (the test server trusts loopback: no password)."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{user}@{rest.partition('@')[2]}"


class Plane:
    """A database migrated by its owner, and a data-plane user of it."""

    def __init__(self) -> None:
        self.database = asyncio.run(create_pg_database())
        self.owner_url = pg_url_for(self.database)
        self.user = f"kg_dp_{uuid.uuid4().hex[:10]}"
        self.migrated = subprocess.run([KEYGATE, "migrate"], env=clean_env(KEYGATE_STORE__URL=self.owner_url),
                                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        asyncio.run(self._sql(f'CREATE ROLE "{self.user}" LOGIN IN ROLE keygate_dataplane'))
        self.url = as_user(self.owner_url, self.user)

    @staticmethod
    async def _sql(statement: str) -> None:
        conn = await asyncpg.connect(PG_ADMIN_URL)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    def drop(self) -> None:
        asyncio.run(drop_pg_database(self.database))
        asyncio.run(self._sql(f'DROP ROLE IF EXISTS "{self.user}"'))


@pytest.fixture(scope="module")
def plane() -> Iterator[Plane]:
    made = Plane()
    yield made
    made.drop()


@pytest.fixture(scope="module")
def gateway(plane: Plane, upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keygate]:
    keygate = Keygate(tmp_path_factory.mktemp("dataplane"), upstream.url, store_url=plane.url,
                      config='[ratelimit]\ndefault = "1000/minute"\n')
    keygate.start()
    yield keygate
    keygate.stop()


@pytest.fixture
async def owner(plane: Plane) -> AsyncIterator[KeyService]:
    """The management plane: the owner's store, as the CLI and the admin plane have it."""
    store = create_store(plane.owner_url)
    await store.open()
    yield KeyService(store, CHEAP, actor="test:operator")
    await store.close()


async def key_row(owner: KeyService, key_id: str) -> KeyRecord:
    async with owner.store.read() as tx:
        record = await tx.get_key(key_id)
    assert record is not None
    return record


async def requests_of(owner: KeyService, key_id: str, count: int) -> list[RequestRecord]:
    for _ in range(100):
        async with owner.store.read() as tx:
            found = await tx.list_requests(key_id=key_id)
        if len(found) >= count:
            return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"fewer than {count} request records of {key_id} reached the store")


# --- the role -------------------------------------------------------------------------------------------


def test_migrate_sets_up_the_role_without_complaint(plane: Plane) -> None:
    """`keygate migrate` by a user who may create roles creates keygate_dataplane and grants it, silently."""
    assert plane.migrated.returncode == 0, plane.migrated.stderr
    assert "warning" not in plane.migrated.stderr


def test_print_dataplane_role_gives_the_sql() -> None:
    """--print-dataplane-role prints the role and exactly its grants, and needs no store."""
    out = subprocess.run([KEYGATE, "migrate", "--print-dataplane-role"], env=clean_env(), capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert "CREATE ROLE keygate_dataplane NOLOGIN;" in out
    assert 'GRANT UPDATE (last_used_at, last_used_ip) ON "public".keys TO keygate_dataplane;' in out
    assert ('GRANT INSERT ON "public".request_records, "public".audit_events, "public".webhook_outbox '
            'TO keygate_dataplane;') in out
    assert "DELETE" not in out and "GRANT ALL" not in out


async def test_role_grants_are_exactly_the_data_planes(plane: Plane) -> None:
    """What PostgreSQL says keygate_dataplane may do: read the authorization tables, add request records,
    set last use; nothing else."""
    conn = await asyncpg.connect(plane.owner_url)
    try:
        tables = {(r["table_name"], r["privilege_type"]) for r in await conn.fetch(
            "SELECT table_name, privilege_type FROM information_schema.role_table_grants "
            "WHERE grantee = 'keygate_dataplane' AND table_catalog = current_database()")}
        columns = {(r["table_name"], r["column_name"], r["privilege_type"]) for r in await conn.fetch(
            "SELECT table_name, column_name, privilege_type FROM information_schema.column_privileges "
            "WHERE grantee = 'keygate_dataplane' AND privilege_type <> 'SELECT' "
            "AND table_catalog = current_database() "
            "AND table_name NOT IN ('request_records', 'audit_events', 'webhook_outbox')")}  # (INSERT, per column)
    finally:
        await conn.close()
    reads = {"keys", "roles", "members", "trust_policies", "changes", "meta", "schema_migrations"}
    inserts = {"request_records", "audit_events", "webhook_outbox"}  # requests; a canary's alarm (issue 17)
    assert tables == {(t, "SELECT") for t in reads} | {(t, "INSERT") for t in inserts}
    assert columns == {("keys", "last_used_at", "UPDATE"), ("keys", "last_used_ip", "UPDATE")}


async def test_store_refuses_management_writes_to_the_role(plane: Plane, owner: KeyService) -> None:
    """As the data plane: creating a key, changing a key beyond its last use, claiming webhook deliveries or
    deleting history is refused by PostgreSQL (StoreRefused, naming the privilege)."""
    record, _ = await owner.create_key(name="victim", role="admin")
    store = create_store(plane.url)
    await store.open()
    try:
        service = KeyService(store, CHEAP, actor="test:intruder")
        with pytest.raises(StoreRefused, match="permission denied for table keys"):
            await service.create_key(name="minted", role="admin")
        with pytest.raises(StoreRefused, match="permission denied"):
            await service.revoke_key(record.id)
        with pytest.raises(StoreRefused, match="permission denied for table webhook_outbox"):
            async with store.transaction() as tx:
                now = datetime.now().astimezone()
                await tx.claim_webhooks(now=now, lease_until=now, limit=10)
        with pytest.raises(StoreRefused, match="permission denied for table (audit_events|request_records)"):
            async with store.transaction() as tx:
                await tx.prune_audit(older_than=datetime.now().astimezone(), batch=10)
        assert not await store.may("DELETE", "audit_events")
        # What the data plane does write goes through.
        await store.record_usage([(record.id, datetime.now().astimezone(), "192.0.2.1")])
    finally:
        await store.close()
    assert (await key_row(owner, record.id)).revoked_at is None


async def test_without_a_stored_pepper_the_role_cannot_start(plane: Plane, owner: KeyService) -> None:
    """With no keys.pepper and none stored, the data plane is refused (it may not store one): no silent new pepper."""
    async with owner.store.transaction() as tx:
        pepper = await tx.get_meta("pepper")
    assert pepper is not None  # keygate migrate stored it
    conn = await asyncpg.connect(plane.owner_url)
    store = create_store(plane.url)
    await store.open()
    try:
        await conn.execute("DELETE FROM meta WHERE name = 'pepper'")
        with pytest.raises(StoreRefused):
            await resolve_pepper(store, CHEAP)
    finally:
        await conn.execute("INSERT INTO meta (name, value) VALUES ('pepper', $1)", pepper)
        await conn.close()
        await store.close()


# --- serve with the role: the proxy works --------------------------------------------------------------


async def test_keys_are_checked_and_forwarded(gateway: Keygate, owner: KeyService) -> None:
    """200 for a good key, 401 for a wrong secret or a revoked key, 403 out of scope, 429 past the limit."""
    _, good = await owner.create_key(name="good", role="admin")
    _, scoped = await owner.create_key(name="scoped", operations=["deploy"])
    _, limited = await owner.create_key(name="limited", role="admin", rate_limit="2/hour")
    revoked, revoked_key = await owner.create_key(name="revoked", role="admin")
    async with aiohttp.ClientSession() as http:
        async def status(key: str) -> int:
            async with http.get(gateway.proxy_url + "/echo", headers=bearer(key)) as r:
                await r.read()
                return r.status

        assert await status(good) == 200
        assert await status(good[:-10] + "A" * 10) == 401
        assert await status(scoped) == 403
        assert [await status(limited) for _ in range(3)] == [200, 200, 429]
        assert await status(revoked_key) == 200
        await owner.revoke_key(revoked.id)
        await asyncio.sleep(1.0)  # the change feed reaches the gateway
        assert await status(revoked_key) == 401


async def test_request_records_and_last_use_are_written(gateway: Keygate, owner: KeyService) -> None:
    """The recorder's writes, with only INSERT on request_records and UPDATE of the last-used columns."""
    record, key = await owner.create_key(name="recorded", role="admin")
    async with aiohttp.ClientSession() as http:
        for _ in range(3):
            async with http.get(gateway.proxy_url + "/echo", headers=bearer(key)) as r:
                assert r.status == 200
    assert len(await requests_of(owner, record.id, 3)) == 3
    for _ in range(50):
        if (await key_row(owner, record.id)).last_used_at is not None:
            break
        await asyncio.sleep(0.1)
    assert (await key_row(owner, record.id)).last_used_ip == "127.0.0.1"
    log = gateway.log()
    assert "permission denied" not in log.split('"event": "listening"')[0]
    assert '"audit_pruner_off"' in log
    # What needs the owner's rights is left to a plane that has them, said once at start.
    assert '"webhook_delivery_off"' in log and '"hygiene_sweeper_off"' in log


async def test_a_canary_use_is_audited_by_the_data_plane(gateway: Keygate, owner: KeyService) -> None:
    """A canary key used on a data plane: 401, and its alarm (audit event with the caller's address) is
    written with the role's insert-only rights."""
    record, key = await owner.create_key(name="decoy", canary=True)
    async with aiohttp.ClientSession() as http:
        async with http.get(gateway.proxy_url + "/echo", headers=bearer(key) | {"User-Agent": "curl/8"}) as r:
            assert r.status == 401
    for _ in range(100):
        async with owner.store.read() as tx:
            events = await tx.list_audit(key=record.id, action="key.canary_used")
        if events:
            break
        await asyncio.sleep(0.1)
    assert events and events[0].details["client_ip"] == "127.0.0.1"
    assert "permission denied" not in gateway.log()


# --- serve with the role: management writes are refused, cleanly ----------------------------------------


async def test_self_revoke_is_refused_by_the_store_with_a_503(gateway: Keygate, owner: KeyService) -> None:
    """A key revoking itself on a data plane: PostgreSQL refuses, the client gets 503 (no traceback), the
    key stays active, and the log names the missing privilege."""
    record, key = await owner.create_key(name="self", role="admin")
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.proxy_url + "/.well-known/keygate/revoke", headers=bearer(key)) as r:
            body = await r.text()
            assert r.status == 503
    assert "Traceback" not in body and "permission" not in body
    assert (await key_row(owner, record.id)).revoked_at is None
    refused = [json.loads(line) for line in gateway.log().splitlines() if '"store_write_refused"' in line]
    assert refused and "permission denied for table" in refused[-1]["error"]


async def test_admin_api_writes_are_refused_by_the_store(gateway: Keygate, owner: KeyService) -> None:
    """Creating a key through the data plane's admin API: PostgreSQL refuses; a problem answer, not a 201."""
    _, admin = await owner.create_key(name="admin", role="admin", servers=["admin"])
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.admin_url + "/admin/v1/keys", headers=bearer(admin),
                             json={"name": "minted", "role": "admin"}) as r:
            problem = await r.json(content_type=None)
            assert r.status == 500
    assert problem["type"] == "urn:keygate:problem:store_error" and problem["detail"] == "The key store refused the change."
    assert "permission denied for table keys" in gateway.log()
