"""Keygate memory: RSS per idle keep-alive connection, and RSS through a 1 GiB upload and a 1 GiB download.

Run from the repository root (needs nothing but the venv)::

    .venv/bin/python tests/perf/memory.py [--connections 5000] [--mib 1024] [--concurrency 64]
                                          [--skip-idle] [--skip-stream] [--json results.json] [--keep]

About a minute. Not part of the test suite: pytest does not collect
``tests/perf``.

What it does (issue 13's memory targets):

1. raises this process's open-file limit (``RLIMIT_NOFILE``, soft up to the
   hard limit) so it can hold the client side of every connection; the
   processes it starts inherit it, so Keygate can hold the server side;
2. starts an upstream of its own, a tiny raw asyncio server (this file run
   with ``--upstream PORT``, uvloop when importable): ``PUT``/``POST`` bodies
   are read by Content-Length and thrown away (the answer says how many bytes
   arrived), ``GET /download?bytes=N`` streams N zero bytes with a
   Content-Length, any other ``GET`` answers ``200 "ok\\n"``;
3. for each of the two measurements below, starts a ``keygate serve`` of its
   own (1 worker, SQLite store in a temporary folder; a fresh process, so
   memory one measurement freed cannot hide what the other takes) set up as
   ``bench.py``'s ``keygate_1w`` (every check on, with its helpers), but
   with ``proxy.max_body_size = 0`` (unlimited) and a key that may also
   ``write`` (a ``PUT`` outside the route table is a write to the default
   upstream);
4. **idle connections**: after a warm-up (the key cached, the upstream pool
   filled by requests ``--concurrency`` at a time, those connections closed)
   it reads the RSS of Keygate's serving process, then opens
   ``--connections`` (5,000) keep-alive connections, ``--concurrency`` at a
   time, each sending one authenticated ``GET`` and reading its ``200``, and
   leaves them all open and idle; after 2 s it reads the RSS again, checks
   every connection is still open, and reports the difference per
   connection in KiB (target: at most 16 KiB), then closes them and reports
   the RSS once more (for information: how much was given back);
5. **streaming**: a ``PUT`` with a ``--mib`` (1024) MiB body, sent with a
   Content-Length in 256 KiB chunks as fast as Keygate takes them (the
   upstream discards it), then a ``GET`` of a ``--mib`` MiB body read as fast
   as it comes; during each, a thread samples Keygate's RSS every 0.2 s (and
   once just before), and the report gives the RSS before, the lowest and
   highest sample and their difference (target: flat, less than 32 MiB),
   with the transfer's rate.

RSS is ``VmRSS`` from ``/proc/PID/status`` of the process that holds the
proxy's listening socket (with one worker, Keygate's only serving process).

Exit status: 0 when the measurement completed, whether or not the targets
were met; 1 when a process failed to start, the limit cannot be raised, a
request was refused, or a connection closed too early; 130 on Ctrl-C.
Everything started is stopped.

Caveats: the Python allocator keeps freed memory for reuse, so the RSS
after closing the connections does not fall back to where it started; the
per-connection figure is the one that counts. The client (this script), the
upstream and Keygate share the machine, so the streaming rates are low and
noisy; the RSS figures are not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for path in (str(ROOT), str(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)

from bench import (  # noqa: E402
    KEY_OPERATIONS, PYTHON, BenchError, Processes, Target, check_target, free_port, run_with_processes,
    start_keygate, tail, wait_http,
)

MIB = 1 << 20
CHUNK = 256 * 1024
SAMPLE_INTERVAL = 0.2
TARGET_PER_CONNECTION_KIB = 16.0
TARGET_GROWTH_MIB = 32.0
SETTLE = 2.0  # seconds between the last connection and the RSS reading
PATH = "/api/servers/app/status"


# -- the upstream (run as ``memory.py --upstream PORT``) -------------------


async def _upstream_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    zeros = bytes(CHUNK)
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            lines = head.decode("latin-1").split("\r\n")
            method, target = lines[0].split(" ")[:2]
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    name, value = line.split(":", 1)
                    headers[name.strip().lower()] = value.strip()
            if "chunked" in headers.get("transfer-encoding", "").lower():
                body = b'{"error":"chunked bodies are not read here"}'
                writer.write(b"HTTP/1.1 411 Length Required\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%b"
                             % (len(body), body))
                await writer.drain()
                return
            remaining = int(headers.get("content-length", "0"))
            received = 0
            while remaining:
                data = await reader.read(min(remaining, CHUNK))
                if not data:
                    return
                received += len(data)
                remaining -= len(data)
            if method == "GET" and target.startswith("/download"):
                size = int(target.partition("bytes=")[2] or 0)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                             b"Content-Length: %d\r\n\r\n" % size)
                while size:
                    piece = zeros if size >= CHUNK else zeros[:size]
                    writer.write(piece)
                    size -= len(piece)
                    await writer.drain()
                continue
            body = b'{"received":%d}' % received if method in ("PUT", "POST") else b"ok\n"
            kind = b"application/json" if method in ("PUT", "POST") else b"text/plain"
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: %b\r\nContent-Length: %d\r\n\r\n%b"
                         % (kind, len(body), body))
            await writer.drain()
    finally:
        writer.close()


async def _upstream(port: int) -> None:
    server = await asyncio.start_server(_upstream_connection, "127.0.0.1", port, backlog=1024)
    print(f"memory upstream listening on 127.0.0.1:{port}", flush=True)
    async with server:
        await server.serve_forever()


def run_upstream(port: int) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(_upstream(port))
    else:
        uvloop.run(_upstream(port))


def start_upstream(procs: Processes, folder: Path) -> str:
    port = free_port()
    log = folder / "upstream.log"
    process = procs.start("upstream", [PYTHON, __file__, "--upstream", str(port)], log=log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/", process, "upstream")
    except BenchError as exc:
        raise BenchError(f"{exc}\n{tail(log)}") from None
    return url


# -- measuring -------------------------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for process {pid}")


class Sampler:
    """A thread reading a process's RSS every ``interval`` seconds while in its ``with`` block."""

    def __init__(self, pid: int, interval: float = SAMPLE_INTERVAL) -> None:
        self.pid, self.interval = pid, interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append(rss_kib(self.pid))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> Sampler:
        self.samples.append(rss_kib(self.pid))  # the first, before the block starts
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(rss_kib(self.pid))


def raise_nofile(needed: int) -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise BenchError(f"the open-file limit's hard limit is {hard}; {needed} are needed "
                         "(raise it, e.g. ulimit -Hn, or pass fewer --connections)")
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft, hard
    wanted = hard if hard != resource.RLIM_INFINITY else needed
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    lines = head.split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return status, headers


async def request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, key: str,
                  path: str = PATH) -> None:
    """One authenticated GET on an open connection, its 200 and body read; the connection stays open."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n\r\n".encode())
    status, headers = await read_response(reader)
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    if status != 200:
        raise BenchError(f"GET {path} answered {status}: {body[:200]!r}")


async def open_idle(target: Target, count: int, concurrency: int) -> list[tuple[asyncio.StreamReader,
                                                                                asyncio.StreamWriter]]:
    host, port = target.url.removeprefix("http://").rsplit(":", 1)
    gate = asyncio.Semaphore(concurrency)
    opened: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def one() -> None:
        async with gate:
            reader, writer = await asyncio.open_connection(host, int(port))
            opened.append((reader, writer))
            await request(reader, writer, f"{host}:{port}", target.key or "")

    results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        for _reader, writer in opened:
            writer.close()
        raise BenchError(f"{len(failures)} of {count} connections failed, e.g. {failures[0]!r}")
    return opened


def still_open(connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> int:
    return sum(1 for reader, writer in connections if not reader.at_eof() and not writer.is_closing())


async def close_all(connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> None:
    for _reader, writer in connections:
        writer.close()
    await asyncio.gather(*(w.wait_closed() for _r, w in connections), return_exceptions=True)


async def measure_idle(target: Target, pid: int, count: int, concurrency: int) -> dict[str, Any]:
    # Warm-up: the key cached, the upstream pool as large as the concurrency makes it, those connections gone.
    for _ in range(2):
        await close_all(await open_idle(target, concurrency, concurrency))
    await asyncio.sleep(SETTLE)
    before = rss_kib(pid)
    started = time.monotonic()
    connections = await open_idle(target, count, concurrency)
    opening_s = time.monotonic() - started
    await asyncio.sleep(SETTLE)
    after = rss_kib(pid)
    alive = still_open(connections)
    await close_all(connections)
    await asyncio.sleep(SETTLE)
    closed = rss_kib(pid)
    if alive != count:
        raise BenchError(f"only {alive} of {count} idle connections were still open after {SETTLE:.0f}s")
    return {"connections": count, "opening_s": opening_s, "rss_before_kib": before, "rss_after_kib": after,
            "rss_after_close_kib": closed, "per_connection_kib": (after - before) / count,
            "target_kib": TARGET_PER_CONNECTION_KIB,
            "pass": (after - before) / count <= TARGET_PER_CONNECTION_KIB}


async def upload(target: Target, size: int) -> float:
    """PUT ``size`` bytes with a Content-Length; the seconds it took."""
    host, port = target.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        started = time.monotonic()
        writer.write(f"PUT /upload HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {target.key}\r\n"
                     f"Content-Type: application/octet-stream\r\nContent-Length: {size}\r\n\r\n".encode())
        chunk, remaining = bytes(CHUNK), size
        while remaining:
            piece = chunk if remaining >= CHUNK else chunk[:remaining]
            writer.write(piece)
            remaining -= len(piece)
            await writer.drain()
        status, headers = await read_response(reader)
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        elapsed = time.monotonic() - started
    finally:
        writer.close()
    if status != 200 or json.loads(body).get("received") != size:
        raise BenchError(f"the upload answered {status} {body[:200]!r}, expected 200 and {size} bytes received")
    return elapsed


async def download(target: Target, size: int) -> float:
    """GET ``size`` bytes, read as they come; the seconds it took."""
    host, port = target.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        started = time.monotonic()
        writer.write(f"GET /download?bytes={size} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                     f"Authorization: Bearer {target.key}\r\n\r\n".encode())
        status, headers = await read_response(reader)
        if status != 200:
            raise BenchError(f"the download answered {status}: {(await reader.read(200))!r}")
        expected, got = int(headers.get("content-length", "-1")), 0
        while got < expected:
            data = await reader.read(CHUNK)
            if not data:
                break
            got += len(data)
        elapsed = time.monotonic() - started
    finally:
        writer.close()
    if expected != size or got != size:
        raise BenchError(f"the download announced {expected} bytes and brought {got}, expected {size}")
    return elapsed


def measure_stream(target: Target, pid: int, name: str, transfer: Any, size: int) -> dict[str, Any]:
    with Sampler(pid) as sampler:
        elapsed = asyncio.run(transfer(target, size))
    before = sampler.samples[0]
    low, high = min(sampler.samples), max(sampler.samples)
    return {"transfer": name, "bytes": size, "seconds": elapsed, "mib_per_s": size / MIB / elapsed,
            "samples": len(sampler.samples), "rss_before_kib": before, "rss_min_kib": low, "rss_max_kib": high,
            "rss_growth_kib": high - low, "target_mib": TARGET_GROWTH_MIB,
            "pass": (high - low) / 1024 < TARGET_GROWTH_MIB}


# -- main ------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=5000, help="idle keep-alive connections (5000)")
    parser.add_argument("--concurrency", type=int, default=64,
                        help="connections being opened at once, and warm-up requests at once (64)")
    parser.add_argument("--mib", type=int, default=1024, help="MiB uploaded, then downloaded (1024)")
    parser.add_argument("--skip-idle", action="store_true", help="leave out the idle connections")
    parser.add_argument("--skip-stream", action="store_true", help="leave out the upload and download")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, store)")
    parser.add_argument("--upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.connections < 1 or args.concurrency < 1 or args.mib < 1:
        parser.error("--connections, --concurrency and --mib must be positive")
    return args


def start(procs: Processes, folder: Path, upstream: str, name: str) -> tuple[Target, int]:
    """A Keygate set up as bench.py's keygate_1w, with no body size limit and a key that may write; its pid."""
    keygate = start_keygate(procs, folder, upstream, workers=1, name=name,
                            extra_env={"KEYGATE_PROXY__MAX_BODY_SIZE": "0"},
                            operations=(*KEY_OPERATIONS, "write"))
    check_target(keygate)
    if len(keygate.pids) != 1:
        raise BenchError(f"expected one serving Keygate process, found {keygate.pids}")
    print(f"{name}: {keygate.url}, serving pid {keygate.pids[0]}")
    return keygate, keygate.pids[0]


def measure(args: argparse.Namespace, procs: Processes, folder: Path) -> int:
    soft, hard = raise_nofile(args.connections + args.concurrency + 1024)
    print(f"open-file limit {soft} (hard {hard}), inherited by Keygate")
    upstream = start_upstream(procs, folder)
    print(f"upstream {upstream}")
    results: dict[str, Any] = {}
    if not args.skip_idle:
        keygate, pid = start(procs, folder, upstream, "keygate_idle")
        idle = asyncio.run(measure_idle(keygate, pid, args.connections, args.concurrency))
        results["idle"] = idle
        print(f"\nidle keep-alive connections: {idle['connections']} opened in {idle['opening_s']:.1f}s, "
              "each after one authenticated request")
        print(f"  RSS before         {idle['rss_before_kib'] / 1024:8.1f} MiB")
        print(f"  RSS with them open {idle['rss_after_kib'] / 1024:8.1f} MiB")
        print(f"  RSS after closing  {idle['rss_after_close_kib'] / 1024:8.1f} MiB (for information)")
        print(f"  per connection     {idle['per_connection_kib']:8.1f} KiB   "
              f"(target <= {TARGET_PER_CONNECTION_KIB:.0f} KiB)  {'PASS' if idle['pass'] else 'FAIL'}")
    if not args.skip_stream:
        keygate, pid = start(procs, folder, upstream, "keygate_stream")
        size = args.mib * MIB
        results["stream"] = []
        print(f"\nstreaming {args.mib} MiB through Keygate, RSS sampled every {SAMPLE_INTERVAL}s")
        for name, transfer in (("upload", upload), ("download", download)):
            s = measure_stream(keygate, pid, name, transfer, size)
            results["stream"].append(s)
            print(f"  {name:<8} {s['seconds']:6.1f}s {s['mib_per_s']:7.1f} MiB/s  RSS before "
                  f"{s['rss_before_kib'] / 1024:6.1f} MiB, min {s['rss_min_kib'] / 1024:6.1f}, "
                  f"max {s['rss_max_kib'] / 1024:6.1f}, max-min {s['rss_growth_kib'] / 1024:5.1f} MiB "
                  f"({s['samples']} samples; target < {TARGET_GROWTH_MIB:.0f} MiB)  {'PASS' if s['pass'] else 'FAIL'}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nresults written to {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.upstream is not None:
        run_upstream(args.upstream)
        return 0
    return run_with_processes("keygate-memory-", args.keep, lambda procs, folder: measure(args, procs, folder))


if __name__ == "__main__":
    sys.exit(main())
