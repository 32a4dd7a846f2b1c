"""SQLite writes many rows per statement, and still writes them all where a build allows fewer parameters."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import aiosqlite
import pytest

from gateway.store.rows import alike_runs
from gateway.store.sqlite import ALIKE_RUN, _alike_sql, _SqliteConnection, _values_sql


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


# Rows of (a, b, c) whose column 1 is the one runs share (``alike``), as the request records' key and address.
ALIKE = (1,)


async def _write_alike(db: aiosqlite.Connection, rows: list[tuple[int, str, float]]) -> None:
    await _SqliteConnection(db).insert_many("INSERT INTO t (a, b, c)", 3, _flat(rows), ALIKE)


def _mixed(count: int) -> list[tuple[int, str, float]]:
    """Runs of every length from 1 to 40 (each value of b a new run), some of them longer than ALIKE_RUN."""
    rows: list[tuple[int, str, float]] = []
    run = 0
    while len(rows) < count:
        run += 1
        rows += [(len(rows) + i, f"run{run}", (len(rows) + i) / 4) for i in range(run % 41)]
    return rows[:count]


@pytest.mark.parametrize("rows", [
    pytest.param([(i, "same", i / 4) for i in range(3000)], id="one run over several statements"),
    pytest.param([(i, f"r{i % 2}", i / 4) for i in range(700)], id="no run: every other row differs"),
    pytest.param(_mixed(5000), id="runs of 1-40 rows, short and long mixed"),
    pytest.param([(i, None if i < 300 else "x", 0.0) for i in range(600)], id="a run of NULLs then of text"),
    pytest.param([(i, "same", i / 4) for i in range(ALIKE_RUN)], id="a run of exactly ALIKE_RUN rows"),
    pytest.param([(i, "same", i / 4) for i in range(ALIKE_RUN - 1)], id="one row short of a run"),
])
async def test_rows_alike_in_some_columns_are_written_whole_and_in_order(
    tmp_path: Path, rows: list[tuple[int, str, float]],
) -> None:
    async with aiosqlite.connect(tmp_path / "t.db") as db:
        await db.execute("CREATE TABLE t (a, b, c)")
        await _write_alike(db, rows)
        assert await _rows(db) == rows


async def test_a_run_binds_its_alike_columns_once_per_statement(tmp_path: Path) -> None:
    """What the run's statements are for: the shared value is bound once, not once per row."""
    async with aiosqlite.connect(tmp_path / "t.db") as db:
        await db.execute("CREATE TABLE t (a, b, c)")
        bound: list[int] = []
        real_execute = db.execute

        def counting_execute(sql: str, parameters: list[object]):  # type: ignore[no-untyped-def]
            bound.append(sum(1 for value in parameters if value == "same"))
            return real_execute(sql, parameters)

        db.execute = counting_execute  # type: ignore[method-assign]
        await _write_alike(db, [(i, "same", i / 4) for i in range(1000)])
        assert 1 <= len(bound) <= 10 and set(bound) == {1}  # 1000 = 512 + 256 + 128 + 64 + 32 + 8


async def test_equal_values_of_other_types_are_each_stored_as_given(tmp_path: Path) -> None:
    async with aiosqlite.connect(tmp_path / "t.db") as db:
        await db.execute("CREATE TABLE t (a, b, c)")
        await _write_alike(db, [(i, 1 if i < 20 else 1.0, 0.5) for i in range(40)])  # type: ignore[misc]
        async with db.execute("SELECT typeof(b) FROM t ORDER BY rowid") as cursor:
            assert [r[0] for r in await cursor.fetchall()] == ["integer"] * 20 + ["real"] * 20


async def test_equal_values_stored_apart_by_sqlite_are_each_stored_as_given(tmp_path: Path) -> None:
    later = datetime(2026, 1, 1, 13, tzinfo=timezone(timedelta(hours=1)))
    rows = [(i, value, 0.5) for i, value in enumerate([0.0] * 20 + [-0.0] * 20 + [datetime(2026, 1, 1, 12, tzinfo=UTC)] * 20
                                                       + [later] * 20)]
    async with aiosqlite.connect(tmp_path / "t.db") as db:
        await db.execute("CREATE TABLE t (a, b, c)")
        await _write_alike(db, rows)  # type: ignore[arg-type]
        async with db.execute("SELECT b FROM t ORDER BY rowid") as cursor:
            stored = [r[0] for r in await cursor.fetchall()]
    assert [str(v) for v in stored] == ["0.0"] * 20 + ["-0.0"] * 20 + ["2026-01-01 12:00:00+00:00"] * 20 + [
        "2026-01-01 13:00:00+01:00"] * 20


@pytest.mark.parametrize("alike", [(0, 1, 2), (1, 1), (2, 1), (3,), (-1,)])
async def test_alike_columns_that_are_not_some_columns_in_order_are_refused(tmp_path: Path, alike: tuple[int, ...]) -> None:
    async with aiosqlite.connect(tmp_path / "t.db") as db:
        await db.execute("CREATE TABLE t (a, b, c)")
        with pytest.raises(ValueError, match="alike columns"):
            await _SqliteConnection(db).insert_many("INSERT INTO t (a, b, c)", 3, _flat([(1, "a", 0.5)] * 20), alike)
        assert await _rows(db) == []


async def test_alike_statements_fall_back_to_a_lower_parameter_limit(tmp_path: Path) -> None:
    async with aiosqlite.connect(tmp_path / "t.db") as db:
        await db.execute("CREATE TABLE t (a, b, c)")
        await db._execute(db._conn.setlimit, sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
        rows = [(i, "same", i / 4) for i in range(2000)]
        await _write_alike(db, rows)
        assert await _rows(db) == rows


async def test_alike_runs_take_a_few_statement_texts(tmp_path: Path) -> None:
    async with aiosqlite.connect(tmp_path / "t.db") as db:
        await db.execute("CREATE TABLE t (a, b, c)")
        _values_sql.cache_clear()
        _alike_sql.cache_clear()
        rows = _mixed(20000)
        await _write_alike(db, rows)
        assert await _rows(db) == rows
        assert _alike_sql.cache_info().currsize <= 12 and _values_sql.cache_info().currsize <= 12


@pytest.mark.parametrize(("columns", "min_run", "spans"), [
    # columns: the alike column's value per row
    ([], 2, []),
    (["a"], 2, [(0, 1, False)]),
    (["a", "a"], 2, [(0, 2, True)]),
    (["a", "a"], 3, [(0, 2, False)]),
    (["a", "b", "b", "b", "c"], 3, [(0, 1, False), (1, 4, True), (4, 5, False)]),
    (["a", "a", "a", "b", "b", "b"], 3, [(0, 3, True), (3, 6, True)]),
    (["a", "b", "a", "b"], 2, [(0, 4, False)]),
    ([None, None, "None", "None"], 2, [(0, 2, True), (2, 4, True)]),
    ([1, 1.0, True, "1"], 2, [(0, 4, False)]),  # equal in Python, not stored alike by SQLite
    ([float("1.5"), float("1.5"), 2, 2], 2, [(0, 2, False), (2, 4, True)]),  # floats alike only as one object
    ([float("nan"), float("nan")], 2, [(0, 2, False)]),  # NaN is not equal to itself: each row binds its own
    ([0.0, -0.0], 2, [(0, 2, False)]),  # equal, stored apart
    ([b"k", b"k", 7, 7], 2, [(0, 2, True), (2, 4, True)]),
])
def test_alike_runs_cut_rows_in_order(columns: list[object], min_run: int, spans: list[tuple[int, int, bool]]) -> None:
    values = [value for row, shared in enumerate(columns) for value in (row, shared, 0.5)]
    assert alike_runs(values, 3, ALIKE, min_run) == spans
