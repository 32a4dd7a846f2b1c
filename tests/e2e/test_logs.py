"""Logs of ``keygate serve``: one JSON object per line, the access log's fields, no key anywhere."""

from __future__ import annotations

import asyncio
import json
import shlex
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from .conftest import bearer
from .harness import Keygate, Upstream, refusing_port
from .test_499 import download_then_hang_up

BODY = b"x" * 123
# A second upstream with nothing listening: its requests get 502.
DOWN = (
    f'[[upstreams]]\nname = "down"\nurl = "http://127.0.0.1:{refusing_port()}"\nconnect_timeout = 2\n'
    '[[routes]]\npath = "/down/*"\nupstream = "down"\noperation = "read"\n'
)


def start(folder: Any, upstream: Upstream, *, log: str, access_log: bool | None) -> Keygate:
    """A gateway with an authz listener too, logging as ``log`` and ``access_log`` say."""
    proxy = "" if access_log is None else f"access_log = {str(access_log).lower()}\n"
    return Keygate(folder, upstream.url, proxy=proxy, config=log + DOWN, authz="").start()


@pytest.fixture(scope="module")
def json_logs(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keygate]:
    """JSON logs (said explicitly) with the access log on."""
    keygate = start(tmp_path_factory.mktemp("json-logs"), upstream, log='[log]\nformat = "json"\n', access_log=True)
    yield keygate
    keygate.stop()


@pytest.fixture(scope="module")
def text_logs(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keygate]:
    """Text logs with the access log on."""
    keygate = start(tmp_path_factory.mktemp("text-logs"), upstream, log='[log]\nformat = "text"\n', access_log=True)
    yield keygate
    keygate.stop()


@pytest.fixture(scope="module")
def default_logs(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keygate]:
    """Logging as shipped: nothing set."""
    keygate = start(tmp_path_factory.mktemp("default-logs"), upstream, log="", access_log=None)
    yield keygate
    keygate.stop()


async def send(http: aiohttp.ClientSession, gateway: Keygate, method: str, path: str, key: str | None,
               request_id: str) -> tuple[int, str, int, str | None]:
    """Status, the request id the client got (its header; a refusal's body agrees), the response body's length, and the one the upstream got."""
    headers = {**(bearer(key) if key else {}), "X-Request-Id": request_id}
    async with http.request(method, gateway.proxy_url + path, headers=headers,
                            data=BODY if method == "POST" else None) as r:
        body = await r.read()
        if r.status == 200:
            upstream_saw = dict((k.lower(), v) for k, v in json.loads(body)["headers"]).get("x-request-id")
            return r.status, r.headers["X-Request-Id"], len(body), upstream_saw
        # A refusal names the request in its header and its body alike.
        named = json.loads(body)["request_id"]
        assert r.headers["X-Request-Id"] == named
        return r.status, named, len(body), None


async def access_lines(gateway: Keygate, count: int, parse: Any) -> list[dict[str, Any]]:
    """The first ``count`` access lines, once written (after the answer: poll for them)."""
    deadline = time.monotonic() + 10
    while True:
        found = [parse(line) for line in gateway.log().splitlines() if "keygate.access" in line]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.05)


async def access_line(gateway: Keygate, request_id: str) -> dict[str, Any]:
    """The JSON access line of ``request_id``, once written."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for line in await access_lines(gateway, 0, parse_json):
            if line["request_id"] == request_id:
                return line
        await asyncio.sleep(0.05)
    raise AssertionError(f"no access line for {request_id}")


def parse_json(line: str) -> dict[str, Any]:
    return json.loads(line)  # type: ignore[no-any-return]


def parse_text(line: str) -> dict[str, Any]:
    """A text access line's name=value pairs (values as the JSON format would hold them)."""
    _time, level, logger, event, *pairs = shlex.split(line)  # quoted values are JSON strings: shell-quotable
    fields: dict[str, Any] = {"level": level.lower(), "logger": logger, "event": event}
    for pair in pairs:
        name, _, value = pair.partition("=")
        try:
            fields[name] = json.loads(value)
        except ValueError:
            fields[name] = value
    return fields


# The requests each access-logging gateway gets, and what its line must say.
CASES = [
    # (request id, method, path, key, status, key id?, server, operation, upstream, decision)
    ("logs-200", "POST", "/echo?token={key}", "writer", 200, True, "app", "write", "app", "allowed"),
    ("logs-401", "GET", "/echo", None, 401, False, None, None, None, "no_credentials"),
    ("logs-403", "POST", "/echo", "reader", 403, True, "app", "write", "app", "insufficient_scope"),
    ("logs-502", "GET", "/down/x", "writer", 502, True, "down", "read", "down", "upstream_unavailable"),
]


@pytest.mark.parametrize("gateway_name, parse", [("json_logs", parse_json), ("text_logs", parse_text)])
async def test_access_line_per_request(http: aiohttp.ClientSession, request: pytest.FixtureRequest,
                                       gateway_name: str, parse: Any) -> None:
    """Each proxied request (200, 401, 403, 502, and a 499) is one access line with its fields and request id."""
    gateway: Keygate = request.getfixturevalue(gateway_name)
    writer, writer_key = await gateway.key(name="writer", operations=["*"])
    reader, reader_key = await gateway.key(name="reader", operations=["read"])
    keys = {"writer": (writer.id, writer_key), "reader": (reader.id, reader_key), None: (None, None)}
    answers = {}
    for request_id, method, path, who, *_ in CASES:
        key_id, key = keys[who]
        answers[request_id] = await send(http, gateway, method, path.format(key=key), key, request_id)
    got = await asyncio.to_thread(download_then_hang_up, gateway.proxy_port, writer_key, f"/bytes/{1 << 30}",
                                  1 << 20, 0.0)
    deadline = time.monotonic() + 10
    while True:  # the lines are written after the answers: wait for all of them (and the 499's)
        lines = {line["request_id"]: line for line in await access_lines(gateway, 0, parse)}
        written = {case[0] for case in CASES} <= lines.keys() \
            and any(line["path"] == f"/bytes/{1 << 30}" for line in lines.values())
        if written or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)

    for request_id, method, path, who, status, has_key, server, operation, upstream, decision in CASES:
        line = lines[request_id]
        client_status, client_saw, body_length, upstream_saw = answers[request_id]
        assert (client_status, client_saw) == (status, request_id)
        if status == 200:
            assert upstream_saw == request_id  # one id for the client, Keygate's log and the upstream
        assert {k: line.get(k) for k in (
            "level", "logger", "event", "listener", "method", "server", "operation", "upstream", "status", "decision",
            "client", "bytes_out")} == {
            "level": "info", "logger": "keygate.access", "event": "request", "listener": "proxy", "method": method,
            "server": server, "operation": operation, "upstream": upstream, "status": status, "decision": decision,
            "client": "127.0.0.1", "bytes_out": body_length,
        }, line
        # A refused POST's body may or may not have arrived by the time its line is written.
        assert line["bytes_in"] == len(BODY) if status == 200 else line["bytes_in"] in (0, len(BODY))
        assert line.get("key_id") == (keys[who][0] if has_key else None)
        if status == 403:
            assert line["reason"] == "operation 'write' not granted"
        assert line["path"] == path.format(key=writer.id)  # the key in the query shown as its id
        assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
    [gone] = [line for line in lines.values() if line["path"] == f"/bytes/{1 << 30}"]
    assert (gone["status"], gone["key_id"], gone["decision"]) == (499, writer.id, "allowed")
    assert gone["bytes_out"] >= got - 4096  # what was written to the client, less the head

    log = gateway.log()
    for _key_id, key in keys.values():
        # SECURITY: the full key never appears in a log, however it reached Keygate.
        assert key is None or key not in log


@pytest.mark.parametrize(("listener", "with_key", "status"), [
    ("proxy", True, 200), ("proxy", False, 401), ("authz", True, 200), ("admin", True, 403)])
async def test_a_key_sent_as_the_request_id_is_replaced_and_never_logged(
        http: aiohttp.ClientSession, json_logs: Keygate, listener: str, with_key: bool, status: int) -> None:
    """SECURITY: a key pasted into X-Request-Id is not used as the id: not logged, not sent on, not answered."""
    _, key = await json_logs.key(name=f"pasted-{listener}-{status}", operations=["*"])
    url = {"proxy": json_logs.proxy_url + "/echo", "authz": json_logs.authz_url + "/echo",
           "admin": json_logs.admin_url + "/admin/v1/keys"}[listener]
    async with http.get(url, headers={**(bearer(key) if with_key else {}), "X-Request-Id": key}) as r:
        assert r.status == status
        body = await r.text()
        # Answered in the header, allowed or refused (a refusal's JSON body names it too).
        answered = r.headers["X-Request-Id"]
        if listener == "proxy" and status != 200:
            assert json.loads(body)["request_id"] == answered
    assert answered and answered != key and key not in body
    await asyncio.sleep(0.3)  # the access line is written right after the answer
    assert key not in json_logs.log()


@pytest.mark.parametrize(("key_or_not", "status", "decision"), [(True, 200, "allowed"), (False, 401, "no_credentials")])
async def test_authz_decisions_get_access_lines(http: aiohttp.ClientSession, json_logs: Keygate, key_or_not: bool,
                                               status: int, decision: str) -> None:
    """The authz listener's answers are access lines too: listener authz, no upstream, no bytes sent on."""
    record, key = await json_logs.key(name="ingress-checked", operations=["read"])
    request_id = f"logs-authz-{status}"
    headers = {**(bearer(key) if key_or_not else {}), "X-Request-Id": request_id}
    async with http.get(json_logs.authz_url + "/things", headers=headers) as r:
        assert r.status == status
    line = await access_line(json_logs, request_id)
    assert {k: line[k] for k in ("listener", "key_id", "method", "path", "upstream", "status", "decision")} == {
        "listener": "authz", "key_id": record.id if key_or_not else None, "method": "GET", "path": "/things",
        "upstream": None, "status": status, "decision": decision}


async def test_every_json_line_is_one_object(http: aiohttp.ClientSession, json_logs: Keygate) -> None:
    """Everything keygate serve wrote to stderr (startup, access lines, refusals) is one JSON object per line."""
    await send(http, json_logs, "GET", "/echo", None, "logs-any")
    await access_lines(json_logs, 1, parse_json)
    for line in json_logs.log().splitlines():
        fields = json.loads(line)
        assert isinstance(fields, dict) and {"time", "level", "logger"} <= fields.keys(), line
        assert fields["time"].endswith("Z")


async def test_access_log_is_off_by_default(http: aiohttp.ClientSession, default_logs: Keygate) -> None:
    """Without proxy.access_log, requests write no line; the other lines are JSON."""
    _, key = await default_logs.key(name="ci", operations=["*"])
    for key_or_none in (key, None):
        assert (await send(http, default_logs, "GET", "/echo", key_or_none, "logs-off"))[0] in (200, 401)
    await asyncio.sleep(0.5)  # an access line would be written right after the answer
    lines = default_logs.log().splitlines()
    assert lines and all(json.loads(line)["logger"] != "keygate.access" for line in lines)
    assert key not in default_logs.log()


async def test_a_record_written_during_a_request_names_it(http: aiohttp.ClientSession, json_logs: Keygate) -> None:
    """A warning written while a request is handled (an issuer's keys not fetched during an exchange) has its id."""
    from tests.identity_issuer import OidcIssuer

    from .test_exchange import GRANT, ID_TOKEN, TOKEN, now, trust

    async with OidcIssuer() as issuer:
        await trust(json_logs, "logs-down", issuer.url)
        issuer.status = 503
        form = {"grant_type": GRANT, "subject_token_type": ID_TOKEN,
                "subject_token": issuer.token(issuer.github_claims(now()))}
        async with http.post(json_logs.proxy_url + TOKEN, data=form, headers={"X-Request-Id": "logs-exchange"}) as r:
            assert r.status == 503
    warnings = [fields for fields in map(json.loads, json_logs.log().splitlines())
                if fields["logger"] == "keygate.identity" and fields.get("message", "").startswith("signing keys of")]
    assert warnings and all(fields["request_id"] == "logs-exchange" for fields in warnings), warnings
