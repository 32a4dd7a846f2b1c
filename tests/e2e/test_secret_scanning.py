"""Leaked keys through `keygate serve` (two workers, both stores): GitHub's secret-scanning reports and
`keygate keys report-leak`.

GitHub is played by tests/github_scanning.py (its key list on 127.0.0.1,
reports signed as GitHub signs them), run on a thread of its own for the
module's gateway. Each refusal is tested case by case in-process
(tests/contract/hygiene/test_leaks.py); here the whole path is seen once
as GitHub, the key's user and the operator see it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import threading
import time
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import aiohttp
import pytest

from gateway.config.schema import Settings
from gateway.manage.service import KeyService
from gateway.models import KeyRecord
from gateway.store import create_store
from tests.github_scanning import TYPE, GitHubScanning, match, report

from .conftest import bearer, metric, wrong_secret
from .harness import KEYGATE, Keygate, Upstream, audit_events, clean_env

PATH = "/.well-known/keygate/secret-scanning"
HOOK = "https://hooks.example/keygate"
T = TypeVar("T")


class ThreadedGitHub:
    """The stand-in on an event loop of its own thread, so a module-scoped gateway can use it across tests."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.github = self.run(GitHubScanning().start())

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(10)

    def stop(self) -> None:
        self.run(self.github.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def github() -> Iterator[GitHubScanning]:
    threaded = ThreadedGitHub()
    yield threaded.github
    threaded.stop()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def gateway(request: pytest.FixtureRequest, upstream: Upstream, github: GitHubScanning,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keygate]:
    """`keygate serve --workers 2` on each store, trusting the stand-in's keys, with a webhook and a flagging kind."""
    store_url = ""
    if request.param == "postgres":
        from tests.conftest import create_pg_database, drop_pg_database, pg_url_for
        name = asyncio.run(create_pg_database())
        store_url = pg_url_for(name)
        subprocess.run([KEYGATE, "migrate"], env=clean_env(KEYGATE_STORE__URL=store_url), check=True,
                       capture_output=True, timeout=60)
    config = (
        f'[leaks]\ngithub_keys_url = "{github.keys_url}"\nper_client = "10000/minute; burst=10000"\n'
        '[keys.kinds.watched]\nprefix = "kgw_"\non_leak = "flag"\n'
        f'[[webhooks]]\nurl = "{HOOK}"\nsecret = "{"s" * 16}"\nevents = ["key.leaked", "key.revoked"]\n'
    )
    keygate = Keygate(tmp_path_factory.mktemp("leaks"), upstream.url, store_url=store_url, workers=2,
                      config=config).start()
    yield keygate
    assert keygate.stop() == 0
    if request.param == "postgres":
        asyncio.run(drop_pg_database(name))


async def post_report(http: aiohttp.ClientSession, gateway: Keygate, github: GitHubScanning,
                      matches: list[dict[str, Any]], *, signed: bool = True) -> tuple[int, Any]:
    body = report(matches)
    headers = github.sign(body) if signed else {"Content-Type": "application/json"}
    async with http.post(gateway.proxy_url + PATH, data=body, headers=headers) as r:
        return r.status, json.loads(await r.read())


async def statuses(http: aiohttp.ClientSession, gateway: Keygate, key: str, n: int = 10) -> list[int]:
    """``n`` requests with ``key``, each on a new connection, so both workers answer some."""
    found = []
    for _ in range(n):
        async with http.get(gateway.proxy_url + "/items", headers={**bearer(key), "Connection": "close"}) as r:
            await r.read()
            found.append(r.status)
    return found


async def refused_within(http: aiohttp.ClientSession, gateway: Keygate, key: str, seconds: float) -> float:
    """Seconds until every worker answers 401 to ``key`` (asserted within ``seconds``)."""
    started = time.monotonic()
    while set(await statuses(http, gateway, key)) != {401}:
        assert time.monotonic() - started < seconds, "the key still works on some worker"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def queued(gateway: Keygate, key_id: str) -> list[tuple[str, str, dict[str, Any]]]:
    async with gateway.service() as service, service.store.read() as tx:
        rows = await tx.list_webhooks(key_id=key_id)
    return [(d.url, d.event, json.loads(d.body)) for d in reversed(rows)]


async def watched_key(gateway: Keygate) -> tuple[KeyRecord, str]:
    """A key of the kind the gateway's config adds (the harness's service knows only the built-in kinds)."""
    settings = Settings.model_validate({"keys": {"argon2": {"memory_cost": 1024},
                                                 "kinds": {"watched": {"prefix": "kgw_", "on_leak": "flag"}}}})
    store = create_store(gateway.store_url)
    await store.open()
    try:
        return await KeyService(store, settings, actor="test:operator").create_key(
            name="watched", kind="watched", role="admin")
    finally:
        await store.close()


async def counted(http: aiohttp.ClientSession, gateway: Keygate, result: str, expected: float) -> None:
    """keygate_leak_reports_total{result} reaches ``expected`` (another worker's numbers are up to 1 s old)."""
    for _ in range(40):
        if await metric(http, gateway, "keygate_leak_reports_total", result=result) == expected:
            return
        await asyncio.sleep(0.1)
    assert await metric(http, gateway, "keygate_leak_reports_total", result=result) == expected


def sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# -- 200 ------------------------------------------------------------------------------------------------

async def test_a_reported_key_is_refused_by_every_worker_within_a_second(
    http: aiohttp.ClientSession, gateway: Keygate, github: GitHubScanning,
) -> None:
    """GitHub reports a key in a public commit: true_positive, 401 everywhere within 1 s, audited with url and
    source, key.leaked and key.revoked queued for the webhook, counted in /metrics; the token never in the log."""
    record, full = await gateway.key(name="ci", role="admin")
    assert set(await statuses(http, gateway, full)) == {200}  # cached by both workers
    before = await metric(http, gateway, "keygate_leak_reports_total", result="true_positive")
    url = "https://github.com/acme/shop/blob/c040cae/deploy/.env"
    status, answer = await post_report(http, gateway, github, [match(full, url=url, source="commit")])
    assert status == 200
    assert answer == [{"token_hash": sha256(full), "token_type": TYPE, "label": "true_positive"}]
    await refused_within(http, gateway, full, 1.0)

    details = [d for action, d in await audit_events(gateway, record.id) if action == "key.leaked"][0]
    assert details == {"url": url, "source": "commit", "via": "github", "result": "revoked", "first_report": True}
    assert [(hook, event) for hook, event, _ in await queued(gateway, record.id)] == [
        (HOOK, "key.leaked"), (HOOK, "key.revoked")]
    leaked = [body for _, event, body in await queued(gateway, record.id) if event == "key.leaked"][0]
    assert leaked["details"]["url"] == url and leaked["details"]["actor"] == "github:secret-scanning"
    await counted(http, gateway, "true_positive", before + 1)
    secret_part = full[len(record.id):]
    assert secret_part not in gateway.log()


async def test_a_key_of_a_flagging_kind_keeps_working_but_shows_its_leak(
    http: aiohttp.ClientSession, gateway: Keygate, github: GitHubScanning,
) -> None:
    """on_leak = "flag": true_positive, leaked_at set, the key still authorizes; key.leaked only."""
    record, full = await watched_key(gateway)
    status, answer = await post_report(http, gateway, github, [match(full)])
    assert (status, answer[0]["label"]) == (200, "true_positive")
    await asyncio.sleep(0.5)  # past a change-feed poll
    assert set(await statuses(http, gateway, full)) == {200}
    async with gateway.service() as service:
        stored = await service.get_key(record.id)
    assert stored.leaked_at is not None and stored.revoked_at is None
    assert [event for _, event, _ in await queued(gateway, record.id)] == ["key.leaked"]


async def test_unknown_keys_wrong_secrets_and_garbage_are_false_positives_and_change_nothing(
    http: aiohttp.ClientSession, gateway: Keygate, github: GitHubScanning,
) -> None:
    """A real id with a random secret (anyone can publish one) is no leak of that key; nor is an unknown
    key, another vendor's token or garbage: each is false_positive, once, and the key works on."""
    from gateway.keys import generate
    record, full = await gateway.key(name="victim", role="admin")
    forged = wrong_secret(record.id)
    tokens = [forged, generate("kg_").full, "ghp_" + "x" * 36, "not a key at all", forged]
    before = await metric(http, gateway, "keygate_leak_reports_total", result="false_positive")
    status, answer = await post_report(http, gateway, github, [match(t) for t in tokens])
    assert status == 200
    assert answer == [{"token_hash": sha256(t), "token_type": TYPE, "label": "false_positive"} for t in tokens[:4]]
    assert set(await statuses(http, gateway, full)) == {200}
    async with gateway.service() as service:
        assert (await service.get_key(record.id)).leaked_at is None
    assert "key.leaked" not in [action for action, _ in await audit_events(gateway, record.id)]
    await counted(http, gateway, "false_positive", before + 4)


# -- refused whole ------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("make", "status"),
    [
        (lambda full: (report([match(full)]), False), 401),  # unsigned
        (lambda full: (b"[{", True), 400),
        (lambda full: (report([match(full, url="x" * (1024 * 1024))]), True), 413),
    ],
    ids=["unsigned", "malformed", "huge"],
)
async def test_a_bad_report_revokes_nothing(
    http: aiohttp.ClientSession, gateway: Keygate, github: GitHubScanning, make: Any, status: int,
) -> None:
    """Unsigned, malformed or huge: refused whole (counted as refused), the key in it works on."""
    record, full = await gateway.key(name="ci", role="admin")
    body, signed = make(full)
    headers = github.sign(body) if signed else {"Content-Type": "application/json"}
    before = await metric(http, gateway, "keygate_leak_reports_total", result="refused")
    async with http.post(gateway.proxy_url + PATH, data=body, headers=headers) as r:
        assert r.status == status
        assert full not in await r.text()
    assert set(await statuses(http, gateway, full, 4)) == {200}
    await counted(http, gateway, "refused", before + 1)


# -- by hand ------------------------------------------------------------------------------------------------

async def test_keys_report_leak_by_hand_with_the_pasted_key(
    http: aiohttp.ClientSession, gateway: Keygate,
) -> None:
    """`keygate keys report-leak <full key> --url ... --json`: revoked, 401 within 1 s, the secret never printed."""
    record, full = await gateway.key(name="ci", role="admin")
    assert set(await statuses(http, gateway, full, 4)) == {200}
    done = subprocess.run(
        [KEYGATE, "--config", str(gateway.config_path), "keys", "report-leak", full, "--url",
         "https://chat.example/msg/42", "--source", "chat", "--json"],
        env=clean_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert (shown["id"], shown["result"], shown["first_report"], shown["status"]) == (
        record.id, "revoked", True, "revoked")
    assert full[len(record.id):] not in done.stdout + done.stderr
    await refused_within(http, gateway, full, 1.0)
    details = [d for action, d in await audit_events(gateway, record.id) if action == "key.leaked"][0]
    assert (details["via"], details["url"], details["source"]) == ("manual", "https://chat.example/msg/42", "chat")

    again = subprocess.run([KEYGATE, "--config", str(gateway.config_path), "keys", "report-leak", record.id,
                            "--url", "https://elsewhere.example"], env=clean_env(), capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 0 and again.stdout.strip() == f"{record.id} reported leaked: already revoked " \
        "(reported before)"
