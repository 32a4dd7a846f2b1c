"""Stage 9 — record: last-used times and request records, written in batches.

Nothing on the request path waits on a write: :meth:`Recorder.key_used` and
:meth:`Recorder.request` only touch in-memory buffers, and a background task
writes them every ``flush_interval`` seconds. Last-used entries are coalesced
per key (only the newest time matters); request records go to a buffer
bounded by ``max_buffer``. When the store is down, what was not written goes
back into the buffers for the next flush, so nothing accepted is lost until
the bound is reached; past it records are dropped, counted and logged.

Uses of canary keys (:meth:`Recorder.canary_used`) are buffered the same way,
bounded alike, and written by the ``alarms`` sink: each batch in one
transaction with its audit events and webhooks (:mod:`gateway.hygiene.canary`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from itertools import chain, islice
from typing import Final, Protocol

from .models import CanaryUse, RequestRecord

# Rows per store call: keeps each statement and transaction a sensible size.
CHUNK_SIZE: Final = 1000

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


class RecordSink(Protocol):
    """The part of the key store the recorder writes to."""

    async def record_usage(self, usage: Sequence[tuple[str, datetime, str | None]]) -> None: ...
    async def add_request_records(self, records: Sequence[RequestRecord]) -> None: ...


class AlarmSink(Protocol):
    """Where uses of canary keys are written (their audit events and webhooks)."""

    async def canary_used(self, uses: Sequence[CanaryUse]) -> None: ...


class Stamps:
    """The time request records and last-used entries are stamped with: UTC, to the millisecond, rounded up.

    Every record stamped within one millisecond shares one datetime, made once:
    ``datetime.now(UTC)`` per request cost about 2,300 instructions (callgrind:
    a gmtime, two datetimes and the zone's ``fromutc``), this a clock read and
    a comparison; and a flush formats each shared time once (see
    :func:`gateway.store.rows.sqlite_time_in`). Rounded up, never down: a stamp
    is never before the instant it records, so a use never sorts before the
    key's creation, the audit event that preceded it or an idle notice sent
    before it (those keep their microseconds). ``clock_ns`` gives epoch
    nanoseconds: integers, so a millisecond is never misread from a float.
    """

    def __init__(self, clock_ns: Callable[[], int] = time.time_ns) -> None:
        self._clock_ns = clock_ns
        self._ms = -1
        self._at = _EPOCH

    def __call__(self) -> datetime:
        ms = -(-self._clock_ns() // 1_000_000)  # (the next whole millisecond, or this one if exact)
        if ms != self._ms:
            self._at = _EPOCH + timedelta(milliseconds=ms)
            self._ms = ms
        return self._at


class Recorder:
    """Buffers last-used times and request records and writes them in batches.

    A batch is written every ``flush_interval`` seconds, and sooner once
    :data:`CHUNK_SIZE` request records (or a tenth of ``max_buffer``, if
    less) are waiting. Sooner, or a gateway answering more than 20,000
    requests a second (one worker does, here) would fill the default 100,000
    between two 5 s flushes and drop records while the store is healthy.
    One chunk, not a tenth of the buffer: every record held is a young
    object to the garbage collector, and 10,000 of them waiting made each
    young collection walk them all, a pause of 2-5 ms (15 in a 10 s run of
    ``tests/perf/bench.py``) that lands in the proxy's p99; written a chunk
    at a time, they are gone before a collection comes. After a failed
    write the step is a tenth of the buffer until one succeeds: a store
    that is down is retried every tenth of a buffer of new records (or
    every ``flush_interval``), not every chunk.
    """

    def __init__(
        self, store: RecordSink, *, flush_interval: float, max_buffer: int,
        logger: logging.Logger | None = None, close_attempts: int = 3, close_retry_delay: float = 0.2,
        alarms: AlarmSink | None = None, clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        if flush_interval <= 0:
            raise ValueError("flush_interval must be positive")
        if max_buffer < 1:
            raise ValueError("max_buffer must be at least 1")
        self._store = store
        self._alarm_sink = alarms
        self._interval = flush_interval
        self._max_buffer = max_buffer
        self._log = logger or logging.getLogger("keygate.recorder")
        self._close_attempts = max(1, close_attempts)
        self._close_retry_delay = close_retry_delay
        # What the request path stamps its records and last-used times with (``clock_ns``: epoch nanoseconds).
        self.stamp = Stamps(clock_ns)

        # Per key only the newest use is kept. Not bounded by max_buffer: only
        # keys that passed authentication get here, so it is bounded by the
        # number of real keys.
        self._usage: dict[str, tuple[datetime, str | None]] = {}
        self._requests: deque[RequestRecord] = deque()
        self._alarms: deque[CanaryUse] = deque()
        # One flush at a time, so records put back after a failure keep their order.
        self._flush_lock = asyncio.Lock()
        self._stop = asyncio.Event()
        # Set when request records reach _due_at: the periodic task writes them without waiting out
        # the interval. Once per filling, never per record: a flush swaps the buffer out whole and the
        # mark goes back to _flush_at; a failed write moves it _retry_after past what is waiting then,
        # so a store that fails is retried once per tenth of a buffer of new records, not per record.
        self._flush_at = max(1, min(max_buffer // 10, CHUNK_SIZE))
        self._retry_after = max(1, max_buffer // 10)
        self._due_at = self._flush_at
        self._due = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_drop_warning = -float("inf")
        self._dropped_since_warning = 0

        self.flushed_usage = 0
        self.flushed_requests = 0
        self.flushed_alarms = 0
        self.dropped = 0
        self.failed_flushes = 0

    @property
    def pending(self) -> int:
        """Buffered request records, canary uses and last-used entries, not yet written."""
        return len(self._requests) + len(self._usage) + len(self._alarms)

    # -- the request path: O(1), never awaits --------------------------------

    def key_used(self, key_id: str, at: datetime, ip: str | None) -> None:
        current = self._usage.get(key_id)
        if current is None or at >= current[0]:
            self._usage[key_id] = (at, ip)

    def request(self, record: RequestRecord) -> None:
        requests = self._requests
        waiting = len(requests)
        if waiting >= self._max_buffer:
            self._drop(1)
            return
        requests.append(record)
        if waiting + 1 == self._due_at:
            self._due.set()

    def canary_used(self, use: CanaryUse) -> None:
        """A canary key was used: its alarm, written with the next batch (bounded like request records)."""
        if self._alarm_sink is None:
            return
        if len(self._alarms) >= self._max_buffer:
            self._drop(1)
            return
        self._alarms.append(use)

    # -- lifetime --------------------------------------------------------------

    async def start(self) -> None:
        if self._task is None:
            self._stop.clear()
            self._task = asyncio.create_task(self._run(), name="keygate-recorder")

    async def close(self) -> None:
        """Stop the periodic task and write everything buffered, retrying briefly."""
        if self._task is not None:
            # Let a flush in progress finish rather than cancelling it mid-write.
            self._stop.set()
            self._due.set()
            await self._task
            self._task = None
        for attempt in range(self._close_attempts):
            if await self._flush():
                return
            if attempt + 1 < self._close_attempts:
                await asyncio.sleep(self._close_retry_delay * (attempt + 1))
        lost = self.pending
        self._usage.clear()
        self._requests.clear()
        self._alarms.clear()
        self.dropped += lost
        self._log.error(json.dumps({
            "event": "recorder_records_lost", "records": lost,
            "detail": "the store stayed unavailable at shutdown",
        }))

    async def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._due.wait(), timeout=self._interval)
            self._due.clear()
            if self._stop.is_set():
                return  # close() does the final flush, with retries
            try:
                await self.flush()
            except Exception:  # a bug must not stop recording for the life of the process
                self._log.exception(json.dumps({"event": "recorder_flush_error"}))

    # -- writing ---------------------------------------------------------------

    async def flush(self) -> None:
        """Write what is buffered now; on failure keep it for the next flush."""
        await self._flush()

    async def _flush(self) -> bool:
        async with self._flush_lock:
            # Swap the buffers out first: requests keep appending while we write.
            usage, self._usage = self._usage, {}
            requests, self._requests = self._requests, deque()
            self._due_at = self._flush_at
            alarms, self._alarms = self._alarms, deque()
            usage_rows = [(key_id, at, ip) for key_id, (at, ip) in usage.items()]
            request_rows = list(requests)
            alarm_rows = list(alarms)
            written_usage = written_requests = written_alarms = 0
            try:
                # Alarms first: they are what an operator is waiting for.
                for start in range(0, len(alarm_rows), CHUNK_SIZE):
                    uses = alarm_rows[start:start + CHUNK_SIZE]
                    await self._alarm_sink.canary_used(uses)  # type: ignore[union-attr]
                    written_alarms += len(uses)
                    self.flushed_alarms += len(uses)
                for start in range(0, len(usage_rows), CHUNK_SIZE):
                    chunk = usage_rows[start:start + CHUNK_SIZE]
                    await self._store.record_usage(chunk)
                    written_usage += len(chunk)
                    self.flushed_usage += len(chunk)
                for start in range(0, len(request_rows), CHUNK_SIZE):
                    records = request_rows[start:start + CHUNK_SIZE]
                    await self._store.add_request_records(records)
                    written_requests += len(records)
                    self.flushed_requests += len(records)
            except Exception as exc:
                self._put_back(usage_rows[written_usage:], request_rows[written_requests:],
                               alarm_rows[written_alarms:])
                self.failed_flushes += 1
                self._log.warning(json.dumps({
                    "event": "recorder_flush_failed", "error": f"{type(exc).__name__}: {exc}",
                    "pending": self.pending,
                }))
                return False
            except BaseException:
                # Cancelled mid-write: keep the records rather than lose them.
                self._put_back(usage_rows[written_usage:], request_rows[written_requests:],
                               alarm_rows[written_alarms:])
                raise
            return True

    def _put_back(
        self, usage: Sequence[tuple[str, datetime, str | None]], requests: Sequence[RequestRecord],
        alarms: Sequence[CanaryUse] = (),
    ) -> None:
        for key_id, at, ip in usage:
            current = self._usage.get(key_id)
            if current is None or at > current[0]:
                self._usage[key_id] = (at, ip)
        if requests:
            # Unwritten records go in front (they are older); the bound still
            # holds, so the newest ones beyond it are dropped.
            total = len(requests) + len(self._requests)
            self._requests = deque(islice(chain(requests, self._requests), self._max_buffer))
            if total > self._max_buffer:
                self._drop(total - self._max_buffer)
        if alarms:
            total = len(alarms) + len(self._alarms)
            self._alarms = deque(islice(chain(alarms, self._alarms), self._max_buffer))
            if total > self._max_buffer:
                self._drop(total - self._max_buffer)
        # A write failed: the next early one waits for a tenth of the buffer of new records, not a chunk,
        # whatever part failed. Records that arrived while it was failing may have asked for one already
        # (the mark was a chunk then): that is no reason to try a store that failed again at once.
        self._due_at = min(len(self._requests) + self._retry_after, self._max_buffer)
        self._due.clear()

    def _drop(self, count: int) -> None:
        self.dropped += count
        self._dropped_since_warning += count
        # One warning per flush interval at most: under sustained failure a
        # warning per record would flood the log.
        now = time.monotonic()
        if now - self._last_drop_warning >= self._interval:
            self._log.warning(json.dumps({
                "event": "recorder_buffer_full", "dropped": self._dropped_since_warning,
                "dropped_total": self.dropped, "max_buffer": self._max_buffer,
            }))
            self._last_drop_warning = now
            self._dropped_since_warning = 0
