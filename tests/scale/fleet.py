"""A fleet for scale tests: several ``keygate serve`` replicas (each with workers) on one PostgreSQL and
one Redis or one Redis Cluster."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from ..conftest import create_pg_database, drop_pg_database, pg_url_for
from ..e2e.harness import KEYGATE, Keygate, Upstream, clean_env


@dataclass
class Fleet:
    folder: Path
    upstream: Upstream
    redis_url: str
    redis_prefix: str
    replicas_count: int = 3
    workers: int = 2
    policy: str = "redis"
    extra: str = ""
    cluster: bool = False  # redis_url is a seed node of a Redis Cluster
    replicas: list[Keygate] = field(default_factory=list)
    database: str = ""

    @property
    def store_url(self) -> str:
        return pg_url_for(self.database)

    def cli_env(self, *, redis: bool = True) -> dict[str, str]:
        """The environment an operator's CLI would have, with or without redis.url."""
        env = {"KEYGATE_STORE__URL": self.store_url, "KEYGATE_KEYS__ARGON2__MEMORY_COST": "1024"}
        if redis:
            env |= {"KEYGATE_REDIS__URL": self.redis_url, "KEYGATE_REDIS__PREFIX": self.redis_prefix,
                    "KEYGATE_REDIS__CLUSTER": "true" if self.cluster else "false"}
        return clean_env(**env)

    def cli(self, *args: str, redis: bool = True) -> str:
        result = subprocess.run([KEYGATE, *args], env=self.cli_env(redis=redis), capture_output=True, text=True,
                                timeout=60, stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise AssertionError(f"keygate {' '.join(args)} exited {result.returncode}: {result.stderr}")
        return result.stdout

    def create_key(self, *args: str) -> tuple[str, str]:
        """A new key's (id, full key), made with the CLI."""
        record = json.loads(self.cli("keys", "create", "--name", "scale", "--json", *args))
        return record["id"], record["key"]

    def start(self) -> "Fleet":
        self.database = asyncio.run(create_pg_database())
        self.cli("migrate", redis=False)
        config = (
            # A generous timeout: these tests measure the policies, and a busy test machine
            # must not push a replica onto its fallback (the failure tests kill Redis outright).
            f'[redis]\nurl = "{self.redis_url}"\nprefix = "{self.redis_prefix}"\ntimeout = 2\n'
            f'cluster = {"true" if self.cluster else "false"}\n'
            f'[ratelimit]\npolicy = "{self.policy}"\n' + self.extra
        )
        for _ in range(self.replicas_count):
            self.replicas.append(Keygate(self.folder, self.upstream.url, config=config, workers=self.workers,
                                         store_url=self.store_url))
        for replica in self.replicas:
            replica.start()
        return self

    def stop(self) -> None:
        for replica in self.replicas:
            if replica.process is not None:
                replica.stop()
        if self.database:
            asyncio.run(drop_pg_database(self.database))


async def statuses(key: str, urls: Iterable[str], path: str = "/echo") -> list[tuple[str, int, dict[str, str]]]:
    """One request per URL, each on a new connection so the replicas' workers share them; in order."""
    async def one(http: aiohttp.ClientSession, url: str) -> tuple[str, int, dict[str, str]]:
        async with http.get(url + path, headers={"Authorization": f"Bearer {key}"}) as r:
            await r.read()
            return url, r.status, dict(r.headers)

    # A request a replica never answers fails the test in a minute, not aiohttp's default five.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True, limit=16),
                                     timeout=aiohttp.ClientTimeout(total=60)) as http:
        return list(await asyncio.gather(*(one(http, url) for url in urls)))


def by_status(results: Iterable[tuple[str, int, dict[str, str]]]) -> Counter[int]:
    return Counter(status for _, status, _ in results)
