"""The HTTP peers of keygate-login in the tests, on loopback.

- ``IdTokenService`` stands in for GitHub's ID token service, the one thing that cannot
  run here, in its documented wire format: ``GET $ACTIONS_ID_TOKEN_REQUEST_URL&audience=...``
  with ``Authorization: bearer $ACTIONS_ID_TOKEN_REQUEST_TOKEN``, answered
  ``{"value": "<JWT>"}``; it checks the bearer token and the audience asked for. The JWT is
  signed by an :class:`~tests.identity_issuer.OidcIssuer` run by the test, whose discovery
  document and JWKS a real ``keygate serve`` fetches to verify it, with GitHub's claims
  (``github_claims``) and the audience asked for as ``aud``.
- Keygate's side is a real ``keygate serve`` (tests/e2e/harness.py, fixtures in
  conftest.py) with a trust policy made as an operator makes it.
- ``KeygateStandIn`` remains only for answers no real Keygate gives (a 200 without an
  access_token, a redirect, a line break in an error description, a 500 to a revocation)
  and for checking that nothing reached Keygate at all; it records what reaches
  ``/.well-known/keygate/token`` and ``/.well-known/keygate/revoke`` and answers as scripted.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web

from gateway.manage.service import KeyService
from gateway.models import TrustPolicy
from tests.e2e.harness import Keygate
from tests.identity_issuer import OidcIssuer

ACTION_DIR = Path(__file__).resolve().parents[2] / "deploy" / "github-actions" / "keygate-login"
REQUEST_TOKEN = "ghs_requesttoken" + "x" * 24
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ID_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:id_token"
# The policy of the tests: jobs of acme/shop in environment production may deploy to prod-1.
POLICY = "shop-production"
CONDITIONS = {"repository": "acme/shop", "environment": "production"}


# -- GitHub's ID token service (stand-in) ------------------------------------------
@dataclass
class IdTokenService:
    """Answers with GitHub-shaped ID tokens signed by ``issuer``'s key; ``claims`` overrides some claims."""

    issuer: OidcIssuer
    url: str = ""
    claims: dict[str, Any] = field(default_factory=lambda: {"environment": "production"})
    audiences: list[str] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)
    # Awaited before the token is handed out (e.g. to spend Keygate's exchange budget just then).
    before_answer: Callable[[], Awaitable[None]] | None = None

    async def handle(self, request: web.Request) -> web.Response:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or token != REQUEST_TOKEN:
            return web.json_response({"message": "Bad credentials"}, status=401)
        audience = request.query.get("audience")
        # The runner's URL already carries a query (api-version); the audience is appended to it.
        if request.query.get("api-version") != "2.0" or not audience:
            return web.json_response({"message": "bad request"}, status=400)
        self.audiences.append(audience)
        claims = self.issuer.github_claims(datetime.now(UTC), **{**self.claims, "aud": audience})
        token = self.issuer.token(claims)
        self.issued.append(token)
        if self.before_answer is not None:
            await self.before_answer()
        return web.json_response({"value": token})


def claims_of(token: str) -> dict[str, Any]:
    """A token's claims, unverified (the test made it)."""
    return dict(jwt.decode(token, options={"verify_signature": False}))


async def trust(gateway: Keygate, issuer: OidcIssuer, *, name: str = POLICY, audience: str | None = None,
                **settings: Any) -> TrustPolicy:
    """The test's trust policy in the real gateway's store, as ``keygate trust add --replace`` makes it."""
    settings.setdefault("conditions", CONDITIONS)
    settings.setdefault("operations", ["deploy"])
    settings.setdefault("servers", ["prod-1"])
    settings.setdefault("lifetime", "15m")
    async with gateway.service() as service:
        return await service.put_trust_policy(name, issuer=issuer.url, audience=audience or gateway.proxy_url,
                                              org="acme", replace=True, **settings)


async def exchanged_keys(service: KeyService, policy: str = POLICY) -> list[str]:
    return [k.id for k in await service.list_keys(org="acme") if k.created_by == f"exchange:{policy}"]


# -- Keygate's side, for what only a stand-in can answer ----------------------------
@dataclass
class Answer:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class KeygateStandIn:
    url: str = ""
    # Answers to the next token requests, in order; once used up, a 500 (a test asked for more than it scripted).
    answers: list[Answer] = field(default_factory=list)
    exchanges: list[dict[str, Any]] = field(default_factory=list)
    revocations: list[str] = field(default_factory=list)
    revoke_answer: Answer = field(default_factory=lambda: Answer(500, {"error": "stand_in_has_no_answer"}))

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        self.exchanges.append({"content_type": request.content_type, "form": dict(form)})
        answer = self.answers.pop(0) if self.answers else Answer(500, {"error": "stand_in_has_no_answer"})
        return web.json_response(answer.body, status=answer.status, headers=answer.headers)

    async def revoke(self, request: web.Request) -> web.Response:
        self.revocations.append(request.headers.get("Authorization", ""))
        return web.json_response(self.revoke_answer.body, status=self.revoke_answer.status)

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/.well-known/keygate/token", self.token),
                web.post("/.well-known/keygate/revoke", self.revoke)]


async def serve(routes: list[web.RouteDef]) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.add_routes(routes)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


def oidc_env(github: IdTokenService) -> dict[str, str]:
    """What the runner sets for a job with ``permissions: id-token: write``."""
    return {"ACTIONS_ID_TOKEN_REQUEST_URL": f"{github.url}/_apis/token?api-version=2.0",
            "ACTIONS_ID_TOKEN_REQUEST_TOKEN": REQUEST_TOKEN}


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
