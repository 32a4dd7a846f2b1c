"""Wrong-secret flood: a legitimate, cached key's latency while attackers guess secrets for known key ids.

Run from the repository root (needs ``nginx`` on PATH; on Debian ``apt-get install -y nginx``)::

    .venv/bin/python tests/perf/flood.py [--duration 20] [--rate 200] [--connections 50] [--ids 9]
                                         [--source DIR] [--json results.json] [--keep]

About 2 x ``--duration`` seconds plus start-up. Not part of the test suite:
pytest does not collect ``tests/perf``.

What it does (issue 11, finding 3):

1. starts nginx answering ``200 "ok\\n"`` (as ``bench.py`` does) and one
   ``keygate serve`` (1 worker, SQLite, ``proxy.trusted_proxies =
   ["127.0.0.1/32"]``, every other setting at its default: argon2 costs,
   failure limits, cache TTL), with a legitimate key and ``--ids`` (9) victim
   keys whose ids the attackers know (ids are public);
2. **idle**: a prober sends the legitimate key at ``--rate`` requests per
   second (open loop: each request is sent at its scheduled time on one of
   8 keep-alive connections, and its latency is measured from that time, so
   a stalled gateway shows as latency rather than as fewer requests) for
   ``--duration`` seconds; the key is warmed first, so it is a cache hit;
3. **flood**: the same again while a separate process floods the gateway on
   ``--connections`` (50) keep-alive connections, closed loop, with wrong
   secrets (random, valid checksum) for the victim ids, each request from a
   different ``X-Forwarded-For`` address (random, across many networks);
4. prints p50/p99 idle and during the flood, the ratio of the p99s (target:
   at most 2), the flood's rate and answers, and the gateway's argon2
   verifications and refused lookups from ``/metrics``.

``--source DIR`` runs ``keygate`` from another source tree (e.g. an
unpacked ``git archive main``) with this venv's packages, to measure the code
before a change with the same script. Keys are made with this tree's
``gateway`` package (the store schema must match).

Exit status: 0 when the measurement completed, whether or not the target
was met; 1 when a process failed to start or the legitimate key was ever
refused; 130 on Ctrl-C. Everything started is stopped.

Caveats: everything shares one machine; on 2 cores the flooder, nginx, the
prober and Keygate compete for CPU, so the absolute figures are noisy, and
the ratio is what this is for. Run it on a quiet machine: each phase prints
the CPU that anything else on the machine used ("other load"); a phase with
more than a few percent is disturbed, and its p99 says little.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import shutil
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for path in (str(ROOT), str(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)

from bench import (  # noqa: E402
    KEYGATE, PYTHON, BenchError, Processes, _children, children_cpu, free_port, machine_cpu, process_cpu,
    run_with_processes, start_nginx, tail, wait_http,
)

PATH = "/flood/probe"
TARGET_RATIO = 2.0
PROBE_CONNECTIONS = 8

CONFIG = """\
[proxy]
listen = "127.0.0.1:{proxy_port}"
workers = 1
trusted_proxies = ["127.0.0.1/32"]

[admin]
listen = "127.0.0.1:{admin_port}"

[store]
url = "sqlite:///{db}"

[log]
level = "warning"

[ratelimit]
default = "100000000/minute"

[[upstreams]]
name = "app"
url = "{upstream}"
"""


# -- keys ------------------------------------------------------------------


async def _create_keys(store_url: str, victims: int) -> tuple[str, list[str]]:
    """The legitimate key, and the victims' ids; argon2 at the default cost, as in production."""
    from gateway.config.schema import Settings
    from gateway.manage.service import KeyService, bootstrap
    from gateway.store import create_store

    store = create_store(store_url)
    await store.open()
    try:
        await bootstrap(store)
        service = KeyService(store, Settings.model_validate({}), actor="flood")
        _, key = await service.create_key(name="legitimate", role="admin")
        ids = [(await service.create_key(name=f"victim-{i}", role="admin"))[0].id for i in range(victims)]
        return key, ids
    finally:
        await store.close()


def wrong_key(key_id: str) -> str:
    """A well-formed key for ``key_id`` (valid checksum) with a random secret."""
    from gateway.keys import SECRET_LENGTH, checksum, random_base62

    body = key_id + random_base62(SECRET_LENGTH)
    return body + checksum(body)


def random_address(rng: random.Random) -> str:
    return f"{rng.randrange(1, 224)}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"


# -- processes -------------------------------------------------------------


def start_keygate(procs: Processes, folder: Path, upstream: str, victims: int,
                  source: Path | None) -> tuple[str, str, str, list[str], list[int]]:
    """``keygate serve``; its proxy and admin URLs, the legitimate key, the victim ids and its pids."""
    home = folder / "keygate"
    home.mkdir()
    proxy_port, admin_port = free_port(), free_port()
    db = home / "keygate.db"
    config = home / "keygate.toml"
    config.write_text(CONFIG.format(proxy_port=proxy_port, admin_port=admin_port, db=db, upstream=upstream))
    key, ids = asyncio.run(_create_keys(f"sqlite:///{db}", victims))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGATE_")}
    argv = [KEYGATE]
    if source is not None:
        # First on sys.path: ahead of the working directory and of this tree's editable install.
        argv = [PYTHON, "-c", f"import sys; sys.path.insert(0, {str(source)!r}); "
                "from gateway.cli import main; sys.exit(main())"]
    log = home / "keygate.log"
    process = procs.start("keygate", [*argv, "--config", str(config), "serve"], log=log, env=env)
    admin = f"http://127.0.0.1:{admin_port}"
    try:
        wait_http(admin + "/readyz", process, "keygate")
    except BenchError as exc:
        raise BenchError(f"{exc}\n{tail(log)}") from None
    return f"http://127.0.0.1:{proxy_port}", admin, key, ids, [process.pid, *_children(process.pid)]


class OtherLoad:
    """CPU used on the machine by anything but this benchmark's processes, as % of one core, over a phase."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self._start = self._sample()
        self._at = time.monotonic()

    def _sample(self) -> tuple[float, float]:
        own = resource.getrusage(resource.RUSAGE_SELF)
        ours = process_cpu(self.pids) + own.ru_utime + own.ru_stime + children_cpu()
        return machine_cpu()[0], ours

    def percent(self) -> float:
        machine, ours = self._sample()
        return max(0.0, (machine - self._start[0]) - (ours - self._start[1])) / (time.monotonic() - self._at) * 100


def scrape(admin: str) -> dict[str, float]:
    """The /metrics samples this report uses, by name and labels."""
    with urllib.request.urlopen(admin + "/metrics", timeout=5) as r:
        text = r.read().decode()
    wanted = ("keygate_argon2_verifications_total", "keygate_lookups_refused_total", "keygate_argon2_skipped_total")
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(wanted):
            name, _, value = line.rpartition(" ")
            found[name] = float(value)
    return found


# -- the prober (this process) ---------------------------------------------


async def probe(url: str, key: str, *, rate: float, duration: float) -> tuple[list[float], dict[int, int]]:
    """Latencies (seconds) of requests sent at ``rate`` per second for ``duration`` seconds, and their statuses."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    headers = {"Authorization": f"Bearer {key}"}
    connector = aiohttp.TCPConnector(limit=PROBE_CONNECTIONS)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def one(scheduled: float) -> None:
            async with http.get(url + PATH, headers=headers) as r:
                await r.read()
                statuses[r.status] = statuses.get(r.status, 0) + 1
            latencies.append(time.perf_counter() - scheduled)

        for _ in range(PROBE_CONNECTIONS * 4):  # warm: connections open, the key cached
            await one(time.perf_counter())
        latencies.clear()
        statuses.clear()
        loop_start = time.perf_counter()
        tasks = []
        n = int(rate * duration)
        for i in range(n):
            scheduled = loop_start + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(scheduled)))
        await asyncio.gather(*tasks)
    return latencies, statuses


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- the flooder (a child process) -----------------------------------------


async def flood(url: str, ids: list[str], connections: int, duration: float) -> dict[str, Any]:
    rng = random.Random()
    statuses: dict[int, int] = {}
    deadline = time.monotonic() + duration
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def lane() -> None:
            while time.monotonic() < deadline:
                headers = {"Authorization": f"Bearer {wrong_key(rng.choice(ids))}",
                           "X-Forwarded-For": random_address(rng)}
                async with http.get(url + PATH, headers=headers) as r:
                    await r.read()
                    statuses[r.status] = statuses.get(r.status, 0) + 1

        started = time.monotonic()
        await asyncio.gather(*(lane() for _ in range(connections)))
        elapsed = time.monotonic() - started
    return {"statuses": statuses, "requests": sum(statuses.values()), "seconds": elapsed}


def flooder_main(args: argparse.Namespace) -> int:
    try:
        import uvloop  # the flooder should be as fast as it can be
        run = uvloop.run
    except ImportError:
        run = asyncio.run
    result = run(flood(args.flood_url, args.flood_ids.split(","), args.connections, args.duration))
    print(json.dumps(result), flush=True)
    return 0


# -- main ------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds idle, then seconds of flood")
    parser.add_argument("--rate", type=float, default=200.0, help="legitimate requests per second")
    parser.add_argument("--connections", type=int, default=50, help="flood connections")
    parser.add_argument("--ids", type=int, default=9, help="victim key ids the flood guesses secrets for")
    parser.add_argument("--source", type=Path, help="run keygate from this source tree instead")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, store)")
    parser.add_argument("--flood-url", help=argparse.SUPPRESS)
    parser.add_argument("--flood-ids", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.rate <= 0 or args.connections < 1 or args.ids < 1:
        parser.error("--duration, --rate, --connections and --ids must be positive")
    return args


def run(args: argparse.Namespace, procs: Processes, folder: Path) -> int:
    nginx = start_nginx(procs, folder)
    proxy, admin, key, ids, pids = start_keygate(procs, folder, nginx.url, args.ids, args.source)
    pids += nginx.all_pids
    print(f"keygate {proxy} ({'source ' + str(args.source) if args.source else 'this tree'}), "
          f"{args.ids} victim ids, prober {args.rate:.0f} req/s, flood {args.connections} connections, "
          f"{args.duration:.0f} s each phase", flush=True)

    load = OtherLoad(pids)
    idle, idle_statuses = asyncio.run(probe(proxy, key, rate=args.rate, duration=args.duration))
    idle_other = load.percent()
    before = scrape(admin)
    load = OtherLoad(pids)
    flooder = procs.start("flooder", [PYTHON, __file__, "--flood-url", proxy, "--flood-ids", ",".join(ids),
                                      "--connections", str(args.connections), "--duration", str(args.duration)],
                          capture=True)
    flooded, flood_statuses = asyncio.run(probe(proxy, key, rate=args.rate, duration=args.duration))
    out, _ = flooder.communicate(timeout=args.duration + 60)
    flood_other = load.percent()
    after = scrape(admin)
    try:
        attack = json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise BenchError(f"the flooder failed: {out.decode(errors='replace')[-2000:]}") from None

    figures = {
        "idle": {"p50_ms": statistics.median(idle) * 1000, "p99_ms": percentile(idle, 0.99) * 1000,
                 "requests": len(idle), "statuses": idle_statuses, "other_load_pct": idle_other},
        "flood": {"p50_ms": statistics.median(flooded) * 1000, "p99_ms": percentile(flooded, 0.99) * 1000,
                  "requests": len(flooded), "statuses": flood_statuses, "other_load_pct": flood_other},
        "attack": {"requests": attack["requests"], "per_second": attack["requests"] / attack["seconds"],
                   "statuses": attack["statuses"]},
        "metrics_during_flood": {name: after.get(name, 0.0) - before.get(name, 0.0)
                                 for name in sorted(set(after) | set(before))},
    }
    figures["p99_ratio"] = figures["flood"]["p99_ms"] / figures["idle"]["p99_ms"]
    figures["p50_ratio"] = figures["flood"]["p50_ms"] / figures["idle"]["p50_ms"]
    i, f = figures["idle"], figures["flood"]
    for name, phase in (("idle", i), ("flood", f)):
        print(f"{name:<7} p50 {phase['p50_ms']:7.2f} ms  p99 {phase['p99_ms']:7.2f} ms  ({phase['requests']} "
              f"requests {phase['statuses']}; other load on the machine {phase['other_load_pct']:.0f}% of a core)")
    verdict = "PASS" if figures["p99_ratio"] <= TARGET_RATIO else "FAIL"
    print(f"ratio   p50 {figures['p50_ratio']:.2f}x  p99 {figures['p99_ratio']:.2f}x  "
          f"(target p99 <= {TARGET_RATIO:.0f}x: {verdict})")
    a = figures["attack"]
    print(f"attack  {a['requests']} requests, {a['per_second']:.0f}/s, answers {a['statuses']}")
    for name, delta in figures["metrics_during_flood"].items():
        print(f"        {name} +{delta:.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    refused = {s: n for s, n in {**idle_statuses, **flood_statuses}.items() if s != 200}
    if refused:
        print(f"error: the legitimate key was refused: {refused}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.flood_url:
        return flooder_main(args)
    if shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"):
        print("error: nginx not found: apt-get install -y nginx", file=sys.stderr)
        return 1

    return run_with_processes("keygate-flood-", args.keep, lambda procs, folder: run(args, procs, folder))


if __name__ == "__main__":
    sys.exit(main())
