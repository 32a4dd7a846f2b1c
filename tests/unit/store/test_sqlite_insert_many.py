"""SQLite writes many rows per statement, and still writes them all where a build allows fewer parameters."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import aiosqlite
import pytest

from gateway.store.sqlite import _SqliteConnection, _values_sql


async def _rows(db: aiosqlite.Connection) -> list[tuple[int, str, float]]:
    async with db.execute("SELECT a, b, c FROM t ORDER BY rowid") as cursor:
        return [tuple(r) for r in await cursor.fetchall()]  # type: ignore[misc]


def _flat(rows: list[tuple[int, str, float]]) -> list[object]:
    return [value for row in rows for value in row]


async def test_every_row_in_order_across_statements(tmp_path: Path) -> None:
    async with aiosqlite.connect(tmp_path / "t.db") as db:
        await db.execute("CREATE TABLE t (a, b, c)")
        rows = [(i, f"r{i}", i / 4) for i in range(4321)]
        await _SqliteConnection(db).insert_many("INSERT INTO t (a, b, c)", 3, _flat(rows))
        await _SqliteConnection(db).insert_many("INSERT INTO t (a, b, c)", 3, [])
        assert await _rows(db) == rows


async def test_a_lower_parameter_limit_falls_back_to_smaller_statements(tmp_path: Path) -> None:
    async with aiosqlite.connect(tmp_path / "t.db") as db:
        await db.execute("CREATE TABLE t (a, b, c)")
        # As if SQLite had been built with the pre-3.32 default of 999 bound parameters.
        await db._execute(db._conn.setlimit, sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
        rows = [(i, f"r{i}", i / 4) for i in range(2000)]
        await _SqliteConnection(db).insert_many("INSERT INTO t (a, b, c)", 3, _flat(rows))
        assert await _rows(db) == rows


async def test_flushes_of_any_size_take_a_few_statement_texts(tmp_path: Path) -> None:
    """Each statement text is prepared once and then reused from the statement cache: whatever a flush's size,
    its statements are of a few sizes (the full one and powers of two), not one new size per flush."""
    async with aiosqlite.connect(tmp_path / "t.db") as db:
        await db.execute("CREATE TABLE t (a, b, c)")
        _values_sql.cache_clear()
        written: list[tuple[int, str, float]] = []
        for size in [*range(1, 40), 499, 500, 501, 777, 1234, 2999]:
            rows = [(i, f"r{i}", i / 4) for i in range(len(written), len(written) + size)]
            await _SqliteConnection(db).insert_many("INSERT INTO t (a, b, c)", 3, _flat(rows))
            written += rows
        assert await _rows(db) == written
        assert _values_sql.cache_info().currsize <= 12  # 1833 rows a statement and powers of two up to 1024


async def test_values_that_are_not_whole_rows_are_refused_before_any_is_written(tmp_path: Path) -> None:
    async with aiosqlite.connect(tmp_path / "t.db") as db:
        await db.execute("CREATE TABLE t (a, b, c)")
        with pytest.raises(ValueError, match="not rows of 3"):
            await _SqliteConnection(db).insert_many("INSERT INTO t (a, b, c)", 3, [*_flat([(1, "a", 0.5)] * 7), 8])
        assert await _rows(db) == []
