"""A client that stops reading its response is cut off after client_timeout, and its upstream connection with it.

Forwarder._relay awaits Request.drain() (http1.Connection.drain) before it reads more from the upstream;
that wait has no deadline, and nothing else times the connection while the response is being written.
"""

from __future__ import annotations
import asyncio
import socket
import subprocess
from collections.abc import Iterator
import pytest
from .harness import Keygate, Upstream


@pytest.fixture(scope="module")
def kg(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keygate]:
    keygate = Keygate(tmp_path_factory.mktemp("r13slow"), upstream.url, upstream_timeout=1,
                      proxy="client_timeout = 1\nidle_timeout = 1\nheader_timeout = 1\n").start()
    yield keygate
    keygate.stop()


def established(port: int) -> int:
    out = subprocess.run(["ss", "-Htn", "state", "established", f"( dport = :{port} )"], capture_output=True, text=True).stdout
    return len([l for l in out.splitlines() if l.strip()])


async def test_client_that_never_reads(kg, upstream):
    _, key = await kg.key(name="a", role="admin")
    before = established(upstream.port)
    sock = socket.create_connection(("127.0.0.1", kg.proxy_port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(f"GET /bytes/500000000 HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {key}\r\n\r\n".encode())
    await asyncio.sleep(1)
    during = established(upstream.port)
    await asyncio.sleep(8)  # every proxy timeout (1 s) several times over
    after = established(upstream.port)
    sock.close()
    print(before, during, after)
    assert after == before, "a client that stopped reading still holds an upstream connection after 8 s"

