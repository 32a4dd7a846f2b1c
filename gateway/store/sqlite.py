"""The embedded store: one SQLite file in WAL mode, shared safely by processes."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sqlite3
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import aiosqlite

from .base import Conflict, StoreUnavailable
from .rows import alike_runs, alike_values
from .sql import SQLITE, SqlStore, SqlTransaction

log = logging.getLogger("keygate.store")

# None binds as NULL either way; registered, it is found in sqlite3's adapter table at once. Unregistered,
# sqlite3 looks for __adapt__ and __conform__ on every None it binds: a sixth of a request record's
# insert (one None per allowed request's record: 1,160 against 970 ns a row, 500-row statements).
# {}.get(None) is None: a C call, where a lambda would run Python.
sqlite3.register_adapter(type(None), {}.get)


class _SqliteConnection:
    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db
        self._max_variables = _MAX_VARIABLES

    async def fetch(self, sql: str, args: Sequence[Any]) -> list[Mapping[str, Any]]:
        async with self._db.execute(sql, tuple(args)) as cursor:
            return list(await cursor.fetchall())

    async def execute(self, sql: str, args: Sequence[Any]) -> None:
        await self._db.execute(sql, tuple(args))

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self._db.executemany(sql, [tuple(r) for r in rows])

    async def insert_many(self, head: str, width: int, values: list[Any], alike: tuple[int, ...] = ()) -> None:
        """Many rows per statement, not one statement per row.

        ``executemany`` steps the statement once per row and takes the GIL back
        after every step; with the event loop busy serving, each of those waits
        for a GIL hand-over, and 17 000 request records took a minute to write
        (measured) instead of a third of a second.

        Full statements take as many rows as the parameter limit allows, the rest go in statements of a
        power of two rows (a flush of 1,234 records: 500, 500, 128, 64, 32, 8, 2): a few statement texts
        in all, each prepared once and then found in sqlite3's statement cache, where a statement of
        whatever rows were left over was a new text, parsed and prepared anew, at almost every flush.

        A run of at least ``ALIKE_RUN`` consecutive rows alike in every column of ``alike`` (as SQLite
        stores them: see rows.alike_runs) goes in statements that bind those columns once (numbered
        parameters, ``?1`` in every row) and each row's others: SQLite copies every text it is bound,
        so one client's burst of request records costs a copy of its key, address and the like per
        statement, not per record. Rows stay in order.
        """
        if len(values) % width:
            raise ValueError(f"{len(values)} values are not rows of {width}")  # (nothing written)
        if list(alike) != sorted(set(alike)) or not all(0 <= column < width for column in alike) \
                or len(alike) >= width:
            raise ValueError(f"alike columns {alike!r}: want distinct columns of {width} in order, not all")
        if not alike:
            await self._insert_rows(head, width, values, 0, len(values) // width)
            return
        for start, end, is_run in alike_runs(values, width, alike, ALIKE_RUN):
            if is_run:
                await self._insert_alike(head, width, alike, values, start, end)
            else:
                await self._insert_rows(head, width, values, start, end)

    async def _insert_rows(self, head: str, width: int, values: list[Any], start: int, end: int) -> None:
        await self._in_statements(
            start, end, 0, width, lambda rows: _values_sql(head, width, rows),
            lambda first, last: values[first * width:last * width],
        )

    async def _insert_alike(
        self, head: str, width: int, alike: tuple[int, ...], values: list[Any], start: int, end: int,
    ) -> None:
        await self._in_statements(
            start, end, len(alike), width - len(alike), lambda rows: _alike_sql(head, width, alike, rows),
            lambda first, last: alike_values(values, width, alike, first, last),
        )

    async def _in_statements(
        self, start: int, end: int, fixed: int, per_row: int,
        sql: Callable[[int], str], parameters: Callable[[int, int], list[Any]],
    ) -> None:
        """Rows ``start`` to ``end`` in statements of as many rows as the parameter limit allows (``fixed``
        parameters a statement and ``per_row`` a row), the rest in statements of a power of two rows."""
        while start < end:
            per_statement = max(1, (self._max_variables - fixed) // per_row)
            left = end - start
            rows = per_statement if left >= per_statement else 1 << (left.bit_length() - 1)
            try:
                await self._db.execute(sql(rows), parameters(start, start + rows))
            except sqlite3.OperationalError as exc:
                # A SQLite built with a lower bound-parameter limit: fall back to the historical
                # default (a failed statement leaves the transaction intact). Numbered parameters
                # (?NNN, in runs' statements) past it fail with a message of their own.
                if not _TOO_MANY.search(str(exc)) or self._max_variables <= _MIN_VARIABLES:
                    raise
                self._max_variables = _MIN_VARIABLES
                continue
            start += rows


# Bound parameters per statement: 500 request records. SQLite allows 32 766 by default
# since 3.32 and 999 before (a build may lower it: see insert_many).
_MIN_VARIABLES = 999
_TOO_MANY = re.compile(r"too many SQL variables|variable number must be between")
_MAX_VARIABLES = 5_500 if sqlite3.sqlite_version_info >= (3, 32) else _MIN_VARIABLES


@lru_cache(maxsize=64)
def _values_sql(head: str, width: int, count: int) -> str:
    row = "(" + ", ".join("?" * width) + ")"
    return f"{head} VALUES {', '.join([row] * count)}"


# Rows alike in some columns are worth a statement of their own from this many on: each statement is a
# round trip to the store's thread and one more statement text; each row is spared about 5,000 instructions
# (callgrind: 32,600 against 27,580 a request record written through SqliteStore, 20,000 records).
ALIKE_RUN = 16


@lru_cache(maxsize=64)
def _alike_sql(head: str, width: int, alike: tuple[int, ...], count: int) -> str:
    """``count`` rows whose ``alike`` columns are the first parameters (``?1``...) in every row, and whose
    other columns take the parameters after them, row after row (see rows.alike_values)."""
    shared = {column: f"?{number}" for number, column in enumerate(alike, 1)}
    number = len(alike)
    rows = []
    for _ in range(count):
        cells = []
        for column in range(width):
            if column in shared:
                cells.append(shared[column])
            else:
                number += 1
                cells.append(f"?{number}")
        rows.append("(" + ", ".join(cells) + ")")
    return f"{head} VALUES {', '.join(rows)}"


def path_from_url(url: str) -> Path:
    """``sqlite:///keygate.db`` is relative to the working directory, ``sqlite:////abs`` absolute."""
    return Path(url.removeprefix("sqlite:///"))


class SqliteStore(SqlStore):
    """SQLite behind one connection: a lock serialises this process's
    transactions, and ``BEGIN IMMEDIATE`` with a busy timeout serialises
    writers across processes (WAL lets readers go on meanwhile)."""

    dialect = SQLITE

    def __init__(self, url: str, *, busy_timeout: float = 10.0) -> None:
        self.url = url
        self.path = path_from_url(url)
        self._busy_timeout_ms = int(busy_timeout * 1000)
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        if not self.path.parent.is_dir():
            raise StoreUnavailable(f"cannot open SQLite store {str(self.path)!r}: no such directory")
        try:
            # SECURITY: the file holds hashes and the generated pepper: owner-only
            # (SQLite gives the -wal and -shm files the same mode).
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        except OSError as exc:
            raise StoreUnavailable(f"cannot open SQLite store {str(self.path)!r}: {exc.strerror}") from None
        connecting = aiosqlite.connect(self.path, isolation_level=None)
        try:
            db = await connecting
        except (sqlite3.Error, OSError) as exc:
            connecting.stop()  # its worker thread must not outlive the event loop
            raise StoreUnavailable(f"cannot open SQLite store {str(self.path)!r}: {exc}") from None
        db.row_factory = sqlite3.Row
        try:
            await db.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute("PRAGMA synchronous = NORMAL")
            await db.execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error as exc:
            await db.close()
            raise StoreUnavailable(f"cannot use SQLite store {str(self.path)!r}: {exc}") from None
        self._db = db

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    @asynccontextmanager
    async def _tx(self, *, write: bool) -> AsyncIterator[SqlTransaction]:
        if self._db is None:
            raise StoreUnavailable("the SQLite store is not open")
        db = self._db
        async with self._lock:
            try:
                try:
                    await db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                except sqlite3.Error as exc:
                    raise StoreUnavailable(f"SQLite store is busy or unusable: {exc}") from None
                try:
                    yield SqlTransaction(_SqliteConnection(db), SQLITE)
                except sqlite3.IntegrityError as exc:
                    raise Conflict(str(exc)) from None
                except sqlite3.OperationalError as exc:
                    raise StoreUnavailable(f"SQLite store failed: {exc}") from None
                try:
                    await db.execute("COMMIT")
                except sqlite3.Error as exc:
                    raise StoreUnavailable(f"SQLite commit failed: {exc}") from None
            except BaseException:
                # Whatever ended the transaction early (an error, or a cancellation of any
                # of the awaits above), the connection leaves the lock out of any transaction.
                await _roll_back(db)
                raise


async def _roll_back(db: aiosqlite.Connection) -> None:
    """Roll back whatever transaction is open on ``db``, and wait for it even if cancelled meanwhile.

    aiosqlite's worker thread runs every queued statement, in order, whether or
    not the task awaiting it is still there: a task cancelled while awaiting its
    BEGIN still has the BEGIN run after it has gone, and a COMMIT that fails
    leaves SQLite's transaction open. Released then, the lock would hand the
    next transaction a connection already in one ("cannot start a transaction
    within a transaction", for every later transaction). A rollback queued now
    runs after anything a cancelled await left behind, and ``rollback()`` is a
    no-op when no transaction is open (a BEGIN that failed, a COMMIT that
    succeeded before its await was cancelled). A cancellation arriving while it
    runs is raised once it is done, so callers are still cancelled.
    """
    rolling_back = asyncio.ensure_future(db.rollback())
    cancelled: asyncio.CancelledError | None = None
    while not rolling_back.done():
        try:
            await asyncio.wait({rolling_back})  # never cancels what it waits for
        except asyncio.CancelledError as exc:
            cancelled = exc
    if not rolling_back.cancelled() and (error := rolling_back.exception()) is not None:
        if not isinstance(error, ValueError):  # aiosqlite's "Connection closed": nothing is open
            log.warning(json.dumps({"event": "sqlite_rollback_failed", "error": f"{type(error).__name__}: {error}"}))
    if cancelled is not None:
        raise cancelled
