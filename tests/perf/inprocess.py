"""Keygate's CPU per request in one process, steady enough to compare two trees a percent apart.

Run from the repository root (or give another tree's root: its ``gateway`` is measured)::

    .venv/bin/python tests/perf/inprocess.py [--tree PATH] [--requests 20000] [--repeat 5] [--connections 16]
                                             [--redis redis://127.0.0.1:6379/0 [--policy redis]]

or, for the compiled build (README), with the Python of a venv it is installed in::

    VENV/bin/python tests/perf/inprocess.py --installed

``bench.py`` measures Keygate as users run it, against nginx, with wrk; on a
shared 2-core machine its CPU per request moves by +-5 % from run to run, so
a change worth 1-2 % cannot be seen there. This runs everything in one
process on one event loop (uvloop when installed): Keygate's proxy listener
and pipeline as ``keygate serve`` builds them (``gateway.runtime``, the
bench's configuration: every check on, three routes, a key with a role, its
own operations, a server list, an allowlist, an expiry and a rate limit that
never refuses, request records written to SQLite), a raw upstream answering
as nginx does, and a raw keep-alive client with ``--connections`` requests
in flight. It reports the process's CPU time (every thread: the store's
too) per request, the best of ``--repeat`` runs of ``--requests`` each, and
the same client against the upstream directly, whose cost is subtracted:
what remains is Keygate's own (its socket writes and reads included).

For A/B work: run it on both trees in turns (``--tree``) and compare the
"keygate" figures; it is no substitute for bench.py's ratios against nginx.
On a busy or shared machine even this moves by a few percent (173-187 us
for one tree, seen here); then count instructions instead, which do not
drift (``perf stat`` is not supported in this sandbox's VMs; valgrind is)::

    for n in 300 1300; do PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        .venv/bin/python tests/perf/inprocess.py --tree PATH --requests $n --repeat 1 --keygate-only \
        2>&1 | grep "I   refs"; done

The difference of the two totals over 2,000 (each run sends ``--requests``
twice: a warm-up and one measured) is the instructions per request, start-up
cancelled out: about 75 s per run; two runs of one tree agreed within 0.6 %.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# The upstream's answer, as the bench's nginx sends it (its Date is fixed: the length never changes).
ANSWER = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Fri, 04 Dec 2026 12:00:00 GMT\r\n"
          b"Content-Type: text/plain\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nok\n")
PATH = "/api/servers/app/status"


class Upstream:
    """Answers every request head it reads with ANSWER (bodiless GETs only)."""

    class Protocol:
        def __init__(self) -> None:
            self.transport: asyncio.Transport | None = None
            self.pending = b""

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport  # type: ignore[assignment]

        def data_received(self, data: bytes) -> None:
            data = self.pending + data
            heads = data.count(b"\r\n\r\n")
            self.pending = data[data.rfind(b"\r\n\r\n") + 4:] if heads else data
            if heads:
                self.transport.write(ANSWER * heads)  # type: ignore[union-attr]

        def connection_lost(self, exc: BaseException | None) -> None:
            pass

        def eof_received(self) -> bool | None:
            return None


class Client(asyncio.Protocol):
    """One keep-alive connection sending the same request each time its answer (httptools-parsed) is whole."""

    def __init__(self, request: bytes, counter: Counter) -> None:
        import httptools

        self.request = request
        self.counter = counter
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.status = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        if status != 200:
            self.counter.failed(status)
        if self.counter.next():
            self.transport.write(self.request)  # type: ignore[union-attr]


class Counter:
    def __init__(self) -> None:
        self.left = 0
        self.done: asyncio.Future[None] | None = None
        self.errors: dict[int, int] = {}

    def start(self, n: int) -> asyncio.Future[None]:
        self.left = n
        self.done = asyncio.get_running_loop().create_future()
        return self.done

    def next(self) -> bool:
        """One answered; whether to send another."""
        self.left -= 1
        if self.left == 0 and self.done is not None and not self.done.done():
            self.done.set_result(None)
        return self.left > 0

    def failed(self, status: int) -> None:
        self.errors[status] = self.errors.get(status, 0) + 1


async def measure(url_host: str, port: int, key: str | None, args: argparse.Namespace) -> float:
    """Best CPU seconds per request over ``args.repeat`` runs of ``args.requests``, in microseconds."""
    loop = asyncio.get_running_loop()
    counter = Counter()
    request = (f"GET {PATH} HTTP/1.1\r\nHost: {url_host}:{port}\r\nUser-Agent: inprocess\r\n"
               + (f"Authorization: Bearer {key}\r\n" if key else "") + "\r\n").encode()
    clients = []
    for _ in range(args.connections):
        _, client = await loop.create_connection(lambda: Client(request, counter), "127.0.0.1", port)
        clients.append(client)
    best = float("inf")
    for run in range(args.repeat + 1):  # the first is a warm-up
        # Each connection keeps one request in flight; the counter stops them after args.requests answers.
        done = counter.start(args.requests + args.connections)
        started = time.process_time()
        for client in clients:
            client.transport.write(request)
        await done
        spent = time.process_time() - started
        await asyncio.sleep(0.05)  # the last in-flight answers
        if run:
            best = min(best, spent / args.requests)
    for client in clients:
        client.transport.close()
    if counter.errors:
        raise SystemExit(f"non-200 answers: {counter.errors}")
    return best * 1e6


async def main_async(args: argparse.Namespace) -> None:
    if args.tree is not None:
        sys.path.insert(0, str(args.tree))
    else:
        import gateway  # noqa: F401 (the installed one, before bench puts this checkout on sys.path)
    sys.path.insert(1, str(HERE))
    import bench  # noqa: E402 (the bench's configuration and key)

    from gateway.config.load import load_settings
    from gateway.process.gc_tuning import settle_heap
    from gateway.runtime import runtime

    import gateway

    loop = asyncio.get_running_loop()
    upstream = await loop.create_server(Upstream.Protocol, "127.0.0.1", 0)  # type: ignore[arg-type]
    upstream_port = upstream.sockets[0].getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="keygate-inprocess-") as folder:
        db = Path(folder) / "keygate.db"
        config = Path(folder) / "keygate.toml"
        config.write_text(bench.KEYGATE_CONFIG.format(
            proxy_port=0, admin_port=0, db=db, upstream=f"http://127.0.0.1:{upstream_port}"))
        key = await bench._create_key(f"sqlite:///{db}")
        environ = bench.redis_policy_env(args.redis, args.policy) if args.redis else {}
        settings = load_settings(config_file=config, environ=environ)
        from gateway.dataplane.listener import proxy_listener

        async with runtime(settings) as rt:
            listener = proxy_listener(rt.gateway.handle, rt.gateway.forwarder.sweeper, settings.proxy)
            bound = await listener.start("127.0.0.1", 0)
            port = int(bound.rsplit(":", 1)[1])
            settle_heap()  # as keygate serve does once it is up (gc tuning)
            try:
                if args.keygate_only:
                    total = await measure("127.0.0.1", port, key, args)
                    base = base_again = 0.0
                else:
                    base = await measure("127.0.0.1", upstream_port, None, args)
                    total = await measure("127.0.0.1", port, key, args)
                    base_again = await measure("127.0.0.1", upstream_port, None, args)
            finally:
                await listener.shutdown(0)
    upstream.close()
    client_and_upstream = min(base, base_again)
    from gateway.dataplane import http1
    build = "compiled" if not http1.__file__.endswith(".py") else "pure Python"
    if args.redis:
        build += f", ratelimit.policy {args.policy}"
    print(f"{Path(gateway.__file__).parent.parent} ({build}): keygate {total - client_and_upstream:.1f} us/req "
          f"(all {total:.1f}, client and upstream alone {client_and_upstream:.1f}; best of {args.repeat} x "
          f"{args.requests} requests, {args.connections} connections, {type(loop).__module__.split('.')[0]})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=HERE.parents[1], help="the checkout whose gateway is measured")
    parser.add_argument("--installed", action="store_true",
                        help="measure the gateway this Python has installed (a compiled build's venv), not a tree")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--keygate-only", action="store_true",
                        help="skip the client-and-upstream runs (for counting instructions: see below)")
    parser.add_argument("--redis", metavar="URL",
                        help="rate-limit with a Redis policy on this Redis (bench.py's kg_redis); its own CPU not counted")
    parser.add_argument("--policy", default="redis", choices=("redis", "local-first"),
                        help="the Redis policy with --redis (redis)")
    args = parser.parse_args()
    args.tree = None if args.installed else args.tree.resolve()
    try:
        import uvloop
    except ImportError:
        asyncio.run(main_async(args))
    else:
        uvloop.run(main_async(args))


if __name__ == "__main__":
    main()
