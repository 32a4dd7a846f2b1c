"""A raw HTTP/1.1 upstream that records exactly what reaches it, for the differential and fuzz tests.

It parses strictly, by RFC 9112 and nothing looser: CRLF line ends only, a
request line of three parts separated by one space, header names that are
tokens with the colon right after them, no obs-fold, no control characters
in values, at most one ``Content-Length`` (digits only) or one
``Transfer-Encoding: chunked`` and never both, chunk sizes in hex with CRLF
after every line. Anything else is recorded as an error and the connection
is closed: a proxy in front of it must never send such bytes.

Each request is recorded when its head arrives (so a request whose body
never comes is seen too) with the exact head bytes, its method, target and
framing, and, once read, its body. Requests are told apart by the client
they came from: the proxy's ``X-Forwarded-For``, which Keygate sets to the
client's socket address, so a test that connects from its own loopback
address (127.x.y.z) finds exactly its own requests however late they come.

It answers every request ``200`` with ``X-Upstream-Seq: <n>`` (the record's
number) and a small Content-Length body (none for HEAD, where
``Content-Length: 0`` is sent so that any reader can frame the answer), and
a valid WebSocket handshake ``101``; after a 101 it closes the connection as
soon as anything more arrives.

It runs on a thread of its own with its own event loop, so one instance can
serve a whole test module whatever loop each test runs in.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import threading
from dataclasses import dataclass, field
from typing import Literal

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
# The target: visible ASCII only (what the proxy sends must be the canonical, percent-encoded form).
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/1\.1")
# field-value: visible characters, obs-text, SP and HTAB inside; optional whitespace around it.
_FIELD = re.compile(rb"(" + _TOKEN + rb"):[ \t]*((?:[\x21-\x7e\x80-\xff](?:[ \t]*[\x21-\x7e\x80-\xff])*)?)[ \t]*")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})((?:[ \t]*;[\x09\x20-\x7e\x80-\xff]*)?)")
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_HEAD = 1 << 20

Framing = Literal["none", "length", "chunked"]


@dataclass
class Seen:
    """One request as it arrived upstream."""

    seq: int
    client: str  # its X-Forwarded-For: the test client's loopback address
    head: bytes  # the request line and headers, exactly as sent, up to and including the blank line
    method: str
    target: str
    headers: list[tuple[str, str]]
    framing: Framing
    length: int | None  # the Content-Length value when framing == "length"
    body: bytes = b""
    complete: bool = False  # the body (if any) arrived whole
    upgrade: bool = False  # answered 101: the connection became a tunnel

    def header(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]


@dataclass
class _State:
    lock: threading.Lock = field(default_factory=threading.Lock)
    seen: list[Seen] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class BadRequest(Exception):
    """What arrived is not strict HTTP/1.1."""


class RecordingUpstream:
    """The strict, recording upstream on 127.0.0.1, served from a thread of its own (``start`` / ``stop``)."""

    def __init__(self) -> None:
        self._state = _State()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="recording-upstream", daemon=True)
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> RecordingUpstream:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0, limit=MAX_HEAD), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()
        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    # --- what the tests read ---------------------------------------------------------------------------------

    def requests(self, client: str) -> list[Seen]:
        """The requests that came for ``client`` (its X-Forwarded-For), in arrival order."""
        with self._state.lock:
            return [s for s in self._state.seen if s.client == client]

    def by_client(self) -> dict[str, int]:
        """How many requests came for each client."""
        counts: dict[str, int] = {}
        with self._state.lock:
            for s in self._state.seen:
                counts[s.client] = counts.get(s.client, 0) + 1
        return counts

    def errors(self) -> list[str]:
        """Every violation of strict HTTP/1.1 the upstream received, in order."""
        with self._state.lock:
            return list(self._state.errors)

    # --- serving ---------------------------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError as exc:
                    if exc.partial:
                        self._error(f"connection closed inside a head: {exc.partial[:200]!r}")
                    return
                except asyncio.LimitOverrunError:
                    self._error("head over 1 MiB")
                    return
                seen = self._record(head)
                if seen is None:
                    writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    return
                try:
                    await self._read_body(reader, seen)
                except (BadRequest, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                    if isinstance(exc, BadRequest):
                        self._error(f"#{seen.seq} {seen.method} {seen.target}: {exc}")
                    return  # a body cut short: the proxy aborted it (recorded as incomplete)
                with self._state.lock:
                    seen.complete = True
                if self._is_websocket(seen):
                    accept = base64.b64encode(hashlib.sha1(seen.header("Sec-WebSocket-Key")[0].encode()
                                                           + _WS_GUID).digest())
                    writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                                 b"Sec-WebSocket-Accept: " + accept + b"\r\nX-Upstream-Seq: %d\r\n\r\n" % seen.seq)
                    with self._state.lock:
                        seen.upgrade = True
                    await reader.read(1)  # a tunnel now: anything (a close frame) or EOF ends it
                    return
                body = b"" if seen.method == "HEAD" else b"ok %d" % seen.seq
                close = any(v.lower() == "close" for v in seen.header("Connection"))
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Upstream-Seq: %d\r\n"
                             b"Content-Length: %d\r\n%s\r\n%s"
                             % (seen.seq, len(body), b"Connection: close\r\n" if close else b"", body))
                await writer.drain()
                if close:
                    return
        except ConnectionError:
            pass
        finally:
            writer.close()

    def _error(self, what: str) -> None:
        with self._state.lock:
            self._state.errors.append(what)

    def _record(self, head: bytes) -> Seen | None:
        """Parse a head strictly and record it; None (and an error recorded) if it is not strict HTTP/1.1."""
        request_line, *lines = head[:-4].split(b"\r\n")
        try:
            line = _REQUEST_LINE.fullmatch(request_line)
            if line is None:
                raise BadRequest(f"request line {request_line[:200]!r}")
            headers: list[tuple[str, str]] = []
            for raw in lines:
                field_match = _FIELD.fullmatch(raw)
                if field_match is None:
                    raise BadRequest(f"header line {raw[:200]!r}")
                headers.append((field_match[1].decode(), field_match[2].decode("latin-1")))
            lengths = [v for n, v in headers if n.lower() == "content-length"]
            codings = [v for n, v in headers if n.lower() == "transfer-encoding"]
            if lengths and codings:
                raise BadRequest("both Content-Length and Transfer-Encoding")
            if len(lengths) > 1 or (lengths and not lengths[0].isdigit()) or (lengths and not lengths[0].isascii()):
                raise BadRequest(f"Content-Length {lengths}")
            if codings and (len(codings) > 1 or codings[0].lower() != "chunked"):
                raise BadRequest(f"Transfer-Encoding {codings}")
            if len([1 for n, _ in headers if n.lower() == "host"]) != 1:
                raise BadRequest("not exactly one Host")
        except BadRequest as exc:
            self._error(str(exc))
            return None
        framing: Framing = "chunked" if codings else "length" if lengths else "none"
        clients = [v for n, v in headers if n.lower() == "x-forwarded-for"]
        with self._state.lock:
            seen = Seen(
                seq=len(self._state.seen) + 1, client=clients[-1] if clients else "", head=head,
                method=line[1].decode(), target=line[2].decode(), headers=headers, framing=framing,
                length=int(lengths[0]) if lengths else None,
            )
            self._state.seen.append(seen)
        return seen

    async def _read_body(self, reader: asyncio.StreamReader, seen: Seen) -> None:
        if seen.framing == "length":
            body = await reader.readexactly(seen.length or 0)
        elif seen.framing == "chunked":
            body = await _read_chunked(reader)
        else:
            body = b""
        with self._state.lock:
            seen.body = body

    @staticmethod
    def _is_websocket(seen: Seen) -> bool:
        return (seen.method == "GET" and [v.lower() for v in seen.header("Upgrade")] == ["websocket"]
                and len(seen.header("Sec-WebSocket-Key")) == 1)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        line = (await reader.readuntil(b"\r\n"))[:-2]
        size_match = _CHUNK_SIZE.fullmatch(line)
        if size_match is None:
            raise BadRequest(f"chunk-size line {line[:100]!r}")
        size = int(size_match[1], 16)
        if size == 0:
            break
        body += await reader.readexactly(size)
        if await reader.readexactly(2) != b"\r\n":
            raise BadRequest("no CRLF after chunk data")
    while trailer := (await reader.readuntil(b"\r\n"))[:-2]:  # the trailer section, then the blank line
        if _FIELD.fullmatch(trailer) is None:
            raise BadRequest(f"trailer line {trailer[:100]!r}")
    return bytes(body)
