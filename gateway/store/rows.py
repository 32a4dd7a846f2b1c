"""What the stores write per request record, compiled (pyproject.toml): a flush writes thousands.

SQLite's timestamps (fixed-width UTC text that sorts like the instants it
names) and the flat list of a batch of request records' values. In
:mod:`.sql`, which is not compiled, each record cost an interpreted frame
for its time and a turn of an interpreted loop: about 6,000 instructions
per record on the event loop (callgrind, ``tests/perf/inprocess.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from ..models import RequestRecord

SQLITE_TIME_FORMAT: Final = "%Y-%m-%dT%H:%M:%S.%fZ"

# The second the last time written fell in: (its start, its end, its text up to the microseconds,
# "YYYY-MM-DDTHH:MM:SS."). One tuple, replaced whole, so threads that share it never see half of one.
_ONE_SECOND: Final = timedelta(seconds=1)
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_last_second: tuple[datetime, datetime, str] = (_EPOCH, _EPOCH, "")
_MICROSECONDS: Final = tuple(f"{n:03d}" for n in range(1000))

# RequestRecord's fields that are columns, in the columns' order: all but its id (the store's to assign).
REQUEST_RECORD_COLUMNS: Final = 11
# The columns one client's run of requests repeats record after record: key, method, server, operation,
# decision, client address and reason (not its time, path, status or duration). SQLite binds them once for
# a run of records alike in them (see alike_runs): binding a text costs SQLite a copy, an allocation and
# three mutexes, about 780 instructions, and these are six of a record's eight texts.
REQUEST_RECORD_ALIKE: Final = (1, 2, 4, 5, 6, 8, 10)


# The last time made text and its text: the records of one millisecond share one datetime
# (recorder.Stamps), so a flush makes each one's text once. Replaced whole, like _last_second.
_last_text: tuple[datetime | None, str] = (None, "")


def sqlite_time_in(value: datetime | None) -> str | None:
    # Fixed-width UTC text sorts and compares like the instants it names.
    global _last_text
    if value is None:
        return None
    last = _last_text
    if value is last[0]:
        return last[1]
    text = _sqlite_time_text(value)
    _last_text = (value, text)
    return text


def _sqlite_time_text(value: datetime) -> str:
    global _last_second
    utc = value if value.tzinfo is UTC else value.astimezone(UTC)
    # The same text as SQLITE_TIME_FORMAT at a sixth of strftime's cost (one per request record: formatting
    # a datetime cost about as much as the rest of writing its record). A batch of records falls in a few
    # seconds, so the text up to the second is made once per second and only the microseconds per record.
    second = _last_second
    if not second[0] <= utc < second[1]:
        if not 1000 <= utc.year < 9999:  # strftime leaves years before 1000 unpadded: keep its exact text
            return utc.strftime(SQLITE_TIME_FORMAT)  # (and the last second of 9999 has no end to cache it by)
        start = utc.replace(microsecond=0)
        second = _last_second = (start, start + _ONE_SECOND, start.strftime("%Y-%m-%dT%H:%M:%S."))
    micro = utc.microsecond
    return second[2] + _MICROSECONDS[micro // 1000] + _MICROSECONDS[micro % 1000] + "Z"


def sqlite_time_out(value: Any) -> datetime | None:
    return None if value is None else datetime.strptime(value, SQLITE_TIME_FORMAT).replace(tzinfo=UTC)


def request_record_values(records: Sequence[RequestRecord], time_in: Callable[[datetime | None], Any]) -> list[Any]:
    """The records' column values, row after row in one flat list (see Connection.insert_many), each
    record's time as ``time_in`` makes it (the dialect's), the other ten as they are."""
    values: list[Any] = []
    for record in records:
        values.append(time_in(record[0]))
        values.extend(record[1:REQUEST_RECORD_COLUMNS])
    return values


def alike_runs(values: list[Any], width: int, alike: tuple[int, ...], min_run: int) -> list[tuple[int, int, bool]]:
    """The rows of ``values`` (flat, ``width`` a row) cut in order into spans ``(start, end, is_run)``: runs of
    at least ``min_run`` consecutive rows alike in every column of ``alike`` (``True``: the same object, or equal
    texts, bytes or integers; see _stored_alike), and the rows
    between them (``False``). Rows are never reordered, so the store assigns ids in arrival order."""
    rows = len(values) // width
    spans: list[tuple[int, int, bool]] = []
    between = 0  # the first row not yet in a span
    first = 0
    while first < rows:
        base = first * width
        end = first + 1
        while end < rows:
            other = end * width
            same = True
            for column in alike:
                a = values[base + column]
                b = values[other + column]
                if a is not b and not _stored_alike(a, b):
                    same = False
                    break
            if not same:
                break
            end += 1
        if end - first >= min_run:
            if between < first:
                spans.append((between, first, False))
            spans.append((first, end, True))
            between = end
        first = end
    if between < rows:
        spans.append((between, rows, False))
    return spans


def _stored_alike(a: Any, b: Any) -> bool:
    """Whether binding ``a`` stores what binding ``b`` would: equal values of exactly str, bytes or int.

    Not merely equal: 1, 1.0 and True are equal and stored as an integer, a real and an integer; 0.0
    and -0.0 are equal and stored apart; two equal datetimes in other zones are adapted to other texts.
    """
    kind = type(a)
    return kind is type(b) and (kind is str or kind is int or kind is bytes) and a == b


def alike_values(values: list[Any], width: int, alike: tuple[int, ...], start: int, end: int) -> list[Any]:
    """The parameters of a statement writing rows ``start`` to ``end`` of a run (see alike_runs): the
    ``alike`` columns once, from the first row, then each row's other columns in order."""
    out: list[Any] = [values[start * width + column] for column in alike]
    others = [column for column in range(width) if column not in alike]
    for row in range(start, end):
        base = row * width
        for column in others:
            out.append(values[base + column])
    return out
