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

from .harness import Keygate, Upstream


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
    burst = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n" * 4096
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
