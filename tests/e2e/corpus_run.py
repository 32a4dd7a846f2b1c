"""Running the HTTP corpus: one exchange per case from a loopback address of its own, and the comparison.

:func:`observe` sends a case's bytes on a fresh connection and reads what
comes back: as many answers as the expectation has (1xx interim answers
skipped), then -- if the connection is still open -- one probe request on
it, whose answer proves the connection is open and in step (a request left
over in the pipe would be answered first). :func:`mismatches` compares
that, and the requests the upstream recorded for the case's address, with
one expected :class:`~tests.e2e.http_corpus.Exchange`.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

from .harness import Keygate
from .http_corpus import Exchange, Framing, Sent
from .recording_upstream import RecordingUpstream, Seen

PROBE_TARGET = "/api/__probe"
PROBE = f"GET {PROBE_TARGET} HTTP/1.1\r\nHost: probe.test\r\nAuthorization: Bearer {{key}}\r\n\r\n"
ROUTES = '[[routes]]\npath = "/api/*"\noperation = "api"\n'
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})(?: [^\r\n]*)?")


def start_gateway(folder: Path, upstream: RecordingUpstream, *, timeouts: float = 2.0,
                  extra_config: str = "") -> tuple[Keygate, str]:
    """A ``keygate serve`` in front of ``upstream`` with ``/api/*`` routed, and a key that may use it, unthrottled.

    Short header and body timeouts (``timeouts`` seconds) make a request that never completes end in a 408
    rather than a hang.
    """
    keygate = Keygate(folder, upstream.url, proxy=f"header_timeout = {timeouts}\nclient_timeout = {timeouts}\n",
                      config=ROUTES + extra_config).start()
    _, key = asyncio.run(keygate.key(name="corpus", role="admin", rate_limit="1000000/second"))
    return keygate, key


_addresses = itertools.count(1)


def next_source() -> str:
    """A loopback address no other exchange of this process used: the upstream tells cases apart by it."""
    n = next(_addresses)
    return f"127.{64 + n // 62500}.{(n // 250) % 250 + 1}.{n % 250 + 1}"


@dataclass(frozen=True)
class Reply:
    status: int
    head: bytes
    body: bytes
    interim: tuple[int, ...] = ()  # the 1xx answers before it

    @property
    def seq(self) -> int | None:
        """The upstream's number for the request this answers (its X-Upstream-Seq), if it came from there."""
        found = re.search(rb"\r\nx-upstream-seq: *(\d+)", self.head.lower())
        return int(found[1]) if found else None

    @property
    def closes(self) -> bool:
        """Whether the answer says the connection ends after it."""
        head = self.head.lower()
        if b"\r\nconnection: close" in head:
            return True
        return head.startswith(b"http/1.0") and b"\r\nconnection: keep-alive" not in head


class NotHTTP(Exception):
    """What came back is no HTTP/1.x answer."""


async def read_reply(reader: asyncio.StreamReader, timeout: float) -> Reply | None:
    """The next final answer (1xx skipped, 101 returned), or None at a clean end of the connection."""
    interim: list[int] = []
    async with asyncio.timeout(timeout):
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    raise NotHTTP(f"connection closed inside an answer's head: {exc.partial[:200]!r}") from None
                return None
            except asyncio.LimitOverrunError:
                raise NotHTTP("an answer's head over 64 KiB") from None
            line = _STATUS_LINE.fullmatch(head.split(b"\r\n", 1)[0])
            if line is None:
                raise NotHTTP(f"not a status line: {head[:200]!r}")
            status = int(line[1])
            if 100 <= status < 200 and status != 101:
                interim.append(status)
                continue
            try:
                body = await _body(reader, head, status)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
                raise NotHTTP(f"an answer's body cut short or malformed ({exc!r}) after {head[:200]!r}") from None
            return Reply(status, head, body, tuple(interim))


async def _body(reader: asyncio.StreamReader, head: bytes, status: int) -> bytes:
    if status in (101, 204, 304):
        return b""
    lower = head.lower()
    found = re.search(rb"\r\ncontent-length: *(\d+)", lower)
    if found:
        return await reader.readexactly(int(found[1]))
    if b"\r\ntransfer-encoding: chunked" in lower:
        body = bytearray()
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += (await reader.readexactly(size + 2))[:-2]
        while await reader.readuntil(b"\r\n") != b"\r\n":
            pass
        return bytes(body)
    return await reader.read()  # framed by the close


@dataclass
class Observed:
    """What one exchange looked like from the client."""

    replies: list[Reply] = field(default_factory=list)
    closed: bool = False  # the server closed the connection (after its last answer)
    tunnel: bool = False  # the last answer was a 101
    stray: bytes = b""  # bytes after the last whole answer that are none
    timed_out: bool = False  # an answer (or the close) that should have come did not
    probe: Reply | None = None  # the answer to the probe request, when one was sent

    def __str__(self) -> str:
        parts = [f"answers {[r.status for r in self.replies]}"]
        if any(r.interim for r in self.replies):
            parts.append(f"interim {[r.interim for r in self.replies]}")
        parts.append("tunnel" if self.tunnel else "closed" if self.closed else "open")
        if self.probe is not None:
            parts.append(f"probe answered {self.probe.status}")
        if self.timed_out:
            parts.append("TIMED OUT")
        if self.stray:
            parts.append(f"stray bytes {self.stray[:120]!r}")
        return ", ".join(parts)


async def observe(port: int, payload: bytes, *, source: str, answers: int, probe: bytes | None,
                  timeout: float = 3.0) -> Observed:
    """Send ``payload`` from ``source``; read up to ``answers`` answers, then probe the connection if still open."""
    seen = Observed()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0), limit=1 << 16)
    # Sent while reading: a server that refuses early may stop reading before the payload is all sent.
    sending = asyncio.create_task(_send(writer, payload))
    try:
        while len(seen.replies) < answers:
            reply = await read_reply(reader, timeout)
            if reply is None:
                seen.closed = True
                return seen
            seen.replies.append(reply)
            if reply.status == 101:
                seen.tunnel = True
                return seen
            if reply.closes:
                seen.stray, seen.closed = await _rest(reader, timeout)
                return seen
        if probe is not None:
            await sending
            writer.write(probe)
            seen.probe = await read_reply(reader, timeout)
            seen.closed = seen.probe is None
    except TimeoutError:
        seen.timed_out = True
    except NotHTTP as exc:
        seen.stray = str(exc).encode()
    except ConnectionError:
        seen.closed = True
    finally:
        sending.cancel()
        writer.close()
    return seen


async def _send(writer: asyncio.StreamWriter, payload: bytes) -> None:
    try:
        writer.write(payload)
        await writer.drain()
    except ConnectionError:
        pass


async def _rest(reader: asyncio.StreamReader, timeout: float) -> tuple[bytes, bool]:
    """What the server still sends, and whether it closed the connection within ``timeout`` seconds."""
    received = bytearray()
    try:
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                received += chunk
    except TimeoutError:
        return bytes(received), False
    except ConnectionError:
        pass
    return bytes(received), True


def framing_matches(want: Framing, got: Seen) -> bool:
    if want.kind == "none":
        # A proxy may spell "no body" as Content-Length: 0 (aiohttp's client does for DELETE).
        return got.framing == "none" or (got.framing == "length" and got.length == 0)
    if want.kind == "length":
        return got.framing == "length" and got.length == want.length
    return got.framing == "chunked"


def describe(got: Seen) -> str:
    framing = {"none": "no body", "chunked": "chunked"}.get(got.framing) or f"Content-Length {got.length}"
    body = f" body {got.body[:40]!r}{'...' if len(got.body) > 40 else ''}" if got.body else ""
    flags = ("" if got.complete else " INCOMPLETE") + (" upgrade" if got.upgrade else "")
    return f"#{got.seq} {got.method} {got.target[:60]} ({framing}{body}){flags}"


def mismatches(expect: Exchange, seen: Observed, upstream: list[Seen]) -> list[str]:
    """How the exchange and the upstream's record of it differ from ``expect``; empty when they match."""
    problems: list[str] = []
    received = [s for s in upstream if s.target != PROBE_TARGET]
    probes = [s for s in upstream if s.target == PROBE_TARGET]
    # The upstream got exactly the requests expected, framed as sent.
    wanted = expect.forwarded
    if len(received) != len(wanted) or any(not _same(w, g) for w, g in zip(wanted, received)):
        problems.append(f"upstream got [{'; '.join(map(describe, received))}], "
                        f"expected [{'; '.join(map(str, wanted))}]")
    # The client got the answers expected, in order; the upstream's ones for the requests they answer.
    statuses = [r.status for r in seen.replies]
    if len(statuses) != len(expect.answers):
        problems.append(f"{len(statuses)} answers {statuses}, expected {len(expect.answers)}")
    forwarded = iter(received)
    for i, (reply, answer) in enumerate(zip(seen.replies, expect.answers)):
        if isinstance(answer, Sent):
            request = next(forwarded, None)
            if reply.status != answer.status:
                problems.append(f"answer {i + 1} is {reply.status}, expected {answer.status}")
            elif not answer.upgrade and request is not None and reply.seq != request.seq:
                problems.append(f"answer {i + 1} answers upstream request #{reply.seq}, expected #{request.seq}")
        elif reply.status not in (answer if isinstance(answer, frozenset) else {answer}):
            problems.append(f"answer {i + 1} is {reply.status}, expected {answer}")
        if reply.status >= 500 and reply.status not in (501, 505):
            problems.append(f"answer {i + 1} is a server error {reply.status}: {reply.body[:200]!r}")
    # The connection ended as expected, with nothing more on it.
    if seen.timed_out:
        problems.append("an answer (or the close) did not come in time")
    if seen.stray:
        problems.append(f"bytes that are no answer: {seen.stray[:200]!r}")
    if not expect.tunnel and not seen.tunnel:
        if expect.closed is True and not seen.closed:
            problems.append("the connection was left open")
        if expect.closed is False and seen.closed:
            problems.append("the connection was closed")
        if seen.probe is not None and (seen.probe.status != 200 or len(probes) != 1 or seen.probe.seq != probes[0].seq):
            problems.append(f"the probe after the answers got {seen.probe.status} "
                            f"(upstream probes {[p.seq for p in probes]}, answer for #{seen.probe.seq})")
    return problems


def _same(want: Sent, got: Seen) -> bool:
    return (want.method == got.method and want.target == got.target and framing_matches(want.framing, got)
            and want.body == got.body and got.complete and want.upgrade == got.upgrade)
