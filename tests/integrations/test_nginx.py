"""Keygate behind nginx (``auth_request``): ``deploy/ingress/nginx/example.conf`` and its snippets, run for real.

nginx's ``auth_request`` never passes the authorization answer's body on, and
turns every status but 2xx/401/403 into a 500; the snippets write Keygate's
refusal again from the answer's status and headers. The tables that do it
are held equal to Keygate's own here, outcome by outcome.
"""

from __future__ import annotations

import json
import re

import aiohttp
import pytest

from gateway.pipeline.outcomes import Outcome
from gateway.pipeline.responses import answer_of

from ..e2e.harness import Keygate, Upstream
from .ingress import Answer, IngressContract, Nginx, call, ingress_binary

NGINX_DIR = Nginx.SNIPPETS
# Every refusal the authz listener can make, and what tells nginx which it was: (WWW-Authenticate, RateLimit-Policy).
AUTHZ_REFUSALS = {
    Outcome.NO_CREDENTIALS: ('Bearer realm="keygate"', ""),
    Outcome.INVALID_REQUEST: ('Bearer realm="keygate", error="invalid_request"', ""),
    Outcome.INVALID_TARGET: ("", ""),
    Outcome.INVALID_TOKEN: ('Bearer realm="keygate", error="invalid_token"', ""),
    Outcome.TOO_MANY_ATTEMPTS: ("", ""),
    Outcome.IP_NOT_ALLOWED: ("", ""),
    Outcome.INSUFFICIENT_SCOPE: ('Bearer realm="keygate", error="insufficient_scope"', ""),
    Outcome.RATE_LIMITED: ("", '"key";q=2;w=60'),
    Outcome.STORE_UNAVAILABLE: ("", ""),
    Outcome.INTERNAL_ERROR: ("", ""),
}
# Refusals nginx cannot tell apart from another by status and headers: written as the other one.
INDISTINGUISHABLE = {Outcome.VERIFICATION_BUSY: Outcome.TOO_MANY_ATTEMPTS}
# Outcomes only the proxy listener has (a body, an upstream): the authz listener never answers them.
PROXY_ONLY = {Outcome.ALLOWED, Outcome.INVALID_UPGRADE, Outcome.INVALID_BODY, Outcome.BODY_TOO_LARGE,
              Outcome.CLIENT_TIMEOUT, Outcome.UPSTREAM_UNAVAILABLE, Outcome.UPSTREAM_TIMEOUT}


class TestNginx(IngressContract):
    ingress_type = Nginx
    # Keygate unreachable: the snippet's own 503, in Keygate's words (the store-down answer, without Retry-After).
    unreachable_status = 503
    # keygate-headers.conf adds them (add_header ... always).
    ratelimit_on_success = True
    # auth_request makes it a 500; @keygate_denied writes it again, byte for byte.
    passes_keygate_503 = True
    # proxy_set_header with an empty value sends no header.
    passes_empty_identity_headers = False
    # proxy_set_header names headers one by one.
    drops_unknown_keygate_headers = False

    def check_unreachable_answer(self, answer: Answer) -> None:
        assert (answer.json["error"], answer.json["error_description"]) == answer_of(Outcome.STORE_UNAVAILABLE)[1:3]
        assert answer.headers["Cache-Control"] == "no-store" and "Retry-After" not in answer.headers

    @pytest.mark.parametrize(("path", "authorization"), [
        ("/api/servers/prod-2/x/..%2fdeploy", "key"), ("/api/servers/prod-2/status", "key key"),
    ], ids=["ambiguous-path", "two-keys-in-one-header"])
    async def test_a_400_turned_into_500_by_auth_request_is_written_as_keygate_s(
        self, client: aiohttp.ClientSession, ingress: Nginx, keygate: Keygate, upstream: Upstream, path: str,
        authorization: str,
    ) -> None:
        """Refusals that auth_request turns into a 500 reach the client as the proxy listener writes them."""
        _, key = await keygate.key(name="reader", role="admin")
        headers = {"Authorization": "Bearer " + authorization.replace("key", key), "X-Request-Id": "via-500"}
        before = upstream.count()
        inline = await call(client, keygate.proxy_url, path, headers=headers)
        through = await call(client, ingress.url, path, headers=headers)
        assert inline.status == 400
        assert (through.status, through.body) == (inline.status, inline.body)
        assert through.significant_headers() == inline.significant_headers()
        assert upstream.count() == before


# --- the snippets' tables against Keygate's ---------------------------------------------------------


def nginx_map(text: str, name: str) -> list[tuple[str, str]]:
    """The (key, value) lines of ``map ... $name { ... }`` in order, quotes removed."""
    block = re.search(r"map [^{]*\$" + re.escape(name) + r" \{\n(.*?)\n\}", text, re.S)
    assert block is not None, f"no map for ${name}"
    token = r"""'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[^\s;'"]+"""
    entries = []
    for line in block[1].splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, value = re.findall(token, line)[:2]
        entries.append((_unquote(key), _unquote(value)))
    return entries


def _unquote(token: str) -> str:
    """A word as nginx reads it: quotes removed, and in quotes only \\" \\' \\\\ unescaped (\\| stays \\|)."""
    if token[:1] in "'\"":
        return re.sub(r"""\\(["'\\])""", r"\1", token[1:-1])
    return token


def classify(status: int | str, challenge: str, policy: str) -> str:
    """The outcome keygate-http.conf's first map finds for an answer, as nginx reads it (first regex that matches)."""
    subject = f"{status}|{challenge}|{policy}"
    for key, value in nginx_map((NGINX_DIR / "keygate-http.conf").read_text(), "keygate_outcome"):
        if key.startswith("~") and re.search(key[1:], subject):
            return value
    return dict(nginx_map((NGINX_DIR / "keygate-http.conf").read_text(), "keygate_outcome"))["default"]


def statuses_written() -> dict[str, int]:
    """Outcome -> status of @keygate_denied's if/return lines (and its last return for the rest)."""
    text = (NGINX_DIR / "keygate-auth.conf").read_text()
    written = {}
    for names, status in re.findall(r"if \(\$keygate_outcome ~ \^\(([a-z_|]+)\)\$\) \{\s*return (\d{3}) ", text):
        for name in names.split("|"):
            written[name] = int(status)
    [fallback] = re.findall(r"\n    return (\d{3}) \$keygate_body;", text)
    written["default"] = int(fallback)
    return written


def test_every_authz_outcome_is_accounted_for() -> None:
    """Each outcome is one the snippet writes, one it writes as another, or one the authz listener never has."""
    assert set(Outcome) == set(AUTHZ_REFUSALS) | set(INDISTINGUISHABLE) | PROXY_ONLY


@pytest.mark.parametrize("outcome", list(AUTHZ_REFUSALS) + list(INDISTINGUISHABLE), ids=str)
def test_snippet_writes_keygate_s_refusal(outcome: Outcome) -> None:
    """From the status and headers of Keygate's answer the snippet finds the outcome, and writes its status,
    error code and description exactly as Keygate's proxy listener does (its body is json.dumps of them)."""
    status, error, description, challenge = answer_of(outcome)
    written_as = INDISTINGUISHABLE.get(outcome, outcome)
    seen_challenge, policy = AUTHZ_REFUSALS[written_as]
    assert (challenge or "") == (seen_challenge if outcome is written_as else answer_of(written_as)[3] or "")
    found = classify(status, challenge or "", policy)
    assert found == written_as.value
    text = (NGINX_DIR / "keygate-http.conf").read_text()
    errors, descriptions = dict(nginx_map(text, "keygate_error")), dict(nginx_map(text, "keygate_description"))
    expected_error, expected_description = answer_of(written_as)[1:3]
    assert (errors.get(found, errors["default"]), descriptions.get(found, descriptions["default"])) == (
        expected_error, expected_description)
    assert json.dumps(expected_description) == f'"{expected_description}"'  # nothing to escape in the body
    assert statuses_written().get(found, statuses_written()["default"]) == status
    if outcome is written_as:
        assert (error, description) == (expected_error, expected_description)


@pytest.mark.parametrize(("upstream_status", "written"), [("502", 503), ("504", 503), ("", 503), ("200", 500)])
def test_keygate_unreachable_is_refused(upstream_status: str, written: int) -> None:
    """No answer from Keygate (refused, timed out, no live server) is a 503; an nginx failure after an allowed
    answer is a 500: never the request passing."""
    found = classify(upstream_status, "", "")
    assert statuses_written().get(found, statuses_written()["default"]) == written


def test_denied_location_sets_no_header_the_refusal_lacks() -> None:
    """Every header @keygate_denied adds comes from Keygate's answer (empty: nginx adds none) but Cache-Control,
    and X-Request-Id, the id nginx sent Keygate (which Keygate's refusal names too)."""
    text = (NGINX_DIR / "keygate-auth.conf").read_text()
    denied = text[text.index("location @keygate_denied"):]
    headers = re.findall(r"add_header (\S+) (\S+) always;", denied)
    assert {name for name, _ in headers} == {"WWW-Authenticate", "Retry-After", "RateLimit-Policy", "RateLimit",
                                             "X-Keygate-RateLimit-Degraded", "Cache-Control", "X-Request-Id"}
    assert all(value.startswith("$keygate_") for name, value in headers if name != "Cache-Control")


def test_the_last_replica_s_answer_counts() -> None:
    """With several Keygate replicas nginx lists every status tried ("502, 401"): the last one is the answer."""
    assert classify("502, 401", 'Bearer realm="keygate", error="invalid_token"', "") == "invalid_token"
    assert classify("504, 429", "", '"key";q=2;w=60') == "rate_limited"
    assert classify("401, 502", "", "") == "unreachable"


@pytest.mark.parametrize(("ci", "outcome"), [("true", pytest.fail.Exception), ("", pytest.skip.Exception)],
                         ids=["ci", "local"])
def test_a_missing_debian_binary_fails_in_ci_and_skips_elsewhere(ci: str, outcome: type[BaseException]) -> None:
    """Under CI=true a missing nginx (or caddy) is a failure naming the package to install, never a skip."""
    with pytest.raises(outcome, match="apt-get install nginx-light"):
        ingress_binary("no-such-nginx", environ={"CI": ci, "PATH": "/nonexistent"}, debian="nginx-light")
