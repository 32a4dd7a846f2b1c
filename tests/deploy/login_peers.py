"""The two HTTP peers of keygate-login in the tests, on loopback.

- ``IdTokenService`` stands in for GitHub's ID token service, the one thing that cannot
  run here, in its documented wire format: ``GET $ACTIONS_ID_TOKEN_REQUEST_URL&audience=...``
  with ``Authorization: bearer $ACTIONS_ID_TOKEN_REQUEST_TOKEN``, answered
  ``{"value": "<JWT>"}`` (RS256, the claims GitHub documents); it checks the bearer token
  and the audience asked for.
- ``KeygateStandIn`` records what reaches Keygate's ``/.well-known/keygate/token`` and
  ``/.well-known/keygate/revoke`` and answers in the identity-exchange spec's format
  (RFC 8693 answer, RFC 6749 §5.2 errors, ``{"revoked": id}``); it also guards an API
  route the way Keygate would (the keys it issued and has not revoked get 200, others 401).
  The end-to-end run against a real ``keygate serve`` is added beside it when the
  exchange endpoint (gateway/identity/exchange.py) lands.
"""

from __future__ import annotations

import functools
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.keys import generate
from gateway.pipeline.outcomes import Outcome
from gateway.pipeline.responses import answer_of

ACTION_DIR = Path(__file__).resolve().parents[2] / "deploy" / "github-actions" / "keygate-login"
REQUEST_TOKEN = "ghs_requesttoken" + "x" * 24
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ID_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:id_token"


# -- GitHub's ID token service (stand-in) ------------------------------------------
@functools.cache
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def github_claims(audience: str) -> dict[str, Any]:
    """An ID token's claims as GitHub documents them, for a push to main run in environment production."""
    now = int(time.time())
    return {
        "jti": str(uuid.uuid4()), "sub": "repo:acme/shop:environment:production", "aud": audience,
        "ref": "refs/heads/main", "sha": "a7c9e1b2" * 5, "repository": "acme/shop", "repository_owner": "acme",
        "repository_owner_id": "65", "repository_id": "35", "repository_visibility": "private",
        "run_id": "1234", "run_number": "7", "run_attempt": "1", "actor": "octocat", "actor_id": "12",
        "workflow": "deploy", "workflow_ref": "acme/shop/.github/workflows/deploy.yml@refs/heads/main",
        "job_workflow_ref": "acme/shop/.github/workflows/deploy.yml@refs/heads/main",
        "event_name": "push", "ref_type": "branch", "environment": "production", "runner_environment": "github-hosted",
        "iss": "https://token.actions.githubusercontent.com", "nbf": now - 5, "iat": now - 5, "exp": now + 300,
    }


@dataclass
class IdTokenService:
    url: str = ""
    audiences: list[str] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or token != REQUEST_TOKEN:
            return web.json_response({"message": "Bad credentials"}, status=401)
        audience = request.query.get("audience")
        # The runner's URL already carries a query (api-version); the audience is appended to it.
        if request.query.get("api-version") != "2.0" or not audience:
            return web.json_response({"message": "bad request"}, status=400)
        self.audiences.append(audience)
        token = jwt.encode(github_claims(audience), signing_key(), algorithm="RS256", headers={"kid": "gh-1"})
        self.issued.append(token)
        return web.json_response({"value": token})


# -- Keygate's side (stand-in until the exchange endpoint lands) -------------------
@dataclass
class Answer:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class KeygateStandIn:
    url: str = ""
    # Answers to the next token requests, in order; once used up, each request is granted a key.
    answers: list[Answer] = field(default_factory=list)
    exchanges: list[dict[str, Any]] = field(default_factory=list)
    revocations: list[str] = field(default_factory=list)
    api_calls: list[dict[str, Any]] = field(default_factory=list)
    revoke_answer: Answer | None = None
    keys: dict[str, str] = field(default_factory=dict)  # full key -> key id, while not revoked

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        self.exchanges.append({"content_type": request.content_type, "form": dict(form)})
        if self.answers:
            answer = self.answers.pop(0)
            return web.json_response(answer.body, status=answer.status, headers=answer.headers)
        key = generate("kga_")
        self.keys[key.full] = key.key_id
        return web.json_response({
            "access_token": key.full, "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
            "token_type": "Bearer", "expires_in": 900, "key_id": key.key_id,
        }, headers={"Cache-Control": "no-store"})

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/.well-known/keygate/token", self.token),
                web.post("/.well-known/keygate/revoke", self.revoke),
                web.post("/api/servers/{server}/deploy", self.api)]

    async def api(self, request: web.Request) -> web.Response:
        """An API route behind Keygate: a key it issued and has not revoked gets through."""
        authorization = request.headers.get("Authorization", "")
        self.api_calls.append({"path": request.path, "authorization": authorization, "body": await request.read()})
        if authorization.removeprefix("Bearer ") not in self.keys:
            return self.invalid_token()
        return web.json_response({"deployed": True})

    @staticmethod
    def invalid_token() -> web.Response:
        status, error, description, challenge = answer_of(Outcome.INVALID_TOKEN)
        return web.json_response({"error": error, "error_description": description}, status=status,
                                 headers={"WWW-Authenticate": challenge or ""})

    async def revoke(self, request: web.Request) -> web.Response:
        authorization = request.headers.get("Authorization", "")
        self.revocations.append(authorization)
        if self.revoke_answer is not None:
            return web.json_response(self.revoke_answer.body, status=self.revoke_answer.status)
        key_id = self.keys.pop(authorization.removeprefix("Bearer "), None)
        if key_id is None:
            return self.invalid_token()
        return web.json_response({"revoked": key_id})


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
