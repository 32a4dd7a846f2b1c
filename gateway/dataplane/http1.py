"""The proxy listener's HTTP/1.1 server: one ``asyncio.Protocol`` per connection, llhttp in strict mode.

The parser is llhttp through httptools (the binding uvicorn uses), with none
of its leniencies: bare LF, obs-fold, a Content-Length beside a
Transfer-Encoding, duplicate lengths, bad chunk sizes and spaces where none
belong are parse errors. Around it this module adds what a reverse proxy
needs before any request reaches the pipeline:

- a deadline for the request line and headers (``proxy.header_timeout``,
  408), from the connection's start or the next request's first byte;
- size limits: the target (8192 bytes, 414), one header line (8190, 431),
  the number of headers (128, 431), the request line and headers in all
  (``proxy.max_header_size``, 431);
- the request forms a reverse proxy serves: origin-form targets over
  HTTP/1.0 or 1.1 (else 400, or 505 for another version); a transfer coding
  other than exactly ``chunked`` is 501, and any in an HTTP/1.0 request 400;
- keep-alive with an idle timeout, pipelined requests answered in order
  (reading pauses while one waits), request bodies streamed with flow
  control (reading pauses while the handler is slower), ``Expect:
  100-continue`` answered when the handler first reads the body;
- after a WebSocket handshake the connection is handed to a tunnel.

Each connection's requests run one after another in one task of its own
(made at its first request, not one per request), as ``handler(request)``;
the handler writes its response through the :class:`Request` (``send`` for
a whole one, or ``start``/``write``/``end``). If the client goes away before
its answer, that task is cancelled in the handler. Every refusal here is
our JSON body, never an echo of the request (it may carry a key), and is
followed by a close.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, Final

import httptools
from multidict import CIMultiDict, CIMultiDictProxy, istr

from ..keys import LastKey
from .client_gone import ClientGone
from .sweeper import Sweeper

log = logging.getLogger("keygate.http")

MAX_TARGET: Final = 8192  # bytes of the request target
MAX_FIELD: Final = 8190  # bytes of one header's name plus value
MAX_HEADERS: Final = 128  # header lines; more is 431
# What a connection keeps of its last request's or response's headers (to reuse for the next with the same
# headers: the mapping here, the lines sent upstream and the response's block in .forward) only when they are
# short, as a keep-alive client's and an API's are: an idle connection then holds at most about this much of
# them (a 64 KiB head would hold about 146 KB; found by a review).
MEMO_BLOCK: Final = 4096
# Requests read ahead of their answers on one connection (pipelined). Reading pauses while one waits, but
# one read (up to 256 KiB) can hold thousands of small heads, each parsed into a request of ten times its
# size; the one that reaches this is the last read: answered with Connection: close, what follows dropped.
MAX_PIPELINED: Final = 100
KEEPALIVE_TIMEOUT: Final = 75.0  # seconds an idle keep-alive connection waits for its next request (nginx's default)
LINGER: Final = 2.0  # seconds a refused connection still drains what the client sends, so the answer is not reset
# Request body bytes buffered before reading from the client pauses, and the level at which it resumes.
BODY_HIGH: Final = 256 * 1024
BODY_LOW: Final = 64 * 1024
# What each piece of a body held costs beyond its bytes (a bytes object and its place in a deque), counted
# against BODY_HIGH with them: a chunked body sent one byte per chunk would otherwise hold about 60 bytes of
# memory per byte of body before reading paused (found by a review: 2 MiB per connection).
PIECE_COST: Final = 64

_INF: Final = float("inf")
# How a request line in each version served ends (see Connection._version_read).
_HTTP11_END: Final = b" HTTP/1.1\r\n"
_HTTP10_END: Final = b" HTTP/1.0\r\n"
_HANDLER_TASK: Final = "keygate-requests"  # the name of every connection's task that runs the handler

# Header names as multidict's istr, made once per spelling: a CIMultiDict takes an istr's lower-case form as
# it is, and a lookup by an istr lowers nothing, where a plain str is lowered on every insertion and every
# lookup; and a name is decoded once, not per request. A client can send any names: spellings up to
# _NAME_SIZE bytes are kept, _NAME_SPELLINGS at most (then new ones are decoded each time, as before).
_NAME_SPELLINGS: Final = 512
_NAME_SIZE: Final = 64
_names: Final[dict[bytes, str]] = {}
_HOST_NAME: Final[str] = istr("Host")
_TRANSFER_ENCODING_NAME: Final[str] = istr("Transfer-Encoding")
_CONTENT_LENGTH_NAME: Final[str] = istr("Content-Length")
_EXPECT_NAME: Final[str] = istr("Expect")

# Why reading from a connection is paused: reading resumes only once none is left.
_PAUSE_BODY: Final = 1  # the handler has not taken enough of the body yet
_PAUSE_QUEUE: Final = 2  # a pipelined request waits for the one before it to be answered
_PAUSE_TUNNEL: Final = 4  # the tunnel's other side cannot take more
_PAUSE_WRITE: Final = 8  # the client is not taking its answers: no more requests are read (nor answered) meanwhile

# Connection states, for the deadline that applies.
_HEAD: Final = 0  # a request line and headers are arriving (or the connection just opened)
_BODY: Final = 1  # a request's head is complete; its body (if any) is read under the body's own deadline
_IDLE: Final = 2  # between requests
_TUNNEL: Final = 3  # bytes are relayed; the tunnel keeps its own deadline

_REASONS: Final = {
    100: "Continue", 101: "Switching Protocols", 200: "OK", 201: "Created", 202: "Accepted", 204: "No Content",
    206: "Partial Content", 301: "Moved Permanently", 302: "Found", 304: "Not Modified",
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout", 409: "Conflict", 413: "Content Too Large", 414: "URI Too Long",
    415: "Unsupported Media Type", 422: "Unprocessable Content", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 500: "Internal Server Error", 501: "Not Implemented",
    502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported",
}

_ERRORS: Final = {
    400: ("invalid_request", "The request is not well-formed HTTP."),
    408: ("request_timeout", "The request line and headers did not arrive in time."),
    414: ("uri_too_long", f"The request target is longer than {MAX_TARGET} bytes."),
    431: ("request_header_fields_too_large",
          f"A header line is longer than {MAX_FIELD} bytes, or the request has too many or too large headers."),
    501: ("not_implemented", 'Only the "chunked" transfer coding is accepted for request bodies.'),
    505: ("http_version_not_supported", "Only HTTP/1.0 and HTTP/1.1 are served here."),
}
# Parsed requests that are never forwarded: Keygate serves one API by path, it is no forward proxy or tunnel.
_NOT_ORIGIN_FORM: Final = ("invalid_request",
                    'Only requests for a path starting with "/" are served; CONNECT, absolute-form and '
                    "OPTIONS * requests are not.")
_FRAMING_10: Final = ("invalid_request", "An HTTP/1.0 request cannot carry a Transfer-Encoding.")
_FRAMING: Final = ("invalid_request", 'A Transfer-Encoding must end with "chunked", once.')
_METHOD: Final = ("not_implemented", "The request method is not one Keygate recognises.")
_TOKEN: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_HOST: Final = ("invalid_request", "A request needs exactly one valid Host header (HTTP/1.0: at most one).")
# RFC 9110 section 7.2 / RFC 3986: an IP-literal or a reg-name (no spaces, no userinfo), then an optional port.
_HOST: Final = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]*)(?::[0-9]*)?")


# Status lines made so far, by status: the reason phrase each was made with and the line. One per status
# (a reason other than the last one's makes the line again) and only short reasons (an upstream's may be
# long), so no upstream can grow it past 900 short entries.
_STATUS_LINES: Final[dict[int, tuple[str, bytes]]] = {}
_STATUS_REASON_KEPT: Final = 64


def status_line(status: int, reason: str) -> bytes:
    """``HTTP/1.1 <status> <reason>\\r\\n``, made once per status and reason, not per response."""
    made = _STATUS_LINES.get(status)
    if made is not None and made[0] == reason:
        return made[1]
    line = b"HTTP/1.1 %d %s\r\n" % (status, reason.encode("latin-1", "replace"))
    if len(reason) <= _STATUS_REASON_KEPT:
        _STATUS_LINES[status] = (reason, line)
    return line


# Host values judged so far (most requests repeat a few): bounded, and started over when full.
_HOSTS_JUDGED: Final[dict[str, bool]] = {}
_HOSTS_JUDGED_SIZE: Final = 1024
_HOST_JUDGED_LENGTH: Final = 255  # (a longer value is judged each time, never remembered)


def _valid_host(host: str) -> bool:
    """Whether ``host`` is a valid Host value (``_HOST``), the regex run once per value rather than per request."""
    valid = _HOSTS_JUDGED.get(host)
    if valid is None:
        valid = _HOST.fullmatch(host) is not None
        if len(host) <= _HOST_JUDGED_LENGTH:
            if len(_HOSTS_JUDGED) >= _HOSTS_JUDGED_SIZE:
                _HOSTS_JUDGED.clear()
            _HOSTS_JUDGED[host] = valid
    return valid


def _header_name(raw: bytes) -> str:
    """The name of a request header as sent (its bytes read as latin-1), an istr; kept for next time if there is room."""
    name: str = istr(raw.decode("latin-1"))
    if len(raw) <= _NAME_SIZE and len(_names) < _NAME_SPELLINGS:
        _names[raw] = name
    return name


def reason_of(status: int) -> str:
    return _REASONS.get(status, "Unknown")


class Refused(Exception):
    """A request refused before any handler ran: its status, and a constant reason that is safe to log."""

    def __init__(self, status: int, reason: str, body: tuple[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.body = body or _ERRORS.get(status, ("invalid_request", "The request could not be handled."))


class BodyTimeout(Exception):
    """The client sent no request body data for ``proxy.client_timeout`` seconds."""


class MalformedBody(Exception):
    """The request body's framing broke off (a malformed chunk): it can never be forwarded whole."""


class Body:
    """A request body as it arrives: the handler reads it chunk by chunk; reading pauses while it lags."""

    __slots__ = ("_chunks", "_conn", "_error", "_waiter", "buffered", "deadline", "eof", "expected",
                 "received", "timeout", "chunked", "taken", "discarding")

    def __init__(self, conn: Connection, expected: int | None, chunked: bool, timeout: float) -> None:
        self._conn = conn
        self._chunks: deque[bytes] = deque()
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.buffered = 0
        self.received = 0  # bytes of body that arrived (decoded of chunked framing)
        self.taken = 0  # bytes the handler read
        self.expected = expected  # Content-Length, or None when chunked
        self.chunked = chunked
        self.eof = False
        self.discarding = False  # the response is done: what still arrives is dropped
        self.timeout = timeout
        self.deadline = _INF

    # -- the parser's side

    def feed(self, data: bytes) -> None:
        self.received += len(data)
        if self.discarding:
            return
        self._chunks.append(data)
        self.buffered += len(data) + PIECE_COST
        if self.buffered > BODY_HIGH:
            self._conn.pause(_PAUSE_BODY)
        self._wake()

    def feed_eof(self) -> None:
        self.eof = True
        self._wake()

    @property
    def broken(self) -> bool:
        """Whether the body can never arrive whole (malformed framing)."""
        return isinstance(self._error, MalformedBody)

    def fail(self, exc: BaseException) -> None:
        if not self.eof and self._error is None:
            self._error = exc
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            self.deadline = _INF
            if not waiter.done():
                waiter.set_result(None)

    def expire(self, now: float) -> None:
        self._conn.sweeper.forget(self)
        self.fail(BodyTimeout())

    # -- the handler's side

    async def read(self) -> bytes:
        """What arrived of the body since the last read (at least a byte; every piece held, joined);
        ``b""`` at its end. Raises BodyTimeout or ClientGone."""
        conn = self._conn
        if conn.continue_due:
            conn.send_continue()
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self.eof:
                return b""
            waiter = self._waiter = conn.loop.create_future()
            self.deadline = conn.sweeper.time() + self.timeout
            conn.sweeper.watch(self)
            try:
                await waiter
            finally:
                self._waiter = None
                self.deadline = _INF
                conn.sweeper.forget(self)
        chunks = self._chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        self.taken += len(data)
        if self.buffered < BODY_LOW:
            conn.resume(_PAUSE_BODY)
        return data

    def discard(self) -> None:
        """The handler is done: drop what is buffered and what still arrives."""
        self.discarding = True
        self._chunks.clear()
        self.buffered = 0
        self._conn.resume(_PAUSE_BODY)


class Request:
    """One parsed request and the writing of its response."""

    __slots__ = ("_conn", "body", "chunked_out", "content_length", "ended", "expect_continue", "head_size",
                 "headers", "keep_alive", "method", "pairs", "peer", "raw_path", "started", "status", "upgrade",
                 "version", "bytes_out", "_host", "_host_read", "__weakref__")

    def __init__(self, conn: Connection, method: str, raw_path: str, version: str,
                 headers: CIMultiDictProxy[str], keep_alive: bool, upgrade: bool,
                 pairs: list[tuple[str, str]] | None = None) -> None:
        self._conn = conn
        self.method = method
        self.raw_path = raw_path
        self.version = version
        self.headers = headers
        # The same headers as a list, in the order they came: what is forwarded is read off it (a list is
        # walked at a fraction of a multidict's cost).
        self.pairs = pairs if pairs is not None else list(headers.items())
        # The Host header's value once the connection has read it (it checks every request's): not looked up twice.
        self._host: str | None = None
        self._host_read = False
        self.keep_alive = keep_alive
        self.upgrade = upgrade
        self.peer = conn.peer
        self.body: Body | None = None
        self.content_length: int | None = None
        self.expect_continue = False
        self.head_size = 0
        self.started = False  # the response head was written
        self.ended = False  # the response was written whole
        self.chunked_out = False
        self.status = 0
        self.bytes_out = 0

    @property
    def host(self) -> str:
        """The Host header, or the address the client connected to."""
        host = self._host if self._host_read else self.headers.get(_HOST_NAME)
        return host if host is not None else self._conn.local

    @property
    def conn(self) -> Connection:
        return self._conn

    # -- the response

    def send(self, status: int, reason: str, header_block: bytes, body: bytes, *, add_length: bool = True) -> None:
        """A whole response in one write: status, headers (``Name: value\\r\\n`` lines), body.

        ``add_length``: append ``Content-Length`` for ``body`` (else ``header_block`` holds the framing,
        or the response has none: a HEAD's, a 204, a 304).
        """
        conn = self._conn
        self.started = self.ended = True
        self.status = status
        close = conn.closing_after(self)
        framing = b"Content-Length: %d\r\n" % len(body) if add_length else b""
        head = b"%s%s%s%s\r\n" % (status_line(status, reason), header_block, framing, conn.connection_header(self, close))
        if self.method == "HEAD" or status in (204, 304):
            body = b""
        self.bytes_out = len(body)
        data = head + body if body else head
        if close:
            conn.write(data)
        else:
            conn.write_soon(data)  # held for the turn, with the loop's other small writes (Sweeper.hold)
        conn.response_done(self, close)

    def switch(self, head: bytes) -> None:
        """The upgrade's 101 answer: after it the connection is a tunnel (see Connection.take_tunnel)."""
        self.started = self.ended = True
        self.status = 101
        self._conn.write(head)

    def start(self, status: int, reason: str, header_block: bytes, *, length: int | None,
              bodyless: bool = False) -> None:
        """Begin a streamed response; ``header_block`` holds Content-Length when ``length`` is known.

        An unknown length is sent chunked to an HTTP/1.1 client, and delimited by the close to HTTP/1.0.
        """
        conn = self._conn
        self.started = True
        self.status = status
        close = conn.closing_after(self)
        framing = b""
        if not bodyless and length is None:
            if self.version == "1.1":
                self.chunked_out = True
                framing = b"Transfer-Encoding: chunked\r\n"
            else:
                close = conn.must_close = True
        conn.write(b"%s%s%s%s\r\n" % (status_line(status, reason), header_block, framing,
                                      conn.connection_header(self, close)))

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.bytes_out += len(data)
        if self.chunked_out:
            self._conn.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self._conn.write(data)

    async def drain(self) -> None:
        await self._conn.drain()

    def end(self) -> None:
        if self.ended:
            return
        self.ended = True
        if self.chunked_out:
            self._conn.write(b"0\r\n\r\n")
        self._conn.response_done(self, self._conn.closing_after(self))

    def abort(self) -> None:
        """Cut the client off: a response that cannot be completed must not look complete."""
        self.ended = True
        self._conn.abort()


Handler = Callable[[Request], Coroutine[Any, Any, None]]


class Connection(asyncio.Protocol):
    """One client connection of the proxy listener."""

    def __init__(self, server: Any, handler: Handler, sweeper: Sweeper, *, header_timeout: float,
                 max_header_size: int, client_timeout: float, keepalive_timeout: float = KEEPALIVE_TIMEOUT) -> None:
        self.server = server
        self.handler = handler
        self.sweeper = sweeper
        self.loop = sweeper._loop
        self.header_timeout = header_timeout
        self.max_header_size = max_header_size
        self.client_timeout = client_timeout
        self.keepalive_timeout = keepalive_timeout
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.local = ""
        self.parser = httptools.HttpRequestParser(self)
        self.deadline = _INF
        self.state = _HEAD
        self.must_close = False  # no request after the current one
        self._read_last = False  # a request that closes the connection was read: nothing after it is
        self.continue_due = False
        self._paused = 0
        self._write_paused = False
        self._next_due = False  # a queued request waits for the client to take the last answer
        self._drain_waiter: asyncio.Future[None] | None = None
        self._messages_in_read = 0
        self._read: bytes | None = None  # the read being parsed (only while it is)
        self._head_read: bytes | None = None  # that read, if the current head began at its start
        self._url: list[bytes] = []
        self._url_size = 0
        self._headers: list[tuple[str, str]] = []
        self._head_size = 0
        self._raw_head = 0  # bytes of the current head counted read by read (for heads that never complete)
        self._parsing: Request | None = None  # the request whose head or body the parser is in
        self._current: Request | None = None  # the request being handled
        # The connection's requests run in one task, one after another (see _begin and _serve).
        self._worker: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[Request | None] | None = None  # the worker waits on it between requests
        self._next: Request | None = None  # begun while the worker was still in the last request's handler
        self._queue: deque[Request] = deque()
        self._refusal: Refused | None = None  # raised from a parser callback
        self._ending = False  # a later head was refused: answer what is in hand, then close
        self._final: Refused | None = None  # ... and then this refusal
        self._closed = False
        self._closing = False  # closed with answers still buffered: the client has client_timeout to take them
        self._tunnel: Any = None
        self._after_upgrade: bytes | None = None  # bytes that followed an upgrade request's head
        self.last_key = LastKey()  # the handler's: the key last presented here (see gateway.keys.LastKey)
        # The client's header lines last sent upstream from this connection, what they were made from and what
        # was dropped (see forward.upstream_request_headers): a keep-alive client repeats its headers.
        self.sent_pairs: list[tuple[str, str]] | None = None
        # The last request's header list and the read-only mapping made of it: a request whose list equals it
        # (names and values, in order) gets both, instead of a mapping built anew.
        self._last_head: tuple[list[tuple[str, str]], CIMultiDictProxy[str]] | None = None
        self.sent_drop: frozenset[str] | None = None
        self.sent_lines = ""

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else ""
        local = transport.get_extra_info("sockname")
        self.local = f"{local[0]}:{local[1]}" if local and len(local) >= 2 else ""
        self.deadline = self.sweeper.time() + self.header_timeout
        self.sweeper.watch(self)
        self.server.connection_made(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._closed = True
        self.sweeper.forget(self)
        self.server.connection_lost(self)
        gone = ClientGone("the client closed the connection")
        if self._parsing is not None and self._parsing.body is not None:
            self._parsing.body.fail(gone)
        for request in self._queue:
            if request.body is not None:
                request.body.fail(gone)
        self._queue.clear()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_exception(gone)
        waiting, self._next = self._next, None
        if waiting is not None:
            # Begun while the worker finishes the last (answered) request: never handled, nor recorded.
            if waiting.body is not None:
                waiting.body.fail(gone)
        elif self._wake is not None:
            wake, self._wake = self._wake, None
            if not wake.done():
                wake.set_result(None)  # the idle worker ends
        elif self._worker is not None and self._current is not None and not self._current.ended:
            self._worker.cancel()
        if self._tunnel is not None:
            self._tunnel.client_lost()

    def pause_writing(self) -> None:
        # SECURITY: a client that pipelines requests and never reads would have every answer buffered
        # here; reading (and so answering) stops until it takes what it was sent.
        self._write_paused = True
        self.pause(_PAUSE_WRITE)

    def resume_writing(self) -> None:
        self._write_paused = False
        self.resume(_PAUSE_WRITE)
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)
        if self._tunnel is not None:
            self._tunnel.client_drained()
        if self._next_due:
            self._next_due = False
            self.deadline = _INF  # (set for the client to take its answers: it did)
            self._resume_queue()

    def data_received(self, data: bytes) -> None:
        if self._tunnel is not None:
            self._tunnel.from_client(data)
            return
        if self._closed or self._ending or (self.must_close or self._read_last) and self._parsing is None:
            return  # nothing more is parsed on this connection
        if self._after_upgrade is not None:
            self._after_upgrade += data  # held until the upgrade is taken or declined
            return
        fresh = self.state != _HEAD or self._raw_head == 0 and not self._url_size  # a head may begin at data[0]
        self._messages_in_read = 0
        self._read = data
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._read = self._head_read = None
            self._upgraded(data[upgrade.args[0]:])
            return
        except httptools.HttpParserError as exc:
            self._read = self._head_read = None
            if self._read_last and self._parsing is None:
                # Bytes after a request that closes the connection (llhttp: "Data after Connection:
                # close"): never read, so never answered (RFC 9112 section 9.6).
                self._refusal = None
                return
            refusal = self._refusal or self._parse_error(
                exc, data if fresh and not self._messages_in_read else None)
            self._refusal = None
            self._refuse(refusal)
            return
        self._read = self._head_read = None  # (a read may be large: not kept past its parse)
        if self.state == _HEAD:
            # A head still arriving: count its bytes, read by read (its parts are counted exactly once it
            # completes). One that began in this read after another message counts only its own: its target
            # and header lines so far, and, once one of its header lines has been reported (so the read's
            # last LF is its own), the line still arriving after that LF, which llhttp holds unseen. Whole
            # reads from the next on. (Found by reviews: counting the read's earlier bytes, the last 70 KiB
            # of a body, or its own target twice, refused a small head with 431; not counting the line
            # still arriving let a header line of any length ride a read past max_header_size. Until a
            # header line is reported, the first one still arriving rides at most this one read.)
            if self._messages_in_read:
                line = len(data) - 1 - data.rfind(b"\n") if self._head_size else 0
                self._raw_head = self._url_size + self._head_size + line
            else:
                self._raw_head += len(data)
            if self._raw_head > self.max_header_size:
                # (Still arriving: with requests in hand the client sees only the close.)
                self._refuse(Refused(431, "request line and headers over max_header_size"), arriving=True)

    def eof_received(self) -> bool | None:
        if self._tunnel is not None:
            return self._tunnel.client_eof()
        # The transport closes itself on return: an answer held for this turn goes first (found by a review:
        # a client that half-closes after its request lost an answer held when its FIN was read).
        self.sweeper.release()
        return None

    # -- llhttp callbacks

    def on_message_begin(self) -> None:
        if self._read_last:
            # After a request that closes the connection (one llhttp reads as keep-alive: MAX_PIPELINED's):
            # stops the parser; data_received drops the rest unanswered.
            raise self._stop(Refused(400, "a request after the last one read"))
        self._url.clear()
        self._url_size = 0
        self._headers = []
        # This head began at the start of the read being parsed (after any empty lines) only if no message
        # ended in it before: whatever came earlier in the read would be another message's.
        self._head_read = self._read if not self._messages_in_read else None
        self._head_size = 0
        if self.state != _HEAD:
            self.state = _HEAD
            self._raw_head = 0
            if self._paused & _PAUSE_QUEUE:
                self.deadline = _INF  # the client cannot send the rest while we do not read: no clock yet
            else:
                self.deadline = self.sweeper.time() + self.header_timeout

    def on_url(self, piece: bytes) -> None:
        self._url_size += len(piece)
        if self._url_size > MAX_TARGET:
            raise self._stop(Refused(414, "request target too long"))
        self._url.append(piece)

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value)
        if self._parsing is not None:
            # A trailer of a chunked body: not forwarded, but bounded like the head.
            self._head_size += size + 4
            if size > MAX_FIELD or self._head_size > self.max_header_size:
                raise self._stop(Refused(431, "trailers too large"))
            return
        if size > MAX_FIELD:
            raise self._stop(Refused(431, "header line too long"))
        if len(self._headers) >= MAX_HEADERS:
            raise self._stop(Refused(431, "too many headers"))
        self._head_size += size + 4
        known = _names.get(name)
        self._headers.append((known if known is not None else _header_name(name), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        parser = self.parser
        self.state = _BODY
        self.deadline = _INF
        method = parser.get_method().decode("ascii")
        version = self._version_read(len(method))
        raw_path = b"".join(self._url).decode("latin-1")
        if version != "1.1" and version != "1.0":
            raise self._stop(Refused(505, "HTTP version not supported"))
        if method == "CONNECT":
            # SECURITY: no tunnels. llhttp treats CONNECT as an upgrade.
            raise self._stop(Refused(400, "CONNECT", _NOT_ORIGIN_FORM))
        if not raw_path.startswith("/"):
            # SECURITY: absolute-form (http://other.host/...) and OPTIONS * are not requests for our API.
            raise self._stop(Refused(400, "target not in origin-form", _NOT_ORIGIN_FORM))
        head_size = len(method) + self._url_size + self._head_size + 14
        if head_size > self.max_header_size:
            # SECURITY: bounds the memory a client can pin with one head, and what reaches the upstream.
            raise self._stop(Refused(431, "request line and headers over max_header_size"))
        pairs = self._headers
        last = self._last_head
        if last is not None and pairs == last[0]:
            pairs, headers = last
        else:
            headers = CIMultiDictProxy(CIMultiDict(pairs))
            if head_size <= MEMO_BLOCK:
                self._last_head = (pairs, headers)
        request = Request(self, method, raw_path, version, headers, parser.should_keep_alive(),
                          parser.should_upgrade(), pairs)
        request.head_size = head_size
        hosts = headers.getall(_HOST_NAME, ())
        if len(hosts) != 1 and (hosts or version == "1.1") or hosts and not _valid_host(hosts[0]):
            # RFC 9112 section 3.2, a MUST: any request with more than one Host or an invalid one, and an
            # HTTP/1.1 request without one (HTTP/1.0 may omit it). An upstream may route by a Host it
            # reads differently.
            raise self._stop(Refused(400, "Host missing, repeated or invalid", _BAD_HOST))
        request._host = hosts[0] if hosts else None
        request._host_read = True
        if _TRANSFER_ENCODING_NAME in headers:
            if version == "1.0":
                # RFC 9112 section 6.1: such framing is faulty; a proxy must not guess.
                raise self._stop(Refused(400, "transfer-encoding in HTTP/1.0", _FRAMING_10))
            codings = [c for v in headers.getall(_TRANSFER_ENCODING_NAME) for c in v.lower().replace(" ", ",")
                       .replace("\t", ",").split(",") if c]
            if not codings or codings[-1] != "chunked" or codings.count("chunked") > 1:
                # RFC 9112 section 6.3 item 4: the body's length cannot be determined; a MUST.
                raise self._stop(Refused(400, "transfer-encoding without a final chunked", _FRAMING))
            if len(codings) > 1:
                # llhttp accepts "gzip, chunked": the body would reach the upstream still gzip-coded
                # and unlabelled. Only plain chunked framing is forwarded (RFC 9112 section 6.1: 501).
                raise self._stop(Refused(501, "transfer coding other than chunked"))
            request.body = Body(self, None, True, self.client_timeout)
        else:
            length = headers.get(_CONTENT_LENGTH_NAME)
            if length is not None:
                request.content_length = int(length)  # llhttp checked: digits only, one value
                if request.content_length:
                    request.body = Body(self, request.content_length, False, self.client_timeout)
        if request.upgrade and request.body is not None:
            # llhttp hands what follows an upgrade's head to us unparsed: a body there is unframed.
            raise self._stop(Refused(400, "upgrade request with a body"))
        if request.body is not None:
            expect = headers.get(_EXPECT_NAME)
            request.expect_continue = expect is not None and expect.lower() == "100-continue"
        self._parsing = request if request.body is not None else None
        if not request.keep_alive:
            self._read_last = True  # its answer closes the connection: nothing after it is read
        self._enqueue(request)

    def _version_read(self, method_size: int) -> str:
        """The HTTP version of the request whose head just completed.

        Read off its request line when the head began at the start of this read and ended in it (most
        do): the line llhttp accepted is the method, a space, the target (the bytes on_url counted), a
        space, the version and CRLF, so the version's place is known without a search. Leading empty
        lines (which llhttp skips) put something else there, and so does an HTTP/0.9 line, which has
        no version (its CRLF stands where the space would). Any other head asks the parser, at several
        times the cost (a string formatted per request): one that began in an earlier read (even by
        its method alone: the place would be off by as much, and could fall on a header's end) or
        after another message in this one.
        """
        read = self._head_read  # (None once the read it began in is parsed)
        if read is not None:
            end = method_size + self._url_size + 10  # the end of " HTTP/1.x"
            version = read[end - 9:end + 2]
            if version == _HTTP11_END:
                return "1.1"
            if version == _HTTP10_END:
                return "1.0"
        return self.parser.get_http_version()

    def on_body(self, data: bytes) -> None:
        request = self._parsing
        if request is not None and request.body is not None:
            request.body.feed(data)

    def on_message_complete(self) -> None:
        self._messages_in_read += 1
        request = self._parsing
        self._parsing = None
        if request is not None and request.body is not None:
            request.body.feed_eof()
        self.state = _IDLE
        self._raw_head = 0
        if self._current is None and not self._queue:
            self.deadline = self.sweeper.time() + self.keepalive_timeout

    def _stop(self, refusal: Refused) -> Refused:
        """Stop the parser from a callback with ``refusal`` (feed_data then raises HttpParserCallbackError)."""
        self._refusal = refusal
        return refusal

    @staticmethod
    def _parse_error(exc: httptools.HttpParserError, head: bytes | None) -> Refused:
        """The refusal for a parse error; ``head``: the read, when the failed request began at its start."""
        if "Invalid HTTP version" in str(exc):
            return Refused(505, "HTTP version not supported")
        if isinstance(exc, httptools.HttpParserInvalidMethodError) and head is not None \
                and _TOKEN.fullmatch(head.split(b" ", 1)[0]):
            # llhttp knows the registered methods (and only in upper case): another well-formed one is
            # not implemented here (RFC 9110 section 15.6.2); a malformed one (not a token) is 400.
            # (In a read that held an earlier request, where the failed one began is unknown: 400.)
            return Refused(501, "method not recognised", _METHOD)
        return Refused(400, type(exc).__name__)

    # -- requests in order

    def _enqueue(self, request: Request) -> None:
        if self._current is None:
            self._begin(request)
        else:
            self._queue.append(request)
            self.pause(_PAUSE_QUEUE)
            if len(self._queue) >= MAX_PIPELINED:
                # SECURITY: bounds the memory one connection's pipeline holds (RFC 9112 section 9.3.2: a
                # client retries what a closed connection left unanswered).
                request.keep_alive = False
                self._read_last = True

    def _begin(self, request: Request) -> None:
        self._current = request
        if request.expect_continue and request.body is not None and not request.body.received \
                and request.version == "1.1":  # RFC 9110 section 10.1.1: never a 1xx to an HTTP/1.0 client
            self.continue_due = True
        wake = self._wake
        if wake is not None and not wake.done():
            self._wake = None
            wake.set_result(request)
        elif self._worker is not None:
            self._next = request  # the worker takes it once the last request's handler returns
        else:
            # One task per connection, not per request: making, scheduling and ending a task cost
            # about a twentieth of a request. Made directly and named: loop.create_task names each
            # one "Task-<n>" first, and uvloop's adds a call.
            self._worker = asyncio.Task(self._serve(request), loop=self.loop, name=_HANDLER_TASK)

    async def _serve(self, request: Request | None) -> None:
        """The handler for each request begun on this connection, in order, until it closes.

        A handler that fails (logged) or is cancelled without having answered whole has the
        connection cut: its client must not wait for an answer. The next request is taken once the
        last one's handler has returned (it may still record after its answer was written).
        """
        handler = self.handler
        try:
            while request is not None:
                try:
                    await handler(request)
                except asyncio.CancelledError:
                    worker = self._worker
                    if self._closed or worker is None or worker.cancelling():
                        if not request.ended:
                            self.abort()
                        return  # the client went away (or the listener cut it off while draining)
                    # Raised by the handler itself (a future it awaited was cancelled), not this
                    # task cancelled: the connection's next request is still served.
                except Exception as exc:
                    log.error(json.dumps({"event": "handler_failed", "error": type(exc).__name__}), exc_info=exc)
                if not request.ended:
                    self.abort()
                if self._next is not None:
                    # Pipelined: other connections get their turn before it, as they did with a task per
                    # request (a long pipeline of requests answered without waiting must not hold the loop).
                    await asyncio.sleep(0)
                request, self._next = self._next, None  # (None if the client went away meanwhile)
                if request is None and not self._closed:
                    self._wake = self.loop.create_future()
                    request = await self._wake
        finally:
            self._worker = None
            self._wake = None
            if self._next is not None:
                # Leaving with a request begun and never handled (a BaseException, or the loop closing):
                # its client must not wait for an answer.
                self._next = None
                self.abort()

    def closing_after(self, request: Request) -> bool:
        """Whether the connection closes after ``request``'s response (decided when its head is written)."""
        if self._ending and (self._queue or self._final is not None) and request.keep_alive \
                and not self.must_close and not self.server.draining:
            # A later head was refused: the requests read before it are answered first, in full, then its
            # refusal (none if it was still arriving), then the close.
            return False
        if self.must_close or self._ending or self.server.draining or not request.keep_alive:
            return True
        body = request.body
        if body is not None and not body.eof:
            if body._error is not None:
                return True  # the body stalled or broke off: nothing more can be read from this client
            if self.continue_due:
                return True  # the client waits for 100 Continue before sending a body nobody will read
            if body.expected is not None and body.expected - body.received > BODY_HIGH:
                return True  # more to drain than is worth reading
        if request.upgrade:
            return False
        return False

    def connection_header(self, request: Request, close: bool) -> bytes:
        if close:
            self.must_close = True
            return b"Connection: close\r\n"
        if request.version == "1.0":
            return b"Connection: keep-alive\r\n"
        return b""

    def send_continue(self) -> None:
        self.continue_due = False
        if self.transport is not None and not self._closed:
            self.sweeper.release()
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def response_done(self, request: Request, close: bool) -> None:
        if request is not self._current:
            return
        self.continue_due = False
        body = request.body
        unread = body is not None and not body.eof
        if body is not None:
            body.discard()
        if close:
            self._close_after_answer(lingering=unread)
            return
        if request.upgrade and self._tunnel is None:
            # Answered without 101 (an upgrade request has no body): what the client sent after it is parsed
            # now, before anything read later, as the requests that follow it (see decline_upgrade).
            rest = self.decline_upgrade()
            self._current = None
            self._resume_queue()
            if rest:
                self.data_received(rest)
            return
        if unread:
            # The rest of the body is read (and dropped) before the next request, within the client's body
            # deadline: a client that stops sending it is closed, not kept.
            self._current = None
            self._resume_queue()
            self.deadline = self.sweeper.time() + self.client_timeout
            return
        self._current = None
        self._resume_queue()

    def _resume_queue(self) -> None:
        if self._queue:
            self.sweeper.release()  # (an answer held is not yet in the transport's buffer, nor counted by it)
        if self._write_paused and self._queue:
            # The next request starts once the client has taken this answer; one that takes nothing for
            # client_timeout seconds is cut off (SECURITY: else a client that pipelines requests and then
            # neither reads nor sends would keep its connection, and what it was sent, for ever).
            self._next_due = True
            self.deadline = self.sweeper.time() + self.client_timeout
            return
        if self._queue:
            request = self._queue.popleft()
            if not self._queue:
                self.resume(_PAUSE_QUEUE)
                if self.state == _HEAD and self.deadline == _INF and not self._ending:
                    # (Not once a later head was refused: nothing more is read, and the header deadline would
                    # cut off the request now begun; found by a review.)
                    self.deadline = self.sweeper.time() + self.header_timeout
            self._begin(request)
        elif self._ending:
            final, self._final = self._final, None
            if final is not None:
                self._current = None
                self._answer_refusal(final)
            else:
                self._close_after_answer(lingering=False)
        elif self.state == _IDLE:
            self.deadline = self.sweeper.time() + self.keepalive_timeout
        elif self.state == _HEAD and self.deadline == _INF:
            self.deadline = self.sweeper.time() + self.header_timeout

    def _close_after_answer(self, *, lingering: bool) -> None:
        self._current = None
        final, self._final = self._final, None
        if self._queue:
            # Requests are left unanswered (the client retries them on another connection): a refusal now
            # would be read as the answer to the first of them.
            self._queue.clear()
            final = None
        if final is not None:
            self._answer_refusal(final)  # the refused request that followed, answered last
        elif lingering or self._ending:
            # (A later head was refused while still arriving: the client may still be sending it, and a close
            # with its bytes unread would reset the connection, the answers just written lost with it.)
            self._linger()
        else:
            self.close()

    # -- refusals and closing

    def _refuse(self, refusal: Refused, *, arriving: bool = False) -> None:
        """Answer ``refusal`` and close; with requests in hand, answer those first.

        ``arriving``: the refused head is still arriving (too slow, too large). With requests in
        hand it then gets no answer, only the close after theirs: the client may still be sending it.
        """
        self.deadline = _INF
        entry: dict[str, Any] = {"event": "bad_http", "status": refusal.status, "reason": refusal.reason}
        log.info(json.dumps(entry))
        in_body = self._parsing is not None and self._parsing.body is not None
        if in_body:
            # A body that cannot be parsed to its end (a bad chunk): its upstream request must not look
            # complete, and its handler answers for it (400 invalid_body).
            self._parsing.body.fail(MalformedBody())  # type: ignore[union-attr]
            self._parsing = None
            arriving = True
        if self._current is not None or self._queue:
            # A request is being handled or waits: an answer now would interleave with its response.
            # Those are answered, nothing more is read, and the connection closes after the last.
            self._ending = True
            self._final = None if arriving else refusal
            self.pause(_PAUSE_QUEUE)
            return
        self._answer_refusal(refusal)

    def _answer_refusal(self, refusal: Refused) -> None:
        error, description = refusal.body
        body = json.dumps({"error": error, "error_description": description}).encode()
        self.must_close = True
        self._ending = True
        if self.transport is not None and not self._closed:
            self.sweeper.release()
            self.transport.write(
                b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n%s" % (refusal.status, reason_of(refusal.status).encode(), len(body), body))
            if refusal.status == 408:
                self.close()  # a client that stalled has nothing more to send
            else:
                self._linger()

    def _linger(self) -> None:
        """End our side and drop what the client still sends, for at most LINGER seconds.

        Closing with unread input makes the kernel reset the connection, and a client still sending
        (a head too large, a body nobody reads) may then lose the answer; our FIN tells it to stop.
        """
        transport = self.transport
        self._ending = True
        self.state = _IDLE
        if transport is None or self._closed:
            return
        if not transport.can_write_eof():
            self.close()
            return
        self.resume(_PAUSE_BODY | _PAUSE_QUEUE)
        self.sweeper.release()
        transport.write_eof()
        self.deadline = self.sweeper.time() + LINGER

    def expire(self, now: float) -> None:
        if self._closed or self.transport is None:
            return
        if self._closing or self._next_due or self._drain_waiter is not None and not self._drain_waiter.done():
            # The client has taken nothing of what it was sent for client_timeout seconds: its answers (a
            # handler's, those of requests it pipelined, or the last before a close) are dropped with it.
            self.abort()
            return
        if self._ending:
            if self._current is None:
                self.close()  # lingering ran out
            else:
                self.deadline = _INF  # requests read before a refused head are still being answered
        elif self.state == _HEAD:
            # SECURITY: slowloris; a head that trickles in must still be complete in time.
            self._refuse(Refused(408, "request line and headers not complete within header_timeout"), arriving=True)
        elif self._current is None and self.state in (_IDLE, _BODY):
            self.close()  # an idle keep-alive connection, or an answered request's body stalled
        else:
            self.deadline = _INF

    def close(self) -> None:
        """Close once what was written is sent. SECURITY: a client that does not take it within client_timeout
        seconds is cut off then (a transport's close waits for its buffer for ever, and the connection counts
        against max_connections meanwhile)."""
        transport = self.transport
        if transport is None or self._closed:
            return
        self.sweeper.release()
        transport.close()
        if transport.get_write_buffer_size() and not self._closing:
            self._closing = True
            self.deadline = self.sweeper.time() + self.client_timeout
            self.sweeper.watch(self)  # (a tunnel's connection is no longer watched)

    def abort(self) -> None:
        if self.transport is not None and not self._closed:
            self.sweeper.release()
            self.transport.abort()

    def shutdown(self) -> None:
        """Draining: close now if idle, else after the response in hand."""
        if self._current is None and not self._queue and self._tunnel is None and self.transport is not None:
            if self.state != _HEAD or self._head_size == 0 and self._url_size == 0 and self._raw_head == 0:
                self.close()

    # -- flow control

    def pause(self, reason: int) -> None:
        if not self._paused and self.transport is not None and not self._closed:
            self.transport.pause_reading()
        self._paused |= reason

    def resume(self, reason: int) -> None:
        if self._paused & reason:
            self._paused &= ~reason
            if not self._paused and self.transport is not None and not self._closed:
                self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self._closed:
            self.sweeper.release()
            self.transport.write(data)

    def write_soon(self, data: bytes) -> None:
        """Write ``data`` once the loop's callbacks of the moment have run (see Sweeper.hold)."""
        if self.transport is not None and not self._closed:
            self.sweeper.hold(self, data)

    def send_held(self, data: bytes) -> None:
        """What write_soon held (Sweeper.release). Dropped if the client went away meanwhile."""
        transport = self.transport
        if transport is not None and not self._closed and not transport.is_closing():
            transport.write(data)

    async def drain(self) -> None:
        """Wait until the client has taken what was written; a client that takes nothing for
        ``client_timeout`` seconds is cut off (ClientGone)."""
        if self._closed:
            raise ClientGone("the client closed the connection")
        if self._write_paused:
            waiter = self._drain_waiter
            if waiter is None:
                waiter = self._drain_waiter = self.loop.create_future()
            saved = self.deadline
            self.deadline = mine = self.sweeper.time() + self.client_timeout
            try:
                await waiter
            finally:
                if self.deadline == mine:
                    self.deadline = saved

    # -- upgrades

    def _upgraded(self, rest: bytes) -> None:
        """llhttp stopped after an upgrade request's head: what follows is not parsed (yet)."""
        self._after_upgrade = rest
        self.pause(_PAUSE_QUEUE)

    def take_tunnel(self, tunnel: Any) -> bytes:
        """The upgrade was accepted: bytes now go to ``tunnel``; returns what the client already sent."""
        rest = self._after_upgrade or b""
        self._after_upgrade = None
        self._tunnel = tunnel
        self.state = _TUNNEL
        self.deadline = _INF
        self.sweeper.forget(self)
        self._paused = 0
        if self.transport is not None and not self._closed:
            self.transport.resume_reading()
        return rest

    def decline_upgrade(self) -> bytes | None:
        """The upgrade was answered without 101: a new parser for what follows; returns what the client sent
        after the upgrade's head, to be parsed first.

        Parsed at once by the caller, not later: reading resumes here, and a read that came in before a
        deferred parse would be parsed ahead of it, its requests answered before those sent earlier (found
        by a review: a pipelining client took one request's answer for another's).
        """
        rest = self._after_upgrade
        self._after_upgrade = None
        self.parser = httptools.HttpRequestParser(self)
        self.state = _IDLE
        self.resume(_PAUSE_QUEUE)
        return rest
