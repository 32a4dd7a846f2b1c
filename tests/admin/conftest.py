"""Admin API fixtures: a real runtime on each store, its admin app behind aiohttp's test server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.admin.listener import admin_app
from gateway.runtime import Runtime, runtime
from gateway.config.schema import Settings
from gateway.quickstart import demo_app
from gateway.manage.service import KeyService, bootstrap
from gateway.store import create_store


@dataclass
class Reply:
    status: int
    body: Any
    headers: Any


@dataclass
class Admin:
    """The admin listener of a running runtime, with a bootstrap admin key made by the CLI's service."""

    rt: Runtime
    client: TestClient
    root: str  # the full admin key
    root_id: str
    cli: KeyService  # acting as an operator at the command line

    async def call(self, method: str, path: str, *, key: str | None = "root", json: Any = None,
                   data: bytes | None = None, params: dict[str, Any] | None = None,
                   headers: dict[str, str] | None = None) -> Reply:
        sent = dict(headers or {})
        if key is not None:
            sent["Authorization"] = f"Bearer {self.root if key == 'root' else key}"
        async with self.client.request(method, path, json=json, data=data, params=params, headers=sent) as r:
            body = await r.json(content_type=None) if r.status != 204 else None
            return Reply(r.status, body, r.headers)

    async def key(self, **kwargs: Any) -> tuple[str, str]:
        """A key made at the command line: (id, full key)."""
        record, full = await self.cli.create_key(**kwargs)
        return record.id, full

    async def audit(self, **filters: Any) -> list[dict[str, Any]]:
        await self.rt.recorder.flush()
        reply = await self.call("GET", "/admin/v1/audit", params={"limit": 500, **filters})
        assert reply.status == 200, reply.body
        return reply.body["items"]


def settings_for(store_url: str, upstream_url: str, **extra: Any) -> Settings:
    return Settings.model_validate({
        "store": {"url": store_url}, "keys": {"argon2": {"memory_cost": 1024}},
        "upstreams": [{"name": "app", "url": upstream_url}], **extra,
    })


@asynccontextmanager
async def admin_on(store_url: str, **extra: Any) -> AsyncIterator[Admin]:
    """A runtime on ``store_url`` (with ``extra`` settings) and its admin listener, bootstrapped."""
    upstream = TestServer(demo_app())
    await upstream.start_server()
    if store_url.startswith("postgres"):
        store = create_store(store_url)
        await store.open()
        await bootstrap(store)
        await store.close()
    try:
        async with runtime(settings_for(store_url, str(upstream.make_url("/")), **extra)) as rt:
            async with TestClient(TestServer(admin_app(rt))) as client:
                cli = KeyService(rt.store, rt.settings, actor="cli:test")
                record, root = await cli.create_key(name="root", role="admin", servers=["admin"])
                yield Admin(rt, client, root, record.id, cli)
    finally:
        await upstream.close()


@pytest.fixture
async def admin(store_url: str) -> AsyncIterator[Admin]:
    async with admin_on(store_url) as a:
        yield a
