"""The token endpoint refuses malformed exchanges before any token is looked at (RFC 6749 section 5.2 answers).

`keygate serve` as a user runs it; no issuer is needed: nothing here gets as
far as verifying a token (the tokens' own cases are in test_exchange.py).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import aiohttp
import pytest

from .conftest import metric
from .harness import Keygate, Upstream
from .rawhttp import closed_by_server, read_response

TOKEN = "/.well-known/keygate/token"
FORM = "application/x-www-form-urlencoded"
GRANT = "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange"
ID_TOKEN = "subject_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Aid_token"
A_JWT = "subject_token=eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJodHRwczovL3guZXhhbXBsZSJ9.c2ln"


@pytest.fixture(scope="module")
def gateway(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keygate]:
    # Every case of this module from one address: a limit the cases never reach.
    keygate = Keygate(tmp_path_factory.mktemp("exchange-requests"), upstream.url,
                      config='[exchange]\nper_client = "1000/minute"\n').start()
    yield keygate
    keygate.stop()


async def post(http: aiohttp.ClientSession, gateway: Keygate, body: bytes | str, *,
               content_type: str | None = FORM, method: str = "POST", path: str = TOKEN,
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], dict[str, str]]:
    sent = dict(headers or {})
    if content_type is not None:
        sent["Content-Type"] = content_type
    async with http.request(method, gateway.proxy_url + path, data=body, headers=sent) as r:
        raw = await r.read()
        return r.status, dict(r.headers), json.loads(raw) if raw else {}


REFUSED = [
    # (case, method, content type, body, status, error, description contains)
    ("not a form", "POST", "application/json", '{"grant_type": "x"}', 400, "invalid_request", "x-www-form-urlencoded"),
    ("no content type", "POST", None, f"{GRANT}&{ID_TOKEN}&{A_JWT}", 400, "invalid_request", "x-www-form-urlencoded"),
    ("no grant type", "POST", FORM, f"{ID_TOKEN}&{A_JWT}", 400, "invalid_request", "grant_type is required"),
    ("another grant type", "POST", FORM, f"grant_type=client_credentials&{ID_TOKEN}&{A_JWT}", 400,
     "unsupported_grant_type", "token-exchange"),
    ("no subject token", "POST", FORM, f"{GRANT}&{ID_TOKEN}", 400, "invalid_request", "subject_token is required"),
    ("empty subject token", "POST", FORM, f"{GRANT}&{ID_TOKEN}&subject_token=", 400, "invalid_request",
     "subject_token is required"),
    ("no subject token type", "POST", FORM, f"{GRANT}&{A_JWT}", 400, "invalid_request", "subject_token_type"),
    ("an access token as subject", "POST", FORM,
     f"{GRANT}&subject_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Aaccess_token&{A_JWT}", 400,
     "invalid_request", "subject_token_type"),
    ("a parameter twice", "POST", FORM, f"{GRANT}&{ID_TOKEN}&{A_JWT}&{A_JWT}", 400, "invalid_request",
     "more than once"),
    ("delegation", "POST", FORM, f"{GRANT}&{ID_TOKEN}&{A_JWT}&actor_token=x&actor_token_type=y", 400,
     "invalid_request", "actor_token"),
    ("a refresh token wanted", "POST", FORM,
     f"{GRANT}&{ID_TOKEN}&{A_JWT}&requested_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Arefresh_token",
     400, "invalid_request", "access_token"),
    ("not UTF-8", "POST", FORM, b"grant_type=\xff\xfe", 400, "invalid_request", "well-formed form"),
    ("not a JWT", "POST", FORM, f"{GRANT}&{ID_TOKEN}&subject_token=hello", 400, "invalid_grant", "not accepted"),
    ("a JWT of an issuer no policy trusts", "POST", FORM, f"{GRANT}&{ID_TOKEN}&{A_JWT}", 400, "invalid_grant",
     "not accepted"),
    ("a GET", "GET", None, "", 405, "invalid_request", "POST"),
    ("over 16 KiB", "POST", FORM, f"{GRANT}&{ID_TOKEN}&subject_token=" + "a" * 17000, 413, "invalid_request",
     "larger than"),
]


@pytest.mark.parametrize(("case", "method", "content_type", "body", "status", "error", "says"), REFUSED,
                         ids=[c[0] for c in REFUSED])
async def test_malformed_exchange_is_refused_as_oauth_error(
    http: aiohttp.ClientSession, gateway: Keygate, upstream: Upstream, case: str, method: str,
    content_type: str | None, body: str | bytes, status: int, error: str, says: str,
) -> None:
    before = upstream.count()
    got, headers, answer = await post(http, gateway, body, content_type=content_type, method=method)
    assert (got, answer["error"]) == (status, error), answer
    assert says in answer["error_description"]
    assert headers["Content-Type"].startswith("application/json")
    assert headers["Cache-Control"] == "no-store"
    assert answer["request_id"]
    if status == 405:
        assert headers["Allow"] == "POST"
    assert "access_token" not in answer
    assert upstream.count() == before, "Keygate's own endpoint was forwarded"
    assert "Traceback" not in gateway.log()


async def test_unknown_keygate_path_is_404_and_never_forwarded(
    http: aiohttp.ClientSession, gateway: Keygate, upstream: Upstream,
) -> None:
    before = upstream.count()
    status, _, answer = await post(http, gateway, "", path="/.well-known/keygate/keys")
    assert (status, answer["error"]) == (404, "not_found")
    assert upstream.count() == before


async def test_refusals_are_counted_by_result(http: aiohttp.ClientSession, gateway: Keygate) -> None:
    before = await metric(http, gateway, "keygate_token_exchanges_total", result="unsupported_grant_type")
    await post(http, gateway, f"grant_type=password&{ID_TOKEN}&{A_JWT}")
    for _ in range(20):
        if await metric(http, gateway, "keygate_token_exchanges_total", result="unsupported_grant_type") > before:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the refusal was not counted")


async def test_exchanges_past_the_client_limit_get_429_before_the_body_is_read(
    upstream: Upstream, tmp_path_factory: pytest.TempPathFactory, http: aiohttp.ClientSession,
) -> None:
    keygate = Keygate(tmp_path_factory.mktemp("exchange-limit"), upstream.url,
                      config='[exchange]\nper_client = "3/hour"\n').start()
    try:
        answers = [await post(http, keygate, f"{GRANT}&{ID_TOKEN}&{A_JWT}") for _ in range(3)]
        assert [a[0] for a in answers] == [400, 400, 400]
        # The fourth is refused whatever its body: the limit comes first.
        status, headers, answer = await post(http, keygate, b"\xff" * 20000)
        assert (status, answer["error"]) == (429, "temporarily_unavailable")
        assert int(headers["Retry-After"]) > 60  # 3/hour: one exchange back every 20 minutes
    finally:
        keygate.stop()


async def test_a_body_trickled_byte_by_byte_gets_408_within_the_body_deadline(gateway: Keygate) -> None:
    """A body that keeps arriving, one byte at a time, cannot hold the exchange (and the connection) for hours."""
    from gateway.identity.exchange import BODY_DEADLINE

    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.proxy_port)
    writer.write(f"POST {TOKEN} HTTP/1.1\r\nHost: x\r\nContent-Type: {FORM}\r\nContent-Length: 16000\r\n\r\n".encode())

    async def trickle() -> None:
        while True:  # well within the client timeout between bytes, so only a deadline for the whole body ends it
            writer.write(b"a")
            await writer.drain()
            await asyncio.sleep(0.5)

    sending = asyncio.create_task(trickle())
    try:
        response = await read_response(reader, timeout=BODY_DEADLINE + 5)
        assert response is not None and response.status == 408
        assert response.json()["error"] == "invalid_request"
        assert await closed_by_server(reader, 5)
    finally:
        sending.cancel()
        writer.close()
