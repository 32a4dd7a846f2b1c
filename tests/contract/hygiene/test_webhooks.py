"""The webhook deliverer against each store and a real HTTP receiver on loopback, on an injected clock."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest

from gateway.config.schema import WebhookSettings
from gateway.hygiene.events import event_body
from gateway.hygiene.webhooks import WebhookDeliverer
from gateway.manage.audit import AuditPruner
from gateway.models import KeyRecord, WebhookDelivery
from gateway.store import KeyStore

from ...clocks import WALL_START, FakeClock
from ...webhook_receiver import WebhookReceiver

SECRET = "a-webhook-secret-of-32-characters"
RECORD = KeyRecord(
    id="kg_AAAAAAAAAAAA", kind="integration", name="ci", org="acme", user="", role="admin", operations=(),
    servers=("*",), ip_allowlist=(), rate_limit=None, created_by="test", created_at=WALL_START, expires_at=None,
    revoked_at=WALL_START, last_used_at=None, last_used_ip=None,
)

Make = Callable[..., WebhookDeliverer]


@pytest.fixture(scope="module")
def receiver() -> Iterator[WebhookReceiver]:
    server = WebhookReceiver()
    yield server
    server.stop()


@pytest.fixture
def path() -> str:
    """A path of this test's own on the shared receiver."""
    return f"/hook-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def make(store: KeyStore, clock: FakeClock[datetime]) -> AsyncIterator[Make]:
    """Deliverers on the test's store and clock, without jitter; closed after the test."""
    made: list[WebhookDeliverer] = []

    def build(*urls: str, retry_for: float = 3600, max_backoff: float = 600, timeout: float = 5,
              **kwargs: Any) -> WebhookDeliverer:
        hooks = [WebhookSettings(url=url, secret=SECRET, timeout=timeout) for url in urls]
        deliverer = WebhookDeliverer(store, hooks, retry_for=retry_for, max_backoff=max_backoff, clock=clock,
                                     rand=lambda: 0.0, **kwargs)
        made.append(deliverer)
        return deliverer

    yield build
    for deliverer in made:
        await deliverer.close()


async def queue(store: KeyStore, url: str, at: datetime, event: str = "key.revoked", count: int = 1) -> list[str]:
    """``count`` events about RECORD queued for ``url`` at ``at``; their bodies."""
    bodies = [event_body(event, at, RECORD, actor="test") for _ in range(count)]
    async with store.transaction() as tx:
        for body in bodies:
            await tx.enqueue_webhook(url=url, event=event, key_id=RECORD.id, body=body, at=at)
    return bodies


async def rows(store: KeyStore) -> list[WebhookDelivery]:
    async with store.read() as tx:
        return list(reversed(await tx.list_webhooks()))


def closed_port() -> int:
    """A loopback port nobody listens on: connections to it are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_2xx_delivers_the_stored_body_signed_with_that_webhooks_secret(
    store: KeyStore, clock: FakeClock[datetime], receiver: WebhookReceiver, path: str, make: Make,
) -> None:
    """The receiver gets the body byte for byte, signed, with the event and its id; the row is done."""
    url = receiver.url + path
    [body] = await queue(store, url, clock())
    deliverer = make(url)
    assert await deliverer.run_once() == 1
    [got] = receiver.received(path)
    assert got.body == body.encode() and got.signed_by(SECRET) and not got.signed_by(SECRET + "x")
    assert got.headers["Content-Type"] == "application/json"
    assert got.headers["X-Keygate-Event"] == "key.revoked"
    assert got.headers["X-Keygate-Delivery"] == got.json()["id"]
    assert got.headers["User-Agent"].startswith("keygate/")
    [row] = await rows(store)
    assert (row.delivered_at, row.attempts, row.last_error, row.abandoned_at) == (clock(), 1, None, None)
    assert deliverer.results == {("key.revoked", "delivered"): 1} and deliverer.backlog == 0
    assert await deliverer.run_once() == 0  # done: never sent again


@pytest.mark.parametrize(("answer", "error"), [
    (500, "HTTP 500"),
    (404, "HTTP 404"),
    (302, "HTTP 302 (redirects are not followed)"),
    ("timeout", "no answer within 0.3 s (the webhook's timeout)"),
    ("refused", "ClientConnectorError"),
])
async def test_a_failed_attempt_is_retried_a_second_later(
    store: KeyStore, clock: FakeClock[datetime], receiver: WebhookReceiver, path: str, make: Make,
    answer: int | str, error: str,
) -> None:
    """Another status, a redirect, a timeout or a refused connection fails the attempt; it is due again 1 s later."""
    url = receiver.url + path if answer != "refused" else f"http://127.0.0.1:{closed_port()}{path}"
    if isinstance(answer, int):
        receiver.answers[path] = [answer]
    elif answer == "timeout":
        receiver.delays[path] = 1.0
    await queue(store, url, clock())
    deliverer = make(url, timeout=0.3)
    assert await deliverer.run_once() == 1
    [row] = await rows(store)
    assert row.last_error is not None and row.last_error.startswith(error)
    assert (row.attempts, row.delivered_at, row.abandoned_at) == (1, None, None)
    assert row.next_attempt_at == clock() + timedelta(seconds=1)
    assert deliverer.results == {("key.revoked", "failed"): 1} and deliverer.backlog == 1
    assert receiver.received("/redirected") == []  # the redirect was not followed
    clock.advance(0.999)
    assert await deliverer.run_once() == 0  # not due yet
    clock.advance(0.001)
    receiver.delays.pop(path, None)
    assert await deliverer.run_once() == 1
    [row] = await rows(store)
    if answer == "refused":
        assert row.attempts == 2 and row.delivered_at is None
    else:
        assert (row.attempts, row.delivered_at) == (2, clock())
        assert deliverer.results[("key.revoked", "delivered")] == 1


async def test_retries_back_off_then_give_up_at_retry_for(
    store: KeyStore, clock: FakeClock[datetime], receiver: WebhookReceiver, path: str, make: Make,
) -> None:
    """Waits of 1, 2, 4 s ..., the last attempt at retry_for after the event, then the row is abandoned and kept."""
    url = receiver.url + path
    receiver.answers[path] = [503] * 10
    created = clock()
    await queue(store, url, created)
    deliverer = make(url, retry_for=10)
    due_at = []
    for _ in range(5):
        assert await deliverer.run_once() == 1
        [row] = await rows(store)
        due_at.append((row.next_attempt_at - created).total_seconds() if row.abandoned_at is None else None)
        clock.now = row.next_attempt_at
    assert due_at == [1, 3, 7, 10, None]  # 1 s, 2 s, 4 s, then cut short by the deadline; then given up
    [row] = await rows(store)
    assert (row.attempts, row.abandoned_at, row.last_error, row.delivered_at) == (5, created + timedelta(seconds=10),
                                                                                  "HTTP 503", None)
    assert len(receiver.received(path)) == 5
    assert deliverer.results == {("key.revoked", "failed"): 4, ("key.revoked", "abandoned"): 1}
    clock.advance(days=1)
    assert await deliverer.run_once() == 0 and deliverer.backlog == 0


async def test_the_wait_between_attempts_is_capped_at_max_backoff(
    store: KeyStore, clock: FakeClock[datetime], receiver: WebhookReceiver, path: str, make: Make,
) -> None:
    """After enough failures the wait stays at webhook_max_backoff."""
    url = receiver.url + path
    receiver.answers[path] = [500] * 10
    await queue(store, url, clock())
    deliverer = make(url, max_backoff=5)
    waits = []
    for _ in range(6):
        before = clock()
        assert await deliverer.run_once() == 1
        [row] = await rows(store)
        waits.append((row.next_attempt_at - before).total_seconds())
        clock.now = row.next_attempt_at
    assert waits == [1, 2, 4, 5, 5, 5]


async def test_a_row_for_a_webhook_no_longer_configured_is_abandoned_with_a_clear_error(
    store: KeyStore, clock: FakeClock[datetime], receiver: WebhookReceiver, path: str, make: Make,
) -> None:
    """An outbox row whose URL left [[webhooks]] is given up at once, kept, and nothing is sent anywhere."""
    gone = receiver.url + path + "-removed"
    await queue(store, gone, clock())
    deliverer = make(receiver.url + path)
    assert await deliverer.run_once() == 1
    [row] = await rows(store)
    assert row.abandoned_at == clock() and row.attempts == 1
    assert (row.url, row.last_error) == (gone, "its URL is no longer a configured webhook (not in [[webhooks]]): "
                                               "not sent")
    assert receiver.received(path + "-removed") == []
    assert deliverer.results == {("key.revoked", "abandoned"): 1}


async def test_a_lease_left_by_a_dead_deliverer_is_taken_over_when_it_ends(
    store: KeyStore, clock: FakeClock[datetime], receiver: WebhookReceiver, path: str, make: Make,
) -> None:
    """Rows claimed by a process that died are sent by another once the lease (2x the timeout) has run out."""
    url = receiver.url + path
    await queue(store, url, clock())
    async with store.transaction() as tx:  # a deliverer claims, then dies before sending
        await tx.claim_webhooks(now=clock(), lease_until=clock() + timedelta(seconds=20), limit=10)
    survivor = make(url, timeout=10)
    clock.advance(19.9)
    assert await survivor.run_once() == 0
    clock.advance(0.1)
    assert await survivor.run_once() == 1
    assert len(receiver.received(path)) == 1


async def test_two_deliverers_send_each_event_once(
    store: KeyStore, clock: FakeClock[datetime], receiver: WebhookReceiver, path: str, make: Make,
) -> None:
    """Deliverers of two workers claiming at once split the rows: every event arrives exactly once."""
    url = receiver.url + path
    bodies = await queue(store, url, clock(), count=30)
    first, second = make(url, batch=4), make(url, batch=4)
    for _ in range(20):
        await asyncio.gather(first.run_once(), second.run_once())
    got = receiver.received(path)
    assert sorted(r.body.decode() for r in got) == sorted(bodies)
    assert sum(first.results.values()) + sum(second.results.values()) == 30


async def test_the_background_task_delivers_and_stops_claiming_when_told(
    store: KeyStore, clock: FakeClock[datetime], receiver: WebhookReceiver, path: str, make: Make,
) -> None:
    """Started, it delivers on its own between injected sleeps; told to stop, it lets the attempt in flight
    finish and claims nothing more."""
    url = receiver.url + path
    receiver.delays[path] = 0.5
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        await asyncio.sleep(0.01)

    deliverer = make(url, sleep=sleep)
    assert deliverer.poll_interval <= 1
    await deliverer.start()
    async with asyncio.timeout(5):
        while not slept:  # it looked, found nothing, and waits for the next poll
            await asyncio.sleep(0.01)
    await queue(store, url, clock())
    await receiver.arrived(1, path)
    deliverer.stop_claiming()
    await queue(store, url, clock())  # due, but nobody may claim it now
    await deliverer.close()
    first, second = await rows(store)
    assert first.delivered_at == clock() and (second.attempts, second.next_attempt_at) == (0, clock())
    assert set(slept) == {deliverer.poll_interval}


async def test_finished_deliveries_are_pruned_with_the_audit_trail(
    store: KeyStore, clock: FakeClock[datetime], receiver: WebhookReceiver, path: str, make: Make,
) -> None:
    """The audit pruner deletes deliveries made or given up before audit.retention_days, never pending ones."""
    url = receiver.url + path
    await queue(store, url, clock(), count=2)
    await make(url, batch=1).run_once()  # one delivered, one still pending
    clock.advance(days=8)
    pruner = AuditPruner(store, retention_days=7, interval=3600, clock=clock)
    await pruner.prune()
    [left] = await rows(store)
    assert left.delivered_at is None


async def test_an_unreachable_outbox_is_logged_once_and_delivery_resumes(
    store: KeyStore, clock: FakeClock[datetime], receiver: WebhookReceiver, path: str, make: Make,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While the store is down the task keeps polling, logging the outage once; then it delivers again."""
    url = receiver.url + path
    polls: list[float] = []

    async def sleep(seconds: float) -> None:
        polls.append(seconds)
        await asyncio.sleep(0.01)

    caplog.set_level(logging.INFO, logger="keygate.webhooks")
    await store.close()
    deliverer = make(url, sleep=sleep)
    await deliverer.start()
    async with asyncio.timeout(5):
        while len(polls) < 5:
            await asyncio.sleep(0.01)
    await store.open()
    await queue(store, url, clock())
    await receiver.arrived(1, path)
    async with asyncio.timeout(5):
        while not any('"webhook_outbox_available"' in r.getMessage() for r in caplog.records):
            await asyncio.sleep(0.01)
    events = [json.loads(r.getMessage())["event"] for r in caplog.records if r.name == "keygate.webhooks"]
    assert events[0] == "webhook_outbox_unavailable" and events.count("webhook_outbox_unavailable") == 1
    assert events.count("webhook_outbox_available") == 1
