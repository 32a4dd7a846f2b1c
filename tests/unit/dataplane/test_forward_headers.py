"""What crosses the proxy in headers, both ways: the two filters of stage 8, as tables.

Each case runs twice: the first call judges the header names, the second
reads them from the tables that remember each spelling, and both must give
the same lines. The tables' bounds are checked too (names sent to fill
them never grow them past their size, and long names are never kept).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.dataplane import forward, http1
from gateway.dataplane.http1 import Request
from gateway.dataplane.forward import response_header_block, upstream_request_headers

from .detached import detached_request

ANSWER = b"X-Request-Id: r1\r\n"
VIA = b"Via: 1.1 keygate\r\n"
IDENTITY = b"X-Keygate-Key-Id: k_1\r\n"
ADDED = "X-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: {host}\r\nVia: 1.1 keygate\r\n" \
        "X-Request-Id: r1\r\n"


def _upstream(headers: list[tuple[str, str]], on: Request | None = None, **options: Any) -> str:
    """The client's header lines sent upstream (what Keygate adds after them is checked, then cut); ``on``:
    a request whose connection the request is made on (else a connection of its own)."""
    request = detached_request("GET", headers, local="api") if on is None else \
        Request(on.conn, "GET", "/", "1.1", CIMultiDictProxy(CIMultiDict(headers)), True, False)
    block = upstream_request_headers(
        request, identity=IDENTITY, client_ip="10.0.0.1", peer="10.0.0.1", request_id="r1",
        **({"pass_credentials": False, "peer_trusted": False} | options))
    added = ADDED.format(host=request.host).encode() + IDENTITY
    assert block.endswith(added)
    return block[:-len(added)].decode("latin-1")


REQUEST_CASES: list[tuple[list[tuple[str, str]], dict[str, Any], str]] = [
    ([("Accept", "*/*"), ("User-Agent", "ci")], {}, "Accept: */*\r\nUser-Agent: ci\r\n"),
    # The key goes upstream only where a route passes it.
    ([("Authorization", "Bearer kg_x"), ("Accept", "*/*")], {}, "Accept: */*\r\n"),
    ([("Authorization", "Bearer kg_x")], {"pass_credentials": True}, "Authorization: Bearer kg_x\r\n"),
    # Identity headers are Keygate's alone, however a client spells them.
    ([("X-Keygate-Key-Id", "k_forged"), ("x-keygate-org", "acme"), ("X_Keygate_Key_Id", "k_forged"),
      ("X-KEYGATE-", "x"), ("X-Keygate", "kept: not the prefix")], {}, "X-Keygate: kept: not the prefix\r\n"),
    # Hop-by-hop, and those Keygate sets itself.
    ([("Connection", "keep-alive"), ("Keep-Alive", "timeout=5"), ("TE", "trailers"), ("Upgrade", "h2c"),
      ("Host", "evil"), ("X-Forwarded-For", "1.2.3.4"), ("X-Request-Id", "mine"), ("Content-Length", "0"),
      ("Accept", "*/*")], {}, "Accept: */*\r\n"),
    # A header the Connection header names is hop-by-hop too, in any spelling.
    ([("Connection", "X-Debug, keep-alive"), ("x-debug", "1"), ("X_Debug", "2"), ("Accept", "*/*")], {},
     "Accept: */*\r\n"),
    # Forgeable forwarding and path or method overrides, from an untrusted client.
    ([("X-Real-IP", "1.2.3.4"), ("X-Original-URL", "/admin"), ("X-HTTP-Method-Override", "DELETE"),
      ("Accept", "*/*")], {}, "Accept: */*\r\n"),
    ([("X-HTTP-Method-Override", "DELETE")], {"pass_method_override": True}, "X-HTTP-Method-Override: DELETE\r\n"),
]


@pytest.mark.parametrize(("headers", "options", "sent"), REQUEST_CASES)
def test_request_headers_sent_upstream(headers: list[tuple[str, str]], options: dict[str, Any], sent: str) -> None:
    assert _upstream(headers, **options) == sent
    assert _upstream(headers, **options) == sent  # again, from the remembered spellings


def test_each_request_on_a_connection_gets_the_lines_of_its_own_headers_and_route() -> None:
    """A connection keeps the lines it last sent upstream and what they were made from (a keep-alive client
    repeats its headers): a request with the same headers, judged by the same rules, gets the same lines;
    any other gets its own, whatever came before it on the connection."""
    on = detached_request("GET", [], local="api")
    key = [("Authorization", "Bearer kg_x")]
    order = [*REQUEST_CASES, *REQUEST_CASES[::-1], *[case for case in REQUEST_CASES for _ in (1, 2)],
             # The same headers by other rules: the key goes only where the route passes it.
             (key, {}, ""), (key, {"pass_credentials": True}, "Authorization: Bearer kg_x\r\n"), (key, {}, ""),
             # The same names, one value changed; a name spelled otherwise.
             ([("Accept", "*/*"), ("User-Agent", "ci")], {}, "Accept: */*\r\nUser-Agent: ci\r\n"),
             ([("Accept", "*/*"), ("User-Agent", "cj")], {}, "Accept: */*\r\nUser-Agent: cj\r\n"),
             ([("Accept", "*/*"), ("user-agent", "cj")], {}, "Accept: */*\r\nuser-agent: cj\r\n")]
    for headers, options, sent in order:
        assert _upstream(headers, on, **options) == sent


@pytest.mark.parametrize(("headers", "block"), [
    ([(b"Content-Type", b"text/plain"), (b"ETag", b'"1"')], b'Content-Type: text/plain\r\nETag: "1"\r\n'),
    # Framing and hop-by-hop headers are Keygate's own on the way back.
    ([(b"Connection", b"keep-alive"), (b"Keep-Alive", b"timeout=5"), (b"Content-Length", b"3"),
      (b"Transfer-Encoding", b"chunked"), (b"Server", b"app")], b"Server: app\r\n"),
    ([(b"connection", b"close"), (b"Server", b"app")], b"Server: app\r\n"),
    # What Keygate answers itself replaces the upstream's.
    ([(b"X-Request-Id", b"theirs"), (b"RateLimit", b"x"), (b"ratelimit-policy", b"y"), (b"Server", b"app")],
     b"Server: app\r\n"),
    # Headers the Connection header names are dropped, whatever their case or order.
    ([(b"X-Secret", b"1"), (b"Connection", b"X-Secret, Keep-Alive"), (b"x-other", b"2"), (b"Server", b"app")],
     b"x-other: 2\r\nServer: app\r\n"),
    ([(b"Connection", b"close"), (b"Connection", b"x-trace"), (b"X-Trace", b"1"), (b"Server", b"app")],
     b"Server: app\r\n"),
    ([(b"Connection", b"Keep-Alive, close"), (b"Server", b"app")], b"Server: app\r\n"),
])
def test_response_headers_sent_back(headers: list[tuple[bytes, bytes]], block: bytes) -> None:
    assert response_header_block(headers, ANSWER) == block + VIA + ANSWER
    assert response_header_block(headers, ANSWER) == block + VIA + ANSWER


@pytest.fixture
def empty_memos() -> Iterator[None]:
    """The remembered spellings, emptied for a test and given back after it: emptied in place, as the
    compiled build reads them (Final: the module attribute is not looked up again, a replacement unseen)."""
    saved = dict(forward._REQUEST_NAMES), dict(forward._RESPONSE_NAMES)
    forward._REQUEST_NAMES.clear()
    forward._RESPONSE_NAMES.clear()
    yield
    forward._REQUEST_NAMES.clear()
    forward._RESPONSE_NAMES.clear()
    forward._REQUEST_NAMES.update(saved[0])
    forward._RESPONSE_NAMES.update(saved[1])


@pytest.mark.usefixtures("empty_memos")
def test_remembered_spellings_stay_bounded() -> None:
    size = forward._MEMO_SIZE
    for i in range(size * 2 + 3):
        _upstream([(f"X-Filler-{i}", "1")])
        response_header_block([(b"X-Filler-%d" % i, b"1")], ANSWER)
        assert len(forward._REQUEST_NAMES) <= size and len(forward._RESPONSE_NAMES) <= size
    # A long name is judged as any other, and not kept.
    long = "X-" + "a" * forward._MEMO_NAME
    forward._REQUEST_NAMES.clear()
    forward._RESPONSE_NAMES.clear()
    assert _upstream([(long, "1")]) == f"{long}: 1\r\n"
    assert _upstream([("X-Keygate-" + "a" * forward._MEMO_NAME, "forged")]) == ""
    assert response_header_block([(long.encode(), b"1")], ANSWER) == f"{long}: 1\r\n".encode() + VIA + ANSWER
    assert forward._REQUEST_NAMES == {} and forward._RESPONSE_NAMES == {}


def test_a_connection_keeps_only_short_header_lines() -> None:
    """What a connection keeps of its last request is bounded: lines over http1.MEMO_BLOCK are sent, not kept
    (an idle connection would hold a 64 KiB head otherwise)."""
    on = detached_request("GET", [], local="api")
    small = [("Accept", "*/*")]
    assert _upstream(small, on) == "Accept: */*\r\n"
    assert on.conn.sent_pairs == small
    large = [("Cookie", "c" * http1.MEMO_BLOCK)]
    assert _upstream(large, on) == f"Cookie: {'c' * http1.MEMO_BLOCK}\r\n"
    assert on.conn.sent_pairs == small and len(on.conn.sent_lines) <= http1.MEMO_BLOCK
    assert _upstream(small, on) == "Accept: */*\r\n"
