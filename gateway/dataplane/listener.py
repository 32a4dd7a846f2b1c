"""The proxy listener: accepting connections, a cap on how many are open, and draining on shutdown."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from typing import Any

from ..config.schema import ProxySettings
from .http1 import Connection, Handler
from .sweeper import Sweeper

log = logging.getLogger("keygate.http")


class ProxyListener:
    """Serves ``handler`` over :class:`~gateway.dataplane.http1.Connection` on one address."""

    def __init__(self, handler: Handler, sweeper: Sweeper, *, header_timeout: float, max_header_size: int,
                 client_timeout: float, max_connections: int, idle_timeout: float) -> None:
        self.handler = handler
        self.sweeper = sweeper
        self.header_timeout = header_timeout
        self.max_header_size = max_header_size
        self.client_timeout = client_timeout
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.connections: set[Connection] = set()
        self.draining = False
        self.refused = 0  # connections closed at once because max_connections were open
        # Any, not asyncio's Server: uvloop's answers its sockets as a list where typeshed says tuple, and
        # the compiled build checks every type it is told.
        self._server: Any = None
        self._empty: asyncio.Event | None = None

    def __call__(self) -> Connection:
        return Connection(self, self.handler, self.sweeper, header_timeout=self.header_timeout,
                          max_header_size=self.max_header_size, client_timeout=self.client_timeout,
                          keepalive_timeout=self.idle_timeout)

    def connection_made(self, conn: Connection) -> None:
        if len(self.connections) >= self.max_connections or self.draining:
            # Past the cap nothing is read from it: closing at once costs least and tells the
            # client (or its load balancer) to try elsewhere.
            self.refused += 1
            conn.abort()
            return
        self.connections.add(conn)

    def connection_lost(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if self._empty is not None and not self.connections:
            self._empty.set()

    async def start(self, host: str, port: int, *, reuse_port: bool = False, backlog: int = 1024) -> str:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self, host, port, reuse_port=reuse_port or None, backlog=backlog,
                                                family=socket.AF_INET6 if ":" in host else socket.AF_UNSPEC)
        sockets = self._server.sockets
        if not sockets:
            return "?:0"
        address = sockets[0].getsockname()
        return f"{address[0]}:{address[1]}"

    async def shutdown(self, grace: float) -> None:
        """Stop accepting, close idle connections, let requests in hand finish within ``grace``, then cut the rest."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.shutdown()
        if self.connections:
            self._empty = asyncio.Event()
            try:
                await asyncio.wait_for(self._empty.wait(), grace)
            except TimeoutError:
                log.warning(json.dumps({"event": "drain_cut", "connections": len(self.connections)}))
        tasks = [conn._worker for conn in self.connections if conn._worker is not None]
        for conn in list(self.connections):
            conn.abort()
        # Handlers of the cut connections are cancelled (their requests recorded as 499): let them finish.
        if tasks:
            await asyncio.wait(tasks, timeout=5)


def proxy_listener(handler: Handler, sweeper: Sweeper, settings: ProxySettings) -> ProxyListener:
    """The proxy listener as ``proxy.*`` settings configure it."""
    return ProxyListener(
        handler, sweeper, header_timeout=settings.header_timeout, max_header_size=settings.max_header_bytes,
        client_timeout=settings.client_timeout, max_connections=settings.max_connections,
        idle_timeout=settings.idle_timeout)
