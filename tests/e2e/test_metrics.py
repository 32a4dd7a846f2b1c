"""/metrics of a running ``keygate serve``: the series a Prometheus user graphs and alerts on.

Requests by decision, reason, status class and upstream after real requests
(200, 401, 403, 429, 502), upstream errors by upstream and kind, the build
info, the process collector's numbers, the change-propagation histogram after
a revoke, and no key id in any series.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway import __version__

from .conftest import bearer, metric
from .harness import Keygate, Upstream, refusing_port

KEY_ID = re.compile(r"kga?_[0-9A-Za-z]{12}")


@pytest.fixture(scope="module")
def metered(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keygate]:
    """A gateway with two upstreams: ``app`` (the test upstream) and ``down`` (a port nobody listens on)."""
    config = (
        f'[[upstreams]]\nname = "down"\nurl = "http://127.0.0.1:{refusing_port()}"\nconnect_timeout = 2\n'
        '[[routes]]\npath = "/down/*"\nupstream = "down"\noperation = "read"\n'
    )
    keygate = Keygate(tmp_path_factory.mktemp("metered"), upstream.url, config=config).start()
    yield keygate
    keygate.stop()


async def samples(http: aiohttp.ClientSession, gateway: Keygate) -> list[tuple[str, dict[str, str], float]]:
    async with http.get(gateway.admin_url + "/metrics") as r:
        assert r.status == 200
        text = await r.text()
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


# case, method, path, key ("read": operation read, 1/hour; None: no key), status, labels of the series it counts in
CASES = [
    ("allowed", "GET", "/x", "read", 200, {"decision": "allowed", "reason": "", "status": "2xx", "upstream": "app"}),
    ("no key", "GET", "/x", None, 401,
     {"decision": "denied", "reason": "no_credentials", "status": "4xx", "upstream": ""}),
    ("not granted", "POST", "/x", "read", 403,
     {"decision": "denied", "reason": "insufficient_scope", "status": "4xx", "upstream": "app"}),
    ("rate limited", "GET", "/x", "read", 429,
     {"decision": "denied", "reason": "rate_limited", "status": "4xx", "upstream": "app"}),
    ("upstream down", "GET", "/down/x", "fresh", 502,
     {"decision": "failed", "reason": "upstream_unavailable", "status": "5xx", "upstream": "down"}),
]


@pytest.fixture(scope="module")
def read_key(metered: Keygate) -> str:
    """A key that may read once an hour: its first GET is allowed (the ``allowed`` case), later ones limited."""
    _, key = asyncio.run(metered.key(name="reader", operations=["read"], rate_limit="1/hour"))
    return key


@pytest.mark.parametrize(("case", "method", "path", "key", "status", "labels"), CASES, ids=[c[0] for c in CASES])
async def test_each_answer_counts_in_its_series(
    http: aiohttp.ClientSession, metered: Keygate, read_key: str,
    case: str, method: str, path: str, key: str | None, status: int, labels: dict[str, str],
) -> None:
    """A request counts once, in the series of its decision, reason, status class and upstream."""
    if key == "fresh":
        _, token = await metered.key(name="fresh", operations=["read"])
        headers = bearer(token)
    else:
        headers = bearer(read_key) if key == "read" else {}
    before = await metric(http, metered, "keygate_requests_total", **labels)
    async with http.request(method, metered.proxy_url + path, headers=headers) as r:
        assert r.status == status
    assert await metric(http, metered, "keygate_requests_total", **labels) == before + 1


async def test_upstream_errors_name_the_upstream_and_the_kind(http: aiohttp.ClientSession, metered: Keygate) -> None:
    """A refused connection counts as kind connect of the upstream that refused it, not of the others."""
    _, token = await metered.key(name="errors", operations=["read"])
    before = await metric(http, metered, "keygate_upstream_errors_total", upstream="down", kind="connect")
    async with http.get(metered.proxy_url + "/down/y", headers=bearer(token)) as r:
        assert r.status == 502
    assert await metric(http, metered, "keygate_upstream_errors_total", upstream="down", kind="connect") == before + 1
    assert await metric(http, metered, "keygate_upstream_errors_total", upstream="app") == 0


async def test_build_info_and_process_metrics(http: aiohttp.ClientSession, metered: Keygate) -> None:
    """keygate_build_info carries the version and is 1; the process collector's families are there."""
    found = {name: (labels, value) for name, labels, value in await samples(http, metered)}
    assert found["keygate_build_info"] == ({"version": __version__}, 1.0)
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
                 "process_start_time_seconds", "process_max_fds", "process_virtual_memory_bytes"):
        assert found[name][1] > 0, name


async def test_a_revoke_is_one_propagation_observation(http: aiohttp.ClientSession, metered: Keygate) -> None:
    """The worker that drops a revoked key from its cache observes the change's delay once (via the feed)."""
    record, token = await metered.key(name="revoked", operations=["read"])
    async with http.get(metered.proxy_url + "/x", headers=bearer(token)) as r:
        assert r.status == 200  # cached now
    name = "keygate_change_propagation_seconds_count"
    before = await metric(http, metered, name, via="feed")
    async with metered.service() as service:
        await service.revoke_key(record.id)
    async with asyncio.timeout(5):  # the feed is polled 4 times a second
        while await metric(http, metered, name, via="feed") < before + 1:
            await asyncio.sleep(0.05)
    assert await metric(http, metered, name, via="feed") == before + 1
    assert await metric(http, metered, "keygate_change_propagation_seconds_bucket", via="feed", le="+Inf") == before + 1
    async with http.get(metered.proxy_url + "/x", headers=bearer(token)) as r:
        assert r.status == 401


async def test_no_series_carries_a_key_id(http: aiohttp.ClientSession, metered: Keygate, read_key: str) -> None:
    """Keys are never a label: a series per key would grow without bound (README, metrics)."""
    async with http.get(metered.proxy_url + "/x", headers=bearer(read_key)) as r:
        assert r.status in (200, 429)
    found = await samples(http, metered)
    assert any(name == "keygate_requests_total" for name, _, _ in found)
    assert [(name, labels) for name, labels, _ in found if any(KEY_ID.search(v) for v in labels.values())] == []
