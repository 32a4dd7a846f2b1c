"""Raw HTTP/1.x requests and what a strict HTTP/1.1 reverse proxy must do with each (issue 13).

Every case is the exact bytes one client writes in one go on a fresh
connection, with ``{key}`` standing for a valid API key (filled in at run
time), sent to ``/api/...`` paths the key may use. Its expectation is one
:class:`Exchange` (rarely a choice of them, where RFC 9110/9112 leave the
recipient a choice that cannot change the framing):

- the answers the client gets, in order: a :class:`Sent` for a request the
  proxy must forward -- exactly that method, target, body and framing must
  reach the upstream, and the upstream's answer come back -- or a status
  (or set of statuses) the proxy answers itself;
- whether the connection is then closed (``True``), kept open (``False``:
  proven by one more request on it), or either (``None``).

A refusal is an exchange whose last answer is a 4xx/5xx status with the
connection closed; the requests before it in the same write (pipelined)
may be forwarded first. Nothing else ever reaches the upstream: one request
in, at most one request out, with identical framing (a Content-Length body
arrives with that Content-Length, a chunked body chunked with the same
decoded bytes, a body-less request with no body).

The expectations are the RFC's, taking the strict choice where RFC 9112
lets a recipient either reject or repair (bare LF, obs-fold, whitespace
before a colon, a repeated Content-Length): a proxy that repairs forwards
something its upstream may read another way, which is how requests are
smuggled. Keygate's own contract (DESIGN.md, the e2e tests) adds: only
origin-form targets (absolute-form, authority-form, ``*`` and CONNECT get
400), only HTTP/1.0 and 1.1 (505), a target over 8192 bytes 414, a header
line over 8190 bytes, more than 128 headers or a head over
``proxy.max_header_size`` 431, a body over ``proxy.max_body_size`` 413.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal

KEY = b"{key}"
AUTH = b"Authorization: Bearer {key}\r\n"
HOST = b"Host: gw.test\r\n"
T = "/api/items"


@dataclass(frozen=True)
class Framing:
    """How a forwarded request's body is delimited upstream."""

    kind: Literal["none", "length", "chunked"]
    length: int | None = None

    def __str__(self) -> str:
        return {"none": "no body", "chunked": "chunked"}.get(self.kind) or f"Content-Length {self.length}"


NO_BODY = Framing("none")  # neither header, or Content-Length: 0 (both say "no body"; a proxy may add the latter)
CHUNKED = Framing("chunked")


def length(n: int) -> Framing:
    return Framing("length", n)


@dataclass(frozen=True)
class Sent:
    """A request the upstream must receive, answered there (200, or 101 for a WebSocket handshake)."""

    method: str
    target: str = T
    body: bytes = b""
    framing: Framing = NO_BODY
    upgrade: bool = False

    @property
    def status(self) -> int:
        return 101 if self.upgrade else 200

    def __str__(self) -> str:
        body = f" body {self.body[:40]!r}{'...' if len(self.body) > 40 else ''}" if self.body else ""
        return f"{self.method} {self.target[:60]} ({self.framing}{body}){' upgrade' if self.upgrade else ''}"


Status = int | frozenset[int]
Answer = Sent | Status


@dataclass(frozen=True)
class Exchange:
    """The answers a client gets for its bytes, in order, and whether the connection then closes."""

    answers: tuple[Answer, ...]
    closed: bool | None

    @property
    def forwarded(self) -> tuple[Sent, ...]:
        return tuple(a for a in self.answers if isinstance(a, Sent))

    @property
    def tunnel(self) -> bool:
        """The last answer is a 101: the connection is a tunnel from there on."""
        return bool(self.answers) and isinstance(self.answers[-1], Sent) and self.answers[-1].upgrade

    def __str__(self) -> str:
        shown = []
        for a in self.answers:
            if isinstance(a, Sent):
                shown.append(f"{a.status} for {a}")
            else:
                shown.append("|".join(map(str, sorted(a))) if isinstance(a, frozenset) else str(a))
        end = {True: "closed", False: "kept open", None: "open or closed"}[self.closed]
        return "; ".join(shown) + f"; {end}"


@dataclass(frozen=True)
class Case:
    id: str
    kind: str
    raw: bytes  # with {key} for the key
    expect: tuple[Exchange, ...]  # any one of them
    why: str = ""

    @property
    def requests(self) -> int:
        """How many requests the bytes hold at most: the most the upstream may ever see for them."""
        return max(len(e.forwarded) for e in self.expect)

    def payload(self, key: str) -> bytes:
        return self.raw.replace(KEY, key.encode())


def ok(*sent: Sent | Status, closed: bool | None = False) -> Exchange:
    """Forwarded and answered (a status among them: an answer the proxy makes itself, in order)."""
    return Exchange(tuple(sent), closed)


def refused(status: Status, *, after: tuple[Sent | Status, ...] = (), closed: bool | None = True) -> Exchange:
    """Refused with ``status`` (after the pipelined ``after``, answered first); by default then closed."""
    return Exchange((*after, status), closed)


def one_of(*statuses: int) -> frozenset[int]:
    return frozenset(statuses)


def request(method: str | bytes = "GET", target: str | bytes = T, *, version: bytes = b"HTTP/1.1",
            headers: bytes = b"", body: bytes = b"", host: bytes = HOST) -> bytes:
    """One request: the request line, Host, the key, ``headers`` (whole CRLF-ended lines), a blank line, ``body``."""
    m = method.encode() if isinstance(method, str) else method
    t = target.encode() if isinstance(target, str) else target
    return m + b" " + t + b" " + version + b"\r\n" + host + AUTH + headers + b"\r\n" + body


def cl(body: bytes) -> bytes:
    return b"Content-Length: %d\r\n" % len(body)


TE = b"Transfer-Encoding: chunked\r\n"


def chunks(*pieces: bytes) -> bytes:
    """``pieces`` as a chunked body, with the last chunk and no trailers."""
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def post(body: bytes, target: str = T) -> bytes:
    return request("POST", target, headers=cl(body), body=body)


def unauthenticated_get(target: str = "/api/smuggled") -> bytes:
    """A request with no key: a 401 if it is ever taken as a request of its own."""
    return f"GET {target} HTTP/1.1\r\nHost: gw.test\r\n\r\n".encode()


CASES: list[Case] = []


def case(kind: str, name: str, raw: bytes, *expect: Exchange, why: str = "") -> None:
    CASES.append(Case(f"{kind}-{name}", kind, raw, expect, why))


def get(target: str = T) -> Sent:
    return Sent("GET", target)


HELLO = Sent("POST", body=b"hello", framing=length(5))
CHUNKED_HELLO = Sent("POST", body=b"hello", framing=CHUNKED)
BAD = 400
WS_KEY = b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
WS = b"Connection: Upgrade\r\nUpgrade: websocket\r\n" + WS_KEY + b"Sec-WebSocket-Version: 13\r\n"


# --- valid requests -------------------------------------------------------------------------------------------

for method in ("GET", "HEAD", "OPTIONS", "DELETE"):
    case("valid", method.lower(), request(method), ok(Sent(method)))
    case("valid", f"{method.lower()}-close", request(method, headers=b"Connection: close\r\n"),
         ok(Sent(method), closed=True))
BODY = b'{"name": "build-42", "tags": ["a", "b"]}'
for method in ("POST", "PUT", "PATCH", "DELETE", "OPTIONS", "GET"):
    case("valid", f"{method.lower()}-length", request(method, headers=cl(BODY), body=BODY),
         ok(Sent(method, body=BODY, framing=length(len(BODY)))))
for method in ("POST", "PUT", "GET"):
    case("valid", f"{method.lower()}-length-zero", request(method, headers=b"Content-Length: 0\r\n"),
         ok(Sent(method, framing=length(0))))
case("valid", "post-no-framing", request("POST"), ok(Sent("POST")),
     why="A request with neither Content-Length nor Transfer-Encoding has no body (RFC 9112 section 6.3).")
case("valid", "post-close", request("POST", headers=b"Connection: close\r\n" + cl(b"hello"), body=b"hello"),
     ok(HELLO, closed=True))
case("valid", "get-query", request("GET", "/api/items?a=1&b=%20x&c"), ok(get("/api/items?a=1&b=%20x&c")))
case("valid", "get-escaped-path", request("GET", "/api/items%20x"), ok(get("/api/items%20x")))
BINARY = bytes(range(256)) + b"\r\n\r\n\x00\r\n"
case("valid", "post-binary-body", post(BINARY), ok(Sent("POST", body=BINARY, framing=length(len(BINARY)))))
INNER = b"GET /api/smuggled HTTP/1.1\r\nHost: gw.test\r\n\r\n"
case("valid", "post-body-holding-a-request", post(INNER), ok(Sent("POST", body=INNER, framing=length(len(INNER)))),
     why="A body is bytes: a request inside one is never a request of its own.")
BIG = bytes(range(256)) * 256
case("valid", "post-64KiB", post(BIG), ok(Sent("POST", body=BIG, framing=length(len(BIG)))))
LARGE = b"x" * 300_000
case("valid", "put-300KB", request("PUT", headers=cl(LARGE), body=LARGE),
     ok(Sent("PUT", body=LARGE, framing=length(len(LARGE)))))
case("valid", "http10-get", request("GET", version=b"HTTP/1.0", host=b""), ok(get(), closed=True),
     why="HTTP/1.0 without keep-alive: one request per connection (RFC 9112 section 9.3).")
case("valid", "http10-head", request("HEAD", version=b"HTTP/1.0", host=b""), ok(Sent("HEAD"), closed=True))
case("valid", "http10-post", request("POST", version=b"HTTP/1.0", headers=cl(b"hello"), body=b"hello"),
     ok(HELLO, closed=True))
case("valid", "http10-get-close", request("GET", version=b"HTTP/1.0", headers=b"Connection: close\r\n"),
     ok(get(), closed=True))
case("valid", "http10-get-keepalive", request("GET", version=b"HTTP/1.0", headers=b"Connection: keep-alive\r\n"),
     ok(get(), closed=None),
     why="A server may or may not keep an HTTP/1.0 keep-alive connection (RFC 9112 section C.2.2).")
case("valid", "http10-post-keepalive",
     request("POST", version=b"HTTP/1.0", headers=b"Connection: keep-alive\r\n" + cl(b"hello"), body=b"hello"),
     ok(HELLO, closed=None))
case("valid", "keepalive-explicit", request("GET", headers=b"Connection: keep-alive\r\n"), ok(get()))
case("valid", "close-mixed-case", request("GET", headers=b"Connection: Close\r\n"), ok(get(), closed=True),
     why="Connection options are case-insensitive.")
case("valid", "close-in-list", request("GET", headers=b"Connection: keep-alive, close\r\n"), ok(get(), closed=True))
case("valid", "repeated-header", request("GET", headers=b"X-Dup: a\r\nX-Dup: b\r\n"), ok(get()))
case("valid", "empty-value", request("GET", headers=b"X-Empty:\r\n"), ok(get()))
case("valid", "lowercase-names", b"GET /api/items HTTP/1.1\r\nhost: gw.test\r\nauthorization: Bearer {key}\r\n"
     b"content-length: 5\r\n\r\nhello", ok(Sent("GET", body=b"hello", framing=length(5))))
case("valid", "uppercase-names", request("POST", headers=b"CONTENT-LENGTH: 5\r\n", body=b"hello"), ok(HELLO))
case("valid", "tchar-name", request("GET", headers=b"!#$%&'*+-.^_`|~Xy9: v\r\n"), ok(get()),
     why="Every tchar is allowed in a field name (RFC 9110 section 5.6.2).")
case("valid", "underscore-transfer-encoding", request("POST", headers=b"Transfer_Encoding: chunked\r\n" + cl(b"hello"),
                                                      body=b"hello"), ok(HELLO),
     why="Transfer_Encoding is another field, not Transfer-Encoding: the body is framed by Content-Length.")
case("valid", "length-leading-zeros", request("POST", headers=b"Content-Length: 005\r\n", body=b"hello"), ok(HELLO),
     why="1*DIGIT: 005 is the length 5.")
case("valid", "length-ows", request("POST", headers=b"Content-Length:   5  \r\n", body=b"hello"), ok(HELLO))
case("valid", "length-tab", request("POST", headers=b"Content-Length:\t5\r\n", body=b"hello"), ok(HELLO))
case("valid", "value-8000-bytes", request("GET", headers=b"X-Long: " + b"v" * 8000 + b"\r\n"), ok(get()))
case("valid", "100-headers", request("GET", headers=b"".join(b"X-Filler-%d: %d\r\n" % (i, i) for i in range(100))),
     ok(get()))
case("valid", "target-8000-bytes", request("GET", "/api/" + "a" * 7995), ok(get("/api/" + "a" * 7995)))
case("valid", "upgrade-h2c-ignored",
     request("GET", headers=b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                            b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"),
     ok(get()), why="A server may ignore an Upgrade it does not take (RFC 9110 section 7.8): a plain request then.")


# --- pipelined: several requests in one write -------------------------------------------------------------------

case("pipelined", "2-gets", request("GET", "/api/a") + request("GET", "/api/b"), ok(get("/api/a"), get("/api/b")))
case("pipelined", "3-gets", b"".join(request("GET", f"/api/{i}") for i in range(3)),
     ok(*(get(f"/api/{i}") for i in range(3))))
case("pipelined", "5-gets", b"".join(request("GET", f"/api/{i}") for i in range(5)),
     ok(*(get(f"/api/{i}") for i in range(5))))
case("pipelined", "get-post-get", request("GET", "/api/a") + post(b"hello", "/api/b") + request("GET", "/api/c"),
     ok(get("/api/a"), Sent("POST", "/api/b", b"hello", length(5)), get("/api/c")))
case("pipelined", "post-post", post(b"abc", "/api/a") + post(b"defg", "/api/b"),
     ok(Sent("POST", "/api/a", b"abc", length(3)), Sent("POST", "/api/b", b"defg", length(4))))
case("pipelined", "chunked-then-get",
     request("POST", "/api/a", headers=TE, body=chunks(b"hello")) + request("GET", "/api/b"),
     ok(Sent("POST", "/api/a", b"hello", CHUNKED), get("/api/b")))
case("pipelined", "get-then-chunked",
     request("GET", "/api/a") + request("PUT", "/api/b", headers=TE, body=chunks(b"x", b"yz")),
     ok(get("/api/a"), Sent("PUT", "/api/b", b"xyz", CHUNKED)))
case("pipelined", "head-then-get", request("HEAD", "/api/a") + request("GET", "/api/b"),
     ok(Sent("HEAD", "/api/a"), get("/api/b")))
case("pipelined", "delete-options-put", request("DELETE", "/api/a") + request("OPTIONS", "/api/b")
     + request("PUT", "/api/c", headers=cl(b"1"), body=b"1"),
     ok(Sent("DELETE", "/api/a"), Sent("OPTIONS", "/api/b"), Sent("PUT", "/api/c", b"1", length(1))))
case("pipelined", "mixed-5", request("GET", "/api/1") + post(b"hello", "/api/2")
     + request("POST", "/api/3", headers=TE, body=chunks(b"a" * 20, b"b")) + request("HEAD", "/api/4")
     + request("DELETE", "/api/5"),
     ok(get("/api/1"), Sent("POST", "/api/2", b"hello", length(5)), Sent("POST", "/api/3", b"a" * 20 + b"b", CHUNKED),
        Sent("HEAD", "/api/4"), Sent("DELETE", "/api/5")))
case("pipelined", "post-zero-then-get",
     request("POST", "/api/a", headers=b"Content-Length: 0\r\n") + request("GET", "/api/b"),
     ok(Sent("POST", "/api/a", framing=length(0)), get("/api/b")))
case("pipelined", "close-then-get",
     request("GET", "/api/a", headers=b"Connection: close\r\n") + request("GET", "/api/b"),
     ok(get("/api/a"), closed=True),
     why="Nothing after a request with Connection: close is read (RFC 9112 section 9.6).")
case("pipelined", "http10-then-get", request("GET", "/api/a", version=b"HTTP/1.0") + request("GET", "/api/b"),
     ok(get("/api/a"), closed=True))
case("pipelined", "get-then-nul", request("GET", "/api/a") + b"G\x00T /api/b HTTP/1.1\r\n\r\n",
     refused(BAD, after=(get("/api/a"),)))
case("pipelined", "get-then-unauthenticated", request("GET", "/api/a") + unauthenticated_get(),
     ok(get("/api/a"), 401), why="The second request is judged on its own: no key, 401, nothing forwarded.")
case("pipelined", "get-then-long-target", request("GET", "/api/a") + request("GET", "/api/" + "b" * 9000),
     refused(414, after=(get("/api/a"),)))
case("pipelined", "get-then-http2", request("GET", "/api/a") + request("GET", "/api/b", version=b"HTTP/2.0"),
     refused(505, after=(get("/api/a"),)))
case("pipelined", "get-then-absolute-form", request("GET", "/api/a") + request("GET", "http://evil.example/api/b"),
     refused(BAD, after=(get("/api/a"),)))
case("pipelined", "get-then-cl-te", request("GET", "/api/a")
     + request("POST", "/api/b", headers=b"Content-Length: 5\r\n" + TE, body=chunks(b"hello")),
     refused(BAD, after=(get("/api/a"),)))
case("pipelined", "expect-then-get", request("POST", "/api/a", headers=b"Expect: 100-continue\r\n" + cl(b"hello"),
                                             body=b"hello") + request("GET", "/api/b"),
     ok(Sent("POST", "/api/a", b"hello", length(5)), get("/api/b")))
case("pipelined", "empty-line-between", request("GET", "/api/a") + b"\r\n" + request("GET", "/api/b"),
     ok(get("/api/a"), get("/api/b")), refused(BAD, after=(get("/api/a"),)),
     why="A server SHOULD ignore at least one empty line before a request line (RFC 9112 section 2.2); "
         "refusing it is strict but safe.")


# --- chunked bodies -----------------------------------------------------------------------------------------------


def chunked(body: bytes, *, method: str = "POST", headers: bytes = b"") -> bytes:
    return request(method, headers=TE + headers, body=body)


def fwd_chunked(data: bytes, method: str = "POST") -> Exchange:
    return ok(Sent(method, body=data, framing=CHUNKED))


case("chunked", "one-chunk", chunked(chunks(b"hello")), fwd_chunked(b"hello"))
case("chunked", "two-chunks", chunked(chunks(b"hello", b" world")), fwd_chunked(b"hello world"))
case("chunked", "empty", chunked(b"0\r\n\r\n"), fwd_chunked(b""),
     why="A chunked body may be empty: still chunked upstream, with no data.")
case("chunked", "extension", chunked(b"5;foo=bar\r\nhello\r\n0\r\n\r\n"), fwd_chunked(b"hello"))
case("chunked", "extension-quoted", chunked(b'5;foo="a b;c"\r\nhello\r\n0\r\n\r\n'), fwd_chunked(b"hello"))
case("chunked", "extension-name-only", chunked(b"5;foo\r\nhello\r\n0\r\n\r\n"), fwd_chunked(b"hello"))
case("chunked", "extensions-many", chunked(b"5;a=1;b=2;c\r\nhello\r\n6;d=\"x\"\r\n world\r\n0\r\n\r\n"),
     fwd_chunked(b"hello world"))
case("chunked", "extension-on-last-chunk", chunked(b"5\r\nhello\r\n0;end=1\r\n\r\n"), fwd_chunked(b"hello"))
case("chunked", "trailer", chunked(b"5\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n"), fwd_chunked(b"hello"),
     why="A proxy that removes the chunked coding may drop trailers (RFC 9112 section 7.1.2); the body must arrive.")
case("chunked", "trailers-many", chunked(b"5\r\nhello\r\n0\r\nX-A: 1\r\nX-B: 2\r\nX-C: 3\r\n\r\n"),
     fwd_chunked(b"hello"))
case("chunked", "trailer-content-length", chunked(b"5\r\nhello\r\n0\r\nContent-Length: 100\r\n\r\n"),
     fwd_chunked(b"hello"), refused(BAD),
     why="A Content-Length in the trailer section frames nothing: ignored, or refused as suspect (llhttp does).")
TINY = bytes(range(97, 123)) * 4  # 104 one-byte chunks
case("chunked", "104-one-byte-chunks", chunked(b"".join(b"1\r\n%c\r\n" % c for c in TINY) + b"0\r\n\r\n"),
     fwd_chunked(TINY))
case("chunked", "hex-upper", chunked(b"A\r\n0123456789\r\n1F\r\n" + b"y" * 31 + b"\r\n0\r\n\r\n"),
     fwd_chunked(b"0123456789" + b"y" * 31))
case("chunked", "hex-lower", chunked(b"a\r\n0123456789\r\n1f\r\n" + b"y" * 31 + b"\r\n0\r\n\r\n"),
     fwd_chunked(b"0123456789" + b"y" * 31))
case("chunked", "leading-zeros", chunked(b"0005\r\nhello\r\n000\r\n\r\n"), fwd_chunked(b"hello"))
case("chunked", "64KiB-chunk", chunked(chunks(BIG)), fwd_chunked(BIG))
case("chunked", "data-holding-chunk-syntax", chunked(chunks(b"5\r\nhello\r\n0\r\n\r\n")),
     fwd_chunked(b"5\r\nhello\r\n0\r\n\r\n"))
case("chunked", "in-a-get", chunked(chunks(b"hello"), method="GET"), fwd_chunked(b"hello", "GET"))
case("chunked", "in-a-patch", chunked(chunks(b"hello"), method="PATCH"), fwd_chunked(b"hello", "PATCH"))
case("chunked", "then-unauthenticated", chunked(chunks(b"hello")) + unauthenticated_get(), ok(CHUNKED_HELLO, 401),
     why="What follows the last chunk is the next request, judged on its own.")
case("chunked", "size-overflow", chunked(b"FFFFFFFFFFFFFFFFFF\r\nhello\r\n0\r\n\r\n"), refused(BAD))
case("chunked", "size-trailing-space", chunked(b"5 \r\nhello\r\n0\r\n\r\n"), refused(BAD),
     why="chunk-size [ chunk-ext ] CRLF: whitespace may only precede a ';' (RFC 9112 section 7.1).")
case("chunked", "size-negative", chunked(b"-5\r\nhello\r\n0\r\n\r\n"), refused(BAD))
case("chunked", "size-0x", chunked(b"0x5\r\nhello\r\n0\r\n\r\n"), refused(BAD))
case("chunked", "size-plus", chunked(b"+5\r\nhello\r\n0\r\n\r\n"), refused(BAD))
case("chunked", "size-missing", chunked(b"\r\nhello\r\n0\r\n\r\n"), refused(BAD))
case("chunked", "size-not-hex", chunked(b"5g\r\nhello\r\n0\r\n\r\n"), refused(BAD))
case("chunked", "data-longer-than-size", chunked(b"5\r\nhelloXX\r\n0\r\n\r\n"), refused(BAD))
case("chunked", "data-shorter-than-size", chunked(b"5\r\nhell\r\n0\r\n\r\n"), refused(BAD))
case("chunked", "no-crlf-after-data", chunked(b"5\r\nhello0\r\n\r\n"), refused(BAD))
case("chunked", "lf-after-size", chunked(b"5\nhello\r\n0\r\n\r\n"), refused(BAD))
case("chunked", "lf-after-data", chunked(b"5\r\nhello\n0\r\n\r\n"), refused(BAD))
case("chunked", "lf-ending-last-chunk", chunked(b"5\r\nhello\r\n0\n\n"), refused(BAD))
case("chunked", "lf-in-extension", chunked(b'5;ext="a\nb"\r\nhello\r\n0\r\n\r\n'), refused(BAD))
case("chunked", "cr-in-extension", chunked(b"5;a=\rb\r\nhello\r\n0\r\n\r\n"), refused(BAD))
case("chunked", "nul-in-extension", chunked(b"5;a=\x00\r\nhello\r\n0\r\n\r\n"), refused(BAD))
case("chunked", "trailer-bad-name", chunked(b"5\r\nhello\r\n0\r\nBad Name: x\r\n\r\n"), refused(BAD))
case("chunked", "trailer-obs-fold", chunked(b"5\r\nhello\r\n0\r\nX-A: 1\r\n 2\r\n\r\n"), refused(BAD))


# --- odd spacing ----------------------------------------------------------------------------------------------

LINE_WHY = "The request line is method SP target SP version, single spaces (RFC 9112 section 3); strict: 400."
SPACES_WHY = ("Runs of spaces in the request line: a recipient MAY split it on whitespace (RFC 9112 section 3). "
              "The proxy sends a request line of its own, so accepting them cannot reach the upstream; both are fine.")
case("spacing", "double-space-after-method", b"GET  /api/items HTTP/1.1\r\n" + HOST + AUTH + b"\r\n",
     refused(BAD), ok(get()), why=SPACES_WHY)
case("spacing", "double-space-before-version", b"GET /api/items  HTTP/1.1\r\n" + HOST + AUTH + b"\r\n",
     refused(one_of(400, 505)), ok(get()), why=SPACES_WHY)
case("spacing", "tab-after-method", b"GET\t/api/items HTTP/1.1\r\n" + HOST + AUTH + b"\r\n", refused(BAD), why=LINE_WHY)
case("spacing", "tab-before-version", b"GET /api/items\tHTTP/1.1\r\n" + HOST + AUTH + b"\r\n", refused(BAD),
     why=LINE_WHY)
case("spacing", "space-after-version", b"GET /api/items HTTP/1.1 \r\n" + HOST + AUTH + b"\r\n",
     refused(one_of(400, 505)), why=LINE_WHY)
case("spacing", "space-before-method", b" GET /api/items HTTP/1.1\r\n" + HOST + AUTH + b"\r\n", refused(BAD),
     why=LINE_WHY)
case("spacing", "space-inside-target", b"GET /api/it ems HTTP/1.1\r\n" + HOST + AUTH + b"\r\n",
     refused(one_of(400, 505)), why=LINE_WHY)
case("spacing", "space-inside-version", b"GET /api/items HTTP/ 1.1\r\n" + HOST + AUTH + b"\r\n",
     refused(one_of(400, 505)))
case("spacing", "empty-line-first", b"\r\n" + request("GET"), ok(get()), refused(BAD),
     why="A server SHOULD ignore at least one empty line before the request line (RFC 9112 section 2.2).")
case("spacing", "value-trailing-whitespace", request("GET", headers=b"X-A: v \t \r\n"), ok(get()))
case("spacing", "value-leading-tabs", request("GET", headers=b"X-A:\t\tv\r\n"), ok(get()))
case("spacing", "value-inner-tab", request("GET", headers=b"X-A: a\tb\r\n"), ok(get()))
case("spacing", "no-space-after-colon", request("POST", headers=b"Content-Length:5\r\n", body=b"hello"), ok(HELLO))
COLON_WHY = "Whitespace between a field name and the colon: a server MUST answer 400 (RFC 9112 section 5.1)."
case("spacing", "space-before-colon-length", request("POST", headers=b"Content-Length : 5\r\n", body=b"hello"),
     refused(BAD), why=COLON_WHY)
case("spacing", "tab-before-colon-length", request("POST", headers=b"Content-Length\t: 5\r\n", body=b"hello"),
     refused(BAD), why=COLON_WHY)
case("spacing", "space-before-colon-other", request("GET", headers=b"X-A : v\r\n"), refused(BAD), why=COLON_WHY)
case("spacing", "space-before-colon-host", b"GET /api/items HTTP/1.1\r\nHost : gw.test\r\n" + AUTH + b"\r\n",
     refused(BAD), why=COLON_WHY)
case("spacing", "whitespace-before-first-header", b"GET /api/items HTTP/1.1\r\n X-A: v\r\n" + HOST + AUTH + b"\r\n",
     refused(BAD), why="Whitespace between the start line and the first field: reject, or drop those lines "
                       "(RFC 9112 section 2.2); strict: 400.")


# --- bare LF, bare CR, obs-fold -------------------------------------------------------------------------------

LF_WHY = "Bare LF as a line end: RFC 9112 section 2.2 lets a recipient accept it; a strict proxy refuses (400)."
case("lf", "everywhere", b"GET /api/items HTTP/1.1\nHost: gw.test\nAuthorization: Bearer {key}\n\n", refused(BAD),
     why=LF_WHY)
case("lf", "everywhere-with-body", b"POST /api/items HTTP/1.1\nHost: gw.test\nAuthorization: Bearer {key}\n"
     b"Content-Length: 5\n\nhello", refused(BAD), why=LF_WHY)
case("lf", "request-line", b"GET /api/items HTTP/1.1\n" + HOST + AUTH + b"\r\n", refused(BAD), why=LF_WHY)
case("lf", "one-header", request("GET", headers=b"X-A: v\nX-B: w\r\n"), refused(BAD), why=LF_WHY)
case("lf", "end-of-head", request("GET", headers=b"X-A: v\r\n")[:-2] + b"\n", refused(BAD), why=LF_WHY)
case("lf", "head-ends-lf-lf", b"GET /api/items HTTP/1.1\r\n" + HOST + AUTH[:-2] + b"\n\n", refused(BAD), why=LF_WHY)
case("lf", "hiding-transfer-encoding", request("POST", headers=b"X-A: v\nTransfer-Encoding: chunked\r\n" + cl(b"hello"),
                                               body=b"hello"), refused(BAD), why=LF_WHY)
case("lf", "hiding-content-length", request("POST", headers=b"X-A: v\nContent-Length: 5\r\n", body=b"hello"),
     refused(BAD), why=LF_WHY)
CR_WHY = "A bare CR is invalid (RFC 9112 section 2.2): reject it, or replace it with SP; strict: 400."
case("cr", "everywhere", b"GET /api/items HTTP/1.1\rHost: gw.test\rAuthorization: Bearer {key}\r\r", refused(BAD),
     why=CR_WHY)
case("cr", "in-value", request("GET", headers=b"X-A: a\rb\r\n"), refused(BAD), why=CR_WHY)
case("cr", "in-request-line", b"GET /api/items\rHTTP/1.1\r\n" + HOST + AUTH + b"\r\n", refused(BAD), why=CR_WHY)
case("cr", "cr-cr-lf", request("GET", headers=b"X-A: v\r\r\n"), refused(BAD), why=CR_WHY)
case("cr", "in-name", request("GET", headers=b"X\r-A: v\r\n"), refused(BAD), why=CR_WHY)
case("cr", "hiding-transfer-encoding", request("POST", headers=b"X-A: v\rTransfer-Encoding: chunked\r\n" + cl(b"hello"),
                                               body=b"hello"), refused(BAD), why=CR_WHY)
FOLD_WHY = "obs-fold: reject with 400 or unfold (RFC 9112 section 5.2); strict: 400."
case("fold", "space", request("GET", headers=b"X-A: a\r\n b\r\n"), refused(BAD), why=FOLD_WHY)
case("fold", "tab", request("GET", headers=b"X-A: a\r\n\tb\r\n"), refused(BAD), why=FOLD_WHY)
case("fold", "transfer-encoding", request("POST", headers=b"Transfer-Encoding:\r\n chunked\r\n" + cl(b"hello"),
                                          body=b"hello"), refused(BAD), why=FOLD_WHY)
case("fold", "content-length", request("POST", headers=b"Content-Length:\r\n 5\r\n", body=b"hello"), refused(BAD),
     why=FOLD_WHY)
case("fold", "authorization", b"GET /api/items HTTP/1.1\r\n" + HOST + b"Authorization: Bearer\r\n {key}\r\n\r\n",
     refused(BAD), why=FOLD_WHY)
case("fold", "empty-continuation", request("GET", headers=b"X-A: a\r\n \r\n"), refused(BAD), why=FOLD_WHY)


# --- Content-Length ---------------------------------------------------------------------------------------------

CL_WHY = "An invalid Content-Length makes the framing invalid: 400 and close (RFC 9112 section 6.3)."
DUP_WHY = ("Repeated Content-Length (even of one value): a recipient MAY reject or collapse it (RFC 9110 section 8.6); "
           "strict: 400.")
case("length", "repeated-same", request("POST", headers=b"Content-Length: 5\r\nContent-Length: 5\r\n", body=b"hello"),
     refused(BAD), why=DUP_WHY)
case("length", "repeated-conflicting",
     request("POST", headers=b"Content-Length: 5\r\nContent-Length: 30\r\n",
             body=b"hello GET /api/smuggled HTTP/1.1\r\n\r\n"),
     refused(BAD), why=CL_WHY)
case("length", "list-same", request("POST", headers=b"Content-Length: 5, 5\r\n", body=b"hello"), refused(BAD),
     why=DUP_WHY)
case("length", "list-conflicting", request("POST", headers=b"Content-Length: 5, 6\r\n", body=b"hello!"),
     refused(BAD), why=CL_WHY)
case("length", "repeated-zero", request("GET", headers=b"Content-Length: 0\r\nContent-Length: 0\r\n"), refused(BAD),
     why=DUP_WHY)
case("length", "trailing-comma", request("POST", headers=b"Content-Length: 5,\r\n", body=b"hello"), refused(BAD),
     why=CL_WHY)
for name, value in [("negative", b"-5"), ("hex", b"0x5"), ("plus", b"+5"), ("decimal-point", b"5.0"), ("empty", b""),
                    ("letters", b"abc"), ("space-inside", b"5 5"), ("exponent", b"5e0"), ("nul", b"5\x00")]:
    case("length", name, request("POST", headers=b"Content-Length: " + value + b"\r\n", body=b"hello"), refused(BAD),
         why=CL_WHY)
case("length", "overflow", request("POST", headers=b"Content-Length: 99999999999999999999999\r\n", body=b"hello"),
     refused(one_of(400, 413)), why="Too large to represent: invalid (400) or too large (413), never forwarded.")
MAX_U64 = b"Content-Length: 18446744073709551615\r\n"
case("length", "max-u64", request("POST", headers=MAX_U64, body=b"hello"), refused(one_of(400, 413)),
     why="2**64 - 1 is llhttp's 'no length' mark: read as 'no body', the request would go upstream without its body.")
case("length", "max-u64-holding-a-request", request("POST", headers=MAX_U64, body=request("GET", "/api/smuggled")),
     refused(one_of(400, 413)), why="Framing must stay identical: never forwarded as a request without a body.")
case("length", "2-to-the-64", request("POST", headers=b"Content-Length: 18446744073709551616\r\n", body=b"hello"),
     refused(one_of(400, 413)))
case("length", "over-max-body-size", request("POST", headers=b"Content-Length: 200000000\r\n", body=INNER),
     refused(413), why="Over proxy.max_body_size (100 MiB): 413 before anything is forwarded, and the unread "
                       "body must not be read as the next request.")


# --- Content-Length with Transfer-Encoding ----------------------------------------------------------------------

CLTE_WHY = ("Transfer-Encoding with Content-Length: a server MAY reject it, or read it as chunked and then close; a "
            "proxy must never forward the pair (RFC 9112 sections 6.1 and 6.3); strict: 400.")
case("cl-te", "cl-then-te", request("POST", headers=b"Content-Length: 5\r\n" + TE, body=chunks(b"hello")),
     refused(BAD), why=CLTE_WHY)
case("cl-te", "te-then-cl", request("POST", headers=TE + b"Content-Length: 5\r\n", body=chunks(b"hello")),
     refused(BAD), why=CLTE_WHY)
case("cl-te", "cl-zero", request("POST", headers=b"Content-Length: 0\r\n" + TE, body=chunks(b"hello")), refused(BAD),
     why=CLTE_WHY)
case("cl-te", "http10",
     request("POST", version=b"HTTP/1.0", headers=b"Content-Length: 5\r\n" + TE, body=chunks(b"hello")),
     refused(BAD), why=CLTE_WHY)
case("cl-te", "te-identity",
     request("POST", headers=b"Content-Length: 5\r\nTransfer-Encoding: identity\r\n", body=b"hello"),
     refused(BAD), why=CLTE_WHY)
case("cl-te", "te-and-smuggled-tail", request("POST", headers=b"Content-Length: 4\r\n" + TE,
                                              body=b"0\r\n\r\n" + INNER), refused(BAD), why=CLTE_WHY)


# --- Transfer-Encoding values ----------------------------------------------------------------------------------

NOT_FINAL = "chunked is not the final coding: 400 and close, a MUST (RFC 9112 section 6.3 item 4)."
UNKNOWN = "A transfer coding the proxy does not implement: 501 (RFC 9112 section 6.1) or 400, never forwarded."
for name, value, status, why in [
    ("chunked-identity", b"chunked, identity", BAD, NOT_FINAL),
    ("identity", b"identity", BAD, NOT_FINAL),
    ("gzip-chunked", b"gzip, chunked", one_of(400, 501), UNKNOWN),
    ("identity-chunked", b"identity, chunked", one_of(400, 501), UNKNOWN),
    ("chunked-with-parameter", b"chunked;q=1", one_of(400, 501), UNKNOWN),
    ("xchunked", b"xchunked", BAD, NOT_FINAL),
    ("chunk", b"chunk", BAD, NOT_FINAL),
    ("chunked-chunked", b"chunked, chunked", BAD, "chunked applied twice (RFC 9112 section 6.1): invalid framing."),
    ("quoted", b'"chunked"', BAD, NOT_FINAL),
    ("empty", b"", BAD, NOT_FINAL),
    ("vertical-tab", b"\x0bchunked", BAD, "VT is no whitespace in a field value: invalid."),
]:
    case("te", name, request("POST", headers=b"Transfer-Encoding: " + value + b"\r\n", body=chunks(b"hello")),
         refused(status), why=why)
case("te", "twice", request("POST", headers=TE + TE, body=chunks(b"hello")), refused(BAD),
     why="Two lines are the list 'chunked, chunked': chunked applied twice, invalid framing.")
case("te", "chunked-then-other", request("POST", headers=TE + b"Transfer-Encoding: x\r\n", body=chunks(b"hello")),
     refused(BAD), why=NOT_FINAL)
case("te", "http10", request("POST", version=b"HTTP/1.0", headers=TE, body=chunks(b"hello")), refused(BAD),
     why="Transfer-Encoding in an HTTP/1.0 request: the framing is faulty (RFC 9112 section 6.1).")
for name, value in [("leading-space", b"  chunked"), ("trailing-space", b"chunked  "), ("leading-tab", b"\tchunked"),
                    ("uppercase", b"CHUNKED"), ("capitalised", b"Chunked")]:
    case("te", name, request("POST", headers=b"Transfer-Encoding: " + value + b"\r\n", body=chunks(b"hello")),
         ok(CHUNKED_HELLO), why="Whitespace around a field value is not part of it; coding names are case-insensitive.")
for name, value in [("empty-element-after", b"chunked,"), ("empty-element-before", b", chunked")]:
    case("te", name, request("POST", headers=b"Transfer-Encoding: " + value + b"\r\n", body=chunks(b"hello")),
         ok(CHUNKED_HELLO), refused(BAD),
         why="Empty list elements are ignored (RFC 9110 section 5.6.1); refusing them is strict but safe.")


# --- NUL, control and high bytes ------------------------------------------------------------------------------

CTL_WHY = "NUL, CR, LF and other controls are invalid in a field value (RFC 9110 section 5.5); strict: 400."
case("bytes", "nul-in-method", request(b"G\x00ET"), refused(BAD))
case("bytes", "nul-in-target", request("GET", b"/api/it\x00ems"), refused(BAD))
case("bytes", "nul-in-name", request("GET", headers=b"X-A\x00: v\r\n"), refused(BAD))
case("bytes", "nul-in-value", request("GET", headers=b"X-A: v\x00w\r\n"), refused(BAD), why=CTL_WHY)
case("bytes", "nul-ending-value", request("GET", headers=b"X-A: v\x00\r\n"), refused(BAD), why=CTL_WHY)
case("bytes", "nul-in-version", request("GET", version=b"HTTP/1.1\x00"), refused(one_of(400, 505)))
case("bytes", "nul-in-key", b"GET /api/items HTTP/1.1\r\n" + HOST + b"Authorization: Bearer {key}\x00\r\n\r\n",
     refused(BAD), why=CTL_WHY)
case("bytes", "high-in-method", request(b"G\xc9T"), refused(BAD))
case("bytes", "high-in-target", request("GET", b"/api/caf\xc3\xa9"), refused(BAD),
     why="A request target is ASCII (RFC 9112 section 3.2, RFC 3986): an invalid request line, 400.")
case("bytes", "high-in-query", request("GET", b"/api/items?q=\xff"), refused(BAD))
case("bytes", "high-in-name", request("GET", headers=b"X-Caf\xe9: v\r\n"), refused(BAD))
case("bytes", "high-in-value", request("GET", headers=b"X-Name: caf\xe9\r\n"), ok(get()),
     why="obs-text (0x80-0xFF) is allowed in a field value (RFC 9110 section 5.5).")
case("bytes", "utf8-in-value", request("GET", headers=b"X-Name: \xe2\x98\x83 snow\r\n"), ok(get()))
for name, byte in [("del", b"\x7f"), ("soh", b"\x01"), ("vt", b"\x0b"), ("ff", b"\x0c"), ("esc", b"\x1b")]:
    case("bytes", f"{name}-in-value", request("GET", headers=b"X-A: a" + byte + b"b\r\n"), refused(BAD), why=CTL_WHY)
case("bytes", "esc-in-target", request("GET", b"/api/it\x1bems"), refused(BAD))
case("bytes", "del-in-target", request("GET", b"/api/it\x7fems"), refused(BAD))


# --- request-target forms ---------------------------------------------------------------------------------------

FORM_WHY = "Keygate serves one API by path: absolute-form, authority-form, '*' and CONNECT get 400 (DESIGN.md)."
for name, raw in [
    ("absolute-http", request("GET", "http://evil.example/api/items", host=b"Host: evil.example\r\n")),
    ("absolute-https", request("GET", "https://evil.example/api/items")),
    ("absolute-own-host", request("GET", "http://gw.test/api/items")),
    ("absolute-userinfo", request("GET", "http://user@evil.example/api/items")),
    ("authority-form", request("GET", "evil.example:443")),
    ("asterisk-options", request("OPTIONS", "*")),
    ("asterisk-get", request("GET", "*")),
    ("connect-authority", request("CONNECT", "evil.example:443", host=b"Host: evil.example:443\r\n")),
    ("connect-origin-form", request("CONNECT", "/api/items", headers=b"Content-Length: 69\r\n")),
    ("connect-tunnel-bytes", request("CONNECT", "evil.example:443") + b"\x16\x03\x01\x00\x05hello"),
    ("relative-path", request("GET", "api/items")),
    ("query-only", request("GET", "?a=1")),
]:
    case("target", name, raw, refused(BAD), why=FORM_WHY)
case("target", "empty", b"GET  HTTP/1.1\r\n" + HOST + AUTH + b"\r\n", refused(one_of(400, 505)))
case("target", "fragment", request("GET", "/api/items#frag"), refused(BAD, closed=None),
     why="'#' is not allowed in a request target (RFC 9112 section 3.2); Keygate answers from the pipeline.")
case("target", "backslash", request("GET", "/api\\items"), refused(BAD, closed=None),
     why="'\\' is not allowed in a request target; Keygate refuses it in the pipeline (encoded_slashes = reject).")


# --- methods --------------------------------------------------------------------------------------------------

UNKNOWN_METHOD = ("A well-formed method the proxy does not know: forward it, or 501 (RFC 9110 section 9.1); "
                  "never 400, it is valid HTTP.")
for name, method in [("unknown", "FOO"), ("lowercase-get", "get"), ("mixed-case", "Get"), ("token-chars", "X-M.1!~"),
                     ("long-unknown", "VERYLONGEXTENSIONMETHODNAMEFORCORPUSTEST")]:
    case("method", name, request(method), ok(Sent(method)), refused(501, closed=None), why=UNKNOWN_METHOD)
case("method", "unknown-with-body", request("FOO", headers=cl(b"hello"), body=b"hello"),
     ok(Sent("FOO", body=b"hello", framing=length(5))), refused(501), why=UNKNOWN_METHOD)
for name, method in [("paren", b"GE(T"), ("slash", b"GE/T"), ("at", b"G@T"), ("colon", b"GET:"),
                     ("brackets", b"[GET]")]:
    case("method", name, request(method), refused(BAD), why="A method is a token (RFC 9110 section 9.1).")
for method in ("PURGE", "SEARCH", "MKCOL", "TRACE", "M-SEARCH"):
    case("method", method.lower(), request(method), ok(Sent(method)))
for method in ("PROPFIND", "REPORT", "QUERY"):
    case("method", f"{method.lower()}-with-body", request(method, headers=cl(b"<q/>"), body=b"<q/>"),
         ok(Sent(method, body=b"<q/>", framing=length(4))))
case("method", "patch-chunked", chunked(chunks(b"hello"), method="PATCH"), fwd_chunked(b"hello", "PATCH"))


# --- versions -------------------------------------------------------------------------------------------------

VERSION_WHY = "Keygate serves HTTP/1.0 and 1.1 only: 505 (DESIGN.md); a malformed version may be 400."
for name, version, status in [
    ("http-0.9", b"HTTP/0.9", 505), ("http-1.2", b"HTTP/1.2", 505), ("http-2.0", b"HTTP/2.0", 505),
    ("http-3.0", b"HTTP/3.0", 505), ("http-9.9", b"HTTP/9.9", 505),
    ("lowercase", b"http/1.1", one_of(400, 505)), ("no-minor", b"HTTP/1", one_of(400, 505)),
    ("two-digit-minor", b"HTTP/1.10", one_of(400, 505)), ("leading-zero-major", b"HTTP/01.1", one_of(400, 505)),
    ("trailing-junk", b"HTTP/1.1x", one_of(400, 505)), ("http-2", b"HTTP/2", one_of(400, 505)),
    ("not-http", b"HTTX/1.1", one_of(400, 505)),
]:
    case("version", name, request("GET", version=version), refused(status), why=VERSION_WHY)
case("version", "missing", b"GET /api/items\r\n" + HOST + AUTH + b"\r\n", refused(one_of(400, 505)), why=VERSION_WHY)
# The listener reads the version off the request line when a head begins a read (Connection._version_read):
# an HTTP/0.9 line whose target looks like a version is still 0.9, and a request after another in the same
# read has its own version (an HTTP/1.0 one may omit Host; read as 1.1 it would be 400).
case("version", "http-0.9-target-ending-in-a-version", b"GET /api/HTTP/1.1\r\n\r\n", refused(505), why=VERSION_WHY)
case("pipelined", "get-then-http10-without-host", request("GET", "/api/a")
     + b"GET /api/b HTTP/1.0\r\n" + AUTH + b"\r\n", ok(get("/api/a"), get("/api/b"), closed=True))


# --- sizes ------------------------------------------------------------------------------------------------------

case("huge", "target-9000", request("GET", "/api/" + "a" * 9000), refused(414))
case("huge", "target-64KiB", request("GET", "/api/" + "a" * 65536), refused(414))
case("huge", "query-9000", request("GET", "/api/items?q=" + "a" * 9000), refused(414))
case("huge", "header-line-9000", request("GET", headers=b"X-Long: " + b"v" * 9000 + b"\r\n"), refused(431))
case("huge", "header-name-9000", request("GET", headers=b"X" * 9000 + b": v\r\n"), refused(431))
case("huge", "200-headers", request("GET", headers=b"".join(b"X-F-%d: v\r\n" % i for i in range(200))), refused(431))
case("huge", "head-70KB", request("GET", headers=b"".join(b"X-F-%d: %s\r\n" % (i, b"v" * 1000) for i in range(70))),
     refused(431), why="Over proxy.max_header_size (64 KiB).")
case("huge", "method-9000", request("G" * 9000), refused(one_of(400, 414, 431, 501)),
     why="An unknown method longer than any line limit: refused, whichever limit or rule says so.")


# --- header field names ---------------------------------------------------------------------------------------

NAME_WHY = "A field name is a token (RFC 9110 section 5.1): anything else is an invalid field line, 400."
for name, line in [
    ("space", b"X Y: v"), ("at", b"X@Y: v"), ("parens", b"X(Y): v"), ("quote", b'X"Y: v'), ("slash", b"X/Y: v"),
    ("brackets", b"X[Y]: v"), ("equals", b"X=Y: v"), ("braces", b"X{Y}: v"), ("comma", b"X,Y: v"),
    ("semicolon", b"X;Y: v"), ("question-mark", b"X?Y: v"), ("backslash", b"X\\Y: v"), ("empty", b": v"),
    ("no-colon", b"X-No-Colon"), ("colon-only", b":"), ("del", b"X\x7fY: v"), ("tab-inside", b"X\tY: v"),
]:
    case("name", name, request("GET", headers=line + b"\r\n"), refused(BAD), why=NAME_WHY)


# --- Host -----------------------------------------------------------------------------------------------------

HOST_WHY = ("An HTTP/1.1 request without Host, with more than one, or with an invalid one: a server MUST answer 400 "
            "(RFC 9112 section 3.2).")
case("host", "missing", request("GET", host=b""), refused(BAD), why=HOST_WHY)
case("host", "repeated-same", request("GET", host=HOST + HOST), refused(BAD), why=HOST_WHY)
case("host", "repeated-different", request("GET", host=HOST + b"Host: evil.example\r\n"), refused(BAD), why=HOST_WHY)
case("host", "list", request("GET", host=b"Host: gw.test, evil.example\r\n"), refused(BAD), why=HOST_WHY)
case("host", "space-inside", request("GET", host=b"Host: gw test\r\n"), refused(BAD), why=HOST_WHY)
case("host", "userinfo", request("GET", host=b"Host: user@gw.test\r\n"), refused(BAD), why=HOST_WHY)
case("host", "empty", request("GET", host=b"Host:\r\n"), ok(get()),
     why="An empty Host is valid when the target has no authority (RFC 9112 section 3.2).")
case("host", "with-port", request("GET", host=b"Host: gw.test:8443\r\n"), ok(get()))
case("host", "ipv6", request("GET", host=b"Host: [::1]:8080\r\n"), ok(get()))
case("host", "missing-http10", request("GET", version=b"HTTP/1.0", host=b""), ok(get(), closed=True))
HOST_10_WHY = ("HTTP/1.0 may omit Host, but more than one, or an invalid one, is 400 in any version "
               "(RFC 9112 section 3.2: 'any request message').")
case("host", "repeated-different-http10",
     request("GET", version=b"HTTP/1.0", host=b"Host: evil.example\r\nHost: gw.test\r\n"), refused(BAD),
     why=HOST_10_WHY)
case("host", "space-inside-http10", request("GET", version=b"HTTP/1.0", host=b"Host: evil.example a b\r\n"),
     refused(BAD), why=HOST_10_WHY)
case("host", "valid-http10", request("GET", version=b"HTTP/1.0", host=HOST), ok(get(), closed=True))


# --- smuggling classics ------------------------------------------------------------------------------------------

case("smuggle", "cl-te", request("POST", headers=b"Content-Length: 6\r\n" + TE, body=b"0\r\n\r\nG"), refused(BAD),
     why=CLTE_WHY)
case("smuggle", "te-cl", request("POST", headers=TE + b"Content-Length: 3\r\n", body=b"8\r\nSMUGGLED\r\n0\r\n\r\n"),
     refused(BAD), why=CLTE_WHY)
for name, te in [
    ("te-te-second-line-junk", TE + b"Transfer-Encoding: x\r\n"),
    ("te-te-space-before-colon", b"Transfer-Encoding : chunked\r\n"),
    ("te-te-tab-value", b"Transfer-Encoding:\tchunked\r\n"),
    ("te-te-xchunked", b"Transfer-Encoding: xchunked\r\n"),
    ("te-te-leading-space-line", b" Transfer-Encoding: chunked\r\n"),
    ("te-te-vertical-tab", b"Transfer-Encoding:\x0bchunked\r\n"),
    ("te-te-bare-lf", b"X-A: b\nTransfer-Encoding: chunked\r\n"),
    ("te-te-obs-fold", b"Transfer-Encoding: x\r\n chunked\r\n"),
    ("te-te-nul", b"Transfer-Encoding: chunked\x00\r\n"),
    ("te-te-underscore-and-real", b"Transfer_Encoding: x\r\n" + TE),
]:
    case("smuggle", name, request("POST", headers=te + b"Content-Length: 4\r\n", body=b"1\r\nZ\r\nQ\r\n\r\n" + INNER),
         refused(BAD), why="Transfer-Encoding (however spelled) with Content-Length: never forwarded.")
case("smuggle", "cl-cl", request("POST", headers=b"Content-Length: 0\r\nContent-Length: 44\r\n", body=INNER),
     refused(BAD), why=CL_WHY)
case("smuggle", "get-with-body", request("GET", headers=cl(INNER), body=INNER),
     ok(Sent("GET", body=INNER, framing=length(len(INNER)))),
     why="A GET may have a body; with a Content-Length it is one request, whatever the body holds.")
case("smuggle", "cl-zero-then-unauthenticated",
     request("POST", headers=b"Content-Length: 0\r\n") + unauthenticated_get(),
     ok(Sent("POST", framing=length(0)), 401))
case("smuggle", "chunk-size-wrapping", chunked(b"10000000000000005\r\nhello\r\n0\r\n\r\n"), refused(BAD),
     why="2**64 + 5 as a chunk size: a parser that wraps reads 5; it must be refused as too large.")
case("smuggle", "head-with-body", request("HEAD", headers=cl(b"hello"), body=b"hello") + request("GET", "/api/b"),
     ok(Sent("HEAD", body=b"hello", framing=length(5)), get("/api/b")),
     why="A HEAD request's body is framed like any other; its answer has none.")


# --- Expect ---------------------------------------------------------------------------------------------------

EXPECT = b"Expect: 100-continue\r\n"
case("expect", "post-length", request("POST", headers=EXPECT + cl(b"hello"), body=b"hello"), ok(HELLO),
     why="Sent with its body at once: forwarded once; a 100 Continue before the answer is allowed.")
case("expect", "post-chunked", request("POST", headers=EXPECT + TE, body=chunks(b"hello")), ok(CHUNKED_HELLO))
case("expect", "mixed-case", request("POST", headers=b"Expect: 100-Continue\r\n" + cl(b"hello"), body=b"hello"),
     ok(HELLO))
case("expect", "length-zero", request("POST", headers=EXPECT + b"Content-Length: 0\r\n"),
     ok(Sent("POST", framing=length(0))))
case("expect", "get", request("GET", headers=EXPECT), ok(get()))
case("expect", "http10", request("POST", version=b"HTTP/1.0", headers=EXPECT + cl(b"hello"), body=b"hello"),
     ok(HELLO, closed=True), why="100-continue in an HTTP/1.0 request is ignored (RFC 9110 section 10.1.1).")
case("expect", "unknown-expectation", request("POST", headers=b"Expect: 200-ok\r\n" + cl(b"hello"), body=b"hello"),
     ok(HELLO), refused(417), why="An expectation a server cannot meet: it MAY answer 417 (RFC 9110 section 10.1.1).")


# --- Upgrade --------------------------------------------------------------------------------------------------

WS_SENT = Sent("GET", "/api/ws", upgrade=True)
UPGRADE_WHY = "Keygate's contract: a WebSocket upgrade must be a GET with Connection: Upgrade, a key and version 13."
case("upgrade", "websocket", request("GET", "/api/ws", headers=WS), ok(WS_SENT, closed=None))
case("upgrade", "websocket-subprotocol",
     request("GET", "/api/ws", headers=WS + b"Sec-WebSocket-Protocol: chat, v2\r\n"),
     ok(WS_SENT, closed=None))
case("upgrade", "websocket-then-frame", request("GET", "/api/ws", headers=WS) + b"\x81\x85\x00\x00\x00\x00hello",
     ok(WS_SENT, closed=None), why="Bytes after the handshake are the tunnel's, never a request.")
case("upgrade", "websocket-post", request("POST", "/api/ws", headers=WS + b"Content-Length: 0\r\n"),
     refused(BAD, closed=None), why=UPGRADE_WHY)
case("upgrade", "websocket-no-key",
     request("GET", "/api/ws", headers=b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"),
     refused(BAD, closed=None), why=UPGRADE_WHY)
case("upgrade", "websocket-version-8", request("GET", "/api/ws", headers=WS.replace(b"Version: 13", b"Version: 8")),
     refused(one_of(400, 426), closed=None), why=UPGRADE_WHY)
case("upgrade", "websocket-without-connection-upgrade",
     request("GET", "/api/ws", headers=b"Upgrade: websocket\r\n" + WS_KEY + b"Sec-WebSocket-Version: 13\r\n"),
     refused(BAD, closed=None), ok(get("/api/ws")),
     why="Upgrade not named in Connection: refused by Keygate's contract, or ignored as a plain GET "
         "(RFC 9110 section 7.8).")
case("upgrade", "websocket-http10", request("GET", "/api/ws", version=b"HTTP/1.0", headers=WS),
     refused(BAD, closed=None), ok(get("/api/ws"), closed=True),
     why="The WebSocket handshake needs HTTP/1.1 (RFC 6455 section 4.1): refused, or served as a plain HTTP/1.0 GET.")


def _check() -> None:
    ids = Counter(c.id for c in CASES)
    repeated = [i for i, n in ids.items() if n > 1]
    assert not repeated, f"case ids used twice: {repeated}"


_check()
