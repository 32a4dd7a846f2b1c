"""A real :class:`~gateway.dataplane.http1.Request` on a connection no socket is attached to.

For tests of code that reads a request (its method, headers, Host, body) without a
listener: a stand-in object would do in pure Python, but the compiled build
(tests/deploy/test_compiled.py) checks that a ``Request`` is one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.dataplane.http1 import Connection, Request
from gateway.dataplane.sweeper import Sweeper


async def _unused(request: Request) -> None:
    raise AssertionError("a detached request is never handled")


def detached_request(method: str = "GET", headers: Sequence[tuple[str, str]] = (), path: str = "/", *,
                     local: str = "127.0.0.1:8000") -> Request:
    """``local``: the address the client reached, the request's ``host`` when it sends no Host."""
    loop = asyncio.new_event_loop()
    try:
        conn = Connection(None, _unused, Sweeper(loop), header_timeout=10, max_header_size=65536, client_timeout=60)
    finally:
        loop.close()  # held, never run: nothing is watched or written
    conn.local = local
    return Request(conn, method, path, "1.1", CIMultiDictProxy(CIMultiDict(headers)), True, False)
