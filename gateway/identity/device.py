"""The client side of ``keygate login``: the OAuth 2.0 device grant (RFC 8628), then the exchange.

1. ``GET {gateway}/.well-known/keygate``: the sign-in provider (issuer) and
   the client id the gateway expects ID tokens for.
2. The provider's discovery document: its device authorization and token
   endpoints (its ``issuer`` must be the one the gateway named).
3. The device authorization request; the person is shown the user code and
   where to enter it.
4. Polling the token endpoint at ``interval`` (5 s more after each
   ``slow_down``) until the person approves (an ID token), denies
   (``access_denied``) or the code expires (``expired_token``).
5. The ID token exchanged at the gateway for the person's agent key.

Every failure is a :class:`LoginError` whose message is one line for the
person; nothing secret (the device code, the ID token, the key) is in one.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from ..config.schema import loopback_host

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"
SCOPE = "openid email profile"
SLOW_DOWN_STEP = 5  # seconds added to the interval by each slow_down (RFC 8628 section 3.5)
MAX_ANSWER = 256 * 1024
# The most a provider may make the CLI wait between polls, and for a code: RFC 8628 suggests 5 s and
# 1800 s; beyond these a provider (broken, or hostile) would leave the person at a CLI that never ends.
MAX_INTERVAL = 60
MAX_EXPIRES_IN = 3600


class LoginError(Exception):
    """``keygate login`` cannot go on; the message is one line for the person."""

    def __init__(self, message: str) -> None:
        # SECURITY: messages quote what a gateway or provider answered; a control character there (a terminal
        # escape, a newline) must not reach the person's terminal as it came.
        super().__init__(printable(message))


def printable(text: str) -> str:
    """``text`` with each character that is not printable (a control character, a lone surrogate) as ``?``."""
    return "".join(c if c.isprintable() else "?" for c in text)


@dataclass(frozen=True, slots=True)
class GatewayInfo:
    gateway: str
    issuer: str
    client_id: str
    token_endpoint: str
    revocation_endpoint: str


@dataclass(frozen=True, slots=True)
class DeviceCode:
    device_code: str
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    expires_in: int
    interval: int


def checked_url(url: str, what: str) -> str:
    """An http(s) URL with a host; http only for loopback (keys and ID tokens travel over it)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LoginError(f"{what} {url!r} is not an http(s) URL")
    if parts.scheme == "http" and not loopback_host(parts.hostname):
        raise LoginError(f"{what} {url!r}: use https (http only for 127.0.0.1 and localhost)")
    return url.rstrip("/")


class DeviceLogin:
    """One sign-in: discovery, the device grant and the exchange, over one HTTP session."""

    def __init__(self, session: aiohttp.ClientSession, *, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.session = session
        self.sleep = sleep
        self.clock = clock

    async def _json(self, method: str, url: str, what: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
        try:
            async with self.session.request(method, url, allow_redirects=False, **kwargs) as r:
                raw = await read_at_most(r.content, MAX_ANSWER + 1)
                status = r.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise LoginError(f"{what} could not be reached at {url}: {exc or type(exc).__name__}") from None
        if len(raw) > MAX_ANSWER:
            raise LoginError(f"{what} answered more than {MAX_ANSWER} bytes")
        try:
            answer = json.loads(raw)
        except ValueError:
            raise LoginError(f"{what} answered {status} without JSON (is {url} right?)") from None
        if not isinstance(answer, dict):
            raise LoginError(f"{what} answered {status} with JSON that is not an object")
        return status, answer

    async def gateway_info(self, gateway: str) -> GatewayInfo:
        gateway = checked_url(gateway, "gateway")
        status, doc = await self._json("GET", gateway + "/.well-known/keygate", "the gateway")
        if status == 404 or (status == 200 and not doc.get("issuer")):
            raise LoginError(f"{gateway} does not offer sign-in (login.issuer is not set there)")
        if status != 200:
            raise LoginError(f"the gateway answered {status}: {doc.get('error_description') or doc.get('error')}")
        if not doc.get("client_id"):
            raise LoginError("the gateway's /.well-known/keygate names no client_id")
        # SECURITY: the ID token goes only to the gateway the person named, at Keygate's own paths,
        # whatever the document says (it could point elsewhere).
        return GatewayInfo(gateway, checked_url(str(doc["issuer"]), "the sign-in provider"), str(doc["client_id"]),
                           gateway + "/.well-known/keygate/token", gateway + "/.well-known/keygate/revoke")

    async def start(self, info: GatewayInfo) -> tuple[DeviceCode, str]:
        """The device code (to show the person) and the provider's token endpoint."""
        status, doc = await self._json("GET", info.issuer + "/.well-known/openid-configuration",
                                       "the sign-in provider")
        if status != 200:
            raise LoginError(f"the sign-in provider's discovery answered {status}")
        if str(doc.get("issuer", "")).rstrip("/") != info.issuer:
            raise LoginError(f"the sign-in provider at {info.issuer} calls itself {doc.get('issuer')!r}")
        device_endpoint, token_endpoint = doc.get("device_authorization_endpoint"), doc.get("token_endpoint")
        if not device_endpoint or not token_endpoint:
            raise LoginError("the sign-in provider does not offer the device grant (RFC 8628)")
        device_endpoint = checked_url(str(device_endpoint), "device authorization endpoint")
        status, answer = await self._json("POST", device_endpoint, "the sign-in provider",
                                          data={"client_id": info.client_id, "scope": SCOPE})
        if status != 200:
            raise LoginError(f"the sign-in provider refused to start: {_oauth_error(answer)}")
        try:
            if not all(_printable(answer.get(name)) for name in ("user_code", "verification_uri")) \
                    or not _printable(answer.get("verification_uri_complete") or ""):
                raise ValueError("not one line of text")
            code = DeviceCode(
                str(answer["device_code"]), str(answer["user_code"]), str(answer["verification_uri"]),
                str(answer["verification_uri_complete"]) if answer.get("verification_uri_complete") else None,
                min(MAX_EXPIRES_IN, int(answer.get("expires_in", 600))),
                min(MAX_INTERVAL, max(1, int(answer.get("interval", 5)))),
            )
        except (KeyError, TypeError, ValueError, OverflowError):  # OverflowError: Infinity or 1e400
            raise LoginError("the sign-in provider's device authorization answer is incomplete") from None
        return code, checked_url(str(token_endpoint), "token endpoint")

    async def wait(self, info: GatewayInfo, code: DeviceCode, token_endpoint: str) -> str:
        """Poll until the person decides; the ID token on approval."""
        interval = code.interval
        deadline = self.clock() + code.expires_in
        while True:
            await self.sleep(interval)
            status, answer = await self._json("POST", token_endpoint, "the sign-in provider", data={
                "grant_type": DEVICE_GRANT, "device_code": code.device_code, "client_id": info.client_id})
            if status == 200:
                id_token = answer.get("id_token")
                if not isinstance(id_token, str) or not id_token:
                    raise LoginError("the sign-in provider answered without an ID token (scope openid?)")
                return id_token
            error = answer.get("error")
            if error == "authorization_pending":
                pass
            elif error == "slow_down":
                interval += SLOW_DOWN_STEP
            elif error == "access_denied":
                raise LoginError("sign-in was denied at the provider")
            elif error == "expired_token":
                raise LoginError("the code expired before it was approved: run `keygate login` again")
            else:
                raise LoginError(f"the sign-in provider refused: {_oauth_error(answer)}")
            if self.clock() > deadline + interval:
                raise LoginError("the code expired before it was approved: run `keygate login` again")

    async def exchange(self, info: GatewayInfo, id_token: str, org: str | None) -> dict[str, Any]:
        form = {"grant_type": TOKEN_EXCHANGE, "subject_token_type": ID_TOKEN, "subject_token": id_token}
        if org:
            form["org"] = org
        status, answer = await self._json("POST", info.token_endpoint, "the gateway", data=form)
        if status != 200:
            raise LoginError(f"the gateway refused the sign-in: {_oauth_error(answer)}")
        for name in ("access_token", "key_id", "org", "user"):
            if not _printable(answer.get(name)):
                raise LoginError(f"the gateway's answer lacks {name} (as one line of text)")
        return answer


def _printable(value: Any) -> bool:
    """Text the CLI may print and store: a string of printable characters (no control character, which
    could rewrite the person's terminal, and no lone surrogate, which no TOML file can hold)."""
    return isinstance(value, str) and value.isprintable()


async def read_at_most(content: aiohttp.StreamReader, limit: int) -> bytes:
    """The body up to its end, or its first ``limit`` bytes: ``read(n)`` alone answers what has arrived so far,
    which for a document of a few KB over TLS may be its first piece."""
    raw = b""
    while len(raw) < limit and (piece := await content.read(limit - len(raw))):
        raw += piece
    return raw


def _oauth_error(answer: dict[str, Any]) -> str:
    error, description = answer.get("error"), answer.get("error_description")
    text = f"{error}: {description}" if error and description else str(error or description or "no reason given")
    return " ".join(text.split())[:300]


__all__ = ["DeviceCode", "DeviceLogin", "GatewayInfo", "LoginError", "checked_url", "printable",
           "read_at_most"]
