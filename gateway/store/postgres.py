"""The production store: PostgreSQL through an asyncpg pool."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from .base import Conflict, StoreError, StoreRefused, StoreUnavailable
from . import dataplane
from .sql import POSTGRES, SqlStore, SqlTransaction

log = logging.getLogger("keygate.store")
CLOSE_TIMEOUT = 5.0  # seconds close() waits for connections in use before cutting them

# Errors that mean "the server is not there or not usable", as opposed to a
# bug in a query: these become StoreUnavailable (503 / exit 1 for users).
_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InvalidCatalogNameError,
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.AdminShutdownError,
)


class _PgConnection:
    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def fetch(self, sql: str, args: Sequence[Any]) -> list[Mapping[str, Any]]:
        return await self._conn.fetch(sql, *args)

    async def execute(self, sql: str, args: Sequence[Any]) -> None:
        await self._conn.execute(sql, *args)

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self._conn.executemany(sql, rows)

    async def insert_many(self, head: str, width: int, values: list[Any], alike: tuple[int, ...] = ()) -> None:
        if values:
            # asyncpg pipelines executemany's rows in one round trip (and sends each row's values apart:
            # `alike` is SQLite's to use).
            row = ", ".join(f"${i}" for i in range(1, width + 1))
            await self._conn.executemany(f"{head} VALUES ({row})",
                                         [values[start:start + width] for start in range(0, len(values), width)])


class PostgresStore(SqlStore):
    dialect = POSTGRES

    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 10, connect_timeout: float = 5.0) -> None:
        self.url = url
        self._min_size = min_size
        self._max_size = max_size
        self._timeout = connect_timeout
        self._pool: asyncpg.Pool | None = None
        self._role: str | None = None

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self.url, min_size=self._min_size, max_size=self._max_size, timeout=self._timeout,
            )
            self._role = await self._pool.fetchval("SELECT current_user")
        except (*_UNAVAILABLE, ValueError, asyncpg.PostgresError) as exc:
            # ValueError: asyncpg refusing parts of the URL (port, options).
            raise StoreUnavailable(f"cannot connect to PostgreSQL: {exc}") from None

    async def may(self, privilege: str, table: str) -> bool:
        """Whether this store's role holds ``privilege`` on ``table`` (the data plane's role mostly does not)."""
        async with self.read() as tx:
            row = await tx._one("SELECT has_table_privilege(current_user, ?, ?) AS ok", table, privilege)
        return bool(row and row["ok"])

    async def grant_dataplane(self) -> str | None:
        """Create the data plane's role if missing (when allowed), then give it exactly its rights.

        Returns None, or one line saying why the role could not be created (it needs CREATEROLE).
        """
        async with self.transaction() as tx:
            exists = await tx._one("SELECT 1 AS found FROM pg_roles WHERE rolname = ?", dataplane.ROLE)
            schema = (await tx._one("SELECT current_schema() AS name"))["name"]  # type: ignore[index]
        if exists is None:
            try:
                async with self.transaction() as tx:
                    await tx._exec(dataplane.create_role())
            except StoreRefused:
                return (f"the store role {self._role} may not create the role {dataplane.ROLE} (CREATEROLE): "
                        "run the SQL of `keygate migrate --print-dataplane-role` as a user who may")
            except Conflict:
                pass  # created at this very moment by another database's migrate on the same server
            except StoreError as exc:
                # Created meanwhile by another database's migrate on the same server: roles are server-wide.
                if "already exists" not in str(exc):
                    raise
        async with self.transaction() as tx:
            for statement in dataplane.grants(schema):
                await tx._exec(statement)
        return None

    async def close(self) -> None:
        if self._pool is None:
            return
        pool, self._pool = self._pool, None
        try:
            # asyncpg's close() waits for every connection to be released: bounded, as its docs advise.
            await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT)
        except TimeoutError:
            log.warning(json.dumps({"event": "store_close_timeout", "seconds": CLOSE_TIMEOUT,
                                    "detail": "a connection was still in use; closed without waiting for it"}))
            pool.terminate()

    @asynccontextmanager
    async def _tx(self, *, write: bool) -> AsyncIterator[SqlTransaction]:
        if self._pool is None:
            raise StoreUnavailable("the PostgreSQL store is not open")
        try:
            async with self._pool.acquire(timeout=self._timeout) as conn:
                async with conn.transaction(readonly=not write):
                    yield SqlTransaction(_PgConnection(conn), POSTGRES)
        except asyncpg.exceptions.IntegrityConstraintViolationError as exc:
            raise Conflict(str(exc)) from None
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"PostgreSQL failed: {exc}") from None
        except asyncpg.exceptions.InsufficientPrivilegeError as exc:
            # A role without this right (the data plane's): a refusal to name, not a bug to trace.
            raise StoreRefused(f"PostgreSQL refused: {exc} (the store role {self._role or '?'} may not do this)") from None
        except asyncpg.PostgresError as exc:
            # e.g. permission denied: the server answered, the action cannot be done.
            raise StoreError(f"PostgreSQL refused: {exc}") from None
