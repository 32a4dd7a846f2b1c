"""A lean Redis client for one hot path: pre-encoded commands, pipelined on one connection, read by hiredis.

redis-py spends more Python per command than Redis spends running it; on
the ``redis`` rate-limit policy (one script call per request) that cost is
most of a decision's CPU. :class:`RespClient` does only what that path
needs: the caller hands it a batch of commands already encoded as RESP
bytes (built from pre-encoded constant parts), it writes them with one
``transport.write`` on one persistent connection (an ``asyncio.Protocol``),
and hiredis parses the replies, which are matched to batches in order, so
any number of batches can be in flight on the connection at once.
A caller on the hot path may skip coroutines altogether: :meth:`RespClient.send`
writes a batch at once on the open connection and hands back the future its
replies will complete (the ``redis`` policy adds a callback to it).

It connects with the very settings redis-py's client got from
``redis.url`` (host and port or unix socket, TLS for ``rediss://``, AUTH,
the database, the connect timeout), and fails as redis-py fails: a lost or
refused connection is :class:`redis.exceptions.ConnectionError`, an error
reply is the matching :class:`redis.exceptions.ResponseError`, so
:meth:`RedisLink.run` classifies both as it classifies redis-py's. The
circuit breaker stays with the link. Every batch is bounded by ``redis.timeout``
on the connection itself, by one timer per connection (not one per batch): a
batch unanswered that long fails with :class:`redis.exceptions.TimeoutError`
and drops the connection, as redis-py drops a connection whose read timed
out; so does a batch given up by its caller. A batch whose callers waited
before it was written fails with :class:`HeldTooLong` once they have waited
that long in all, the connection kept. A dropped connection is
reopened on next use. It speaks to one server: on a Redis Cluster the
policy's calls go through redis-py's cluster client instead
(:class:`gateway.pipeline.ratelimit_redis.SharedBuckets`).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import deque
from typing import Any, cast

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import RedisSSLContext
from redis.exceptions import (
    AuthenticationError,
    ConnectionError as RedisConnectionError,
    InvalidResponse,
    NoScriptError,
    RedisError,
    ResponseError,
    TimeoutError as RedisTimeoutError,
)

from .held import HeldTooLong

# Batches of replies: (future, replies expected, when the server is late with them, when their callers stop
# waiting for them), by the loop's clock. Replies arrive in the order commands were sent.
_Waiting = deque[tuple["asyncio.Future[list[Any]]", int, float, float]]


_NEVER = float("inf")
# The name of the task that opens a connection (one at a time per client).
CONNECT_TASK = "keygate-redis-connect"


def bulk(data: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(data), data)


def encode(arg: bytes | str | int | float) -> bytes:
    """One argument as redis-py encodes it: bytes as they are, text as UTF-8, numbers as their repr."""
    if isinstance(arg, bytes):
        return arg
    if isinstance(arg, str):
        return arg.encode()
    if isinstance(arg, bool) or not isinstance(arg, (int, float)):
        raise TypeError(f"cannot send {type(arg).__name__} to Redis")
    return repr(arg).encode()


def command(*args: bytes | str | int | float) -> bytes:
    """One command as RESP bytes (an array of bulk strings)."""
    return b"*%d\r\n" % len(args) + b"".join(bulk(encode(arg)) for arg in args)


def reply_error(message: str) -> RedisError:
    """An error reply as the exception redis-py would raise for it (those callers tell apart)."""
    if message.startswith("NOSCRIPT"):
        return NoScriptError(message)
    if message.startswith(("WRONGPASS", "NOAUTH")) or message.startswith("ERR invalid password"):
        return AuthenticationError(message)
    return ResponseError(message)


class _Connection(asyncio.Protocol):
    """One connection: writes batches, hands each its replies in order, fails them all when lost or late."""

    def __init__(self, timeout: float | None = None) -> None:
        self.transport: asyncio.WriteTransport | None = None
        self.closed = False
        self._reader = hiredis.Reader(protocolError=InvalidResponse, replyError=reply_error)
        self.waiting: _Waiting = deque()
        self._replies: list[Any] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timeout = timeout
        # The one timer bounding every batch in flight: due when the first of them is, at _due.
        self._watchdog: asyncio.TimerHandle | None = None
        self._due = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.WriteTransport, transport)
        # Asked for once: on Python 3.11 asyncio.get_running_loop() is a getpid() system call.
        self._loop = asyncio.get_running_loop()

    def send(self, commands: bytes, count: int, since: float | None = None) -> asyncio.Future[list[Any]]:
        """Write ``count`` pre-encoded commands; the future gets their ``count`` replies, errors as values.

        The timeout runs from now: a batch unanswered that long fails with
        :class:`redis.exceptions.TimeoutError` and drops the connection (the server
        is late). With ``since`` (the loop's clock: when the batch's oldest call was
        asked for, if it waited before being written) its future also fails with
        :class:`HeldTooLong` once the timeout has run from then, the connection kept.
        """
        loop = self._loop
        if self.closed or self.transport is None or loop is None:
            raise RedisConnectionError("Connection closed.")
        future: asyncio.Future[list[Any]] = loop.create_future()
        if count == 0:
            future.set_result([])  # no reply will come for it: it must not wait in line
            return future
        if self._timeout is None:
            self.waiting.append((future, count, _NEVER, _NEVER))
        else:
            deadline = loop.time() + self._timeout
            held = deadline if since is None else min(deadline, since + self._timeout)
            self.waiting.append((future, count, deadline, held))
            if self._watchdog is None or held < self._due:
                self._watch(held)
        self.transport.write(commands)
        return future

    def _watch(self, when: float) -> None:
        assert self._loop is not None
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._watchdog = self._loop.call_at(when, self._check)
        self._due = when

    def _check(self) -> None:
        """The watchdog: drop the connection if a batch is overdue on it, give up on those whose callers
        waited long enough, and wait until the next of either would be due."""
        self._watchdog = None
        if self.closed or not self.waiting or self._loop is None:
            return  # answered in time; the next batch sets the timer again
        now = self._loop.time()
        due = _NEVER
        for future, _count, deadline, held in self.waiting:
            if now >= deadline:
                self.abort(RedisTimeoutError("Timeout reading from Redis"))
                return
            if not future.done():
                if now >= held:
                    future.set_exception(HeldTooLong("Timeout waiting for Redis (held before sending)"))
                else:
                    due = min(due, held)
            due = min(due, deadline)
        if due < _NEVER:
            self._watch(due)

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        replies = self._replies
        waiting = self.waiting
        try:
            while (reply := reader.gets()) is not False:  # RESP2 has no false: it means "need more"
                replies.append(reply)
                if len(replies) == waiting[0][1]:
                    future = waiting.popleft()[0]
                    if not future.done():  # given up (timed out): the connection is being dropped
                        future.set_result(replies)
                    replies = self._replies = []
        except (InvalidResponse, IndexError) as exc:  # garbage, or a reply nobody asked for
            self.abort(InvalidResponse(f"unexpected data from Redis: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError(f"Connection to Redis lost: {exc}" if exc else "Connection closed by server."))

    def abort(self, error: RedisError) -> None:
        """Drop the connection now; every batch still waiting fails with ``error``."""
        self._fail(error)
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, error: Exception) -> None:
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        waiting, self.waiting = self.waiting, deque()
        for future, _count, _deadline, _held in waiting:
            if not future.done():
                future.set_exception(error)
        self._replies = []


class RespClient:
    """One persistent connection to the Redis that ``client`` (redis-py) is configured for."""

    def __init__(self, client: Redis, *, timeout: float | None = None) -> None:
        """``timeout``: seconds a batch may wait for its replies (``redis.timeout``); None waits for ever."""
        self._timeout = timeout
        pool = client.connection_pool
        # The connection redis-py would open, built (not opened) for its settings alone:
        # what redis.url says (host, port, socket, db, credentials, TLS) is read off it.
        template: Any = pool.connection_class(**pool.connection_kwargs)
        self._path: str | None = getattr(template, "path", None)
        self._host: str | None = getattr(template, "host", None)
        self._port: int | None = getattr(template, "port", None)
        # redis-py's own TLS settings; the context (certificate files read) is made on first connect,
        # so a missing file is a failed connection, as with redis-py, not a failed start.
        self._tls: RedisSSLContext | None = getattr(template, "ssl_context", None)
        self._keepalive: dict[int, Any] | None = (
            dict(template.socket_keepalive_options) if getattr(template, "socket_keepalive", False) else None
        )
        self._connect_timeout: float | None = template.socket_connect_timeout
        setup: list[bytes] = []
        if template.username or template.password:
            auth = (template.username, template.password) if template.username else (template.password,)
            setup.append(command("AUTH", *auth))
        if template.db:
            setup.append(command("SELECT", template.db))
        self._setup = setup
        self._where = self._path or f"{self._host}:{self._port}"
        self._connection: _Connection | None = None
        self._connecting: asyncio.Task[_Connection] | None = None
        # Attempts given up by drop() and not finished yet (close() waits for them).
        self._dropped: set[asyncio.Task[_Connection]] = set()
        self.connects = 0  # connections opened, for tests

    @property
    def in_flight(self) -> int:
        """Batches sent and not yet answered."""
        return len(self._connection.waiting) if self._connection is not None else 0

    def send(self, commands: bytes, count: int, since: float | None = None) -> asyncio.Future[list[Any]] | None:
        """Write a batch now on the open connection; its future gets the replies as :meth:`execute` returns them.

        ``since``: when (``loop.time()``) the batch's oldest call was asked for; its timeout runs from then.

        None when no connection is open (never opened, or dropped): the caller then
        takes :meth:`execute`, which opens one. The future fails with
        :class:`redis.exceptions.ConnectionError` if the connection is lost, and with
        :class:`redis.exceptions.TimeoutError` if the replies are not in within the timeout.
        """
        connection = self._connection
        if connection is None or connection.closed:
            return None
        return connection.send(commands, count, since)

    async def open(self) -> None:
        """Open the connection if none is open (connect and AUTH/SELECT within the connect timeout)."""
        connection = self._connection
        if connection is None or connection.closed:
            await self._connect()

    async def execute(self, commands: bytes, count: int) -> list[Any]:
        """The replies to ``count`` commands encoded in ``commands``, in order; error replies as values.

        Raises :class:`redis.exceptions.ConnectionError` when the connection cannot be
        opened or is lost before the replies are in.
        """
        connection = self._connection
        if connection is None or connection.closed:
            connection = await self._connect()
        future = connection.send(commands, count)
        try:
            return await future
        except asyncio.CancelledError:
            # The caller gave up waiting: a connection that slow is not reused (its late
            # replies would still be read in order, but the next caller would queue behind them).
            connection.abort(RedisConnectionError("Connection dropped: a call on it was given up."))
            raise

    async def _connect(self) -> _Connection:
        if self._connecting is None:
            # One attempt shared by every batch that finds the connection missing.
            self._connecting = asyncio.get_running_loop().create_task(self._open(), name=CONNECT_TASK)
            self._connecting.add_done_callback(self._connected)
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        except asyncio.CancelledError:
            # The attempt was cancelled (drop() or close() came first) and this caller was not: a connection
            # error, as for any connection lost. A caller cancelled itself is cancelled, even in the same
            # turn as the attempt (its canceller, a timeout say, waits for its CancelledError).
            caller = asyncio.current_task()
            if connecting.cancelled() and (caller is None or not caller.cancelling()):
                raise RedisConnectionError("Connection given up while it was being opened.") from None
            raise

    def _connected(self, task: asyncio.Task[_Connection]) -> None:
        if task is not self._connecting:
            return  # given up by drop() (which closed what it made) or close()
        self._connecting = None
        if not task.cancelled() and task.exception() is None:
            self._connection = task.result()

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        connection: _Connection | None = None
        try:
            async with asyncio.timeout(self._connect_timeout):
                if self._path is not None:
                    _, connection = await loop.create_unix_connection(self._new_connection, self._path)
                else:
                    tls: ssl.SSLContext | None = self._tls.get() if self._tls is not None else None
                    # (redis-py's TCP connection always has both: its defaults are localhost and 6379.)
                    transport, connection = await loop.create_connection(
                        self._new_connection, cast(str, self._host), cast(int, self._port), ssl=tls)
                    self._set_keepalive(transport)
                self.connects += 1
                if self._setup:
                    # AUTH and SELECT, answered before anything else is sent.
                    for reply in await connection.send(b"".join(self._setup), len(self._setup)):
                        if isinstance(reply, RedisError):
                            raise reply
        except BaseException as exc:
            if connection is not None:
                connection.abort(RedisConnectionError("Connection not set up."))
            if isinstance(exc, (OSError, TimeoutError)):  # TLS verification failures are OSErrors too
                raise RedisConnectionError(f"Error connecting to {self._where}: {exc or type(exc).__name__}") from exc
            raise
        return connection

    def _new_connection(self) -> _Connection:
        return _Connection(self._timeout)

    def _set_keepalive(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is None or self._keepalive is None:
            return
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for option, value in self._keepalive.items():
                sock.setsockopt(socket.SOL_TCP, option, value)
        except (OSError, TypeError):
            pass  # as redis-py: a platform without an option simply goes without it

    def drop(self) -> None:
        """Abandon the open connection, if any: the next batch opens a new one (see RedisLink._trip).

        After a failure the server at the other end may no longer be the one ``redis.url`` reaches: a
        failover behind an endpoint (a managed service's, a Sentinel-aware proxy's) demotes the old
        primary to a replica, which keeps the connections it had and refuses every script with READONLY.
        """
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.abort(RedisConnectionError("Connection dropped after a failure."))
        # So is an attempt under way, begun before the failure (it may reach the old server too): its waiters
        # fail with a connection error, and a connection it has already made is closed, not kept.
        connecting, self._connecting = self._connecting, None
        if connecting is not None:
            if not connecting.done():
                connecting.cancel()
                # close() waits for it to finish (it closes what it opened on its way out).
                self._dropped.add(connecting)
                connecting.add_done_callback(self._dropped.discard)
            elif not connecting.cancelled() and connecting.exception() is None:
                connecting.result().abort(RedisConnectionError("Connection dropped after a failure."))

    async def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
            self._dropped.add(self._connecting)
        # Every attempt still under way, this one and those drop() gave up, finished before close() returns:
        # none is left pending when the loop stops, none leaves a socket open.
        for attempt in list(self._dropped):
            try:
                await attempt
            except (asyncio.CancelledError, Exception):
                pass
        self._dropped.clear()
        if self._connection is not None:
            self._connection.abort(RedisConnectionError("Connection closed."))
            self._connection = None
