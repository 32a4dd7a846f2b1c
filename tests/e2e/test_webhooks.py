"""Webhooks through `keygate serve` on each store: a real receiver on loopback gets every key event, signed,
at least once, across failures and restarts, and never on the admin API's time."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from .conftest import bearer, metric
from .harness import KEYGATE, Keygate, Upstream, clean_env
from ..waiting import until
from ..webhook_receiver import Received, WebhookReceiver

SECRET = "e2e-webhook-secret-0123456789"


@pytest.fixture(scope="module")
def receiver() -> Iterator[WebhookReceiver]:
    server = WebhookReceiver()
    yield server
    server.stop()


@pytest.fixture
def path() -> str:
    return f"/hook-{uuid.uuid4().hex[:8]}"


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest) -> str:
    """An empty store of each kind; PostgreSQL migrated first, as an operator would."""
    if request.param == "sqlite":
        return ""  # the gateway's own SQLite file
    url = str(request.getfixturevalue("pg_database"))
    subprocess.run([KEYGATE, "migrate"], env=clean_env(KEYGATE_STORE__URL=url), check=True, capture_output=True,
                   timeout=60)
    return url


def hooked(folder: Path, upstream: Upstream, *urls: str, store_url: str = "", workers: int = 1,
           timeout: float = 5) -> Keygate:
    """A gateway (not started) sending every event to ``urls``, retrying at least once a second."""
    hooks = "".join(f'[[webhooks]]\nurl = "{url}"\nsecret = "{SECRET}"\ntimeout = {timeout}\n' for url in urls)
    return Keygate(folder, upstream.url, store_url=store_url, workers=workers,
                   config="[hygiene]\nwebhook_max_backoff = 1\n" + hooks)


def cli(keygate: Keygate, *args: str) -> str:
    done = subprocess.run([KEYGATE, "--config", str(keygate.config_path), *args], env=clean_env(), check=True,
                          capture_output=True, text=True, timeout=60)
    return done.stdout


def admin_key(keygate: Keygate) -> str:
    """The first admin key, made with the CLI (itself a key.created event)."""
    made = json.loads(cli(keygate, "keys", "create", "--name", "ops", "--server", "admin", "--role", "admin",
                          "--json"))
    return str(made["key"])


def of(received: list[Received], event: str, key_id: str | None = None) -> list[Received]:
    return [r for r in received if r.json()["event"] == event and (key_id is None or r.json()["key_id"] == key_id)]


async def test_a_revoke_reaches_the_webhook_signed_within_seconds(
    upstream: Upstream, receiver: WebhookReceiver, path: str, store_url: str, tmp_path: Path,
) -> None:
    """Revokes through the admin API and the CLI each arrive within seconds (a poll is 0.5 s), signed, naming the key."""
    keygate = hooked(tmp_path, upstream, receiver.url + path, store_url=store_url).start()
    try:
        api = keygate.admin_url + "/admin/v1"
        async with aiohttp.ClientSession(headers=bearer(admin_key(keygate))) as http:
            async with http.post(api + "/keys", json={"name": "ci", "role": "admin"}) as r:
                created = await r.json()
            async with http.post(f"{api}/keys/{created['id']}/revoke") as r:
                assert r.status == 200
            revoked_at = time.monotonic()
            assert await until(lambda: of(receiver.received(path), "key.revoked"), timeout=10)
            [got] = of(receiver.received(path), "key.revoked")
            assert got.at - revoked_at < 5.0
            assert got.signed_by(SECRET) and got.headers["X-Keygate-Event"] == "key.revoked"
            body = got.json()
            assert (body["key_id"], body["key"]["status"]) == (created["id"], "revoked")
            assert created["key"] not in got.body.decode()
            # The CLI writes to the store directly; the running gateway delivers.
            async with http.post(api + "/keys", json={"name": "cd", "role": "admin"}) as r:
                other = await r.json()
        cli(keygate, "keys", "revoke", other["id"], "--yes")
        revoked_at = time.monotonic()
        assert await until(lambda: of(receiver.received(path), "key.revoked", other["id"]), timeout=10)
        [got] = of(receiver.received(path), "key.revoked", other["id"])
        assert got.at - revoked_at < 5.0 and got.signed_by(SECRET)
        assert len(of(receiver.received(path), "key.created")) == 3  # ops, ci, cd
    finally:
        assert keygate.stop() == 0


async def test_a_receiver_answering_500_gets_the_event_again(
    upstream: Upstream, receiver: WebhookReceiver, path: str, tmp_path: Path,
) -> None:
    """A 500 is retried about a second later with the same body and event id; then it is delivered, once."""
    receiver.answers[path] = [500]  # before the event exists: it could be delivered at once
    keygate = hooked(tmp_path, upstream, receiver.url + path).start()
    try:
        admin_key(keygate)
        first, second = await receiver.arrived(2, path)
        assert first.body == second.body and first.headers["X-Keygate-Delivery"] == second.headers["X-Keygate-Delivery"]
        assert 0.7 <= second.at - first.at < 10.0  # backoff about 1 s; the bound only catches "never"
        async with aiohttp.ClientSession() as http:
            async def counted(result: str) -> float:
                return await metric(http, keygate, "keygate_webhook_deliveries_total", event="key.created",
                                    result=result)
            deadline = time.monotonic() + 10
            while await counted("delivered") < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert (await counted("failed"), await counted("delivered")) == (1, 1)
        await asyncio.sleep(1.5)
        assert len(receiver.received(path)) == 2  # delivered: never sent again
    finally:
        assert keygate.stop() == 0


async def test_a_restart_between_an_event_and_its_delivery_loses_no_webhook(
    upstream: Upstream, store_url: str, tmp_path: Path,
) -> None:
    """An event written while serve is stopped, and one whose receiver was down until serve stopped, both
    arrive once serve runs again."""
    down = WebhookReceiver()
    port = down.port
    down.stop()  # the receiver is down: connections are refused
    url = f"http://127.0.0.1:{port}/hook"
    keygate = hooked(tmp_path, upstream, url, store_url=store_url).start()
    try:
        cli(keygate, "keys", "create", "--name", "made-while-down", "--role", "admin")
        assert await until(lambda: '"webhook_failed"' in keygate.log(), timeout=10)  # tried, refused, due again later
    finally:
        assert keygate.stop() == 0
    # Serve is stopped: this event sits in the outbox only.
    made = json.loads(cli(keygate, "keys", "create", "--name", "made-while-stopped", "--role", "admin", "--json"))
    cli(keygate, "keys", "revoke", made["id"], "--yes")
    up = WebhookReceiver(port)
    try:
        keygate.start()
        try:
            got = await up.arrived(3, "/hook")
            names = sorted((r.json()["event"], r.json()["key"]["name"]) for r in got)
            assert names == [("key.created", "made-while-down"), ("key.created", "made-while-stopped"),
                             ("key.revoked", "made-while-stopped")]
            assert all(r.signed_by(SECRET) for r in got)
            await asyncio.sleep(1.0)
            assert len(up.received()) == 3
        finally:
            assert keygate.stop() == 0
    finally:
        up.stop()


async def test_two_workers_deliver_each_event_once(
    upstream: Upstream, receiver: WebhookReceiver, path: str, tmp_path: Path,
) -> None:
    """With `serve --workers 2` both workers' deliverers share the outbox, and every event arrives exactly once."""
    keygate = hooked(tmp_path, upstream, receiver.url + path, workers=2).start()
    try:
        api = keygate.admin_url + "/admin/v1"
        async with aiohttp.ClientSession(headers=bearer(admin_key(keygate))) as http:
            for n in range(20):
                async with http.post(api + "/keys", json={"name": f"k{n}", "role": "admin"}) as r:
                    assert r.status == 201
                if n % 5 == 4:
                    await asyncio.sleep(0.3)  # spread over several polls, so both workers get some
        await receiver.arrived(21, path)
        await asyncio.sleep(1.5)  # any second copy would have arrived by now
        got = receiver.received(path)
        ids = [r.headers["X-Keygate-Delivery"] for r in got]
        assert len(ids) == 21 and len(set(ids)) == 21
    finally:
        assert keygate.stop() == 0


async def test_a_slow_receiver_never_slows_the_admin_api_and_sigterm_lets_its_attempt_finish(
    upstream: Upstream, receiver: WebhookReceiver, path: str, tmp_path: Path,
) -> None:
    """With the receiver taking 2 s per event, admin API calls still answer at once; SIGTERM while an attempt
    is in flight waits for it (delivered, not sent again) and exits 0."""
    receiver.delays[path] = 2.0
    keygate = hooked(tmp_path, upstream, receiver.url + path).start()
    api = keygate.admin_url + "/admin/v1"
    try:
        async with aiohttp.ClientSession(headers=bearer(admin_key(keygate))) as http:
            await receiver.arrived(1, path)  # the admin key's event: the receiver is now busy with it
            for n in range(5):
                started = time.monotonic()
                async with http.post(api + "/keys", json={"name": f"k{n}", "role": "admin"}) as r:
                    assert r.status == 201
                    created = await r.json()
                async with http.post(f"{api}/keys/{created['id']}/revoke") as r:
                    assert r.status == 200
                assert time.monotonic() - started < 0.5
                async with http.get(keygate.proxy_url + "/echo", headers=bearer(created["key"])) as r:
                    assert r.status == 401  # and the proxy went on deciding meanwhile
            await receiver.arrived(2, path)
    finally:
        assert keygate.process is not None
        keygate.process.send_signal(signal.SIGTERM)  # attempts are in flight
        code = await asyncio.to_thread(keygate.stop)
    assert code == 0
    async with keygate.service() as service, service.store.read() as tx:
        rows = await tx.list_webhooks(limit=100)
    # Every attempt that reached the receiver finished and was recorded; nothing else was tried.
    delivered = [r for r in rows if r.delivered_at is not None]
    assert len(receiver.received(path)) == len(delivered) >= 2
    assert all(r.attempts == 0 for r in rows if r.delivered_at is None)
