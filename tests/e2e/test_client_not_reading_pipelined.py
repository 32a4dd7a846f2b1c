"""A pipelining client that never reads its answers cannot grow Keygate's memory: reading stops until it does.

http1.Request.send/Connection.write never wait for the client to take what was written, and nothing
pauses reading while the transport's write buffer is over its high-water mark (pause_writing only sets
a flag that drain() reads; no handler awaits it for a whole answer). So each pipelined request is read,
answered and its answer appended to the write buffer: ~350 bytes of 401 per 27 bytes of request.
(aiohttp's server awaited the drain of each answer before it handled the next request.)
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest

from gateway.dataplane.http1 import MAX_PIPELINED

from .harness import Keygate, Upstream
from .rawhttp import exchange


@pytest.fixture(scope="module")
def kg(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keygate]:
    keygate = Keygate(tmp_path_factory.mktemp("r13pipe"), upstream.url).start()
    yield keygate
    keygate.stop()


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_pipelining_client_that_never_reads(kg: Keygate) -> None:
    """Requests keep being read while their answers pile up unsent: memory grows with what the client sends.

    Measured on main: 21 MiB of pipelined requests in 25 s, RSS 68 -> 758 MiB (all 818,971 answers
    were buffered in the process, and delivered once the client read them).
    """
    assert kg.process is not None
    before = rss_kib(kg.process.pid)
    sock = socket.create_connection(("127.0.0.1", kg.proxy_port))
    sock.setblocking(False)
    # Each request padded to 3 KB: one read (256 KiB at most) never holds MAX_PIPELINED of them, so what
    # stops the reading here is the answers piling up (pause_writing), not the pipeline's cap below.
    burst = (b"GET / HTTP/1.1\r\nHost: a\r\nX-Pad: " + b"p" * 3000 + b"\r\n\r\n") * 256
    sent = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    grown = 0
    try:
        while loop.time() < deadline and grown < 128 * 1024:
            try:
                sent += sock.send(burst[sent % len(burst):])
            except BlockingIOError:
                await asyncio.sleep(0.01)
                grown = rss_kib(kg.process.pid) - before
    finally:
        sock.close()
    print(f"sent {sent >> 20} MiB of requests without reading; RSS grew {grown >> 10} MiB")
    assert grown < 64 * 1024, f"RSS grew by {grown >> 10} MiB for {sent >> 20} MiB of requests"


async def test_a_pipeline_longer_than_the_cap_is_answered_to_the_cap_then_closed(kg: Keygate) -> None:
    """One read of 300 small heads: each would be parsed and queued (ten times its size) before reading
    pauses. The 101st is the last read: its answer says Connection: close and what followed it is dropped
    (a pipelining client retries what a closed connection left unanswered, RFC 9112 section 9.3.2)."""
    _, key = await kg.key(name="pipeliner", role="admin", rate_limit="1000000/second")
    one = f"GET /api/a HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {key}\r\n\r\n".encode()
    responses, closed = await exchange(kg.proxy_port, one * 300)
    # Sent in one write, it may still arrive in more than one read: each read's pipeline is capped alike.
    assert MAX_PIPELINED < len(responses) < 300, len(responses)
    assert closed
    assert [r.status for r in responses] == [200] * len(responses)
    closing = [i for i, r in enumerate(responses) if b"\r\nConnection: close\r\n" in r.head]
    assert closing == [len(responses) - 1], closing


async def test_many_pipelining_connections_cannot_grow_memory_by_their_queues(kg: Keygate) -> None:
    """40 connections each send 256 KiB of 27-byte requests and read nothing. Measured before the cap (a
    helper's run, 80 connections of 300 KB): RSS +212 MiB, about 2.6 MiB per connection, held until
    header_timeout cut them."""
    assert kg.process is not None
    before = rss_kib(kg.process.pid)
    burst = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n" * (256 * 1024 // 27)
    socks = []
    try:
        for _ in range(40):
            sock = socket.create_connection(("127.0.0.1", kg.proxy_port))
            sock.setblocking(False)
            try:
                sock.send(burst)
            except BlockingIOError:
                pass
            socks.append(sock)
        await asyncio.sleep(1.5)
        grown = rss_kib(kg.process.pid) - before
    finally:
        for sock in socks:
            sock.close()
    print(f"RSS grew {grown >> 10} MiB for 40 connections")
    assert grown < 24 * 1024, f"RSS grew by {grown >> 10} MiB"
