"""keygate-login's main and post steps, run by the machine's ``node`` as the runner runs them.

Two peers answer them over HTTP on loopback:

- a stand-in for GitHub's ID token service, the one thing that cannot run here. It speaks
  its documented wire format: ``GET $ACTIONS_ID_TOKEN_REQUEST_URL&audience=...`` with
  ``Authorization: bearer $ACTIONS_ID_TOKEN_REQUEST_TOKEN``, answered ``{"value": "<JWT>"}``
  (an RS256 token with the claims GitHub documents), and it checks the bearer token and
  the audience asked for;
- for Keygate's side, a small aiohttp server that records what it receives and answers
  ``/.well-known/keygate/token`` and ``/.well-known/keygate/revoke`` in the format of the
  identity-exchange spec (RFC 8693 answer, RFC 6749 §5.2 errors, ``{"revoked": id}``).

The end-to-end run against a real ``keygate serve`` (exchange, use the key through the proxy,
post step revokes it) is added when the exchange endpoint (gateway/identity/exchange.py) lands.
"""

from __future__ import annotations

import functools
import json
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.keys import generate
from gateway.pipeline.outcomes import Outcome
from gateway.pipeline.responses import answer_of

from .actions_runner import Runner, StepResult, node_binary, parse_file_commands

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
    revoke_answer: Answer | None = None
    keys: dict[str, str] = field(default_factory=dict)  # full key -> key id

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

    async def revoke(self, request: web.Request) -> web.Response:
        authorization = request.headers.get("Authorization", "")
        self.revocations.append(authorization)
        if self.revoke_answer is not None:
            return web.json_response(self.revoke_answer.body, status=self.revoke_answer.status)
        key_id = self.keys.pop(authorization.removeprefix("Bearer "), None)
        if key_id is None:
            status, error, description, challenge = answer_of(Outcome.INVALID_TOKEN)
            return web.json_response({"error": error, "error_description": description}, status=status,
                                     headers={"WWW-Authenticate": challenge or ""})
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


@pytest.fixture
async def github() -> AsyncIterator[IdTokenService]:
    service = IdTokenService()
    runner, service.url = await serve([web.get("/_apis/token", service.handle)])
    try:
        yield service
    finally:
        await runner.cleanup()


@pytest.fixture
async def keygate() -> AsyncIterator[KeygateStandIn]:
    stand_in = KeygateStandIn()
    runner, stand_in.url = await serve([web.post("/.well-known/keygate/token", stand_in.token),
                                        web.post("/.well-known/keygate/revoke", stand_in.revoke)])
    try:
        yield stand_in
    finally:
        await runner.cleanup()


@pytest.fixture
def action(tmp_path: Path) -> Runner:
    return Runner(ACTION_DIR, tmp_path, node_binary())


def oidc_env(github: IdTokenService) -> dict[str, str]:
    """What the runner sets for a job with ``permissions: id-token: write``."""
    return {"ACTIONS_ID_TOKEN_REQUEST_URL": f"{github.url}/_apis/token?api-version=2.0",
            "ACTIONS_ID_TOKEN_REQUEST_TOKEN": REQUEST_TOKEN}


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def assert_never_printed(result: StepResult, *secrets: str) -> None:
    """A secret appears only in ``::add-mask::`` lines (which the runner consumes), and in no stderr."""
    for secret in secrets:
        assert secret not in result.stderr
        for line in result.lines:
            assert secret not in line or line == f"::add-mask::{secret}", line


# -- main: success -------------------------------------------------------------------
# (case, inputs beyond gateway-url, the variable holding the key, audience asked for (None: gateway URL), policy)
GRANTED = [
    ("defaults", {}, "KEYGATE_TOKEN", None, None),
    ("audience-policy-env-var", {"audience": "https://keygate.acme.example", "policy": "shop-production",
                                 "env-var": "DEPLOY_KEY"}, "DEPLOY_KEY", "https://keygate.acme.example",
     "shop-production"),
    ("trailing-slash", {"gateway-url": "{url}/"}, "KEYGATE_TOKEN", None, None),
]


@pytest.mark.parametrize(("inputs", "variable", "audience", "policy"), [c[1:] for c in GRANTED],
                         ids=[c[0] for c in GRANTED])
async def test_main_exchanges_the_id_token_and_exports_the_key_masked(
    inputs: dict[str, str], variable: str, audience: str | None, policy: str | None,
    action: Runner, github: IdTokenService, keygate: KeygateStandIn,
) -> None:
    """The ID token asked for the audience goes to Keygate as RFC 8693 form; the key is masked first, then exported."""
    given = {"gateway-url": keygate.url} | {name: value.format(url=keygate.url) for name, value in inputs.items()}
    result = await action.run("main", inputs=given, environ=oidc_env(github))
    assert result.returncode == 0, result.stdout + result.stderr

    assert github.audiences == [audience or keygate.url]
    (id_token,) = github.issued
    (exchange,) = keygate.exchanges
    assert exchange["content_type"] == "application/x-www-form-urlencoded"
    assert exchange["form"] == {"grant_type": TOKEN_EXCHANGE, "subject_token": id_token,
                                "subject_token_type": ID_TOKEN_TYPE, **({"policy": policy} if policy else {})}
    ((key, key_id),) = keygate.keys.items()

    # The masks come before any other line, so nothing printed later can show either secret.
    assert result.lines[:2] == [f"::add-mask::{id_token}", f"::add-mask::{key}"]
    assert_never_printed(result, key, id_token)
    assert result.env == {variable: key}
    assert result.state == {"gateway": keygate.url, "key": key}
    assert result.outputs == {"key-id": key_id, "expires-in": "900"}
    (notice,) = result.commands("notice")
    assert key_id in notice and f"${variable}" in notice


async def test_main_asks_again_when_keygate_is_busy(
    action: Runner, github: IdTokenService, keygate: KeygateStandIn,
) -> None:
    """A 503 (or 429) with Retry-After means the token was not looked at: the same token is sent again."""
    busy = Answer(503, {"error": "temporarily_unavailable", "error_description": "The issuer cannot be reached."},
                  {"Retry-After": "0"})
    keygate.answers = [busy]
    result = await action.run("main", inputs={"gateway-url": keygate.url}, environ=oidc_env(github))
    assert result.returncode == 0, result.stdout
    assert len(keygate.exchanges) == 2 and len(github.issued) == 1
    assert keygate.exchanges[0]["form"] == keygate.exchanges[1]["form"]
    assert "temporarily_unavailable" in result.stdout and set(result.env) == {"KEYGATE_TOKEN"}


# -- main: failures ------------------------------------------------------------------
INVALID_GRANT = Answer(400, {"error": "invalid_grant", "error_description": "The token was not accepted."})
UNAVAILABLE = Answer(503, {"error": "temporarily_unavailable", "error_description": "Retry shortly."},
                     {"Retry-After": "0"})

# (case, what to change, Keygate's answers, words of the ::error:: line, ID tokens asked for, exchanges made)
REFUSED = [
    ("no-id-token-permission", "no-oidc", [], ["permissions: id-token: write"], 0, 0),
    ("wrong-request-token", "bad-request-token", [], ["GitHub did not issue an ID token", "HTTP 401"], 0, 0),
    ("invalid-grant", "", [INVALID_GRANT],
     ["HTTP 400 invalid_grant: The token was not accepted.", "No trust policy accepted",
      'sub="repo:acme/shop:environment:production"', 'repository="acme/shop"'], 1, 1),
    ("multi-line-description", "", [Answer(400, {"error": "invalid_request", "error_description": "one\ntwo"})],
     ["invalid_request: one%0Atwo"], 1, 1),
    ("still-unavailable", "", [UNAVAILABLE] * 3, ["HTTP 503 temporarily_unavailable: Retry shortly."], 1, 3),
    ("no-access-token", "", [Answer(200, {"token_type": "Bearer", "expires_in": 900})],
     ["200 without a usable access_token"], 1, 1),
    ("redirect-not-followed", "", [Answer(307, {}, {"Location": "http://127.0.0.1:1/.well-known/keygate/token"})],
     ["HTTP 307"], 1, 1),
    ("not-found", "", [Answer(404, {})], ["HTTP 404", "proxy listener"], 1, 1),
    ("gateway-unreachable", "unreachable", [], ["is unreachable", "ECONNREFUSED"], 1, 0),
    ("plain-http-gateway", "http-gateway", [], ["must be an https:// URL"], 0, 0),
    ("bad-env-var", "bad-env-var", [], ["env-var"], 0, 0),
    ("bad-revoke", "bad-revoke", [], ["neither true nor false"], 0, 0),
]


@pytest.mark.parametrize(("change", "answers", "words", "id_tokens", "exchanges"), [c[1:] for c in REFUSED],
                         ids=[c[0] for c in REFUSED])
async def test_main_fails_with_one_error_and_exports_nothing(
    change: str, answers: list[Answer], words: list[str], id_tokens: int, exchanges: int,
    action: Runner, github: IdTokenService, keygate: KeygateStandIn,
) -> None:
    """Each failure is one ::error:: line naming the cause and exit code 1, with no key exported or saved."""
    keygate.answers = list(answers)
    inputs = {"gateway-url": keygate.url}
    environ = oidc_env(github)
    if change == "no-oidc":
        environ = {}
    elif change == "bad-request-token":
        environ["ACTIONS_ID_TOKEN_REQUEST_TOKEN"] = "ghs_someoneelse"
    elif change == "unreachable":
        inputs["gateway-url"] = f"http://127.0.0.1:{unused_port()}"
    elif change == "http-gateway":
        inputs["gateway-url"] = "http://keygate.acme.example"
    elif change == "bad-env-var":
        inputs["env-var"] = "GITHUB_TOKEN"
    elif change == "bad-revoke":
        inputs["revoke"] = "yes"
    result = await action.run("main", inputs=inputs, environ=environ)

    assert result.returncode == 1
    (error,) = result.commands("error")
    for word in words:
        assert word in error, error
    assert len(github.issued) == id_tokens and len(keygate.exchanges) == exchanges
    assert result.env == {} and result.state == {} and result.outputs == {}
    assert_never_printed(result, *github.issued, REQUEST_TOKEN)


# -- post ------------------------------------------------------------------------------
async def test_post_revokes_the_key_with_itself(
    action: Runner, github: IdTokenService, keygate: KeygateStandIn,
) -> None:
    """After a successful main, post sends the key as Bearer to the revoke endpoint."""
    main = await action.run("main", inputs={"gateway-url": keygate.url}, environ=oidc_env(github))
    ((key, key_id),) = keygate.keys.items()
    post = await action.run("post", inputs={"gateway-url": keygate.url}, environ={}, state=main.state)
    assert post.returncode == 0
    assert keygate.revocations == [f"Bearer {key}"] and keygate.keys == {}
    assert f"Revoked Keygate key {key_id}" in post.lines
    assert post.commands("warning") == []
    assert_never_printed(post, key)


# (case, inputs, Keygate's answer to main (None: a key))
NOTHING_TO_REVOKE = [
    ("revoke-false", {"revoke": "false"}, None),
    ("main-failed", {}, INVALID_GRANT),
]


@pytest.mark.parametrize(("inputs", "answer"), [c[1:] for c in NOTHING_TO_REVOKE],
                         ids=[c[0] for c in NOTHING_TO_REVOKE])
async def test_post_does_nothing_without_a_saved_key(
    inputs: dict[str, str], answer: Answer | None, action: Runner, github: IdTokenService, keygate: KeygateStandIn,
) -> None:
    """With revoke: false, or after main failed, post sends nothing and succeeds."""
    keygate.answers = [answer] if answer else []
    given = {"gateway-url": keygate.url, **inputs}
    main = await action.run("main", inputs=given, environ=oidc_env(github))
    assert "key" not in main.state
    post = await action.run("post", inputs=given, environ={}, state=main.state)
    assert post.returncode == 0 and post.lines == ["keygate-login: no key to revoke"]
    assert keygate.revocations == []


# (case, Keygate's answer to the revocation (None: unreachable), the line or command printed)
REVOKE_FAILS = [
    ("already-revoked", Answer(401, {"error": "invalid_token"}), ("info", "The Keygate key was already expired")),
    ("server-error", Answer(500, {"error": "internal_error"}), ("warning", "HTTP 500 internal_error")),
    ("unreachable", None, ("warning", "is unreachable")),
]


@pytest.mark.parametrize(("answer", "printed"), [c[1:] for c in REVOKE_FAILS], ids=[c[0] for c in REVOKE_FAILS])
async def test_a_failed_revocation_does_not_fail_the_job(
    answer: Answer | None, printed: tuple[str, str], action: Runner, github: IdTokenService, keygate: KeygateStandIn,
) -> None:
    """A revocation Keygate refuses or cannot take is a line or a warning, and post still exits 0."""
    main = await action.run("main", inputs={"gateway-url": keygate.url}, environ=oidc_env(github))
    ((key, _),) = keygate.keys.items()
    state = dict(main.state)
    if answer is None:
        state["gateway"] = f"http://127.0.0.1:{unused_port()}"
    keygate.revoke_answer = answer
    post = await action.run("post", inputs={"gateway-url": keygate.url}, environ={}, state=state)
    assert post.returncode == 0
    kind, words = printed
    found = post.commands("warning") if kind == "warning" else post.lines
    assert any(words in line for line in found), post.stdout
    assert_never_printed(post, key)


# -- the environment files ----------------------------------------------------------------
@pytest.mark.parametrize("value", ["one line", "two\nlines", "ends with a break\n"])
def test_values_are_written_in_the_format_the_runner_reads(value: str, action: Runner) -> None:
    """commands.js writes name=value, or the name<<DELIMITER form when the value has a line break."""
    script = (f"require({json.dumps(str(ACTION_DIR / 'commands.js'))})"
              f".exportVariable(process.env, 'SOME_VALUE', {json.dumps(value)})")
    path = action.folder / "github_env"
    path.write_text("")
    subprocess.run([action.node, "-e", script], env={"GITHUB_ENV": str(path)}, check=True, timeout=60)
    assert parse_file_commands(path.read_text()) == {"SOME_VALUE": value}
    assert ("<<ghadelimiter_" in path.read_text()) == ("\n" in value)


@pytest.mark.parametrize(("ci", "outcome"), [("true", pytest.fail.Exception), ("", pytest.skip.Exception)],
                         ids=["ci", "local"])
def test_a_missing_node_fails_in_ci_and_skips_elsewhere(ci: str, outcome: type[BaseException]) -> None:
    """Under CI=true a missing node is a failure, never a skip."""
    with pytest.raises(outcome, match="node is not installed"):
        node_binary({"CI": ci, "PATH": "/nonexistent"})
