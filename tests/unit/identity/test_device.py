"""The client side of `keygate login` against a provider that answers what no honest one would.

The real device grant is in tests/integrations/test_login.py; here a small
HTTP server on loopback plays a hostile or broken provider, so the CLI's
bounds are proven: it neither waits for ever nor fails with a traceback.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.identity.device import MAX_EXPIRES_IN, MAX_INTERVAL, DeviceLogin, GatewayInfo, LoginError, checked_url


class Provider:
    """A provider whose device authorization answer is whatever the test sets."""

    def __init__(self) -> None:
        self.device_answer: str = "{}"
        self.exchange_answer: str = "{}"
        self.url = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self.discovery)
        app.router.add_post("/device", self.device)
        app.router.add_post("/.well-known/keygate/token", self.exchange)
        app.router.add_get("/.well-known/keygate", self.keygate)
        return app

    async def discovery(self, request: web.Request) -> web.StreamResponse:
        """Sent in two pieces, as a larger document arrives (TLS records, TCP segments)."""
        body = json.dumps({"issuer": self.url, "device_authorization_endpoint": self.url + "/device",
                           "token_endpoint": self.url + "/token"}).encode()
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await response.write(body[:20])
        await asyncio.sleep(0.05)
        await response.write(body[20:])
        await response.write_eof()
        return response

    async def device(self, request: web.Request) -> web.Response:
        return web.Response(text=self.device_answer, content_type="application/json")

    async def keygate(self, request: web.Request) -> web.Response:
        """The gateway's discovery, failing with the text the test sets."""
        return web.json_response({"error": "server_error", "error_description": self.exchange_answer}, status=500)

    async def exchange(self, request: web.Request) -> web.Response:
        """The gateway's token endpoint (the same server plays the gateway)."""
        return web.Response(text=self.exchange_answer, content_type="application/json")


@pytest.fixture
async def provider() -> AsyncIterator[Provider]:
    running = Provider()
    runner = web.AppRunner(running.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    running.url = f"http://127.0.0.1:{port}"
    try:
        yield running
    finally:
        await runner.cleanup()


async def start(provider: Provider, answer: dict[str, Any] | str) -> Any:
    provider.device_answer = answer if isinstance(answer, str) else json.dumps(answer)
    info = GatewayInfo("http://127.0.0.1:1", provider.url, "keygate-cli", "", "")
    async with aiohttp.ClientSession() as session:
        code, _ = await DeviceLogin(session).start(info)
    return code


BASE = {"device_code": "d", "user_code": "U", "verification_uri": "https://idp.example/device"}


async def test_an_answer_that_arrives_in_pieces_is_read_whole(provider: Provider) -> None:
    """The discovery document comes in two pieces 50 ms apart (a provider's is several KB: several TLS records)."""
    code = await start(provider, BASE)
    assert (code.user_code, code.interval) == ("U", 5)


@pytest.mark.parametrize(("case", "extra", "interval", "expires_in"), [
    ("a polling interval of a billion seconds", {"interval": 10**9}, MAX_INTERVAL, 600),
    ("a code that lives for a thousand years", {"expires_in": 31_536_000_000}, 5, MAX_EXPIRES_IN),
    ("an interval of 0", {"interval": 0}, 1, 600),
])
async def test_the_provider_cannot_make_the_cli_wait_for_ever_or_spin(
    provider: Provider, case: str, extra: dict[str, Any], interval: int, expires_in: int,
) -> None:
    code = await start(provider, {**BASE, **extra})
    assert (code.interval, code.expires_in) == (interval, expires_in)


@pytest.mark.parametrize("answer", [
    '{"device_code": "d", "user_code": "U", "verification_uri": "https://idp.example/device", "interval": Infinity}',
    '{"device_code": "d", "user_code": "U", "verification_uri": "https://idp.example/device", "expires_in": NaN}',
    '{"device_code": "d", "user_code": "U", "verification_uri": "https://idp.example/device", "interval": 1e400}',
])
async def test_a_number_that_is_no_number_is_an_incomplete_answer(provider: Provider, answer: str) -> None:
    with pytest.raises(LoginError, match="incomplete"):
        await start(provider, answer)


@pytest.mark.parametrize(("case", "field", "value"), [
    ("a terminal escape in the person's code", "user_code", "\x1b]0;pwned\x07WDJB"),
    ("a newline in where to go", "verification_uri", "https://idp.example/device\nopen https://evil.example"),
])
async def test_what_the_cli_shows_of_the_provider_is_one_line_of_text(
    provider: Provider, case: str, field: str, value: str,
) -> None:
    with pytest.raises(LoginError, match="incomplete"):
        await start(provider, {**BASE, field: value})


GOOD = {"access_token": "kg_AAAAAAAAAAAAsecret", "key_id": "kg_AAAAAAAAAAAA", "org": "acme",
        "user": "alice@example.com"}


@pytest.mark.parametrize(("case", "answer"), [
    # A lone surrogate is JSON, but no TOML: saved, it would make the whole credentials file unreadable.
    ("a lone surrogate in the user", '{"access_token": "k", "key_id": "kg_A", "org": "acme", "user": "\\ud800"}'),
    ("a terminal escape in the org", json.dumps({**GOOD, "org": "acme\x1b[2J"})),
    ("a newline in the key", json.dumps({**GOOD, "access_token": "kg_A\nkg_B"})),
])
async def test_the_gateways_answer_must_be_text_the_file_and_terminal_can_hold(
    provider: Provider, case: str, answer: str,
) -> None:
    provider.exchange_answer = answer
    info = GatewayInfo(provider.url, provider.url, "keygate-cli", provider.url + "/.well-known/keygate/token", "")
    async with aiohttp.ClientSession() as session:
        with pytest.raises(LoginError, match="lacks"):
            await DeviceLogin(session).exchange(info, "id.token.here", None)


@pytest.mark.parametrize(("url", "allowed"), [
    ("https://gw.example/", True),
    ("http://127.0.0.1:8000", True),
    ("http://127.1.2.3", True),
    ("http://[::1]:8000", True),
    ("http://localhost:8000", True),
    ("http://gw.example", False),
    # Only begins like a loopback address: a name anyone can point anywhere, the ID token and key in clear.
    ("http://127.attacker.example", False),
    ("http://127.0.0.1.attacker.example", False),
])
def test_http_only_for_loopback(url: str, allowed: bool) -> None:
    if allowed:
        assert checked_url(url, "gateway") == url.rstrip("/")
    else:
        with pytest.raises(LoginError, match="use https"):
            checked_url(url, "gateway")


async def test_a_refusals_text_reaches_the_terminal_without_its_control_characters(provider: Provider) -> None:
    """What a gateway or provider says of a failure is shown to the person: no escape may rewrite their terminal."""
    provider.exchange_answer = "down\x1b]0;owned\x07\x1b[2J for maintenance"
    async with aiohttp.ClientSession() as session:
        with pytest.raises(LoginError) as refused:
            await DeviceLogin(session).gateway_info(provider.url)
    assert str(refused.value).isprintable() and "down" in str(refused.value)
