"""Stage 9 — the recorder against both real stores: batching, coalescing, bounds and outages."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest

from gateway.models import KeyRecord, RequestRecord
from gateway.recorder import Recorder
from gateway.store import KeyStore, StoreUnavailable

T0 = datetime(2026, 11, 22, 12, 0, 0, 500000, tzinfo=UTC)
KEY = "kg_AAAAAAAAAAAA"
OTHER = "kg_BBBBBBBBBBBB"
LONG = 3600.0  # a flush interval that never fires during a test


def a_key(key_id: str = KEY) -> KeyRecord:
    return KeyRecord(
        id=key_id, kind="integration", name="ci deploy", org="acme", user="", role="admin",
        operations=("deploy",), servers=("*",), ip_allowlist=(), rate_limit=None, created_by="test",
        created_at=T0, expires_at=None, revoked_at=None, last_used_at=None, last_used_ip=None,
        secret_hash="$argon2id$fake",
    )


def a_request(n: int = 0, key_id: str | None = KEY, **changes: object) -> RequestRecord:
    record = RequestRecord(
        at=T0 + timedelta(seconds=n), key_id=key_id, method="GET", path=f"/items/{n}", server="app",
        operation="read", decision="allowed", status=200, client_ip="10.0.0.1", duration_ms=1.5,
    )
    return record._replace(**changes)


async def add_keys(store: KeyStore, *key_ids: str) -> None:
    async with store.transaction() as tx:
        for key_id in key_ids:
            await tx.insert_key(a_key(key_id))


async def stored_requests(store: KeyStore, key_id: str | None = KEY) -> list[RequestRecord]:
    """Oldest first, as recorded: without the ids the store gave them."""
    async with store.read() as tx:
        return [r._replace(id=0) for r in reversed(await tx.list_requests(key_id=key_id, limit=100_000))]


async def last_used(store: KeyStore, key_id: str = KEY) -> tuple[datetime | None, str | None]:
    record = await store.get_key(key_id)
    assert record is not None
    return record.last_used_at, record.last_used_ip


class FlakyStore:
    """Delegates to a real store, but the first ``failures`` writes raise StoreUnavailable."""

    def __init__(self, store: KeyStore, failures: int, gate: asyncio.Event | None = None) -> None:
        self.store = store
        self.failures = failures
        self.gate = gate  # if given, a failing write fails only once it is set (a store slow to fail)
        self.usage_calls: list[int] = []
        self.request_calls: list[int] = []

    async def _fail(self) -> None:
        await asyncio.sleep(0)  # like a real store, give others a turn before answering
        if self.failures > 0:
            self.failures -= 1
            if self.gate is not None:
                await self.gate.wait()
            raise StoreUnavailable("store is down")

    async def record_usage(self, usage: Sequence[tuple[str, datetime, str | None]]) -> None:
        await self._fail()
        self.usage_calls.append(len(usage))
        await self.store.record_usage(usage)

    async def add_request_records(self, records: Sequence[RequestRecord]) -> None:
        await self._fail()
        self.request_calls.append(len(records))
        await self.store.add_request_records(records)


@pytest.fixture
def recorder(store: KeyStore) -> Recorder:
    return Recorder(store, flush_interval=LONG, max_buffer=1000)


async def test_records_reach_the_store_only_on_flush(store: KeyStore, recorder: Recorder) -> None:
    """Recording writes nothing by itself; a flush writes usage and request records."""
    await add_keys(store, KEY)
    recorder.key_used(KEY, T0, "10.0.0.1")
    recorder.request(a_request(0))
    assert recorder.pending == 2
    assert await last_used(store) == (None, None)
    assert await stored_requests(store) == []

    await recorder.flush()

    assert await last_used(store) == (T0, "10.0.0.1")
    assert await stored_requests(store) == [a_request(0)]
    assert (recorder.pending, recorder.flushed_usage, recorder.flushed_requests) == (0, 1, 1)


async def test_the_periodic_task_flushes(store: KeyStore) -> None:
    """Once started, the recorder writes its buffers every flush_interval without being asked."""
    await add_keys(store, KEY)
    recorder = Recorder(store, flush_interval=0.05, max_buffer=1000)
    await recorder.start()
    try:
        recorder.key_used(KEY, T0, "10.0.0.1")
        recorder.request(a_request(0))
        for _ in range(100):
            if recorder.pending == 0 and recorder.flushed_requests == 1:
                break
            await asyncio.sleep(0.02)
        assert await stored_requests(store) == [a_request(0)]
        assert await last_used(store) == (T0, "10.0.0.1")
    finally:
        await recorder.close()


async def _flushed(recorder: Recorder, requests: int) -> None:
    for _ in range(250):
        if recorder.flushed_requests >= requests:
            return
        await asyncio.sleep(0.02)


@pytest.mark.parametrize(("max_buffer", "step"), [
    (100_000, 1000),  # the default buffer: a chunk, not a tenth (10,000 held made long GC pauses)
    (5000, 500),  # a buffer under ten chunks: its tenth
    (100, 10),
])
async def test_a_chunk_waiting_is_written_before_the_interval(store: KeyStore, max_buffer: int, step: int) -> None:
    """Busy enough to fill the buffer between two flushes, the recorder writes sooner instead of dropping:
    a chunk at a time (a tenth of a buffer under ten chunks), not when a tenth of a big one has piled up."""
    recorder = Recorder(store, flush_interval=LONG, max_buffer=max_buffer)
    await recorder.start()
    try:
        for batch in range(3):  # and again each time a step's worth is waiting
            for n in range(batch * step, (batch + 1) * step - 1):
                recorder.request(a_request(n))
            await asyncio.sleep(0.1)
            assert recorder.flushed_requests == batch * step  # one short: the interval still rules
            recorder.request(a_request((batch + 1) * step - 1))
            await _flushed(recorder, (batch + 1) * step)
            assert await stored_requests(store) == [a_request(n) for n in range((batch + 1) * step)]
        assert (recorder.pending, recorder.dropped) == (0, 0)
    finally:
        await recorder.close()


@pytest.mark.parametrize(("max_buffer", "chunk", "tenth", "slow"), [
    (100, 10, 10, False),
    (100_000, 1000, 10_000, False),  # retried per tenth of the buffer, not per chunk
    (100_000, 1000, 10_000, True),  # a chunk more arrived while the write was failing: still a tenth
])
async def test_after_a_failed_early_write_the_next_tenth_is_written_early_too(
    store: KeyStore, max_buffer: int, chunk: int, tenth: int, slow: bool,
) -> None:
    """Records put back after a failure do not stop early writes: the next tenth of new ones triggers
    one, and once that succeeds a chunk does again."""
    gate = asyncio.Event()
    flaky = FlakyStore(store, failures=1, gate=gate if slow else None)
    recorder = Recorder(flaky, flush_interval=LONG, max_buffer=max_buffer)
    await recorder.start()
    made = 0

    def more(count: int) -> None:
        nonlocal made
        for n in range(made, made + count):
            recorder.request(a_request(n))
        made += count

    try:
        more(chunk)
        if slow:
            await asyncio.sleep(0.1)
            more(chunk)  # enough for an early write while the failing one is still under way
            gate.set()
        for _ in range(250):
            if recorder.failed_flushes:
                break
            await asyncio.sleep(0.02)
        assert (recorder.failed_flushes, recorder.pending) == (1, made)  # put back
        more(tenth - 1)
        await asyncio.sleep(0.1)
        assert (len(flaky.request_calls), recorder.flushed_requests) == (0, 0)  # not per record, nor chunk
        more(1)
        await _flushed(recorder, made)
        assert (recorder.flushed_requests, recorder.pending, recorder.dropped) == (made, 0, 0)
        more(chunk - 1)  # written: a chunk is the step again
        await asyncio.sleep(0.1)
        assert recorder.flushed_requests == made - chunk + 1
        more(1)
        await _flushed(recorder, made)
        assert await stored_requests(store) == [a_request(n) for n in range(made)]
        assert recorder.failed_flushes == 1
    finally:
        await recorder.close()


async def test_usage_is_coalesced_per_key_keeping_the_newest(store: KeyStore) -> None:
    """Many uses of a key become one write of its newest time and IP, whatever the order they came in."""
    await add_keys(store, KEY, OTHER)
    flaky = FlakyStore(store, failures=0)
    recorder = Recorder(flaky, flush_interval=LONG, max_buffer=1000)
    for seconds, ip in [(1, "10.0.0.1"), (5, "10.0.0.5"), (3, "10.0.0.3")]:
        recorder.key_used(KEY, T0 + timedelta(seconds=seconds), ip)
    recorder.key_used(OTHER, T0, "10.0.0.9")
    assert recorder.pending == 2

    await recorder.flush()

    assert flaky.usage_calls == [2]
    assert await last_used(store, KEY) == (T0 + timedelta(seconds=5), "10.0.0.5")
    assert await last_used(store, OTHER) == (T0, "10.0.0.9")


async def test_last_used_never_goes_backwards_across_batches(store: KeyStore, recorder: Recorder) -> None:
    """A later batch carrying an older use leaves the newer last-used time and IP in place."""
    await add_keys(store, KEY)
    recorder.key_used(KEY, T0 + timedelta(minutes=5), "10.0.0.5")
    await recorder.flush()
    recorder.key_used(KEY, T0 + timedelta(minutes=1), "10.0.0.1")
    await recorder.flush()
    assert await last_used(store) == (T0 + timedelta(minutes=5), "10.0.0.5")
    recorder.key_used(KEY, T0 + timedelta(minutes=9), "10.0.0.9")
    await recorder.flush()
    assert await last_used(store) == (T0 + timedelta(minutes=9), "10.0.0.9")


async def test_request_records_are_written_in_chunks(store: KeyStore) -> None:
    """A large batch is written in store calls of at most 1000 records, all of them, in order."""
    await add_keys(store, KEY)
    flaky = FlakyStore(store, failures=0)
    recorder = Recorder(flaky, flush_interval=LONG, max_buffer=5000)
    records = [a_request(n) for n in range(2500)]
    for record in records:
        recorder.request(record)

    await recorder.flush()

    assert flaky.request_calls == [1000, 1000, 500]
    assert await stored_requests(store) == records


async def test_records_made_during_a_flush_wait_for_the_next(store: KeyStore, recorder: Recorder) -> None:
    """Recording while a flush is writing goes into the fresh buffers, not lost nor written twice."""
    await add_keys(store, KEY)
    recorder.request(a_request(0))
    flushing = asyncio.create_task(recorder.flush())
    await asyncio.sleep(0)  # the flush has swapped its buffers out
    recorder.request(a_request(1))
    await flushing
    assert recorder.pending == 1
    await recorder.flush()
    assert await stored_requests(store) == [a_request(0), a_request(1)]


async def test_close_flushes_everything(store: KeyStore) -> None:
    """Closing stops the periodic task and writes all that is buffered."""
    await add_keys(store, KEY)
    recorder = Recorder(store, flush_interval=LONG, max_buffer=1000)
    await recorder.start()
    recorder.key_used(KEY, T0, "10.0.0.1")
    for n in range(10):
        recorder.request(a_request(n))

    await recorder.close()

    assert recorder.pending == 0
    assert await stored_requests(store) == [a_request(n) for n in range(10)]
    assert await last_used(store) == (T0, "10.0.0.1")


async def test_a_full_buffer_drops_and_counts_new_records(
    store: KeyStore, caplog: pytest.LogCaptureFixture,
) -> None:
    """Beyond max_buffer new records are dropped and counted, with one warning, not one per record."""
    recorder = Recorder(store, flush_interval=LONG, max_buffer=5, logger=logging.getLogger("test.recorder"))
    with caplog.at_level(logging.WARNING, logger="test.recorder"):
        for n in range(12):
            recorder.request(a_request(n))
    assert (recorder.pending, recorder.dropped) == (5, 7)
    assert len([r for r in caplog.records if "recorder_buffer_full" in r.getMessage()]) == 1

    await recorder.flush()
    assert await stored_requests(store) == [a_request(n) for n in range(5)]


@pytest.mark.parametrize("failures", [1, 3])
async def test_a_failing_store_keeps_records_until_it_recovers(store: KeyStore, failures: int) -> None:
    """Flushes that fail put everything back; the first one that succeeds writes it all, once."""
    await add_keys(store, KEY)
    flaky = FlakyStore(store, failures=failures)
    recorder = Recorder(flaky, flush_interval=LONG, max_buffer=1000)
    recorder.key_used(KEY, T0, "10.0.0.1")
    recorder.request(a_request(0))

    for attempt in range(failures):
        await recorder.flush()
        recorder.key_used(KEY, T0 - timedelta(seconds=1), "10.0.0.2")  # older: must not win
        recorder.request(a_request(attempt + 1))
    assert recorder.failed_flushes == failures
    assert await stored_requests(store) == []

    await recorder.flush()

    assert await stored_requests(store) == [a_request(n) for n in range(failures + 1)]
    assert await last_used(store) == (T0, "10.0.0.1")
    assert (recorder.pending, recorder.dropped) == (0, 0)


async def test_a_failure_after_usage_was_written_keeps_only_the_rest(store: KeyStore) -> None:
    """When the request write fails after usage succeeded, only the request records are kept for later."""
    await add_keys(store, KEY)
    flaky = FlakyStore(store, failures=0)
    recorder = Recorder(flaky, flush_interval=LONG, max_buffer=1000)
    recorder.key_used(KEY, T0, "10.0.0.1")
    recorder.request(a_request(0))

    original = flaky.add_request_records

    async def fail_once(records: Sequence[RequestRecord]) -> None:
        flaky.add_request_records = original  # type: ignore[method-assign]
        raise StoreUnavailable("store is down")

    flaky.add_request_records = fail_once  # type: ignore[method-assign]
    await recorder.flush()
    assert (recorder.pending, recorder.flushed_usage, recorder.failed_flushes) == (1, 1, 1)

    await recorder.flush()
    assert flaky.usage_calls == [1]
    assert await stored_requests(store) == [a_request(0)]


async def test_put_back_respects_the_bound(store: KeyStore) -> None:
    """Records put back after a failure go first; what no longer fits is dropped and counted."""
    flaky = FlakyStore(store, failures=1)
    recorder = Recorder(flaky, flush_interval=LONG, max_buffer=4)
    for n in range(3):
        recorder.request(a_request(n))
    flushing = asyncio.create_task(recorder.flush())
    await asyncio.sleep(0)  # the buffers are swapped out; the write is about to fail
    for n in range(3, 6):
        recorder.request(a_request(n))
    await flushing

    assert (recorder.pending, recorder.dropped) == (4, 2)
    await recorder.flush()
    assert await stored_requests(store) == [a_request(n) for n in range(4)]


async def test_the_periodic_task_survives_failures(store: KeyStore) -> None:
    """A store outage does not stop the background flushes; they write once it is back."""
    await add_keys(store, KEY)
    flaky = FlakyStore(store, failures=3)
    recorder = Recorder(flaky, flush_interval=0.02, max_buffer=1000)
    await recorder.start()
    try:
        recorder.request(a_request(0))
        for _ in range(200):
            if recorder.flushed_requests == 1:
                break
            await asyncio.sleep(0.02)
        assert recorder.failed_flushes == 3
        assert await stored_requests(store) == [a_request(0)]
    finally:
        await recorder.close()


async def test_close_retries_then_counts_what_it_could_not_write(
    store: KeyStore, caplog: pytest.LogCaptureFixture,
) -> None:
    """At shutdown a failing flush is retried briefly; what still cannot be written is counted and logged."""
    flaky = FlakyStore(store, failures=1_000)
    recorder = Recorder(flaky, flush_interval=LONG, max_buffer=1000, close_retry_delay=0.01,
                        logger=logging.getLogger("test.recorder"))
    recorder.key_used(KEY, T0, "10.0.0.1")
    recorder.request(a_request(0))
    with caplog.at_level(logging.WARNING, logger="test.recorder"):
        await recorder.close()
    assert (recorder.failed_flushes, recorder.dropped, recorder.pending) == (3, 2, 0)
    assert any("recorder_records_lost" in r.getMessage() for r in caplog.records)


async def test_close_retries_until_the_store_is_back(store: KeyStore) -> None:
    """A store that comes back during the shutdown retries still gets every record."""
    await add_keys(store, KEY)
    flaky = FlakyStore(store, failures=2)
    recorder = Recorder(flaky, flush_interval=LONG, max_buffer=1000, close_retry_delay=0.01)
    recorder.request(a_request(0))
    await recorder.close()
    assert (recorder.dropped, recorder.pending) == (0, 0)
    assert await stored_requests(store) == [a_request(0)]
