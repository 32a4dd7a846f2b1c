"""What an upstream sends outside an exchange is never another client's, and answers Keygate does not relay.

- Bytes that arrive on a pooled upstream connection while it is idle (the body of a HEAD response that
  came in a write of its own, a second response) are parsed into the next exchange on it: another
  client's response then starts with them (upstream_pool.UpstreamConnection.data_received/finish).
- A ``101`` to a request that was forwarded as a plain request is relayed to the client.
- An upstream that answers before it has read the request body gets a 502/504 instead of its answer.
- A body delimited by the close that the upstream cut short with a reset is relayed as if whole.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from .harness import Keygate
from .rawhttp import read_response, until_last_chunk
from .scripted_upstream import ScriptedUpstream
from ..waiting import until


@pytest.fixture(scope="module")
def kg(scripted: ScriptedUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keygate]:
    keygate = Keygate(tmp_path_factory.mktemp("r13pool"), scripted.url).start()
    yield keygate
    keygate.stop()


async def one(port: int, raw: bytes, *, bodyless: bool = False) -> bytes:
    """One request on a connection of its own; the response's head (and body, unless a HEAD or ``bodyless``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    try:
        if bodyless or raw.startswith(b"HEAD"):
            return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        response = await read_response(reader, 5)
        assert response is not None
        return response.head + response.body
    finally:
        writer.close()


def get(path: str, key: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {key}\r\n\r\n".encode()


async def test_bytes_after_a_head_response_are_not_spliced_into_another_client_s_response(
    kg: Keygate, scripted: ScriptedUpstream,
) -> None:
    """An upstream that sends a HEAD's body (a common bug) whose content a client chose (a stored file)."""
    _, attacker = await kg.key(name="attacker", role="admin")
    _, victim = await kg.key(name="victim", role="admin")
    since = len(scripted.strayed)
    await one(kg.proxy_port, get("/head-body", attacker, "HEAD"))
    # The "body" arrives on the idle pooled connection; a Keygate that keeps the connection is caught below.
    await until(lambda: scripted.stray_dropped(since))
    answer = await one(kg.proxy_port, get("/victim", victim))
    assert b"attacker" not in answer, answer


@pytest.mark.parametrize("method,path", [("HEAD", "/late-body"), ("GET", "/not-modified-late")])
async def test_a_bodyless_answer_that_announced_a_body_ends_its_connection(
    kg: Keygate, scripted: ScriptedUpstream, method: str, path: str,
) -> None:
    """The announced body comes 0.3 s after the head: the next client, sent at once, would be given it as its
    own response if the connection went back to the pool (a HEAD's Content-Length is the usual case)."""
    _, attacker = await kg.key(name="attacker", role="admin")
    _, victim = await kg.key(name="victim", role="admin")
    since = len(scripted.strayed)
    answer = await one(kg.proxy_port, get(path, attacker, method), bodyless=True)
    assert answer.startswith(b"HTTP/1.1 " + (b"200" if method == "HEAD" else b"304")), answer
    before = scripted.connections
    answer = await one(kg.proxy_port, get("/victim", victim))
    assert b"EVIL" not in answer, answer
    assert answer.endswith(b"ok GET /victim"), answer
    assert scripted.connections == before + 1, "the connection went back into use"
    await until(lambda: scripted.stray_dropped(since))  # the late body is not left for the next test


@pytest.mark.parametrize("path", ["/coded-chunked", "/coded-close"])
async def test_a_response_transfer_coding_other_than_chunked_is_a_bad_gateway(kg: Keygate, path: str) -> None:
    """Relayed, its body would reach the client still gzip-coded with the coding's label gone (the header is
    hop-by-hop): RFC 9112 section 6.1 lets a proxy remove a transfer coding only by decoding it."""
    _, key = await kg.key(name="k", role="admin")
    answer = await one(kg.proxy_port, get(path, key))
    assert answer.startswith(b"HTTP/1.1 502 "), answer


async def test_a_connection_that_sent_an_unsolicited_response_is_not_reused(
    kg: Keygate, scripted: ScriptedUpstream,
) -> None:
    _, key = await kg.key(name="k", role="admin")
    since = len(scripted.strayed)
    await one(kg.proxy_port, get("/twice", key))
    # The second response arrives while the connection is idle; a Keygate that keeps it is caught below.
    await until(lambda: scripted.stray_dropped(since))
    before = scripted.connections
    answer = await one(kg.proxy_port, get("/victim", key))
    assert b"EVIL" not in answer
    assert scripted.connections == before + 1, "a connection that answered twice went back into use"


async def test_101_to_a_plain_request_is_not_relayed(kg: Keygate, scripted: ScriptedUpstream) -> None:
    """Forwarded without Upgrade (not a WebSocket), so a 101 is a bad answer (502), never the client's."""
    _, key = await kg.key(name="k", role="admin")
    answer = await one(kg.proxy_port, get("/switch", key))
    assert not answer.startswith(b"HTTP/1.1 101"), answer


@pytest.mark.parametrize("path,status", [("/early-close", 413), ("/early", 200)])
async def test_an_early_upstream_answer_is_relayed_not_replaced(kg: Keygate, path: str, status: int) -> None:
    """The upstream answers before reading a 64 MiB body (and closes, or stops reading): its answer is the
    client's, as aiohttp's client (which read the answer while it sent the body) relayed it."""
    _, key = await kg.key(name="k", role="admin")
    size = 64 * 1024 * 1024
    reader, writer = await asyncio.open_connection("127.0.0.1", kg.proxy_port)
    writer.write(f"POST {path} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {key}\r\nContent-Length: {size}\r\n\r\n"
                 .encode())

    async def send() -> None:
        block = b"x" * 65536
        try:
            for _ in range(size // len(block)):
                writer.write(block)
                await writer.drain()
        except ConnectionError:
            pass

    sending = asyncio.create_task(send())
    try:
        response = await read_response(reader, 15)
    finally:
        sending.cancel()
        writer.close()
    assert response is not None and response.status == status, response


@pytest.mark.parametrize(("path", "whole"), [("/close-body", True), ("/close-body-reset", False)],
                         ids=["closed", "reset"])
async def test_a_body_delimited_by_the_close_is_whole_only_if_the_upstream_closed_cleanly(
    kg: Keygate, path: str, whole: bool,
) -> None:
    """A close (FIN) ends such a body: relayed chunked, with its last chunk. A reset cuts it short: the client's
    connection is cut with it, no last chunk, so a truncated body is never presented as whole (as nginx)."""
    _, key = await kg.key(name="close-" + path.strip("/"), role="admin")
    reader, writer = await asyncio.open_connection("127.0.0.1", kg.proxy_port)
    writer.write(get(path, key))
    try:
        received = await until_last_chunk(reader)
    finally:
        writer.close()
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Transfer-Encoding: chunked" in head
    if whole:
        assert body == b"9\r\npart-one,\r\n8\r\npart-two\r\n0\r\n\r\n"
    else:
        assert body == b"9\r\npart-one,\r\n"  # and then the connection ended


async def test_each_response_on_a_pooled_connection_gets_the_headers_of_its_own_answer(
    kg: Keygate, scripted: ScriptedUpstream,
) -> None:
    """An upstream connection keeps the block it last made of a response's headers (an upstream repeats its
    headers): an answer with the same headers gets the same block, any other its own, whatever came before
    it on the pooled connection; the client's own X-Request-Id and RateLimit lines are each request's."""
    _, key = await kg.key(name="headers-memo", role="admin")
    reader, writer = await asyncio.open_connection("127.0.0.1", kg.proxy_port)
    cases = [("X-A=1", [b"X-A: 1"]), ("X-A=1", [b"X-A: 1"]), ("X-A=2", [b"X-A: 2"]),
             ("X-A=2/X-B=3", [b"X-A: 2", b"X-B: 3"]), ("X-A=2/Connection=X-A", []),
             ("X-A=2", [b"X-A: 2"]), ("X-B=3/X-A=2", [b"X-B: 3", b"X-A: 2"]), ("", [])]
    connections = scripted.connections
    try:
        for n, (spec, kept) in enumerate(cases * 2):
            writer.write(f"GET /headers/{spec} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {key}\r\n"
                         f"X-Request-Id: memo-{n}\r\n\r\n".encode())
            response = await read_response(reader, 5)
            assert response is not None and response.status == 200
            lines = response.head.split(b"\r\n")[1:]
            assert [line for line in lines if line.startswith((b"X-A:", b"X-B:"))] == kept
            assert f"X-Request-Id: memo-{n}".encode() in lines and b"Via: 1.1 keygate" in lines
    finally:
        writer.close()
    assert scripted.connections == connections + 1  # one pooled upstream connection answered them all


@pytest.mark.parametrize(("name", "start"), [
    ("status-099", b"HTTP/1.1 502 "),  # (llhttp reads any three digits: relayed as "99")
    ("status-000", b"HTTP/1.1 502 "),
    ("status-600", b"HTTP/1.1 502 "),
    ("status-599", b"HTTP/1.1 599 Odd\r\n"),
    ("reason-control", b"HTTP/1.1 200 OK\r\n"),  # control bytes: the status code's own reason
    ("reason-long", b"HTTP/1.1 200 OK\r\n"),  # 1 KiB: the same
    ("reason-huge", b"HTTP/1.1 502 "),  # 8 MiB
    ("lines-127", b"HTTP/1.1 200 OK\r\n"),  # with Content-Length, 128 header lines: the most taken
    ("lines-128", b"HTTP/1.1 502 "),
    ("lines-tiny", b"HTTP/1.1 502 "),  # 250,000 "a:" lines (relayed after a minute, the worker stalled)
    ("line-huge", b"HTTP/1.1 502 "),  # a 64 MiB header line (read and held whole before it was refused)
])
async def test_a_response_head_that_is_not_valid_or_too_large_is_not_relayed(
        kg: Keygate, scripted: ScriptedUpstream, name: str, start: bytes) -> None:
    """A status code outside 100-599 or a head too large (bytes or lines) is a bad answer (502); a reason
    phrase with bytes HTTP does not allow there, or over 512 bytes, is replaced by the status code's own.
    A head too large is refused while it arrives: Keygate stops reading it (the rest is never sent)."""
    _, key = await kg.key(name="k", role="admin")
    answer = await one(kg.proxy_port, get(f"/raw/{name}", key))
    assert answer.startswith(start), answer[:200]
    if b" 502 " not in start:
        assert answer.endswith(b"\r\n\r\nok")
    if name.endswith("-huge"):
        await until(lambda: f"/raw/{name}" in scripted.raw_sent)
        assert scripted.raw_sent[f"/raw/{name}"] < 32 << 20  # (socket buffers take some MiB)


async def test_a_101_that_switches_to_nothing_is_a_bad_gateway_not_an_upgrade(kg: Keygate) -> None:
    """A WebSocket handshake answered 101 without Upgrade and Connection: upgrade (so llhttp does not switch,
    and fails on what follows): the client gets 502, not a 101 and then a closed tunnel."""
    _, key = await kg.key(name="k", role="admin")
    handshake = (f"GET /raw/switch-bare HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {key}\r\n"
                 "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 "Sec-WebSocket-Version: 13\r\n\r\n").encode()
    answer = await one(kg.proxy_port, handshake)
    assert answer.startswith(b"HTTP/1.1 502 "), answer[:200]


async def test_trailers_are_bounded_on_their_own_not_with_the_head(kg: Keygate) -> None:
    """100 header lines and 40 trailer lines: each within the 128 lines a head may have, so the body is
    relayed whole (counted together they cut it short after its first chunk, as a 502 can no longer be sent)."""
    _, key = await kg.key(name="k", role="admin")
    answer = await one(kg.proxy_port, get("/trailers", key))
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"hello"), answer[-200:]


async def test_each_reason_phrase_on_a_pooled_connection_is_judged_as_its_own(
        kg: Keygate, scripted: ScriptedUpstream) -> None:
    """A connection remembers the last reason phrase it found fit to relay: one that differs is judged again."""
    _, key = await kg.key(name="k", role="admin")
    reader, writer = await asyncio.open_connection("127.0.0.1", kg.proxy_port)
    try:
        before = len(scripted.seen)
        for name in ("ok", "reason-control", "ok", "reason-long", "reason-control"):
            writer.write(get(f"/raw/{name}/keep", key))
            response = await read_response(reader, 5)
            assert response is not None and response.head.startswith(b"HTTP/1.1 200 OK\r\n"), name
            assert response.body == b"ok"
        assert len({seen.conn for seen in scripted.seen[before:]}) == 1  # (one upstream connection)
    finally:
        writer.close()
