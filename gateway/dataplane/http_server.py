"""The proxy listener's HTTP server: aiohttp's low-level server with our error answers and HTTP-level guards.

aiohttp answers requests it cannot parse itself, echoing the offending bytes
(which may hold the client's key) in a text body. Here those answers are
our JSON ones, without the echo, and the connection is closed after them.

Before any request reaches the pipeline, each connection also enforces:
a deadline for the request line and headers (``proxy.header_timeout``, 408),
a cap on their total size (``proxy.max_header_size``, 431), fixed limits on
the target (414) and on one header line (431), and the request forms a
reverse proxy serves: origin-form targets over HTTP/1.0 or 1.1 only (else
400, or 505 for another version).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiohttp import hdrs, web
from aiohttp.http import HttpVersion10, HttpVersion11, RawRequestMessage
from aiohttp.http_exceptions import BadHttpMessage, BadStatusLine, LineTooLong
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler, _ErrInfo

log = logging.getLogger("keygate.http")

# The two line limits differ by 2 bytes on purpose: aiohttp's LineTooLong
# carries only the limit that was hit, and that is how handle_error tells a
# long target (414) from a long header line (431). 8190 is aiohttp's (and
# Apache's) header line default; the target gets the round 8 KiB.
MAX_TARGET = 8192  # bytes of the request target; aiohttp's max_line_size counts only the target
MAX_FIELD = 8190  # bytes of one header's name plus value
MAX_HEADERS = 128  # header lines; more is 431
# An idle keep-alive connection may wait this long for its next request (nginx's default);
# the header timeout starts only once that request's first byte arrives.
KEEPALIVE_TIMEOUT = 75.0

_HTTP1 = (HttpVersion11, HttpVersion10)

_BODIES = {
    400: ("invalid_request", "The request is not well-formed HTTP."),
    408: ("request_timeout", "The request line and headers did not arrive in time."),
    414: ("uri_too_long", f"The request target is longer than {MAX_TARGET} bytes."),
    431: ("request_header_fields_too_large",
          f"A header line is longer than {MAX_FIELD} bytes, or the request has too many or too large headers."),
    500: ("internal_error", "Keygate failed to handle this request."),
    505: ("http_version_not_supported", "Only HTTP/1.0 and HTTP/1.1 are served here."),
}
# Parsed requests that are never forwarded: Keygate serves one API by path, it is no forward proxy or tunnel.
_NOT_ORIGIN_FORM = ("invalid_request",
                    'Only requests for a path starting with "/" are served; CONNECT, absolute-form and '
                    "OPTIONS * requests are not.")


class Refusal(Exception):
    """A request refused at the HTTP level before any handler ran; its text is a constant, safe to log."""


_CONNECT = Refusal("CONNECT")
_TARGET = Refusal("target not in origin-form")
_VERSION = Refusal("HTTP version not supported")
_TOO_LARGE = Refusal("request line and headers over max_header_size")
_TIMEOUT = Refusal("request line and headers not complete within header_timeout")


def _status(status: int, exc: BaseException | None) -> int:
    """The status for an error aiohttp reports as a generic 400, by what went wrong."""
    if status != 400 or exc is None:
        return status  # 500 and 504 come from a handler; its exceptions are not parse errors
    if isinstance(exc, LineTooLong):
        return 414 if exc.args[1] == MAX_TARGET else 431
    if isinstance(exc, BadStatusLine) and "Invalid HTTP version" in exc.message:
        return 505  # llhttp rejects a version it does not know (HTTP/3.0) before we see the request
    if isinstance(exc, BadHttpMessage) and exc.message == "Too many headers received":
        return 431
    return status


def _head_size(message: RawRequestMessage) -> int:
    """Bytes of the request line and headers as sent with single spaces and CRLFs."""
    size = len(message.method) + len(message.path) + 12  # " ", " HTTP/1.1", CRLF
    for name, value in message.raw_headers:
        size += len(name) + len(value) + 4  # ": ", CRLF
    return size + 2


class _Handler(RequestHandler):
    """aiohttp's connection handler with a header deadline, a header size cap and the request-form checks."""

    __slots__ = ("_head_timeout", "_max_head", "_head_timer", "_head_bytes", "_head_uncounted", "_body",
                 "_body_chunked", "_body_decoded", "_ending", "_linger", "_lingering")

    def __init__(self, manager: web.Server, *, header_timeout: float, max_header_size: int, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._head_timeout = header_timeout
        self._max_head = max_header_size
        self._head_timer: asyncio.TimerHandle | None = None
        # Bytes of the head now arriving, counted per read while no request completes.
        self._head_bytes = 0
        # Some bytes of the head now arriving came in a read that also held a body or a whole request,
        # so they are not in _head_bytes: the request they end in is measured exactly instead.
        self._head_uncounted = False
        # The last parsed request's body (None when it has none): reads that arrive while it is
        # unfinished are body, not the next head.
        self._body: StreamReader | None = None
        # How that body is framed on the wire: chunked, or (when not) decoded (Content-Encoding), so that
        # its reader counts other bytes than arrived.
        self._body_chunked = False
        self._body_decoded = False
        # Set when a head is refused (too slow, too large) while requests are in hand: those are answered,
        # nothing more is read, and the connection closes after the last answer.
        self._ending: Refusal | None = None
        # Set by an error answer after which what the client still sends is drained, not reset.
        self._linger = False
        self._lingering: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        if self._lingering is not None and not self._lingering.done():
            self._lingering.set_result(None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._upgraded or self._payload_parser is not None or self._close or self._force_close or self._ending:
            # A WebSocket (or what follows a CONNECT) is not HTTP; a closing connection parses nothing more,
            # nor does one ending after the requests in hand (what arrives is dropped).
            if self._ending is None:
                super().data_received(data)
            return
        body = self._body
        in_body = body is not None and not body.is_eof()
        body_before = body.total_bytes if in_body else 0  # type: ignore[union-attr]
        count = self._request_count
        super().data_received(data)  # counts each request it parses (or fails to) in _request_count
        if self._request_count != count:
            # The hot path (a whole head in one read) costs the compares below, and no timer.
            self._disarm()
            self._parsed(self._request_count - count,
                         exact=in_body or self._head_uncounted or self._head_bytes + len(data) > self._max_head)
            self._head_bytes = 0
            # Did the next head begin in this read? Its bytes here are then uncounted, so that
            # request is measured whole when it completes.
            # No clock, though, when an upgrade request came last: what follows it is no head (a WebSocket's
            # frames, say). If the upgrade is declined, finish_response parses what was held back, and arms.
            body = self._body
            if body is not None:
                # Not if the read ended inside a body; perhaps if the body ended in it.
                self._head_uncounted = ended = body.is_eof()
                if (ended and data and not self._buffer_paused and not self._upgraded
                        and self._next_head_began(data, body.total_bytes, True)):
                    self._arm()  # the next head's clock starts now, as after a bodiless head below
            elif data.endswith(b"\r\n\r\n"):
                self._head_uncounted = False  # the read ended with a bodiless head's blank line
            else:
                self._head_uncounted = True
                if data and not self._buffer_paused and not self._upgraded:
                    # Bytes followed a bodiless head: the next head's clock starts now. (With the queue
                    # full they wait in the parser unread, and it starts when reading resumes.)
                    self._arm()
        elif in_body:
            if body.is_eof():  # type: ignore[union-attr]
                received = body.total_bytes - body_before  # type: ignore[union-attr]
                if received != len(data):
                    # Perhaps something followed the body's end in this read: the next head, uncounted.
                    self._head_uncounted = True
                if (data and not self._upgraded and not self._buffer_paused and self._head_timer is None
                        and self._next_head_began(data, received, False)):
                    # It did: that head's clock starts now. (Else a stall there would last until the
                    # keep-alive timeout.)
                    self._arm()
        elif data:
            self._head_bytes += len(data)
            if self._head_bytes > self._max_head:
                # SECURITY: bounds the memory a client can pin with one head, and what reaches the upstream.
                self._refuse(431, _TOO_LARGE)
            elif self._head_timer is None:
                self._arm()

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None,
    ) -> tuple[web.StreamResponse, bool]:
        # After a declined upgrade (or a refused CONNECT) aiohttp parses the bytes it held back
        # right here, not in data_received: the requests among them are checked here.
        count = self._request_count
        held_back = self._upgraded and bool(self._message_tail)
        result = await super().finish_response(request, resp, start_time)
        if self._ending is not None and not self._messages:
            # The last request in hand before a refused head is answered: close now.
            if self._ending is _TOO_LARGE:
                # The client may still be sending that head: drain (below), lest closing reset the connection.
                self._linger = True
            else:
                self.close()  # a client that stalled has nothing more to send
        if held_back:
            if self._request_count != count:
                # Requests data_received parsed meanwhile are among these; checking one twice is harmless.
                self._parsed(self._request_count - count, exact=True)
                self._head_uncounted = True
            elif not self._upgraded and self._head_timer is None:
                self._arm()  # what was held back is the start of a head
                self._head_uncounted = True
        if self._linger:
            await self._drain_and_close()
        return result

    def _next_head_began(self, data: bytes, received: int, whole: bool) -> bool:
        """Whether bytes of a next head followed, in ``data``, the end of the body that ended in it.

        ``received``: the bytes the body's reader got from this read, all of the body when ``whole``
        (its head completed in this read). Only when sure: else the keep-alive timeout ends a stall.
        """
        if self._body_chunked:
            # The (strict) parser ends a chunked body with CRLF CRLF: a read that ends inside those
            # four bytes ends with the body; anything else after the end is the next head.
            return not b"\r\n\r\n".endswith(data[-4:])
        if self._body_decoded:
            return False  # its reader counts decoded bytes, not those of this read
        if not whole:
            return received < len(data)
        # The body is the last ``received`` bytes of the read unless something followed it; its head
        # ended right before it, with CRLF CRLF (or the part of those that came in this read).
        end = len(data) - received
        return end > 0 and not b"\r\n\r\n".endswith(data[max(end - 4, 0):end])

    async def _drain_and_close(self) -> None:
        """After an error answer, end our side and drop what the client still sends, for at most lingering_time.

        Closing with unread input makes the kernel reset the connection, and a client still sending
        (a head too large, say) may then lose the answer; our FIN after it tells the client to stop.
        """
        transport = self.transport
        if transport is None or not transport.can_write_eof():
            return
        self._close = True  # data_received drops whatever still arrives
        self._lingering = self._loop.create_future()
        transport.write_eof()
        await asyncio.wait((self._lingering,), timeout=self._lingering_time)

    def _parsed(self, new: int, *, exact: bool) -> None:
        """Check the ``new`` requests just queued; refuse each bad one in place, as aiohttp does parse errors."""
        messages = self._messages
        end = len(messages)
        for i in range(max(end - new, 0), end):
            message, payload = messages[i]
            if isinstance(message, _ErrInfo):
                continue
            if payload is EMPTY_PAYLOAD:
                self._body = None
            else:
                self._body = payload
                self._body_chunked = bool(message.chunked)
                self._body_decoded = message.compression is not None
            if message.version not in _HTTP1:
                refusal: tuple[int, Refusal] | None = (505, _VERSION)
            elif message.method == "CONNECT":
                # SECURITY: no tunnels. llhttp treats CONNECT as an upgrade; the answer closes the connection.
                refusal = (400, _CONNECT)
            elif not message.path.startswith("/"):
                # SECURITY: absolute-form (http://other.host/...) and OPTIONS * are not requests for our API.
                refusal = (400, _TARGET)
            elif exact and _head_size(message) > self._max_head:
                refusal = (431, _TOO_LARGE)
            else:
                refusal = None
            if refusal is not None:
                status, exc = refusal
                # aiohttp answers these through handle_error, without running the request handler.
                messages[i] = (_ErrInfo(status=status, exc=exc, message=str(exc)), EMPTY_PAYLOAD)

    def _refuse(self, status: int, exc: Refusal) -> None:
        """Answer ``status`` and close if the connection is idle, else close once the requests in hand are answered."""
        self._disarm()
        if self._request_in_progress or self._messages:
            # A request is being handled or waits: an answer now would interleave with its response, and
            # cutting that would lose an answer to a request that came complete and in time. Those are
            # answered, what arrives meanwhile is dropped (the refused head with it), and finish_response
            # closes after the last. No answer for the refused head, then: the client sees the close.
            self._ending = exc
            if not self._messages:
                self.close()  # ends start()'s loop after the current request; its handler runs on
            return
        # Idle: this answer is the next request start() takes, whether it waits already or not
        # (on a new connection its task may not have run yet).
        self._messages.append((_ErrInfo(status=status, exc=exc, message=str(exc)), EMPTY_PAYLOAD))
        self._close = True  # parse nothing more; close() would cancel the waiter woken below
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _arm(self) -> None:
        loop = self._loop
        self._head_timer = loop.call_at(loop.time() + self._head_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not (self._close or self._force_close or self._ending or self.transport is None
                or self._upgraded or self._payload_parser is not None):
            # (An upgraded connection carries no more heads; a declined upgrade is re-armed in finish_response.)
            # SECURITY: slowloris; a head that trickles in must still be complete in time.
            self._refuse(408, _TIMEOUT)

    def handle_error(
        self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        status = _status(status, exc)
        # Drain after answers to requests no handler saw (a handler's 500/504 keeps aiohttp's own
        # lingering for the body), except after 408: a client that stalled has nothing more to send.
        self._linger = status not in (500, 504) and exc is not _TIMEOUT
        # SECURITY: never echo the request (it may carry a key) and never a traceback.
        entry: dict[str, Any] = {"event": "bad_http", "status": status, "error": type(exc).__name__ if exc else None}
        if isinstance(exc, Refusal):
            entry["reason"] = str(exc)
        log.info(json.dumps(entry))
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        if exc is _CONNECT or exc is _TARGET:
            error, description = _NOT_ORIGIN_FORM
        else:
            error, description = _BODIES.get(status, ("invalid_request", "The request could not be handled."))
        # aiohttp answers these for its fixed stand-in request (HTTP/1.0), so the status line reads
        # "HTTP/1.0 <status>": acceptable, as the connection is closed after it either way. For that
        # version aiohttp would not say so, hence the explicit Connection: close.
        response = web.Response(
            status=status, content_type="application/json", headers={hdrs.CONNECTION: "close"},
            text=json.dumps({"error": error, "error_description": description}),
        )
        response.force_close()
        return response


class ProxyHTTPServer(web.Server):
    """``web.Server`` whose connections use :class:`_Handler`."""

    def __init__(self, handler: Any, *, header_timeout: float, max_header_size: int, **kwargs: Any) -> None:
        super().__init__(
            handler, keepalive_timeout=KEEPALIVE_TIMEOUT, max_line_size=MAX_TARGET, max_field_size=MAX_FIELD,
            max_headers=MAX_HEADERS, **kwargs,
        )
        self._head_settings = {"header_timeout": header_timeout, "max_header_size": max_header_size}

    def __call__(self) -> RequestHandler:
        return _Handler(self, loop=self._loop, **self._head_settings, **self._kwargs)
