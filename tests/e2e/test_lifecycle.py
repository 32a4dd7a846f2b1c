"""Running gateways: CLI changes reach every worker within a second; SIGTERM drains cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable

import aiohttp
import pytest

from .conftest import bearer
from .harness import KEYGATE, Keygate, Upstream, clean_env


async def fresh_status(url: str, key: str) -> int:
    """One request on a new connection, so SO_REUSEPORT can hand it to any worker."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        async with http.get(url, headers=bearer(key)) as r:
            return r.status


async def test_cli_revoke_reaches_both_workers_within_a_second(
    upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A key revoked with the CLI is refused by every worker of `serve --workers 2` within 1 s."""
    keygate = Keygate(tmp_path_factory.mktemp("workers"), upstream.url, workers=2).start()
    try:
        log = keygate.log()
        pids = {json.loads(line)["pid"] for line in log.splitlines() if '"listening"' in line}
        assert len(pids) == 2
        record, key = await keygate.key(name="ci", role="admin")
        # Enough fresh connections that both workers have the key cached.
        warm = await asyncio.gather(*(fresh_status(keygate.proxy_url + "/echo", key) for _ in range(40)))
        assert set(warm) == {200}
        subprocess.run([KEYGATE, "--config", str(keygate.config_path), "keys", "revoke", record.id, "--yes"],
                       env=clean_env(), check=True, capture_output=True, timeout=30)
        revoked_at = time.monotonic()
        await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - revoked_at)))
        after = await asyncio.gather(*(fresh_status(keygate.proxy_url + "/echo", key) for _ in range(40)))
        assert set(after) == {401}
    finally:
        assert keygate.stop() == 0


async def test_sigterm_lets_in_flight_requests_finish(
    upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """SIGTERM during a slow request: it completes, exit status is 0, and its records are stored."""
    keygate = Keygate(tmp_path_factory.mktemp("drain"), upstream.url)
    keygate.config_path.write_text(keygate.config_path.read_text().replace(
        "[recorder]\nflush_interval = 0.2", "[recorder]\nflush_interval = 60"))
    keygate.start()
    record, key = await keygate.key(name="ci", role="admin")
    async with aiohttp.ClientSession() as http:
        slow = asyncio.create_task(http.get(keygate.proxy_url + "/slow/1.5", headers=bearer(key)))
        await asyncio.sleep(0.5)
        assert keygate.process is not None
        keygate.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        async with http.get(keygate.admin_url + "/readyz") as ready:
            assert ready.status == 503 and (await ready.json())["draining"]
        with pytest.raises(aiohttp.ClientConnectionError):
            async with http.get(keygate.proxy_url + "/echo", headers=bearer(key)):
                pass
        response = await slow
        assert response.status == 200 and (await response.json())["slept"] == 1.5
        response.release()
    code = await asyncio.to_thread(keygate.stop)
    assert code == 0
    async with keygate.service() as service:
        stored = await service.get_key(record.id)
        async with service.store.read() as tx:
            requests = await tx.list_requests(key_id=record.id)
    # The flush interval is 60 s: only the shutdown flush can have written these.
    assert stored.last_used_at is not None
    assert [r.path for r in requests] == ["/slow/1.5"]



@pytest.mark.parametrize("workers", [1, 2], ids=["one process", "supervisor and two workers"])
async def test_sigterm_repeated_through_the_shutdown_still_exits_0(
    upstream: Upstream, tmp_path_factory: pytest.TempPathFactory, workers: int
) -> None:
    """A SIGTERM sent again while keygate is already stopping (an impatient operator, a second
    kill from an orchestrator) changes nothing: the shutdown finishes and the exit status is 0."""
    keygate = Keygate(tmp_path_factory.mktemp("again"), upstream.url, workers=workers).start()
    process = keygate.process
    assert process is not None
    deadline = time.monotonic() + 30
    # Every 2 ms until it exits: one lands in each stage of the shutdown, the last ones too.
    while process.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.002)
    assert keygate.stop() == 0
    assert '"stopped"' in keygate.log()


# --- a worker that stops turning its event loop -----------------------------------------------------------


def _worker_pids(keygate: Keygate) -> list[int]:
    return [json.loads(line)["pid"] for line in keygate.log().splitlines() if '"listening"' in line]


def _wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


async def test_a_worker_that_stops_answering_is_killed_and_replaced(
    upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A worker frozen past proxy.worker_timeout is logged, killed and replaced; the gateway keeps answering."""
    keygate = Keygate(tmp_path_factory.mktemp("frozen"), upstream.url, workers=2,
                      proxy="worker_timeout = 2\n").start()
    try:
        frozen = _worker_pids(keygate)[0]
        os.kill(frozen, signal.SIGSTOP)  # as a loop blocked in a call that never returns
        assert await asyncio.to_thread(_wait_for, lambda: len(_worker_pids(keygate)) == 3, 20), keygate.log()
        killed = [json.loads(line) for line in keygate.log().splitlines() if '"worker_killed"' in line]
        assert [(k["pid"], k["reason"]) for k in killed] == [(frozen, "unresponsive")]
        assert killed[0]["seconds"] >= 2  # silent longer than worker_timeout, rounded to 0.1 s
        _, key = await keygate.key(name="ci", role="admin")
        assert set(await asyncio.gather(*(fresh_status(keygate.proxy_url + "/echo", key) for _ in range(20)))) == {200}
    finally:
        assert keygate.stop() == 0


async def test_sigusr1_writes_every_workers_stacks_to_the_log_and_stops_nothing(
    upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """SIGUSR1 to `keygate serve --workers 2`: both workers' stacks in the log; both keep serving."""
    keygate = Keygate(tmp_path_factory.mktemp("stacks"), upstream.url, workers=2).start()
    try:
        assert keygate.process is not None
        keygate.process.send_signal(signal.SIGUSR1)
        dumped = await asyncio.to_thread(
            _wait_for, lambda: keygate.log().count("(most recent call first)") >= 2, 10)
        assert dumped, keygate.log()
        # each worker's main thread, inside its event loop, in one piece (one worker after the other)
        assert await asyncio.to_thread(_wait_for, lambda: keygate.log().count("in run_worker\n") == 2, 5), keygate.log()
        # each dump after a line naming its worker
        named = [json.loads(line)["pid"] for line in keygate.log().splitlines() if '"event": "stacks"' in line]
        assert sorted(named) == sorted(_worker_pids(keygate))
        for pid in named:
            after = keygate.log().split(f'"event": "stacks", "pid": {pid}', 1)[1]
            assert any(line.startswith(("Thread 0x", "Current thread 0x")) for line in after.splitlines()[1:4]), after[:300]
        _, key = await keygate.key(name="ci", role="admin")
        assert set(await asyncio.gather(*(fresh_status(keygate.proxy_url + "/echo", key) for _ in range(20)))) == {200}
        assert len(_worker_pids(keygate)) == 2 and "worker_exited" not in keygate.log()
    finally:
        assert keygate.stop() == 0


async def test_a_worker_that_never_finishes_its_shutdown_is_killed(
    upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """SIGTERM with a frozen worker: the supervisor kills it past the grace and exits 1, rather than hang."""
    keygate = Keygate(tmp_path_factory.mktemp("unstoppable"), upstream.url, workers=2,
                      proxy="worker_timeout = 600\n")
    keygate.config_path.write_text(keygate.config_path.read_text().replace("shutdown_grace = 10", "shutdown_grace = 0"))
    keygate.start()
    frozen = _worker_pids(keygate)[1]
    os.kill(frozen, signal.SIGSTOP)
    code = await asyncio.to_thread(keygate.stop, signal.SIGTERM, 40)
    killed = [json.loads(line) for line in keygate.log().splitlines() if '"worker_killed"' in line]
    assert [(k["pid"], k["reason"]) for k in killed] == [(frozen, "shutdown_stuck")]
    assert code == 1
