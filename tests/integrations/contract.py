"""What a client sees through an ingress that asks Keygate's authz listener, whichever ingress it is.

``test_nginx.py`` and ``test_caddy.py`` each subclass :class:`IngressContract`
and name their ingress with a ``make_ingress`` fixture. Every request goes
client -> ingress -> (Keygate decides) -> upstream, all real processes; the
upstream echoes what it received.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import time
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import pytest
from multidict import CIMultiDict

from gateway.keys import generate

from ..e2e.conftest import bearer, wrong_secret
from ..e2e.harness import KEYGATE, Keygate, Upstream, clean_env, stored_requests
from .conftest import CLIENT, INGRESS_PEER, OTHER_CLIENT, MakeIngress, session_from, start_keygate
from .ingresses import Ingress

READ = "/api/servers/prod/status"
DEPLOY = "/api/servers/prod/deploy"
# The parts of a refusal that are Keygate's: the rest (Date, Server, Connection, framing) is the server's own.
KEYGATE_HEADERS = ("WWW-Authenticate", "Retry-After", "RateLimit-Policy", "RateLimit", "Cache-Control",
                   "Content-Type")

Answer = tuple[int, CIMultiDict[str], bytes]


async def send(http: aiohttp.ClientSession, url: str, path: str, headers: dict[str, str] | None = None,
               method: str = "GET", data: bytes | None = None) -> Answer:
    async with http.request(method, url + path, headers=headers or {}, data=data) as r:
        return r.status, r.headers.copy(), await r.read()


def received(body: bytes) -> tuple[dict[str, Any], CIMultiDict[str]]:
    """What the echoing upstream received: the request, and its headers."""
    echo = json.loads(body)
    return echo, CIMultiDict((name, value) for name, value in echo["headers"])


def keygate_part(answer: Answer) -> tuple[int, dict[str, list[str]], bytes]:
    status, headers, body = answer
    return status, {name: headers.getall(name, []) for name in KEYGATE_HEADERS}, body


class IngressContract:
    """Issue 14's cases, each through the real ingress; subclasses may relax what an ingress cannot do."""

    # What the ingress answers when Keygate cannot be reached (fail closed).
    unreachable_statuses: ClassVar[frozenset[int]] = frozenset({500, 502, 503})

    # --- 200 ---------------------------------------------------------------------------------------

    async def test_allowed_request_carries_identity_upstream_and_not_the_key(
        self, client: aiohttp.ClientSession, ingress: Ingress, keygate: Keygate,
    ) -> None:
        """The upstream gets the verified key's identity, Keygate's request id and no Authorization;
        identity headers the client wrote are not believed."""
        record, key = await keygate.key(name="ci", role="admin")
        forged = {"X-Keygate-Key-Id": "kg_forged", "X-Keygate-User": "mallory", "X-Keygate-Org": "evil",
                  "X-Keygate-Authorization": f"Bearer {key}"}
        status, headers, body = await send(client, ingress.url, READ + "?page=2", {**bearer(key), **forged})
        assert status == 200, body
        echo, seen = received(body)
        assert (echo["method"], echo["path"]) == ("GET", READ + "?page=2")
        assert seen["X-Keygate-Key-Id"] == record.id
        assert (seen["X-Keygate-Key-Name"], seen["X-Keygate-Role"]) == ("ci", "admin")
        assert seen.getall("X-Keygate-Org") == [record.org]
        assert seen.getall("X-Keygate-User", [""]) == [""]  # the key has no user: empty, or (nginx) absent
        assert "Authorization" not in seen  # nor the forged X-Keygate-Authorization turned into one (Caddy)
        # (nginx passes headers it does not know, such as the forged X-Keygate-Authorization, on as they are.)
        assert not [name for name, value in seen.items() if key in value and name != "X-Keygate-Authorization"]
        assert seen["X-Request-Id"] == headers["X-Request-Id"]
        assert headers["RateLimit-Policy"] == '"key";q=100;w=60' and headers["RateLimit"].startswith('"key";r=')

    async def test_client_request_id_goes_through(
        self, client: aiohttp.ClientSession, ingress: Ingress, keygate: Keygate,
    ) -> None:
        """A client's sane X-Request-Id is the one the upstream and the client see, as on the proxy listener."""
        _, key = await keygate.key(name="traced", role="admin")
        status, headers, body = await send(client, ingress.url, READ, {**bearer(key), "X-Request-Id": "trace-42"})
        assert status == 200 and headers["X-Request-Id"] == "trace-42"
        assert received(body)[1]["X-Request-Id"] == "trace-42"

    async def test_pass_credentials_route_hands_the_key_upstream(
        self, client: aiohttp.ClientSession, ingress: Ingress, keygate: Keygate,
    ) -> None:
        """On a route with pass_credentials the upstream gets the client's Authorization as it was."""
        _, key = await keygate.key(name="registry", operations=["private"])
        status, _, body = await send(client, ingress.url, "/private/login", bearer(key))
        assert status == 200, body
        assert received(body)[1].getall("Authorization") == [f"Bearer {key}"]

    async def test_request_body_reaches_the_upstream(
        self, client: aiohttp.ClientSession, ingress: Ingress, keygate: Keygate,
    ) -> None:
        """Keygate decides without the body; the upstream still gets all of it."""
        _, key = await keygate.key(name="deployer", operations=["deploy"])
        payload = bytes(range(256)) * 1000
        status, _, body = await send(client, ingress.url, DEPLOY, bearer(key), method="POST", data=payload)
        assert status == 200, body
        echo, _ = received(body)
        assert (echo["method"], echo["body_len"]) == ("POST", len(payload))
        assert echo["body_sha256"] == hashlib.sha256(payload).hexdigest()

    async def test_decision_is_recorded_with_the_original_request_and_client(
        self, client: aiohttp.ClientSession, ingress: Ingress, keygate: Keygate,
    ) -> None:
        """Keygate records what the client asked for, from where, not the ingress's subrequest."""
        record, key = await keygate.key(name="recorded", operations=["servers:read"])
        assert (await send(client, ingress.url, DEPLOY, bearer(key), method="POST"))[0] == 403
        [stored] = await stored_requests(keygate, record.id)
        assert (stored.method, stored.path, stored.client_ip, stored.decision, stored.status) == (
            "POST", DEPLOY, CLIENT, "insufficient_scope", 403)

    # --- 400, 401: the proxy listener's refusal --------------------------------------------------------

    @pytest.mark.parametrize("case", ["no-key", "unknown", "wrong-secret", "malformed", "two-keys", "ambiguous-path"])
    async def test_refusal_is_the_proxy_listener_s(
        self, client: aiohttp.ClientSession, ingress: Ingress, keygate: Keygate, upstream: Upstream, case: str,
    ) -> None:
        """Status, WWW-Authenticate, Cache-Control, Content-Type and body byte for byte as the proxy
        listener answers the same request (the same request id on both)."""
        record, key = await keygate.key(name="victim", role="admin")
        headers: dict[str, str] = {
            "no-key": {}, "unknown": bearer(generate("kg_").full), "wrong-secret": bearer(wrong_secret(record.id)),
            "malformed": {"Authorization": "Basic dXNlcjpwdw=="}, "two-keys": {"Authorization": f"Bearer {key} {key}"},
            "ambiguous-path": bearer(key),
        }[case]
        path = "/api/servers/prod%2Fstatus" if case == "ambiguous-path" else READ
        headers["X-Request-Id"] = f"refusal-{case}"
        before = upstream.count()
        inline = await send(client, keygate.proxy_url, path, headers)
        through = await send(client, ingress.url, path, headers)
        assert inline[0] in (400, 401), inline
        assert keygate_part(through) == keygate_part(inline)
        assert upstream.count() == before

    # --- 403 -------------------------------------------------------------------------------------------

    @pytest.mark.parametrize("spoof", [
        {}, {"X-Forwarded-For": CLIENT}, {"X-Forwarded-For": f"{CLIENT}, {CLIENT}"},
        {"X-Real-IP": CLIENT, "Forwarded": f"for={CLIENT}"},
    ], ids=["plain", "x-forwarded-for", "x-forwarded-for-chain", "x-real-ip-forwarded"])
    @pytest.mark.parametrize("sender", [OTHER_CLIENT, INGRESS_PEER], ids=["elsewhere", "beside-the-ingress"])
    async def test_client_address_is_the_one_the_ingress_saw(
        self, client: aiohttp.ClientSession, ingress: Ingress, keygate: Keygate, upstream: Upstream,
        sender: str, spoof: dict[str, str],
    ) -> None:
        """A key allowed from 127.0.0.2 only, used from 127.0.0.3 or from the ingress's own address (a hop
        Keygate trusts): ip_not_allowed, whatever address the client claims. The ingress replaces the client's
        X-Forwarded-For with the address it saw; appending to it would let the neighbour in."""
        _, key = await keygate.key(name="office", role="admin", ip_allowlist=[f"{CLIENT}/32"])
        assert (await send(client, ingress.url, READ, bearer(key)))[0] == 200
        headers = {**bearer(key), **spoof, "X-Request-Id": "from-elsewhere"}
        before = upstream.count()
        async with session_from(sender) as http:
            through = await send(http, ingress.url, READ, headers)
            inline = await send(http, keygate.proxy_url, READ, headers)
        assert through[0] == 403 and json.loads(through[2])["error"] == "ip_not_allowed", through
        assert keygate_part(through) == keygate_part(inline)
        assert upstream.count() == before

    @pytest.mark.parametrize(("method", "path", "status"), [
        ("GET", READ, 200), ("GET", DEPLOY, 200), ("POST", DEPLOY, 403), ("DELETE", "/api/servers/prod/x", 200),
    ])
    async def test_scope_is_judged_on_the_original_method_and_path(
        self, client: aiohttp.ClientSession, ingress: Ingress, keygate: Keygate, method: str, path: str,
        status: int,
    ) -> None:
        """A key that may read servers but not deploy: the request the client made decides, not the
        ingress's own request to Keygate."""
        _, key = await keygate.key(name="reader", operations=["servers:read"])
        got, headers, body = await send(client, ingress.url, path, bearer(key), method=method)
        assert got == status, body
        if status == 403:
            assert json.loads(body)["error"] == "insufficient_scope"
            assert headers["WWW-Authenticate"] == 'Bearer realm="keygate", error="insufficient_scope"'
        else:
            assert received(body)[0]["method"] == method

    async def test_forged_original_request_headers_change_nothing(
        self, client: aiohttp.ClientSession, ingress: Ingress, keygate: Keygate, upstream: Upstream,
    ) -> None:
        """Headers that tell Keygate the original request, written by the client, are replaced or dropped by
        the ingress: a deploy claiming to be a read is still a deploy."""
        _, key = await keygate.key(name="reader", operations=["servers:read"])
        forged = {"X-Original-Method": "GET", "X-Original-URI": READ, "X-Original-URL": f"http://api{READ}",
                  "X-Forwarded-Method": "GET", "X-Forwarded-Uri": READ}
        before = upstream.count()
        status, _, body = await send(client, ingress.url, DEPLOY, {**bearer(key), **forged}, method="POST")
        assert status == 403 and json.loads(body)["error"] == "insufficient_scope"
        assert upstream.count() == before

    async def test_method_and_path_overrides_never_reach_the_upstream(
        self, client: aiohttp.ClientSession, ingress: Ingress, keygate: Keygate,
    ) -> None:
        """Headers by which an upstream could run another method or path than Keygate judged are dropped."""
        _, key = await keygate.key(name="reader", operations=["servers:read"])
        overrides = {"X-HTTP-Method-Override": "DELETE", "X-HTTP-Method": "DELETE", "X-Method-Override": "DELETE",
                     "X-Original-URL": DEPLOY, "X-Rewrite-URL": DEPLOY, "X-Original-URI": DEPLOY,
                     "X-Original-Method": "POST", "X-Forwarded-Uri": DEPLOY, "X-Forwarded-Method": "POST"}
        status, _, body = await send(client, ingress.url, READ, {**bearer(key), **overrides})
        assert status == 200, body
        assert [name for name in overrides if name in received(body)[1]] == []

    # --- 429 -------------------------------------------------------------------------------------------

    async def test_rate_limited_client_sees_429_with_retry_after(
        self, client: aiohttp.ClientSession, ingress: Ingress, keygate: Keygate, upstream: Upstream,
    ) -> None:
        """2/minute: two requests pass, the third is Keygate's 429 with Retry-After and RateLimit headers."""
        _, key = await keygate.key(name="busy", role="admin", rate_limit="2/minute")
        before = upstream.count()
        statuses = [(await send(client, ingress.url, READ, bearer(key)))[0] for _ in range(2)]
        status, headers, body = await send(client, ingress.url, READ, {**bearer(key), "X-Request-Id": "limited"})
        assert statuses == [200, 200] and status == 429, body
        assert headers["Retry-After"] == "30"  # one token every 30 s
        assert headers["RateLimit-Policy"] == '"key";q=2;w=60' and headers["RateLimit"].startswith('"key";r=0;')
        assert headers["Cache-Control"] == "no-store"
        assert json.loads(body) == {"error": "rate_limited", "request_id": "limited",
                                    "error_description": "Too many requests for this API key; retry later."}
        assert upstream.count() == before + 2

    # --- revocation --------------------------------------------------------------------------------------

    async def test_key_revoked_with_the_cli_is_refused_within_a_second(
        self, client: aiohttp.ClientSession, ingress: Ingress, keygate: Keygate,
    ) -> None:
        """`keygate keys revoke` on the store, and the next requests through the ingress get 401 within 1 s."""
        record, key = await keygate.key(name="leaked", role="admin")
        assert (await send(client, ingress.url, READ, bearer(key)))[0] == 200
        done = await asyncio.to_thread(
            subprocess.run, [KEYGATE, "--config", str(keygate.config_path), "keys", "revoke", record.id],
            env=clean_env(), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr
        revoked_at = time.monotonic()
        while (status := (await send(client, ingress.url, READ, bearer(key)))[0]) == 200:
            assert time.monotonic() - revoked_at < 1.0, "still allowed 1 s after the revoke"
            await asyncio.sleep(0.05)
        assert status == 401
        assert (await send(client, ingress.url, READ, bearer(key)))[0] == 401

    # --- fail closed -------------------------------------------------------------------------------------

    async def test_keygate_stopped_means_refused(
        self, client: aiohttp.ClientSession, make_ingress: MakeIngress, upstream: Upstream, tmp_path: Path,
    ) -> None:
        """With Keygate gone the ingress refuses every request (5xx), and none reaches the upstream."""
        (tmp_path / "keygate").mkdir()
        (tmp_path / "ingress").mkdir()
        keygate = start_keygate(tmp_path / "keygate", upstream)
        try:
            ingress = make_ingress(tmp_path / "ingress", keygate, upstream)
        except BaseException:
            keygate.stop()
            raise
        try:
            _, key = await keygate.key(name="ci", role="admin")
            assert (await send(client, ingress.url, READ, bearer(key)))[0] == 200
            keygate.stop()
            before = upstream.count()
            for method, path in (("GET", READ), ("POST", DEPLOY), ("GET", "/private/x")):
                status, _, body = await send(client, ingress.url, path, bearer(key), method=method)
                assert status in self.unreachable_statuses, (status, body)
                self.check_unreachable(status, body)
            assert upstream.count() == before
        finally:
            ingress.stop()
            if keygate.process is not None and keygate.process.poll() is None:
                keygate.stop()

    def check_unreachable(self, status: int, body: bytes) -> None:
        """What else the ingress's answer says when Keygate is gone (nothing, by default)."""
