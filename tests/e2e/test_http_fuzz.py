"""The bounded fuzz run of issue 13: mutations of the HTTP corpus against a real Keygate.

A fixed seed and a fixed count make the run the same every time: each
mutant is a corpus case's bytes with one to three random mutations (the
key filled in after) -- a bit flipped, a digit changed, CR, LF, NUL, space,
tab, colon and the like inserted, bytes deleted, a line repeated, or the
tail of another case spliced on. Each is sent on a fresh connection from a loopback address of
its own; what Keygate must never do, whatever the bytes:

- answer a 5xx of its own failing (500, or a 502 that says the upstream
  refused what Keygate sent) or log a traceback;
- send the upstream more requests than the bytes hold requests carrying
  the key (each forwarded request needs one; a request smuggled inside
  another's body would reach the upstream under no client or a forged one),
  or bytes that are not strict HTTP/1.1;
- leave the client without an answer or a close: with the header and body
  timeouts at 1 s, everything is answered, refused or timed out (408)
  within a few seconds;
- answer anything that is not HTTP.

Afterwards Keygate still answers an ordinary request.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from .corpus_run import next_source, read_reply, start_gateway
from .harness import Keygate
from .http_corpus import CASES, KEY, request
from .recording_upstream import RecordingUpstream

SEED = 13
COUNT = 1000
CONCURRENCY = 48
TIMEOUTS = 1.0  # Keygate's header and body timeouts
FIRST_ANSWER = 5.0  # seconds within which a connection must be answered or closed
QUIET = 1.5  # seconds without anything more after an answer: the connection is idle, done
INSERTS = (b"\r", b"\n", b"\r\n", b"\x00", b" ", b"\t", b":", b",", b";", b"\xff", b"\r\n\r\n", b"0\r\n\r\n")
# Server errors that are no fault: refusals of what the bytes ask for.
REFUSING_5XX = frozenset({501, 505})


@dataclass(frozen=True)
class Mutant:
    name: str  # which case, which mutations: enough to find it again
    payload: bytes


def mutants(key: str, seed: int = SEED, count: int = COUNT) -> list[Mutant]:
    rng = random.Random(seed)
    made = []
    for n in range(count):
        case = rng.choice(CASES)
        # The case's bytes with the {key} placeholder, filled in after: mutations seldom hit the key
        # (a key that is no longer one only buys a 401) and never depend on what the key is.
        raw = case.raw
        steps = []
        for _ in range(rng.choice((1, 1, 1, 2, 2, 3))):
            raw, step = _mutate(rng, raw, rng.choice(CASES).raw)
            steps.append(step)
        made.append(Mutant(f"#{n} {case.id}: {', '.join(steps)}", raw.replace(KEY, key.encode())))
    return made


def _mutate(rng: random.Random, data: bytes, other: bytes) -> tuple[bytes, str]:
    op = rng.choice(("flip", "flip", "insert", "insert", "delete", "digit", "repeat-line", "splice"))
    at = rng.randrange(len(data) + 1)
    digits = [i for i, c in enumerate(data) if 0x30 <= c <= 0x39]
    if op == "digit" and digits:
        # Lengths, chunk sizes and versions: where framing disagreements come from.
        at, digit = rng.choice(digits), rng.choice(b"0123456789")
        return data[:at] + bytes([digit]) + data[at + 1:], f"digit@{at}={chr(digit)}"
    if op == "flip" and at < len(data):
        bit = 1 << rng.randrange(8)
        return data[:at] + bytes([data[at] ^ bit]) + data[at + 1:], f"flip@{at}^{bit:#x}"
    if op == "insert":
        piece = rng.choice(INSERTS)
        return data[:at] + piece + data[at:], f"insert@{at} {piece!r}"
    if op == "delete":
        n = rng.randint(1, 8)
        return data[:at] + data[at + n:], f"delete@{at}+{n}"
    if op == "repeat-line":
        lines = data.split(b"\r\n")
        i = rng.randrange(len(lines))
        lines.insert(i, lines[i])
        return b"\r\n".join(lines), f"repeat-line {i}"
    # A splice (or a flip past the end, or a digit change where there is no digit).
    cut = rng.randrange(len(other) + 1)
    return data[:at] + other[cut:], f"splice@{at} tail@{cut}"


_STATUS = re.compile(rb"(?:^|\r\n)HTTP/1\.[01] (\d{3}) ")


@dataclass
class Outcome:
    received: bytes
    closed: bool
    hung: bool

    @property
    def statuses(self) -> list[int]:
        """The status of every answer in what came back.

        Found by their status lines rather than by framing the answers: an answer to a HEAD has a
        Content-Length and no body, and which requests a mutant holds is unknown. No body here can hold
        a status line (Keygate's own are JSON, the upstream's "ok <n>").
        """
        return [int(s) for s in _STATUS.findall(self.received)]

    @property
    def garbage(self) -> bool:
        return bool(self.received) and not self.received.startswith((b"HTTP/1.1 ", b"HTTP/1.0 "))


async def exchange(port: int, payload: bytes, source: str) -> Outcome:
    """Send ``payload``; read until the close, or until the connection has been quiet a while after an answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    sending = asyncio.create_task(_send(writer, payload))
    received = bytearray()
    try:
        while True:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), QUIET if received else FIRST_ANSWER)
            except TimeoutError:
                return Outcome(bytes(received), closed=False, hung=not received)
            if not chunk:
                break
            received += chunk
    except ConnectionError:
        pass
    finally:
        sending.cancel()
        writer.close()
    return Outcome(bytes(received), closed=True, hung=False)


async def _send(writer: asyncio.StreamWriter, payload: bytes) -> None:
    try:
        writer.write(payload)
        await writer.drain()
    except ConnectionError:
        pass


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RecordingUpstream, Keygate, str]]:
    upstream = RecordingUpstream().start()
    gateway, key = start_gateway(tmp_path_factory.mktemp("fuzz"), upstream, timeouts=TIMEOUTS)
    yield upstream, gateway, key
    gateway.stop()
    upstream.stop()


async def test_fuzzed_corpus_never_breaks_keygate(fuzzed: tuple[RecordingUpstream, Keygate, str]) -> None:
    """1000 mutated corpus requests: no 500, traceback, extra upstream request or hang; then a request is served."""
    upstream, gateway, key = fuzzed
    logged = len(gateway.log())
    gate = asyncio.Semaphore(CONCURRENCY)
    sources: dict[str, Mutant] = {}

    async def one(mutant: Mutant) -> tuple[Mutant, str, Outcome]:
        async with gate:
            source = next_source()
            sources[source] = mutant
            return mutant, source, await exchange(gateway.proxy_port, mutant.payload, source)

    results = await asyncio.gather(*(one(m) for m in mutants(key)))
    await asyncio.sleep(0.5)  # anything forwarded late arrives now
    counts = upstream.by_client()
    problems = []
    for mutant, source, outcome in results:
        found = []
        if outcome.hung:
            found.append(f"no answer and no close within {FIRST_ANSWER} s")
        if outcome.garbage:
            found.append(f"answered what is no HTTP: {outcome.received[:200]!r}")
        failed = [status for status in outcome.statuses if status >= 500 and status not in REFUSING_5XX]
        if failed:
            found.append(f"answered {failed}")
        keyed = mutant.payload.count(key.encode())
        if counts.get(source, 0) > keyed:
            found.append(f"{counts[source]} upstream requests for {keyed} carrying the key")
        if found:
            problems.append(f"{mutant.name}: {'; '.join(found)}\n    sent {mutant.payload[:300]!r}")
    assert not problems, f"{len(problems)} of {len(results)} mutants:\n" + "\n".join(problems[:25])
    assert upstream.errors() == [], "the upstream received bytes that are not strict HTTP/1.1"
    assert set(counts) <= set(sources), f"upstream requests for no client Keygate served: {set(counts) - set(sources)}"
    log = gateway.log()[logged:]
    assert "Traceback" not in log
    assert '"status": 500' not in log and "internal_error" not in log
    # And it still serves.
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.proxy_port)
    writer.write(request("GET").replace(b"{key}", key.encode()))
    reply = await read_reply(reader, FIRST_ANSWER)
    writer.close()
    assert reply is not None and reply.status == 200
