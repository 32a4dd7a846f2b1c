"""``keygate quickstart``: the whole thing on the embedded defaults, in one command.

Starts a demo upstream that echoes what it gets, the gateway in front of it
on an SQLite store in ``./keygate-quickstart/``, creates a read-only demo key
and prints ready-to-paste ``curl`` lines for a 200, a 401 and a 403.
"""

from __future__ import annotations

from pathlib import Path

import click
from aiohttp import web

from .runtime import StartupError
from .config.load import ConfigError, load_settings
from .config.schema import Settings
from .process.log_format import configure_logging
from .serve import event_loop_runner, serve_async
from .manage.service import KeyService, bootstrap
from .store import create_store
from .config.units import parse_listen

FOLDER = Path("keygate-quickstart")
DEMO_NAME = "quickstart demo"


# The demo upstream: answers every request with what it received, as JSON.

async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response({
        "method": request.method,
        "path": request.path_qs,
        "headers": dict(request.headers),
        "body_bytes": len(body),
        "message": "Hello from the demo upstream: Keygate let this request through.",
    })


def demo_app() -> web.Application:
    app = web.Application(client_max_size=1024**3)
    app.router.add_route("*", "/{path:.*}", echo)
    return app


async def _start_demo_upstream() -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(demo_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


async def _demo_key(settings: Settings) -> str:
    """A fresh read-only demo key; earlier demo keys are revoked (their secret is long gone)."""
    store = create_store(settings.store.url)
    await store.open()
    try:
        await bootstrap(store)
        service = KeyService(store, settings, actor="cli:quickstart")
        for old in await service.list_keys(status="active"):
            if old.name == DEMO_NAME:
                await service.revoke_key(old.id)
        _record, full = await service.create_key(name=DEMO_NAME, operations=["read"], rate_limit="60/minute")
        return full
    finally:
        await store.close()


def _banner(settings: Settings, upstream: str, key: str) -> str:
    host, port = parse_listen(settings.proxy.listen)
    base = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    admin_host, admin_port = parse_listen(settings.admin.listen)
    return f"""
Keygate is running on the embedded store ({FOLDER}/keygate.db).
  proxy   {base}  ->  demo upstream {upstream} (echoes what it receives)
  admin   http://{admin_host}:{admin_port}/healthz

Demo key (may read, may not write; shown only this once):

  {key}

Try it:

  # 200: the key may read
  curl -i -H "Authorization: Bearer {key}" {base}/hello

  # 401: no key
  curl -i {base}/hello

  # 403: the key may not write
  curl -i -X POST -H "Authorization: Bearer {key}" {base}/hello

Manage keys in another terminal: KEYGATE_STORE__URL={settings.store.url} keygate keys list
Press Ctrl-C to stop.
"""


async def _quickstart(base: Settings) -> int:
    demo_runner, upstream = await _start_demo_upstream()
    try:
        # The demo upstream is the only upstream, so no configured route can point elsewhere.
        settings = Settings.model_validate({
            **base.model_dump(), "upstreams": [{"name": "demo", "url": upstream}], "routes": [],
        })
        key = await _demo_key(settings)
        return await serve_async(
            settings, on_ready=lambda _rt: click.echo(_banner(settings, upstream, key)),
        )
    finally:
        await demo_runner.cleanup()


def quickstart(config_file: str | None, overrides: dict[str, object]) -> int:
    FOLDER.mkdir(exist_ok=True)
    try:
        settings = load_settings(config_file=config_file, overrides={
            "store.url": f"sqlite:///{FOLDER}/keygate.db", **overrides,
        })
    except ConfigError as exc:
        for line in exc.problems:
            click.echo(f"keygate: invalid configuration: {line}", err=True)
        return 2
    configure_logging("warning")
    try:
        return event_loop_runner()(_quickstart(settings))
    except StartupError as exc:
        click.echo(f"keygate: {exc} (choose other ports with --proxy-listen / --admin-listen)", err=True)
        return 1
