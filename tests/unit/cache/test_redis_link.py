"""Naming and addressing on a Redis Cluster: hash tags, and one node's URL built from redis.url."""

from __future__ import annotations

import pytest
from redis.cluster import key_slot

from gateway.cache.redis_link import RedisLink, node_url
from gateway.config.schema import RedisSettings


@pytest.mark.parametrize(("url", "host", "port", "expected"), [
    ("", "10.0.0.5", 7001, "redis://10.0.0.5:7001"),
    ("redis://seed:6379", "10.0.0.5", 7001, "redis://10.0.0.5:7001"),
    ("rediss://user:p%40ss@seed:6380/0?ssl_cert_reqs=none", "10.0.0.5", 7001,
     "rediss://user:p%40ss@10.0.0.5:7001/0?ssl_cert_reqs=none"),
    ("redis://:secret@seed:6379", "fd00::5", 7001, "redis://:secret@[fd00::5]:7001"),
], ids=["no-url", "plain", "tls-credentials-options", "ipv6"])
def test_node_url_keeps_scheme_credentials_and_options(url: str, host: str, port: int, expected: str) -> None:
    """The subscriber reaches the channel's master with redis.url's scheme, credentials and options."""
    settings = RedisSettings(url=url, nodes=[] if url else ["seed:6379"], cluster=True)
    assert node_url(settings, host, port) == expected


async def test_on_a_cluster_a_key_ids_names_share_one_hash_slot() -> None:
    """Every name of one key id hashes to one slot, whatever its kind."""
    link = RedisLink(RedisSettings(url="redis://127.0.0.1:1", prefix="kg:", cluster=True))
    try:
        names = [link.tagged(kind, "kg_7Hq2ZrT9xLmP") for kind in ("rl:", "epoch:", "vk:")]
        assert names[0] == "kg:rl:{kg_7Hq2ZrT9xLmP}"
        assert len({key_slot(name.encode()) for name in [*names, names[2] + ":3:1:digest"]}) == 1
    finally:
        await link.close()


async def test_on_one_server_names_stay_as_they_were() -> None:
    """No hash tag on one server: buckets and epochs written by earlier versions carry over an upgrade."""
    link = RedisLink(RedisSettings(url="redis://127.0.0.1:1", prefix="kg:"))
    try:
        assert link.tagged("rl:", "kg_7Hq2ZrT9xLmP") == "kg:rl::kg_7Hq2ZrT9xLmP"
    finally:
        await link.close()
