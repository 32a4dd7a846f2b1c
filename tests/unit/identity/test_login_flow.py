"""`keygate login` and `logout` with the credentials file changing under them (another terminal, another login)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gateway.identity.credentials import Credential, credentials_path, load, save
from gateway.identity.device import DeviceCode, DeviceLogin, GatewayInfo, LoginError
from gateway.identity.login import login, logout

GATEWAY = "https://gw.example"
OPS = Credential(GATEWAY, "ops", "alice@example.com", "kg_BBBBBBBBBBBB", "kg_BBBBBBBBBBBBsecret")


class SignedInElsewhereMeanwhile(DeviceLogin):
    """A sign-in during whose wait the person signs in to org ops from another terminal."""

    environ: dict[str, str] = {}

    async def gateway_info(self, gateway: str) -> GatewayInfo:
        return GatewayInfo(gateway, "https://idp.example", "keygate-cli", gateway + "/token", gateway + "/revoke")

    async def start(self, info: GatewayInfo) -> tuple[DeviceCode, str]:
        return DeviceCode("device", "WDJB-MJHT", "https://idp.example/device", None, 600, 5), "https://idp.example/t"

    async def wait(self, info: GatewayInfo, code: DeviceCode, token_endpoint: str) -> str:
        path = credentials_path(self.environ)
        save(path, [*load(path), OPS])  # the other terminal's `keygate login --org ops` finished first
        return "id.token"

    async def exchange(self, info: GatewayInfo, id_token: str, org: str | None) -> dict[str, Any]:
        return {"access_token": "kg_AAAAAAAAAAAAsecret", "key_id": "kg_AAAAAAAAAAAA", "org": "acme",
                "user": "alice@example.com"}


async def test_a_login_keeps_what_another_login_stored_while_it_waited(tmp_path: Path) -> None:
    environ = {"XDG_CONFIG_HOME": str(tmp_path)}
    SignedInElsewhereMeanwhile.environ = environ
    await login(GATEWAY, "acme", lambda line: None, environ=environ, flow=SignedInElsewhereMeanwhile)
    assert sorted(e.org for e in load(credentials_path(environ))) == ["acme", "ops"]


@pytest.mark.parametrize(("case", "status", "body"), [
    ("a captive portal's page", 200, "<html>Sign in to the Wi-Fi</html>"),
    ("an ingress's own sign-in wall", 401, "<html>401 Authorization Required</html>"),
    ("another key revoked", 200, '{"revoked": "kg_ZZZZZZZZZZZZ"}'),
])
async def test_logout_keeps_the_key_unless_the_gateway_says_it_is_revoked(
    tmp_path: Path, case: str, status: int, body: str,
) -> None:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(status=status, text=body)

    app = web.Application()
    app.router.add_post("/.well-known/keygate/revoke", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    stored = Credential(f"http://127.0.0.1:{port}", "acme", "alice@example.com", "kg_AAAAAAAAAAAA", "kg_AAAAsecret")
    environ = {"XDG_CONFIG_HOME": str(tmp_path)}
    save(credentials_path(environ), [stored])
    try:
        with pytest.raises(LoginError, match="still stored"):
            await logout(None, None, lambda line: None, environ=environ)
    finally:
        await runner.cleanup()
    assert load(credentials_path(environ)) == [stored]
