"""The differential test of issue 13: every request of the HTTP corpus against a real Keygate.

Keygate runs in front of a strict, recording upstream
(:mod:`tests.e2e.recording_upstream`); each case is sent on a fresh
connection from a loopback address of its own, and must produce exactly
the answers and upstream requests :mod:`tests.e2e.http_corpus` expects:
a refusal and a closed connection with nothing forwarded, or the expected
requests upstream with identical framing and their answers in order.

The same corpus against aiohttp's own server is the reference run: it
proves that the differences listed in ``http_corpus_differences.md`` are
exactly the ones there are.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from .corpus_run import PROBE, PROBE_TARGET, describe, mismatches, next_source, observe, start_gateway
from .harness import Keygate
from .http_corpus import CASES, Case
from .recording_upstream import RecordingUpstream, Seen

# Cases the proxy listener is known to fail, each an xfail(strict=True) naming why: none since issue 13's
# listener (llhttp in strict mode plus its own checks) replaced the aiohttp-based one.
TODAY: dict[str, str] = {}

# Time for a request that should not have been forwarded to reach the upstream all the same; what comes
# later still is caught by test_nothing_reached_the_upstream_late_or_unattributed.
SETTLE = 0.01


@dataclass
class Corpus:
    upstream: RecordingUpstream
    gateway: Keygate
    key: str
    used: set[str] = field(default_factory=set)  # every source address a case was sent from
    checked: dict[str, int] = field(default_factory=dict)  # source address of a passed case -> its upstream requests


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Corpus]:
    upstream = RecordingUpstream().start()
    gateway, key = start_gateway(tmp_path_factory.mktemp("corpus"), upstream)
    yield Corpus(upstream, gateway, key)
    gateway.stop()
    upstream.stop()


def _param(case: Case) -> object:
    marks = [pytest.mark.xfail(strict=True, reason=TODAY[case.id])] if case.id in TODAY else []
    return pytest.param(case, id=case.id, marks=marks)


def report(case: Case, outcome: str, problems: list[list[str]]) -> str:
    lines = [f"{case.id}: {case.why}" if case.why else case.id, f"  got: {outcome}"]
    for expect, found in zip(case.expect, problems):
        lines.append(f"  expected: {expect}")
        lines += [f"    - {p}" for p in found]
    return "\n".join(lines)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
async def test_corpus_case(corpus: Corpus, case: Case) -> None:
    """The case's bytes produce exactly the expected answers, upstream requests and connection state."""
    source = next_source()
    corpus.used.add(source)
    errors, logged = len(corpus.upstream.errors()), len(corpus.gateway.log())
    seen = await observe(corpus.gateway.proxy_port, case.payload(corpus.key), source=source,
                         answers=max(len(e.answers) for e in case.expect), probe=PROBE.format(key=corpus.key).encode())
    await asyncio.sleep(SETTLE)
    upstream = corpus.upstream.requests(source)
    problems = [mismatches(expect, seen, upstream) for expect in case.expect]
    if all(problems):
        pytest.fail(report(case, str(seen), problems), pytrace=False)
    assert corpus.upstream.errors()[errors:] == [], "the upstream received bytes that are not strict HTTP/1.1"
    assert "Traceback" not in corpus.gateway.log()[logged:]
    corpus.checked[source] = len(upstream)


async def test_nothing_reached_the_upstream_late_or_unattributed(corpus: Corpus) -> None:
    """No request reached the upstream for a case after it was checked, nor one Keygate did not send for a client.

    A request smuggled inside another's body would reach the upstream with the client's own headers: without
    the X-Forwarded-For Keygate sets to the client's address, or with a forged one.
    """
    await asyncio.sleep(0.5)
    counts = corpus.upstream.by_client()
    late = {source: counts.get(source, 0) - n for source, n in corpus.checked.items() if counts.get(source, 0) != n}
    assert late == {}
    assert set(counts) <= corpus.used


# --- the reference run: aiohttp's own server ---------------------------------------------------------------------

DIFFERENCES = Path(__file__).with_name("http_corpus_differences.md")


def documented_differences() -> dict[str, str]:
    """The cases http_corpus_differences.md lists as parsed otherwise by aiohttp, with the why it gives for each."""
    rows = re.findall(r"^\| `([^`]+)` \| [^|]* \| ([^|]*) \|$", DIFFERENCES.read_text(), re.MULTILINE)
    return dict(rows)


@asynccontextmanager
async def aiohttp_reference() -> AsyncIterator[tuple[int, list[Seen]]]:
    """aiohttp's low-level server with Keygate's line and header limits, recording what it parsed."""
    parsed: list[Seen] = []

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        if "Authorization" not in request.headers:
            # As Keygate answers a request without a key: the corpus's "smuggled" requests carry none.
            return web.Response(status=401)
        # The parser's own message says whether it read the body as chunked; the headers cannot.
        message = request._message
        framing = "chunked" if message.chunked else "length" if "Content-Length" in request.headers else "none"
        seen = Seen(len(parsed) + 1, request.remote or "", b"", request.method, request.raw_path,
                    list(request.headers.items()), framing, request.content_length if framing == "length" else None)
        parsed.append(seen)
        websocket = web.WebSocketResponse()
        if request.headers.get("Upgrade", "").lower() == "websocket" and websocket.can_prepare(request).ok:
            seen.complete = seen.upgrade = True
            await websocket.prepare(request)
            async for _ in websocket:
                pass
            return websocket
        seen.body = await request.read()
        seen.complete = True
        body = b"" if request.method == "HEAD" else b"ok %d" % seen.seq
        # As the recording upstream answers: Content-Length even for HEAD (web.Response would leave it out).
        response = web.StreamResponse(headers={"X-Upstream-Seq": str(seen.seq)})
        response.content_length = len(body)
        await response.prepare(request)
        await response.write_eof(body)
        return response

    server = web.Server(handler, max_line_size=8192, max_field_size=8190, max_headers=128)
    listener = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
    try:
        yield listener.sockets[0].getsockname()[1], parsed
    finally:
        listener.close()
        await server.shutdown(1)


async def test_aiohttp_reference_differs_exactly_as_documented() -> None:
    """Run against aiohttp's own server, the corpus differs in exactly the cases http_corpus_differences.md explains."""
    table: dict[str, str] = {}
    async with aiohttp_reference() as (port, parsed):
        for case in CASES:
            source = next_source()
            seen = await observe(port, case.payload("kg_reference"), source=source,
                                 answers=max(len(e.answers) for e in case.expect),
                                 probe=PROBE.format(key="kg_reference").encode(), timeout=1.0)
            got = [s for s in parsed if s.client == source]
            if all(mismatches(expect, seen, got) for expect in case.expect):
                requests = "; ".join(describe(s) for s in got if s.target != PROBE_TARGET) or "nothing"
                table[case.id] = f"{seen}; parsed: {requests}"
    print("\n| case | aiohttp's server | why |\n| --- | --- | --- |")
    for case_id, what in table.items():
        print(f"| `{case_id}` | {what} | |")
    documented = documented_differences()
    assert sorted(table) == sorted(documented), (
        f"not documented: {sorted(set(table) - set(documented))}; "
        f"documented but no longer different: {sorted(set(documented) - set(table))}")


def test_known_failures_are_documented_differences() -> None:
    """A case the listener is known to fail (TODAY) must be one the differences file explains."""
    assert set(TODAY) <= set(documented_differences())
