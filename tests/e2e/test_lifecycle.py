"""Running gateways: CLI changes reach every worker within a second; SIGTERM drains cleanly."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time

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
