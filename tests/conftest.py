"""Shared fixtures: every test gets its own SQLite file or PostgreSQL database.

PostgreSQL tests use the machine's server (``TEST_PG_URL``, default
127.0.0.1:5432 as ``postgres``) with a database created for the test and
dropped afterwards. They never skip: if the server is unreachable they fail.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path

import asyncpg
import pytest

from gateway.config.schema import RedisSettings, Settings
from gateway.cache.redis_link import RedisLink
from gateway.manage.service import KeyService, bootstrap
from gateway.store import KeyStore, create_store

from .clocks import WALL_START, FakeClock
from .redis_server import SHARED_REDIS_URL, ClusterServers, RedisServer, drop_prefix, unique_prefix

PG_ADMIN_URL = os.environ.get("TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def pg_url_for(database: str) -> str:
    base, _, _ = PG_ADMIN_URL.rpartition("/")
    return f"{base}/{database}"


async def create_pg_database() -> str:
    name = f"keygate_test_{uuid.uuid4().hex[:16]}"
    conn = await asyncpg.connect(PG_ADMIN_URL)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name


async def drop_pg_database(name: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_URL)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
async def pg_database() -> AsyncIterator[str]:
    """A fresh, empty PostgreSQL database's URL, dropped after the test."""
    name = await create_pg_database()
    try:
        yield pg_url_for(name)
    finally:
        await drop_pg_database(name)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'keygate.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest) -> str:
    """The URL of an empty store of each kind: the contract suite runs against both."""
    return str(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_database"))


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[KeyStore]:
    """An opened, migrated store with the built-in roles."""
    s = create_store(store_url)
    await s.open()
    await bootstrap(s)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
def clock() -> FakeClock[datetime]:
    """The management plane's wall clock, standing still until a test moves it."""
    return FakeClock(WALL_START)


@pytest.fixture
def settings() -> Settings:
    # Cheapest argon2 settings the library accepts keep the suite fast; the
    # cost does not change any behaviour under test.
    return Settings.model_validate({"keys": {"argon2": {"time_cost": 1, "memory_cost": 1024, "parallelism": 1}}})


@pytest.fixture
def service(store: KeyStore, settings: Settings, clock: FakeClock[datetime]) -> KeyService:
    return KeyService(store, settings, actor="test:alice", clock=clock)


@pytest.fixture
def fixed_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """An environment for subprocesses: no stray KEYGATE_ settings from the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGATE_")}
    env["KEYGATE_STORE__URL"] = f"sqlite:///{tmp_path / 'cli.db'}"
    yield env


@pytest.fixture
def redis_url() -> str:
    return SHARED_REDIS_URL


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A Redis key prefix of this test's own on the shared server, its keys deleted afterwards."""
    prefix = unique_prefix()
    yield prefix
    drop_prefix(SHARED_REDIS_URL, prefix)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, which it may kill."""
    server = RedisServer(tmp_path).start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterServers]:
    """A Redis Cluster (three masters, one replica each) shared by the session's tests; none may kill it.

    Never skipped: without redis-server or redis-cli the tests that use it fail.
    """
    cluster = ClusterServers(tmp_path_factory.mktemp("redis-cluster")).start()
    yield cluster
    cluster.stop()


@pytest.fixture(params=["one-redis", "redis-cluster"])
def redis_on_both(request: pytest.FixtureRequest, redis_prefix: str) -> RedisSettings:
    """This test's Redis namespace on the shared server, then on the session's Redis Cluster.

    A module whose tests must hold on both overrides ``redis_settings`` with this.
    """
    if request.param == "one-redis":
        return RedisSettings(url=SHARED_REDIS_URL, prefix=redis_prefix, timeout=2.0)
    cluster: ClusterServers = request.getfixturevalue("redis_cluster")
    request.addfinalizer(lambda: cluster.drop_prefix(redis_prefix))
    return RedisSettings(url=cluster.url, prefix=redis_prefix, timeout=2.0, cluster=True)


@pytest.fixture
def redis_settings(redis_url: str, redis_prefix: str) -> RedisSettings:
    return RedisSettings(url=redis_url, prefix=redis_prefix, timeout=2.0)


@pytest.fixture
async def link(redis_settings: RedisSettings) -> AsyncIterator[RedisLink]:
    """A process's Redis link on the shared server, in this test's namespace."""
    connection = RedisLink(redis_settings)
    yield connection
    await connection.close()
