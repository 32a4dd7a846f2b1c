"""keygate-login's main and post steps, run by the machine's ``node`` as the runner runs them.

The peers (tests/deploy/login_peers.py) are a stand-in for GitHub's ID token service (the
one thing that cannot run here), speaking its documented wire format and checking the
bearer token and the audience, and for Keygate's side a small aiohttp server that records
what it receives and answers in the identity-exchange spec's format.

The end-to-end run against a real ``keygate serve`` (exchange, use the key through the proxy,
post step revokes it) is added when the exchange endpoint (gateway/identity/exchange.py) lands.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from .actions_runner import Runner, assert_never_printed, node_binary, parse_file_commands
from .login_peers import (
    ACTION_DIR, ID_TOKEN_TYPE, REQUEST_TOKEN, TOKEN_EXCHANGE, Answer, IdTokenService, KeygateStandIn, oidc_env,
    unused_port,
)


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


async def test_main_runs_when_copied_into_an_es_module_package(
    tmp_path: Path, github: IdTokenService, keygate: KeygateStandIn,
) -> None:
    """Copied into a repository whose package.json says "type": "module", the .cjs scripts still run."""
    repository = tmp_path / "repository"
    (repository / ".github" / "actions").mkdir(parents=True)
    (repository / "package.json").write_text('{"type": "module"}')
    copied = repository / ".github" / "actions" / "keygate-login"
    shutil.copytree(ACTION_DIR, copied)
    action = Runner(copied, tmp_path, node_binary())
    result = await action.run("main", inputs={"gateway-url": keygate.url}, environ=oidc_env(github))
    assert result.returncode == 0, result.stdout + result.stderr
    assert set(result.env) == {"KEYGATE_TOKEN"}


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
