"""keygate-login's main and post steps, run by the machine's ``node`` as the runner runs them.

Keygate is a real ``keygate serve`` with a real trust policy (fixtures in conftest.py). The one
thing that cannot run here, GitHub's ID token service, is a stand-in speaking its documented
wire format whose tokens carry GitHub's claims and are signed by an OIDC issuer run by the
test; Keygate fetches that issuer's discovery document and JWKS and verifies them as it
would GitHub's. So each test sees what a job sees: the key the action exports works through
the proxy as the policy says, the audit trail holds the run, the post step's revocation ends
the key.

A few cases still use the scripted ``KeygateStandIn`` (tests/deploy/login_peers.py), each for a
reason a real Keygate cannot provide: an answer it never gives (a 200 without an access_token,
a redirect, a line break in an error description, a 500 to a revocation), three 503s in a row
(a real issuer outage makes Keygate answer Retry-After: 60, which the action caps at 10 s: a
real run would wait 20 s), and the cases that must not reach Keygate at all, where the
stand-in's record of requests proves that nothing was sent.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.models import KeyStatus
from tests.e2e.harness import Keygate, Upstream, audit_events
from tests.identity_issuer import OidcIssuer

from .actions_runner import Runner, assert_never_printed, node_binary, parse_file_commands
from .conftest import ROUTES
from .login_peers import (
    ACTION_DIR, POLICY, REQUEST_TOKEN, Answer, IdTokenService, KeygateStandIn, claims_of, exchanged_keys, oidc_env,
    trust, unused_port,
)

DEPLOY = "/api/servers/prod-1/deploy"


async def status_through(http: aiohttp.ClientSession, gateway: Keygate, key: str, method: str = "POST",
                         path: str = DEPLOY) -> int:
    """The proxy's status for a request with ``key`` as Bearer."""
    async with http.request(method, gateway.proxy_url + path, headers={"Authorization": f"Bearer {key}"},
                            json={"ref": "main"}) as r:
        await r.read()
        return r.status


async def key_status(gateway: Keygate, key_id: str) -> KeyStatus:
    async with gateway.service() as service:
        return (await service.get_key(key_id)).status(datetime.now(UTC))


# -- main: success -------------------------------------------------------------------
# (case, inputs beyond gateway-url, the variable holding the key, the policy's audience (None: gateway URL))
GRANTED = [
    ("defaults", {}, "KEYGATE_TOKEN", None),
    ("audience-policy-env-var", {"audience": "https://keygate.acme.example", "policy": POLICY, "env-var": "DEPLOY_KEY"},
     "DEPLOY_KEY", "https://keygate.acme.example"),
    ("trailing-slash", {"gateway-url": "{url}/"}, "KEYGATE_TOKEN", None),
]


@pytest.mark.parametrize(("inputs", "variable", "audience"), [c[1:] for c in GRANTED], ids=[c[0] for c in GRANTED])
async def test_main_trades_the_id_token_at_keygate_for_a_key_that_works_as_the_policy_says(
    inputs: dict[str, str], variable: str, audience: str | None, action: Runner, github: IdTokenService,
    issuer: OidcIssuer, gateway: Keygate, http: aiohttp.ClientSession,
) -> None:
    """Masked, exported, saved for post; 200 through the proxy for what the policy grants, 403 beyond; audited.

    With the policy input a second policy accepts the token too: Keygate then needs the name.
    """
    await trust(gateway, issuer, audience=audience)
    if "policy" in inputs:
        await trust(gateway, issuer, name="shop-any", audience=audience, operations=["servers:read"])
    given = {"gateway-url": gateway.proxy_url} | {k: v.format(url=gateway.proxy_url) for k, v in inputs.items()}
    result = await action.run("main", inputs=given, environ=oidc_env(github))
    assert result.returncode == 0, result.stdout + result.stderr

    assert github.audiences == [audience or gateway.proxy_url]
    (id_token,) = github.issued
    key = result.env[variable]
    key_id = result.outputs["key-id"]
    # The masks come before any other line, so nothing printed later can show either secret.
    assert result.lines[:2] == [f"::add-mask::{id_token}", f"::add-mask::{key}"]
    assert_never_printed(result, key, id_token)
    assert result.env == {variable: key}
    assert result.state == {"gateway": gateway.proxy_url, "key": key}
    assert key.startswith(key_id) and key_id.startswith("kga_")
    assert 890 <= int(result.outputs["expires-in"]) <= 900
    (notice,) = result.commands("notice")
    assert key_id in notice and f"${variable}" in notice

    # The key through the proxy: the policy's operation on its server, and nothing else.
    assert await status_through(http, gateway, key) == 200
    assert await status_through(http, gateway, key, "GET", "/api/servers/prod-1/status") == 403
    assert await status_through(http, gateway, key, "POST", "/api/servers/prod-2/deploy") == 403

    # The audit trail: the exchange with this run's claims.
    claims = claims_of(id_token)
    ((event, details),) = await audit_events(gateway, key_id)
    assert event == "key.exchanged"
    assert details["policy"] == POLICY and details["issuer"] == issuer.url
    assert details["subject"] == "repo:acme/shop:environment:production" == claims["sub"]
    for claim in ("repository", "ref", "sha", "run_id", "workflow"):
        assert details["claims"][claim] == claims[claim], claim
    async with gateway.service() as service:
        record = await service.get_key(key_id)
    assert record.name == f"gh acme/shop@refs/heads/main run {claims['run_id']}"
    assert (record.kind, record.org, record.operations, record.servers) == ("automation", "acme", ("deploy",),
                                                                            ("prod-1",))


async def test_main_runs_when_copied_into_an_es_module_package(
    tmp_path: Path, github: IdTokenService, issuer: OidcIssuer, gateway: Keygate,
) -> None:
    """Copied into a repository whose package.json says "type": "module", the .cjs scripts still run."""
    await trust(gateway, issuer)
    repository = tmp_path / "repository"
    (repository / ".github" / "actions").mkdir(parents=True)
    (repository / "package.json").write_text('{"type": "module"}')
    copied = repository / ".github" / "actions" / "keygate-login"
    shutil.copytree(ACTION_DIR, copied)
    action = Runner(copied, tmp_path, node_binary())
    result = await action.run("main", inputs={"gateway-url": gateway.proxy_url}, environ=oidc_env(github))
    assert result.returncode == 0, result.stdout + result.stderr
    assert set(result.env) == {"KEYGATE_TOKEN"}


async def test_main_asks_again_when_keygate_is_busy(
    action: Runner, github: IdTokenService, issuer: OidcIssuer, upstream: Upstream,
    tmp_path_factory: pytest.TempPathFactory, http: aiohttp.ClientSession,
) -> None:
    """A real 429: Keygate allows one exchange a second from an address, and that one is spent just before main's.

    The action waits the answer's Retry-After (1 s) and sends the same ID token again, which
    Keygate then takes: one token, one key.
    """
    gateway = Keygate(tmp_path_factory.mktemp("keygate-login-busy"), upstream.url,
                      config=ROUTES + '[exchange]\nper_client = "1/second"\n').start()
    try:
        await trust(gateway, issuer)

        async def spend_the_budget() -> None:
            async with http.post(gateway.proxy_url + "/.well-known/keygate/token", data={"grant_type": "x"}) as r:
                assert r.status == 400, await r.text()

        github.before_answer = spend_the_budget
        result = await action.run("main", inputs={"gateway-url": gateway.proxy_url}, environ=oidc_env(github))
        assert result.returncode == 0, result.stdout + result.stderr
        assert len(github.issued) == 1
        assert "Keygate is busy (HTTP 429 temporarily_unavailable: Too many token exchanges; retry later.); " \
               "asking again in 1 s" in result.lines
        key = result.env["KEYGATE_TOKEN"]
        assert await status_through(http, gateway, key) == 200
        async with gateway.service() as service:
            assert await exchanged_keys(service) == [result.outputs["key-id"]]
    finally:
        assert gateway.stop() == 0


# -- main: failures ------------------------------------------------------------------
async def test_a_token_of_another_repository_is_invalid_grant_and_nothing_is_exported(
    action: Runner, github: IdTokenService, issuer: OidcIssuer, gateway: Keygate,
) -> None:
    """Keygate's invalid_grant, in one ::error:: line with the claims a policy would have to match."""
    await trust(gateway, issuer)
    async with gateway.service() as service:
        before = await exchanged_keys(service)
    github.claims = {"repository": "acme/other", "environment": "production"}
    result = await action.run("main", inputs={"gateway-url": gateway.proxy_url}, environ=oidc_env(github))
    assert result.returncode == 1
    (error,) = result.commands("error")
    for words in ["HTTP 400 invalid_grant: The subject token is not accepted", "No trust policy accepted",
                  f"audience {gateway.proxy_url}", 'sub="repo:acme/other:environment:production"',
                  'repository="acme/other"', 'environment="production"']:
        assert words in error, error
    assert result.env == {} and result.state == {} and result.outputs == {}
    assert_never_printed(result, *github.issued, REQUEST_TOKEN)
    async with gateway.service() as service:
        assert await exchanged_keys(service) == before, "a key was minted"


async def test_a_gateway_url_that_is_not_the_proxy_listener_gets_a_hint(
    action: Runner, github: IdTokenService, issuer: OidcIssuer, gateway: Keygate,
) -> None:
    """The admin listener's URL by mistake: its 404 comes with the question whether this is the proxy listener."""
    result = await action.run("main", inputs={"gateway-url": gateway.admin_url, "audience": gateway.proxy_url},
                              environ=oidc_env(github))
    assert result.returncode == 1
    (error,) = result.commands("error")
    assert "HTTP 404" in error and "proxy listener" in error, error
    assert result.env == {} and result.state == {}


INVALID_GRANT = Answer(400, {"error": "invalid_grant", "error_description": "The token was not accepted."})
UNAVAILABLE = Answer(503, {"error": "temporarily_unavailable", "error_description": "Retry shortly."},
                     {"Retry-After": "0"})

# (case, what to change, the stand-in's answers, words of the ::error:: line, ID tokens asked for, exchanges made)
REFUSED = [
    ("no-id-token-permission", "no-oidc", [], ["permissions: id-token: write"], 0, 0),
    ("wrong-request-token", "bad-request-token", [], ["GitHub did not issue an ID token", "HTTP 401"], 0, 0),
    ("multi-line-description", "", [Answer(400, {"error": "invalid_request", "error_description": "one\ntwo"})],
     ["invalid_request: one%0Atwo"], 1, 1),
    ("still-unavailable", "", [UNAVAILABLE] * 3, ["HTTP 503 temporarily_unavailable: Retry shortly."], 1, 3),
    ("no-access-token", "", [Answer(200, {"token_type": "Bearer", "expires_in": 900})],
     ["200 without a usable access_token"], 1, 1),
    ("redirect-not-followed", "", [Answer(307, {}, {"Location": "http://127.0.0.1:1/.well-known/keygate/token"})],
     ["HTTP 307"], 1, 1),
    ("gateway-unreachable", "unreachable", [], ["is unreachable", "ECONNREFUSED"], 1, 0),
    ("plain-http-gateway", "http-gateway", [], ["must be an https:// URL"], 0, 0),
    ("bad-env-var", "bad-env-var", [], ["env-var"], 0, 0),
    ("bad-revoke", "bad-revoke", [], ["neither true nor false"], 0, 0),
]


@pytest.mark.parametrize(("change", "answers", "words", "id_tokens", "exchanges"), [c[1:] for c in REFUSED],
                         ids=[c[0] for c in REFUSED])
async def test_main_fails_with_one_error_and_exports_nothing(
    change: str, answers: list[Answer], words: list[str], id_tokens: int, exchanges: int,
    action: Runner, github: IdTokenService, stand_in: KeygateStandIn,
) -> None:
    """Each failure is one ::error:: line naming the cause and exit code 1, with no key exported or saved."""
    stand_in.answers = list(answers)
    inputs = {"gateway-url": stand_in.url}
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
    assert len(github.issued) == id_tokens and len(stand_in.exchanges) == exchanges
    assert result.env == {} and result.state == {} and result.outputs == {}
    assert_never_printed(result, *github.issued, REQUEST_TOKEN)


# -- post ------------------------------------------------------------------------------
async def test_post_revokes_the_key_with_itself(
    action: Runner, github: IdTokenService, issuer: OidcIssuer, gateway: Keygate, http: aiohttp.ClientSession,
) -> None:
    """Post sends the key as Bearer to Keygate's revoke endpoint: the key is then 401, and key.revoke (self) audited.

    A second post (a re-run of it) finds the key already revoked: a plain line, no warning.
    """
    await trust(gateway, issuer)
    inputs = {"gateway-url": gateway.proxy_url}
    main = await action.run("main", inputs=inputs, environ=oidc_env(github))
    assert main.returncode == 0, main.stdout + main.stderr
    key, key_id = main.env["KEYGATE_TOKEN"], main.outputs["key-id"]
    assert await status_through(http, gateway, key) == 200

    post = await action.run("post", inputs=inputs, environ={}, state=main.state)
    assert post.returncode == 0
    assert f"Revoked Keygate key {key_id}" in post.lines
    assert post.commands("warning") == []
    assert_never_printed(post, key)
    assert await status_through(http, gateway, key) == 401
    assert await key_status(gateway, key_id) is KeyStatus.REVOKED
    events = await audit_events(gateway, key_id)
    assert [a for a, _ in events] == ["key.exchanged", "key.revoke"]
    assert events[1][1] == {"reason": "self"}

    again = await action.run("post", inputs=inputs, environ={}, state=main.state)
    assert again.returncode == 0 and again.commands("warning") == []
    assert "The Keygate key was already expired or revoked" in again.lines
    assert_never_printed(again, key)


# (case, inputs, the ID token's claims (a token of another repository: main fails))
NOTHING_TO_REVOKE = [
    ("revoke-false", {"revoke": "false"}, {"environment": "production"}),
    ("main-failed", {}, {"repository": "acme/other", "environment": "production"}),
]


@pytest.mark.parametrize(("inputs", "claims"), [c[1:] for c in NOTHING_TO_REVOKE],
                         ids=[c[0] for c in NOTHING_TO_REVOKE])
async def test_post_does_nothing_without_a_saved_key(
    inputs: dict[str, str], claims: dict[str, str], action: Runner, github: IdTokenService, issuer: OidcIssuer,
    gateway: Keygate, http: aiohttp.ClientSession,
) -> None:
    """With revoke: false, or after main failed, post sends nothing and succeeds (a revoke: false key lives on)."""
    await trust(gateway, issuer)
    github.claims = claims
    given = {"gateway-url": gateway.proxy_url, **inputs}
    main = await action.run("main", inputs=given, environ=oidc_env(github))
    assert "key" not in main.state
    post = await action.run("post", inputs=given, environ={}, state=main.state)
    assert post.returncode == 0 and post.lines == ["keygate-login: no key to revoke"]
    if "KEYGATE_TOKEN" in main.env:
        assert await status_through(http, gateway, main.env["KEYGATE_TOKEN"]) == 200
        assert await key_status(gateway, main.outputs["key-id"]) is KeyStatus.ACTIVE


# (case, the revocation's answer (None: unreachable), the line or command printed)
REVOKE_FAILS = [
    ("server-error", Answer(500, {"error": "internal_error"}), ("warning", "HTTP 500 internal_error")),
    ("unreachable", None, ("warning", "is unreachable")),
]


@pytest.mark.parametrize(("answer", "printed"), [c[1:] for c in REVOKE_FAILS], ids=[c[0] for c in REVOKE_FAILS])
async def test_a_failed_revocation_does_not_fail_the_job(
    answer: Answer | None, printed: tuple[str, str], action: Runner, stand_in: KeygateStandIn,
) -> None:
    """A revocation the stand-in refuses with a 500 (Keygate's own answer is JSON 5xx only when broken), or
    a gateway gone, is a warning, and post still exits 0."""
    key = "kga_" + "A" * 12 + "_" + "s" * 40
    state = {"gateway": stand_in.url, "key": key}
    if answer is None:
        state["gateway"] = f"http://127.0.0.1:{unused_port()}"
    else:
        stand_in.revoke_answer = answer
    post = await action.run("post", inputs={"gateway-url": stand_in.url}, environ={}, state=state)
    assert post.returncode == 0
    kind, words = printed
    found = post.commands("warning") if kind == "warning" else post.lines
    assert any(words in line for line in found), post.stdout
    assert stand_in.revocations == ([f"Bearer {key}"] if answer else [])
    assert_never_printed(post, key)


# -- the environment files ----------------------------------------------------------------
@pytest.mark.parametrize("value", ["one line", "two\nlines", "ends with a break\n"])
def test_values_are_written_in_the_format_the_runner_reads(value: str, action: Runner) -> None:
    """commands.cjs writes name=value, or the name<<DELIMITER form when the value has a line break."""
    script = (f"require({json.dumps(str(ACTION_DIR / 'commands.cjs'))})"
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
