"""Keygate benchmark: Keygate against nginx as a key-checking gateway, a Python floor and a thin aiohttp proxy.

Run from the repository root (needs ``nginx`` and ``wrk`` on PATH; on Debian
``apt-get install -y nginx-light wrk``; the venv needs ``httptools`` for the
Python floor)::

    .venv/bin/python tests/perf/bench.py [--duration 10] [--connections 32] [--rounds 3]
                                         [--threads 2] [--warmup 1] [--retries 2]
                                         [--targets NAME,...] [--no-redis]
                                         [--json results.json] [--keep]

About 15 s per target per round (9 targets, 3 rounds: about 7 minutes);
``--targets nginx_gw,py_floor,keygate_1w`` measures a subset (nginx, the
upstream, is started whatever is measured). Not part of the test suite:
pytest does not collect ``tests/perf``.

What it does:

1. starts nginx (its own temporary prefix and config, ``daemon off``,
   ``worker_processes 1``, no access log) answering ``200 "ok\\n"`` on a free
   loopback port: an upstream that cannot be the bottleneck (target
   ``nginx``: the upstream measured directly, without a key);
2. starts the references, each forwarding to that nginx and checking the
   bearer key (one of Keygate's own keys):

   * ``nginx_gw``, the C anchor of issue 13: a second nginx set up the same
     way, as a key-checking gateway: a ``map`` of ``$http_authorization``
     (401 JSON for anything else), a ``limit_req`` zone keyed by the key with
     a rate and burst that never refuse, ``allow 127.0.0.0/8; deny all``,
     and ``proxy_pass`` over a pooled keep-alive upstream (``keepalive 64``,
     HTTP/1.1, ``Connection ""``) without the client's ``Authorization``,
     adding ``X-Forwarded-For`` and an identity header as Keygate does;
   * ``py_floor``, the Python floor of issue 13: ``python_floor.py``,
     uvloop + httptools parsers on raw ``asyncio.Protocol``s, a dict key
     check, one coroutine per request, pooled keep-alive upstream
     connections, the same headers added: what Python itself allows;
   * ``thin``, the reference of issue 3, for information: ``thin_proxy.py``,
     aiohttp's low-level server + one shared ``ClientSession`` (+ uvloop
     when importable) that checks the key against a dict and forwards;
3. starts ``keygate serve`` twice (``--workers 1`` and ``--workers 2``), each
   on its own SQLite store in a temporary folder, with every check on: a key
   with a role *and* its own operations, a server list, an IP allowlist
   (127.0.0.0/8), an expiry, a rate limit that never triggers
   (100000000/minute), a route table of three routes (the benchmarked
   ``GET /api/servers/app/status`` matches the second one), the recorder
   writing request records and last-used times, the change feed polled;
   access log off, ``log.level = "warning"``;

   ``nginx_authz``, decision only (issue 14): a third one-worker Keygate
   configured the same way plus its authz listener (``authz.listen``,
   ``authz.trusted_proxies = ["127.0.0.1/32"]``), and an nginx in front of
   it running the shipped snippets of ``deploy/ingress/nginx/`` as they are
   (``auth_request`` over a keep-alive upstream to the authz listener, the
   identity headers copied, the key stripped), forwarding to the same
   upstream nginx; its CPU per request is nginx's and Keygate's summed, and
   each is also reported on its own;
4. for every round, runs ``wrk --latency -t THREADS -c CONNECTIONS -d DURATION``
   with the key against each target in turn (nginx, nginx_gw, py_floor, thin,
   keygate_1w, keygate_2w, nginx_authz, kg_redis, kg_local1st, then again), so drift hits
   all alike. Before each measured run
   it sends a few requests on fresh connections and a 1 s unmeasured wrk run,
   so the key cache is warm and wrk measures the cache-hit path;
   During each run it also reads, from ``/proc``, the CPU the target's
   processes used (``cpu us/req``: CPU time per request, the figure least
   sensitive to a busy machine; the upstream nginx's is not counted for any
   proxy, nor redis-server's for kg_redis and kg_local1st), the CPU used by
   anything else ("other": neither a target, the upstream, redis-server,
   wrk nor this script) and
   the CPU the hypervisor stole ("steal"). A run during which other work
   used more than 25 % of a core or more than 10 % was stolen is marked
   DISTURBED and repeated, up to ``--retries`` times, and left out of the
   medians unless all of a target's runs were disturbed;
   With Redis (unless ``--no-redis``; needs ``redis-server`` on PATH) it
   also starts a ``redis-server`` of its own on a free port and two more
   one-worker Keygates configured like ``keygate_1w`` plus ``redis.url``:
   ``kg_redis`` (``ratelimit.policy = "redis"``: one Lua script call per
   request) and ``kg_local1st`` (``"local-first"``: tokens leased in
   batches); their throughput is reported as ratios to ``keygate_1w`` (the
   in-process policy) measured in the same run: target >= 0.90 for
   ``redis`` (issue 13), >= 0.85 for local-first (issue 4);
5. prints the median over rounds of requests/s, p50, p99 and cpu us/req per
   target, and each target's CPU per request as a multiple of nginx_gw's;
   each Keygate's CPU split into its event loop's threads and the rest (its
   store's thread writing the request records, chiefly: the part of its
   CPU that nginx_gw, with no access log, has no counterpart for); then the
   ratios, by issue, of the targets measured:

   * issue 13, each PASS/FAIL: keygate_1w / nginx_gw CPU per request
     (target <= 2.0), throughput (>= 0.5) and p99 (<= 2.0), plus for
     information the median over rounds of the throughput ratio measured
     back to back (the figure least moved by a machine whose speed drifts);
   * for information: keygate_1w / py_floor and py_floor / nginx_gw;
   * issue 3, against the thin aiohttp proxy (kept for information beside
     issue 13's): keygate_1w ≥ 0.90 × thin throughput, keygate_1w p99 ≤
     1.20 × thin p99 (PASS/FAIL), keygate_1w / thin CPU per request and its
     median of rounds, keygate_2w / thin;
   * the Redis policies against keygate_1w (above);
   * issue 14, decision only: Keygate's own CPU per decision in nginx_authz
     over keygate_1w's CPU per inline request (target <= 0.6, PASS/FAIL),
     and for information nginx_authz's CPU per request (nginx + Keygate)
     and throughput against keygate_1w and nginx_gw;

   ``--json FILE`` also writes everything (raw runs included) as JSON.

Exit status: 0 when the measurement completed, whether or not the targets
were met; 1 when a target process failed to start or answer correctly, or wrk
failed or reported errors (non-2xx/3xx responses, socket errors) — they are
printed; 130 on Ctrl-C. Every process it started is stopped in all cases
(each runs in its own process group, which is signalled on exit).

Caveats:

* Everything shares one machine: on 2 cores, wrk's threads, nginx's worker
  and the proxy under test compete for CPU. Nothing is pinned. Absolute
  figures are therefore low and noisy; the ratios between targets measured
  in the same run are what this is for. Keep ``--threads`` at 1 or 2.
* Run it on a quiet machine: any other load (a test suite, a build, a noisy
  neighbour on a shared VM) moves the throughput ratios by tens of percent.
  Watch the "other" and "steal" columns; the cpu us/req ratio is the most
  stable comparison when they are not near zero.
* ``keygate_2w`` shares the same 2 cores with wrk and nginx, so it shows how
  much of the spare core a second worker can use, not how Keygate scales;
  it is reported for information, not against a target.
* wrk is closed-loop (each connection waits for its answer), so latency
  figures are at saturation and mostly mirror throughput; they hide
  coordinated omission. Use more rounds (``--rounds 5``) for stabler medians.
* The key cache TTL is Keygate's default (30 s); a run longer than that
  includes one re-verification (store read + argon2) per TTL, which is part
  of the real cache-hit path. The recorder writes every 5 s (default), and
  sooner once 1,000 request records wait (some 25 times a second at these
  rates; until 2026-12-07 once 10,000 waited, a tenth of its buffer, and
  the records then waiting made each young garbage collection a 2-5 ms
  pause in the p99), so writing the records of a run falls
  within it, as it does in production; the bench pauses 5 s after each
  Keygate run so a last flush does not land in the next target's
  measurement. (Before 2026-12-04 the buffer filled between two 5 s
  flushes at these rates: part of the records were dropped and part
  written after the measured window, which flattered Keygate's CPU figure
  by about a tenth.)
* The interpreter running the bench runs py_floor, thin and Keygate too, and
  its build moves them all: on one machine a CPython without PGO and LTO
  (pyenv's default build) used 1.2-1.3 x the CPU per request of Debian's
  python3.11 (built with both, as the Dockerfile's python:3.11-slim is) for
  py_floor and Keygate alike, while nginx_gw's did not move. The first line
  prints a speed figure for it (``interpreter_speed``); a venv on another
  interpreter runs the bench on it (``/path/to/venv/bin/python
  tests/perf/bench.py``). So does the compiled build (README, "The compiled
  build"): run the bench with the Python of a venv it is installed in, and
  the first line says ``keygate compiled``.
* uvloop is used by the Python proxies (py_floor, thin, Keygate) only when
  it is installed in the venv (it is optional); the loop in use is printed.
* nginx_gw does less than Keygate even on the cache-hit path: no key
  expiry, operation or server scope, no RateLimit response headers, no
  request record. It is the anchor for what a C gateway costs, and
  py_floor for what Python's own I/O costs, not equivalents.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterable
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PYTHON = sys.executable
KEYGATE = str(Path(sys.executable).with_name("keygate"))
THIN_PROXY = str(HERE / "thin_proxy.py")
PY_FLOOR = str(HERE / "python_floor.py")
PATH = "/api/servers/app/status"  # matches the second route of the table below
BODY = b"ok\n"
RECORDER_FLUSH = 5.0  # Keygate's default recorder.flush_interval, seconds
# Issue 13: keygate_1w against nginx as a key-checking gateway (nginx_gw), measured in the same run.
TARGET_GW_CPU = 2.0  # keygate_1w / nginx_gw CPU per request, at most
TARGET_GW_THROUGHPUT = 0.5  # keygate_1w / nginx_gw requests/s, at least
TARGET_GW_P99 = 2.0  # keygate_1w / nginx_gw p99, at most
TARGET_REDIS = 0.90  # the redis (exact) policy / the in-process policy, throughput, at least
# Issue 3: keygate_1w against the thin aiohttp proxy.
TARGET_THROUGHPUT = 0.90
TARGET_P99 = 1.20
# Issue 4: the local-first Redis policy / the in-process policy, throughput, at least.
TARGET_LOCAL_FIRST = 0.85
# Issue 14: Keygate's CPU per decision (nginx_authz) / its CPU per inline request (keygate_1w), at most.
TARGET_DECISION_CPU = 0.6
# Every target, in the order each round measures them; nginx (the upstream) is always started.
TARGETS = ("nginx", "nginx_gw", "py_floor", "thin", "keygate_1w", "keygate_2w", "nginx_authz", "kg_redis",
           "kg_local1st")
REDIS_TARGETS = ("kg_redis", "kg_local1st")
# A measured run during which other work used more than this much of a core, or the hypervisor
# stole more than this much, is repeated (up to --retries times).
DISTURBED_OTHER_PCT = 25.0
DISTURBED_STEAL_PCT = 10.0


class BenchError(Exception):
    """The measurement cannot go on: a process failed or wrk reported errors."""


# -- processes -------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Processes:
    """Every process started, each in its own session; all stopped by :meth:`stop_all`."""

    def __init__(self) -> None:
        self._started: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], *, log: Path | None = None,
              env: dict[str, str] | None = None, capture: bool = False) -> subprocess.Popen[bytes]:
        out: Any = subprocess.PIPE if capture else (log.open("ab") if log else subprocess.DEVNULL)
        try:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT if (log or capture) else subprocess.DEVNULL,
                env=env, start_new_session=True,  # own group: Ctrl-C reaches only us; we stop them
            )
        except OSError as exc:
            raise BenchError(f"cannot start {name}: {exc}") from None
        finally:
            if log and not capture:
                out.close()
        self._started.append((name, process))
        return process

    def stop(self, process: subprocess.Popen[bytes], timeout: float = 15) -> None:
        """SIGTERM the process's group (nginx's and keygate's workers too), then SIGKILL if needed."""
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                pass
            try:
                process.wait(wait)
                # The leader is gone; make sure no member of its group stays behind.
                try:
                    os.killpg(process.pid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.2)
            except subprocess.TimeoutExpired:
                continue

    def stop_all(self) -> None:
        for _name, process in reversed(self._started):
            self.stop(process)
        self._started.clear()


def wait_http(url: str, process: subprocess.Popen[bytes], name: str, timeout: float = 30.0,
              headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"{name} exited with status {process.returncode} during start-up")
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=1):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"{name} did not answer at {url} within {timeout:.0f}s")


def fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may contain spaces, so split after ")".
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            kids.append(int(entry))
    return kids


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == "0A":
                inodes.add(cols[9])
    return inodes


def _holds_socket(pid: int, inodes: set[str]) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in inodes:
            return True
    return False


CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system, all threads) used so far by these processes."""
    return _stat_cpu(f"/proc/{pid}/stat" for pid in pids)


def main_thread_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by these processes' main threads alone."""
    return _stat_cpu(f"/proc/{pid}/task/{pid}/stat" for pid in pids)


def _stat_cpu(paths: Iterable[str]) -> float:
    total = 0
    for path in paths:
        try:
            fields = Path(path).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def machine_cpu() -> tuple[float, float]:
    """CPU seconds all CPUs spent busy since boot (user, nice, system, irq, softirq), and stolen.

    Steal is time a virtual machine's CPUs were ready to run but the hypervisor ran something else.
    """
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq) / CLK_TCK, steal / CLK_TCK


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def serving_pids(leader: int, port: int) -> list[int]:
    """Pids among ``leader`` and its children that hold a listening socket on ``port``."""
    inodes = _listening_inodes(port)
    return [p for p in [leader, *_children(leader)] if _holds_socket(p, inodes)]


# -- targets ---------------------------------------------------------------


@dataclass
class Target:
    name: str
    url: str
    key: str | None = None
    pids: list[int] = field(default_factory=list)
    # Every process of the target (nginx's master, Keygate's supervisor too), for CPU accounting.
    all_pids: list[int] = field(default_factory=list)
    # Whether it writes in the background after a run (Keygate's recorder).
    flushes: bool = False
    # A target of several programs (nginx_authz): each one's processes, its CPU also reported alone.
    parts: dict[str, list[int]] = field(default_factory=dict)
    # Processes whose main thread runs the event loop (Keygate's serving processes): the CPU of
    # those threads is reported apart from the rest of the target's (its store thread, executor).
    loop_pids: list[int] = field(default_factory=list)
    # Keygate's admin listener: its /metrics say how many request records were written and dropped.
    admin: str = ""

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}


NGINX_CONFIG = """
daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 75s;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
{http}
}}
"""

# The upstream: answers 200 "ok\n" to everything.
NGINX_UPSTREAM = """
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        location / {{
            default_type text/plain;
            return 200 "ok\\n";
        }}
    }}
"""

# nginx as a key-checking gateway, the C anchor of issue 13: what Keygate's cache-hit path does,
# done by nginx. The key is checked against a map (401 JSON otherwise), a limit_req zone keyed by
# the key takes a token (a rate and burst that never refuse: without a burst, two requests in one
# millisecond would), an allowlist of 127.0.0.0/8, and the request goes upstream over pooled
# keep-alive connections without the client's Authorization, with X-Forwarded-For and an identity
# header added.
NGINX_GATEWAY = """
    map_hash_bucket_size 256;  # room for a whole "Bearer <key>"
    map $http_authorization $key_id {{
        "Bearer {key}" "bench";
        default "";
    }}
    limit_req_zone $http_authorization zone=keys:10m rate=1000000r/s;
    upstream app {{
        server {upstream};
        keepalive 64;
        keepalive_requests 100000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        location / {{
            default_type application/json;
            if ($key_id = "") {{
                return 401 '{{"error":"invalid_token"}}';
            }}
            limit_req zone=keys burst=1000000 nodelay;
            allow 127.0.0.0/8;
            deny all;
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "";
            proxy_set_header X-Forwarded-For $remote_addr;  # replaced, as Keygate does for an untrusted peer
            proxy_set_header X-Keygate-Key-Id $key_id;
        }}
    }}
"""


def _start_nginx(procs: Processes, folder: Path, name: str, http: Callable[[int], str]) -> tuple[str, list[int]]:
    """An nginx of its own (temporary prefix, ``daemon off``, one worker); its URL and pids.

    ``http(port)`` is the end of its http block, with a server listening on ``port``.
    """
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(nginx):
        raise BenchError("nginx not found: apt-get install -y nginx")
    prefix = folder / name
    (prefix / "tmp").mkdir(parents=True)
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONFIG.format(prefix=prefix, http=http(port)))
    log = prefix / "stderr.log"
    process = procs.start(name, [nginx, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)],
                          log=log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + PATH, process, name)
    except BenchError as exc:
        raise BenchError(f"{exc}\n{tail(log)}\n{tail(prefix / 'error.log')}") from None
    return url, [process.pid, *_children(process.pid)]


def start_nginx(procs: Processes, folder: Path) -> Target:
    url, pids = _start_nginx(procs, folder, "nginx", lambda port: NGINX_UPSTREAM.format(port=port))
    return Target("nginx", url, pids=pids, all_pids=pids)


def start_nginx_gw(procs: Processes, folder: Path, upstream: str, key: str) -> Target:
    server = upstream.removeprefix("http://")
    url, pids = _start_nginx(procs, folder, "nginx_gw",
                             lambda port: NGINX_GATEWAY.format(port=port, key=key, upstream=server))
    return Target("nginx_gw", url, key=key, pids=pids, all_pids=pids)


def start_thin(procs: Processes, folder: Path, upstream: str, key: str) -> Target:
    port = free_port()
    log = folder / "thin_proxy.log"
    env = {**os.environ, "THIN_PROXY_KEYS": key}
    process = procs.start("thin proxy", [PYTHON, THIN_PROXY, str(port), upstream], log=log, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + PATH, process, "thin proxy")
    except BenchError as exc:
        raise BenchError(f"{exc}\n{tail(log)}") from None
    return Target("thin", url, key=key, pids=[process.pid], all_pids=[process.pid])


def start_py_floor(procs: Processes, folder: Path, upstream: str, key: str) -> Target:
    if importlib.util.find_spec("httptools") is None:
        raise BenchError("py_floor needs httptools: .venv/bin/pip install httptools "
                         "(or leave it out: --targets without py_floor)")
    port = free_port()
    log = folder / "python_floor.log"
    env = {**os.environ, "PY_FLOOR_KEYS": key}
    process = procs.start("python floor", [PYTHON, PY_FLOOR, str(port), upstream], log=log, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + PATH, process, "python floor")
    except BenchError as exc:
        raise BenchError(f"{exc}\n{tail(log)}") from None
    return Target("py_floor", url, key=key, pids=[process.pid], all_pids=[process.pid])


KEYGATE_CONFIG = """\
[proxy]
listen = "127.0.0.1:{proxy_port}"
workers = 1
access_log = false

[admin]
listen = "127.0.0.1:{admin_port}"

[store]
url = "sqlite:///{db}"

[log]
level = "warning"

[ratelimit]
default = "100/minute"

[[upstreams]]
name = "app"
url = "{upstream}"

[[upstreams]]
name = "billing"
url = "{upstream}"

[[routes]]
methods = ["POST"]
path = "/api/servers/{{server}}/deploy"
operation = "deploy"

[[routes]]
methods = ["GET", "HEAD"]
path = "/api/servers/{{server}}/status"
operation = "servers:read"

[[routes]]
path = "/billing/*"
upstream = "billing"
operation = "billing:read"
"""


KEY_OPERATIONS = ("servers:read", "deploy", "read")


async def _create_key(store_url: str, operations: tuple[str, ...] = KEY_OPERATIONS) -> str:
    from gateway.config.schema import Settings
    from gateway.manage.service import KeyService, bootstrap
    from gateway.store import create_store

    store = create_store(store_url)
    await store.open()
    try:
        await bootstrap(store)
        service = KeyService(store, Settings.model_validate({}), actor="bench")
        await service.put_role("bench", ["servers:*", "deploy", "read", "write"])
        _record, key = await service.create_key(
            name="bench", role="bench", operations=list(operations),
            servers=["app"], ip_allowlist=["127.0.0.0/8"], rate_limit="100000000/minute", expires="1y",
        )
        return key
    finally:
        await store.close()


def start_keygate(procs: Processes, folder: Path, upstream: str, workers: int, *, name: str | None = None,
                  extra_env: dict[str, str] | None = None,
                  operations: tuple[str, ...] = KEY_OPERATIONS, extra_config: str = "") -> Target:
    name = name or f"keygate_{workers}w"
    home = folder / name
    home.mkdir()
    proxy_port, admin_port = free_port(), free_port()
    store_url = f"sqlite:///{home / 'keygate.db'}"
    config = home / "keygate.toml"
    config.write_text(KEYGATE_CONFIG.format(proxy_port=proxy_port, admin_port=admin_port,
                                            db=home / "keygate.db", upstream=upstream) + extra_config)
    key = asyncio.run(_create_key(store_url, operations))
    log = home / "keygate.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGATE_")} | (extra_env or {})
    process = procs.start(name, [KEYGATE, "--config", str(config), "serve", "--workers", str(workers)],
                          log=log, env=env)
    admin = f"http://127.0.0.1:{admin_port}"
    try:
        wait_http(admin + "/readyz", process, name)
        deadline = time.monotonic() + 30
        pids = serving_pids(process.pid, proxy_port)
        while len(pids) < workers:
            if process.poll() is not None:
                raise BenchError(f"{name} exited with status {process.returncode} during start-up")
            if time.monotonic() > deadline:
                raise BenchError(f"{name}: only {len(pids)} of {workers} workers listening after 30s")
            time.sleep(0.1)
            pids = serving_pids(process.pid, proxy_port)
    except BenchError as exc:
        raise BenchError(f"{exc}\n{tail(log)}") from None
    return Target(name, f"http://127.0.0.1:{proxy_port}", key=key, pids=pids,
                  all_pids=[process.pid, *_children(process.pid)], flushes=True, loop_pids=pids, admin=admin)


def recorder_counts(target: Target) -> tuple[int, int] | None:
    """Request records the target's recorder has written and records it has dropped so far (its
    /metrics), or None for a target that keeps none. A build that drops records under the load (its
    buffer full: a store slower than the requests) is not charged for writing them, and looks faster
    than it is: the report says so."""
    if not target.admin:
        return None
    with urllib.request.urlopen(target.admin + "/metrics", timeout=10) as response:
        text = response.read().decode()
    written = dropped = 0
    for line in text.splitlines():
        if line.startswith('keygate_recorder_flushed_total{kind="request"}'):
            written = int(float(line.split()[-1]))
        elif line.startswith("keygate_recorder_dropped_total"):
            dropped = int(float(line.split()[-1]))
    return written, dropped


def print_records(targets: Iterable[Target]) -> dict[str, dict[str, int]]:
    """Each Keygate's request records written and dropped over the whole bench (warm-ups included)."""
    counts: dict[str, dict[str, int]] = {}
    for target in targets:
        found = recorder_counts(target)
        if found is None:
            continue
        counts[target.name] = {"written": found[0], "dropped": found[1]}
        print(f"{target.name}: request records written {found[0]}, dropped {found[1]}")
        if found[1]:
            print(f"WARNING: {target.name} dropped {found[1]} request records (its buffer was full): its "
                  "figures leave out writing them and flatter it")
    return counts


SNIPPETS = ROOT / "deploy" / "ingress" / "nginx"

# nginx deciding with Keygate (issue 14): the shipped snippets as they are, an upstream of keep-alive
# connections to the authz listener and one to the app (the upstream nginx), as example.conf has them.
NGINX_AUTHZ = """
    include {snippets}/keygate-http.conf;
    upstream keygate_authz {{
        server {authz};
        keepalive 64;
        keepalive_requests 100000000;
    }}
    upstream app {{
        server {upstream};
        keepalive 64;
        keepalive_requests 100000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        include {snippets}/keygate-auth.conf;
        include {snippets}/keygate-headers.conf;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header X-Forwarded-For $remote_addr;
        location / {{
            proxy_pass http://app;
        }}
    }}
"""


def start_nginx_authz(procs: Processes, folder: Path, upstream: str) -> Target:
    """A one-worker Keygate with its authz listener, and an nginx asking it (auth_request) before the upstream."""
    authz_port = free_port()
    keygate = start_keygate(procs, folder, upstream, workers=1, name="kg_authz", extra_config=(
        f'\n[authz]\nlisten = "127.0.0.1:{authz_port}"\ntrusted_proxies = ["127.0.0.1/32"]\n'))
    url, nginx_pids = _start_nginx(procs, folder, "nginx_authz", lambda port: NGINX_AUTHZ.format(
        port=port, snippets=SNIPPETS, authz=f"127.0.0.1:{authz_port}", upstream=upstream.removeprefix("http://")))
    return Target("nginx_authz", url, key=keygate.key, pids=[*nginx_pids, *keygate.pids],
                  all_pids=[*nginx_pids, *keygate.all_pids], flushes=True,
                  parts={"nginx": nginx_pids, "keygate": keygate.all_pids})


def start_redis(procs: Processes, folder: Path) -> Target:
    """A redis-server of the bench's own on a free port (no persistence); its URL (redis://) and pid."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchError("redis-server not found: apt-get install -y redis-server (or pass --no-redis)")
    port = free_port()
    home = folder / "redis"
    home.mkdir()
    log = home / "redis.log"
    process = procs.start("redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                    "--appendonly", "no", "--dir", str(home)], log=log)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"redis-server exited with status {process.returncode}\n{tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    return Target("redis", f"redis://127.0.0.1:{port}/0", pids=[process.pid],
                                  all_pids=[process.pid])
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"redis-server on port {port} did not answer\n{tail(log)}")


def redis_policy_env(redis_url: str, policy: str) -> dict[str, str]:
    # Each Keygate gets its own prefix: the two policies must not share buckets or cache entries.
    return {"KEYGATE_REDIS__URL": redis_url, "KEYGATE_REDIS__PREFIX": f"bench-{policy}:",
            "KEYGATE_RATELIMIT__POLICY": policy}


def check_target(target: Target) -> None:
    """One correct answer through the target, and (for proxies) refusals where they belong."""
    status, headers, body = fetch(target.url + PATH, target.headers)
    if status != 200 or body != BODY:
        raise BenchError(f"{target.name}: GET {PATH} answered {status} {body[:200]!r}, expected 200 {BODY!r}")
    if target.key is None:
        return
    status, _h, _b = fetch(target.url + PATH)
    if status != 401:
        raise BenchError(f"{target.name}: a request without a key answered {status}, expected 401")
    if target.name.startswith("keygate") or target.name == "nginx_authz":
        if "RateLimit" not in headers:
            raise BenchError(f"{target.name}: no RateLimit header on an allowed response")
        # Scope is enforced: the key is not granted the billing server.
        status, _h, _b = fetch(target.url + "/billing/invoices", target.headers)
        if status != 403:
            raise BenchError(f"{target.name}: a request outside the key's scope answered {status}, expected 403")


def warm(target: Target, requests: int = 16) -> None:
    """A few requests on fresh connections: with 2 workers each gets some and caches the key."""
    for _ in range(requests):
        status, _h, body = fetch(target.url + PATH, target.headers)
        if status != 200 or body != BODY:
            raise BenchError(f"{target.name}: warm-up request answered {status} {body[:200]!r}")


# -- wrk -------------------------------------------------------------------

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_LATENCY = re.compile(r"^\s*(50|75|90|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_TOTAL = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h)", re.M)
_NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


@dataclass
class WrkResult:
    target: str
    round: int
    requests_per_s: float
    p50_ms: float
    p75_ms: float
    p90_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: dict[str, int]
    # CPU the target's processes used per request, and its share of one core during the run.
    cpu_us_per_request: float = float("nan")
    target_cpu_pct: float = float("nan")
    # CPU used by processes that are neither the targets, wrk nor this script (plus kernel work
    # not charged to a process), in % of one core; above ~25 % another workload disturbed the run.
    other_load_pct: float = float("nan")
    # CPU time stolen by the hypervisor, in % of one core (virtual machines only).
    steal_pct: float = float("nan")
    attempts: int = 1
    # CPU per request of each part of a target made of several programs (Target.parts).
    cpu_us_per_request_parts: dict[str, float] = field(default_factory=dict)

    @property
    def disturbed(self) -> bool:
        return self.other_load_pct > DISTURBED_OTHER_PCT or self.steal_pct > DISTURBED_STEAL_PCT


def to_ms(value: str, unit: str) -> float:
    return float(value) * _UNITS[unit]


def parse_wrk(output: str, target: str, round_no: int) -> WrkResult:
    latencies = {p: to_ms(v, u) for p, v, u in _LATENCY.findall(output)}
    rps = _RPS.search(output)
    total = _TOTAL.search(output)
    if rps is None or total is None or not {"50", "99"} <= latencies.keys():
        raise BenchError(f"cannot parse wrk output for {target}:\n{output}")
    non_2xx = _NON_2XX.search(output)
    socket_errors = _SOCKET.search(output)
    return WrkResult(
        target=target, round=round_no, requests_per_s=float(rps[1]),
        p50_ms=latencies["50"], p75_ms=latencies.get("75", float("nan")),
        p90_ms=latencies.get("90", float("nan")), p99_ms=latencies["99"], requests=int(total[1]),
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
        socket_errors=dict(zip(("connect", "read", "write", "timeout"),
                               map(int, socket_errors.groups()))) if socket_errors else {},
    )


def run_wrk(procs: Processes, target: Target, *, duration: int, connections: int, threads: int,
            latency: bool = True) -> str:
    argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration}s", "--timeout", "5s"]
    if latency:
        argv.append("--latency")
    if target.key:
        argv += ["-H", f"Authorization: Bearer {target.key}"]
    argv.append(target.url + PATH)
    process = procs.start("wrk", argv, capture=True)
    try:
        out, _ = process.communicate(timeout=duration + 60)
    except subprocess.TimeoutExpired:
        procs.stop(process)
        raise BenchError(f"wrk against {target.name} did not finish") from None
    text = out.decode(errors="replace")
    if process.returncode != 0:
        raise BenchError(f"wrk against {target.name} exited with status {process.returncode}:\n{text}")
    return text


def measure(procs: Processes, target: Target, round_no: int, args: argparse.Namespace,
            ours: list[int]) -> WrkResult:
    warm(target)
    if args.warmup > 0:
        output = run_wrk(procs, target, duration=args.warmup, connections=args.connections,
                         threads=args.threads, latency=False)
        if _NON_2XX.search(output):
            raise BenchError(f"wrk against {target.name} got non-2xx/3xx responses during warm-up:\n{output}")
    started, (busy, steal) = time.monotonic(), machine_cpu()
    mine, all_ours, wrk = process_cpu(target.all_pids), process_cpu(ours), children_cpu()
    parts = {name: process_cpu(pids) for name, pids in target.parts.items()}
    loop = main_thread_cpu(target.loop_pids)
    output = run_wrk(procs, target, duration=args.duration, connections=args.connections, threads=args.threads)
    wall = time.monotonic() - started
    busy_after, steal_after = machine_cpu()
    busy, steal, mine = busy_after - busy, steal_after - steal, process_cpu(target.all_pids) - mine
    parts = {name: process_cpu(target.parts[name]) - before for name, before in parts.items()}
    if target.loop_pids:
        # The event loop's threads, and the rest of the target's CPU (so the two add up to it).
        loop = main_thread_cpu(target.loop_pids) - loop
        parts = {"event loop": loop, "other threads": mine - loop}
    all_ours, wrk = process_cpu(ours) - all_ours, children_cpu() - wrk
    result = parse_wrk(output, target.name, round_no)
    if result.requests:
        result.cpu_us_per_request = mine / result.requests * 1e6
        result.cpu_us_per_request_parts = {name: cpu / result.requests * 1e6 for name, cpu in parts.items()}
    result.target_cpu_pct = 100 * mine / wall
    result.other_load_pct = max(0.0, 100 * (busy - all_ours - wrk) / wall)
    result.steal_pct = 100 * steal / wall
    errors = {k: v for k, v in result.socket_errors.items() if v}
    if result.non_2xx or errors or result.requests == 0:
        raise BenchError(
            f"wrk against {target.name} reported errors: {result.non_2xx} non-2xx/3xx responses, "
            f"socket errors {errors or 'none'}, {result.requests} requests\n{output}"
        )
    return result


# -- report ----------------------------------------------------------------


def summarize(results: list[WrkResult], names: list[str]) -> dict[str, dict[str, Any]]:
    summary = {}
    for name in names:
        every = [r for r in results if r.target == name]
        # Disturbed runs count only when a target has nothing else.
        mine = [r for r in every if not r.disturbed] or every
        summary[name] = {
            "runs_used": len(mine),
            "runs_disturbed": sum(r.disturbed for r in every),
            "requests_per_s": statistics.median(r.requests_per_s for r in mine),
            "p50_ms": statistics.median(r.p50_ms for r in mine),
            "p99_ms": statistics.median(r.p99_ms for r in mine),
            "cpu_us_per_request": statistics.median(r.cpu_us_per_request for r in mine),
            "cpu_us_per_request_parts": {part: statistics.median(r.cpu_us_per_request_parts[part] for r in mine)
                                         for part in mine[0].cpu_us_per_request_parts},
            "max_other_load_pct": max(r.other_load_pct for r in mine),
            "max_steal_pct": max(r.steal_pct for r in mine),
            "rounds_requests_per_s": [r.requests_per_s for r in every],
            "rounds_p99_ms": [r.p99_ms for r in every],
            "rounds_disturbed": [r.disturbed for r in every],
        }
    return summary


def _check(group: str, value: float, target: str | None = None, passed: bool | None = None) -> dict[str, Any]:
    return {"group": group, "value": value, "target": target, "pass": passed}


def ratios(summary: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every ratio whose targets were measured, by label; those with a target say whether it was met."""
    checks: dict[str, dict[str, Any]] = {}
    one, two = summary.get("keygate_1w"), summary.get("keygate_2w")
    gw, floor, thin, nginx = summary.get("nginx_gw"), summary.get("py_floor"), summary.get("thin"), summary.get("nginx")

    def rps(a: dict[str, Any], b: dict[str, Any]) -> float:
        return a["requests_per_s"] / b["requests_per_s"]

    def p99(a: dict[str, Any], b: dict[str, Any]) -> float:
        return a["p99_ms"] / b["p99_ms"]

    def cpu(a: dict[str, Any], b: dict[str, Any]) -> float:
        return a["cpu_us_per_request"] / b["cpu_us_per_request"]

    group = "issue 13: Keygate against nginx as a key-checking gateway"
    if one and gw:
        value = cpu(one, gw)
        checks["keygate_1w/nginx_gw CPU per request"] = _check(group, value, f"<= {TARGET_GW_CPU}",
                                                                value <= TARGET_GW_CPU)
        value = rps(one, gw)
        checks["keygate_1w/nginx_gw throughput"] = _check(group, value, f">= {TARGET_GW_THROUGHPUT}",
                                                          value >= TARGET_GW_THROUGHPUT)
        value = p99(one, gw)
        checks["keygate_1w/nginx_gw p99"] = _check(group, value, f"<= {TARGET_GW_P99}", value <= TARGET_GW_P99)
        checks["keygate_1w/nginx_gw, median of rounds"] = _check(group, _median_of_rounds(one, gw))
    if one and floor:
        group = "the Python floor, for information"
        checks["keygate_1w/py_floor CPU per request"] = _check(group, cpu(one, floor))
        checks["keygate_1w/py_floor throughput"] = _check(group, rps(one, floor))
        checks["keygate_1w/py_floor p99"] = _check(group, p99(one, floor))
    if floor and gw:
        group = "the Python floor, for information"
        checks["py_floor/nginx_gw CPU per request"] = _check(group, cpu(floor, gw))
        checks["py_floor/nginx_gw throughput"] = _check(group, rps(floor, gw))
    group = "issue 3: against the thin aiohttp proxy"
    if one and thin:
        value = rps(one, thin)
        checks["keygate_1w/thin throughput"] = _check(group, value, f">= {TARGET_THROUGHPUT}",
                                                      value >= TARGET_THROUGHPUT)
        value = p99(one, thin)
        checks["keygate_1w/thin p99"] = _check(group, value, f"<= {TARGET_P99}", value <= TARGET_P99)
        checks["keygate_1w/thin CPU per request"] = _check(group, cpu(one, thin))
        # Each round's two runs are close together, so their ratio is the least moved by a machine
        # whose speed drifts over minutes; for information beside the target's ratio of medians.
        checks["keygate_1w/thin, median of rounds"] = _check(group, _median_of_rounds(one, thin))
    if two and thin:
        checks["keygate_2w/thin throughput"] = _check(group, rps(two, thin))
        checks["keygate_2w/thin p99"] = _check(group, p99(two, thin))
    if thin and nginx:
        checks["thin/nginx throughput"] = _check(group, rps(thin, nginx))
    return {**checks, **redis_ratios(summary), **decision_ratios(summary)}


def _median_of_rounds(one: dict[str, Any], other: dict[str, Any]) -> float:
    """The median over rounds of one's requests/s over other's, leaving out rounds where either was disturbed."""
    pairs = [a / b for a, b, da, db in zip(one["rounds_requests_per_s"], other["rounds_requests_per_s"],
                                           one["rounds_disturbed"], other["rounds_disturbed"]) if not (da or db)]
    return statistics.median(pairs) if pairs else float("nan")


def redis_ratios(summary: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The Redis policies against the in-process policy (keygate_1w) of the same run."""
    local = summary.get("keygate_1w")
    if local is None:
        return {}
    group = "issues 4 and 13: the Redis policies against the in-process one"
    checks: dict[str, dict[str, Any]] = {}
    if "kg_redis" in summary:
        exact = summary["kg_redis"]["requests_per_s"] / local["requests_per_s"]
        checks["kg_redis/keygate_1w throughput"] = _check(group, exact, f">= {TARGET_REDIS}", exact >= TARGET_REDIS)
        checks["kg_redis/keygate_1w p99"] = _check(group, summary["kg_redis"]["p99_ms"] / local["p99_ms"])
    if "kg_local1st" in summary:
        first = summary["kg_local1st"]["requests_per_s"] / local["requests_per_s"]
        checks["kg_local1st/keygate_1w throughput"] = _check(group, first, f">= {TARGET_LOCAL_FIRST}",
                                                             first >= TARGET_LOCAL_FIRST)
    # CPU per request moves least when the machine is busy: the cost of each policy per request.
    for name in REDIS_TARGETS:
        if name in summary:
            checks[f"{name}/keygate_1w CPU per request"] = _check(
                group, summary[name]["cpu_us_per_request"] / local["cpu_us_per_request"])
    return checks


def decision_ratios(summary: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Issue 14: nginx auth_request -> Keygate's authz listener, against Keygate inline and nginx_gw."""
    authz, one, gw = summary.get("nginx_authz"), summary.get("keygate_1w"), summary.get("nginx_gw")
    if authz is None:
        return {}
    group = "issue 14: decision only (nginx auth_request -> Keygate authz)"
    checks: dict[str, dict[str, Any]] = {}
    if one:
        value = authz["cpu_us_per_request_parts"]["keygate"] / one["cpu_us_per_request"]
        checks["Keygate per decision/per inline req CPU"] = _check(group, value, f"<= {TARGET_DECISION_CPU}",
                                                                   value <= TARGET_DECISION_CPU)
        checks["nginx_authz/keygate_1w CPU per request"] = _check(group, authz["cpu_us_per_request"]
                                                                  / one["cpu_us_per_request"])
        checks["nginx_authz/keygate_1w throughput"] = _check(group, authz["requests_per_s"] / one["requests_per_s"])
        checks["nginx_authz/keygate_1w p99"] = _check(group, authz["p99_ms"] / one["p99_ms"])
    if gw:
        checks["nginx_authz/nginx_gw CPU per request"] = _check(group, authz["cpu_us_per_request"]
                                                                / gw["cpu_us_per_request"])
    return checks


def print_report(summary: dict[str, dict[str, Any]], checks: dict[str, dict[str, Any]]) -> None:
    gw = summary.get("nginx_gw")
    print()
    print(f"{'target':<12} {'req/s':>10} {'p50 ms':>9} {'p99 ms':>9} {'cpu us/req':>11} {'x nginx_gw':>10}   "
          "req/s per round (* = disturbed, left out of the median)")
    for name, s in summary.items():
        rounds = " ".join(f"{v:.0f}{'*' if d and s['runs_disturbed'] < len(s['rounds_disturbed']) else ''}"
                          for v, d in zip(s["rounds_requests_per_s"], s["rounds_disturbed"]))
        versus = f"{s['cpu_us_per_request'] / gw['cpu_us_per_request']:>10.2f}" if gw else f"{'':>10}"
        print(f"{name:<12} {s['requests_per_s']:>10.0f} {s['p50_ms']:>9.2f} {s['p99_ms']:>9.2f} "
              f"{s['cpu_us_per_request']:>11.1f} {versus}   {rounds}")
    if gw:
        print("(x nginx_gw: CPU per request as a multiple of nginx_gw's)")
    for name, s in summary.items():
        if s["cpu_us_per_request_parts"]:
            print(f"{name}: cpu us/req " + " + ".join(f"{part} {value:.1f}" for part, value
                                                    in s["cpu_us_per_request_parts"].items())
                  + f" = {s['cpu_us_per_request']:.1f}")
    group = None
    for label, c in checks.items():
        if c["group"] != group:
            group = c["group"]
            print(f"\n{group}")
        verdict = "" if c["pass"] is None else ("PASS" if c["pass"] else "FAIL")
        target = f"(target {c['target']})" if c["target"] else ""
        print(f"  {label:<38} {c['value']:>6.3f}  {target:<16} {verdict}")
    spoiled = [name for name, s in summary.items() if s["runs_disturbed"] == len(s["rounds_disturbed"])]
    partly = [name for name, s in summary.items() if 0 < s["runs_disturbed"] < len(s["rounds_disturbed"])]
    if spoiled:
        print(f"\nWARNING: every run of {', '.join(spoiled)} was disturbed by other load or hypervisor "
              "steal: these figures are unreliable (cpu us/req is the least affected); rerun on a quiet machine.")
    elif partly:
        print(f"\nnote: disturbed runs of {', '.join(partly)} were left out of the medians.")


def interpreter_speed() -> float:
    """Nanoseconds per turn of a fixed pure-Python loop (a dict read, an attribute read, a call), the best of 5.

    The Python targets' CPU per request follows the interpreter's speed, and
    builds differ: a CPython built without PGO and LTO (pyenv's default, say)
    ran this loop about 1.45 times slower than Debian's python3.11 (built
    with both, as the python:3.11-slim image the Dockerfile uses is) on one
    machine, while nginx_gw's figures do not move. Compare ratios between
    runs only at a like figure here.
    """
    import timeit

    class Item:
        __slots__ = ("value",)

        def __init__(self) -> None:
            self.value = 1

    setup = {"table": {"a": Item()}, "get": len, "word": "abc"}
    turns = 2_000
    code = "total = 0\nfor _ in range(%d):\n    total += table['a'].value + get(word)" % turns
    best = min(timeit.repeat(code, globals=setup, number=20, repeat=5))
    return round(best / (20 * turns) * 1e9, 1)


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    def version(argv: list[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except OSError:
            return "?"
        return (done.stdout + done.stderr).strip().splitlines()[0] if (done.stdout + done.stderr).strip() else "?"

    try:
        import uvloop  # noqa: F401
        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    # What the keygate beside this Python runs (README, "The compiled build"): asked from /, where
    # this checkout is not on sys.path, so the venv's own install answers.
    where = subprocess.run([PYTHON, "-c", "import gateway.dataplane.http1 as m; print(m.__file__)"], cwd="/",
                           capture_output=True, text=True, timeout=60)
    build = "?" if where.returncode else "pure Python" if where.stdout.strip().endswith(".py") else "compiled"
    return {
        "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
        "python_executable": sys.executable, "interpreter_ns": interpreter_speed(), "keygate_build": build,
        "aiohttp": aiohttp.__version__, "event_loop": loop, "nginx": version(["nginx", "-v"]),
        "wrk": version(["wrk", "-v"]), "commit": version(["git", "-C", str(ROOT), "rev-parse", "HEAD"]),
        "duration_s": args.duration, "connections": args.connections, "threads": args.threads,
        "rounds": args.rounds, "warmup_s": args.warmup, "path": PATH,
    }


# -- main ------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10, help="whole seconds per measured wrk run (10)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all targets (3)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads; keep 1-2 on 2 cores (2)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="whole seconds of unmeasured wrk before each run; 0 = none (1)")
    parser.add_argument("--retries", type=int, default=2,
                        help="times a run disturbed by other load or hypervisor steal is repeated (2)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON here")
    parser.add_argument("--no-redis", dest="redis", action="store_false",
                        help="leave out the Redis policy targets (kg_redis, kg_local1st)")
    parser.add_argument("--targets", metavar="NAME,...",
                        help="measure only these targets, e.g. nginx,nginx_gw,py_floor,keygate_1w "
                             f"(default: all of {', '.join(TARGETS)}; the Redis ones not with --no-redis)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, stores)")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.connections < 1 or args.rounds < 1 or args.threads < 1 or args.retries < 0:
        parser.error("--duration, --connections, --rounds and --threads must be positive, --retries >= 0")
    if args.connections < args.threads:
        parser.error("wrk needs at least one connection per thread")
    if args.targets is None:
        args.targets = [t for t in TARGETS if args.redis or t not in REDIS_TARGETS]
    else:
        wanted = {t.strip() for t in args.targets.split(",") if t.strip()}
        unknown = wanted - set(TARGETS)
        if unknown or not wanted:
            parser.error(f"--targets: unknown {', '.join(sorted(unknown)) or 'nothing'}; "
                         f"choose among {', '.join(TARGETS)}")
        if not args.redis and wanted & set(REDIS_TARGETS):
            parser.error("--targets names a Redis target, and --no-redis leaves them out")
        args.targets = [t for t in TARGETS if t in wanted]  # always measured in the same order
    return args


def bench(args: argparse.Namespace, procs: Processes, folder: Path) -> int:
    if shutil.which("wrk") is None:
        raise BenchError("wrk not found: apt-get install -y wrk")
    env = environment(args)
    print(f"{env['cpus']} CPUs, Python {env['python']} ({env['python_executable']}: {env['interpreter_ns']} ns "
          f"per turn of interpreter_speed's loop), keygate {env['keygate_build']}, aiohttp {env['aiohttp']}, "
          f"loop {env['event_loop']}, {env['nginx']}, {env['wrk']}")
    env["load_before"] = os.getloadavg()[0]
    wanted = args.targets
    nginx = start_nginx(procs, folder)  # the upstream of every proxy
    started: dict[str, Target] = {"nginx": nginx}
    for workers in (1, 2):
        if f"keygate_{workers}w" in wanted:
            started[f"keygate_{workers}w"] = start_keygate(procs, folder, nginx.url, workers=workers)
    if any(name in wanted for name in REDIS_TARGETS):
        # Issue 4: the same Keygate (1 worker) with global rate limits in Redis, exact and local-first.
        # Its CPU is not the proxy's, but not other load either: it is in `ours` below.
        started["redis"] = redis = start_redis(procs, folder)
        for name, policy in (("kg_redis", "redis"), ("kg_local1st", "local-first")):
            if name in wanted:
                started[name] = start_keygate(procs, folder, nginx.url, workers=1, name=name,
                                              extra_env=redis_policy_env(redis.url, policy))
    if "nginx_authz" in wanted:
        started["nginx_authz"] = start_nginx_authz(procs, folder, nginx.url)
    # The references check a key of Keygate's own (same request bytes), or one made up when no Keygate runs.
    key = next((t.key for t in started.values() if t.key), None) or f"kg_bench_{secrets.token_urlsafe(32)}"
    for name, start in (("nginx_gw", start_nginx_gw), ("py_floor", start_py_floor), ("thin", start_thin)):
        if name in wanted:
            started[name] = start(procs, folder, nginx.url, key)
    targets = [started[name] for name in TARGETS if name in wanted]
    for target in targets:
        check_target(target)
        print(f"  {target.name:<11} {target.url}  pids {' '.join(map(str, target.pids))}")
    print(f"wrk -t {args.threads} -c {args.connections} -d {args.duration}s --latency, "
          f"{args.rounds} round(s), GET {PATH}")

    # Every process of ours (the upstream nginx and redis-server too): the rest is "other" load.
    ours = sorted({pid for t in started.values() for pid in t.all_pids} | {os.getpid()})
    results: list[WrkResult] = []
    for round_no in range(1, args.rounds + 1):
        for target in targets:
            for attempt in range(1, args.retries + 2):
                result = measure(procs, target, round_no, args, ours)
                result.attempts = attempt
                if not result.disturbed or attempt == args.retries + 1:
                    break
                print(f"  round {round_no} {target.name:<11} disturbed (other {result.other_load_pct:.0f}%, "
                      f"steal {result.steal_pct:.0f}%), repeating", flush=True)
                time.sleep(RECORDER_FLUSH + 0.5 if target.flushes else 1.0)
            results.append(result)
            print(f"  round {round_no} {target.name:<11} {result.requests_per_s:>9.0f} req/s  "
                  f"p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms  "
                  f"cpu {result.cpu_us_per_request:6.1f} us/req ({result.target_cpu_pct:3.0f}%)  "
                  f"other {result.other_load_pct:3.0f}%  steal {result.steal_pct:3.0f}%"
                  + ("  DISTURBED" if result.disturbed else ""), flush=True)
            # Let background work (Keygate's recorder flush) land outside the next run.
            time.sleep(RECORDER_FLUSH + 0.5 if target.flushes else 1.0)

    env["load_after"] = os.getloadavg()[0]
    names = [t.name for t in targets]
    summary = summarize(results, names)
    checks = ratios(summary)
    print_report(summary, checks)
    print()
    records = print_records(targets)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "environment": env,
            "targets": {t.name: {"url": t.url, "pids": t.pids, "all_pids": t.all_pids} for t in targets},
            "runs": [{**asdict(r), "disturbed": r.disturbed} for r in results],
            "summary": summary, "ratios": checks, "request_records": records,
        }, indent=2) + "\n")
        print(f"\nresults written to {args.json}")
    return 0


def run_with_processes(prefix: str, keep: bool, body: Callable[[Processes, Path], int]) -> int:
    """Run ``body(procs, folder)`` in a fresh temporary folder; every process it started is stopped, whatever happens.

    SIGTERM and Ctrl-C interrupt it (exit 130); a BenchError is reported (exit 1).
    """

    def terminate(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    # Interruptible even when started with SIGINT ignored (e.g. as a background job of a script).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    procs = Processes()
    try:
        return body(procs, folder)
    except (BenchError, subprocess.TimeoutExpired) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        # Ctrl-C during clean-up must not leave processes behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        procs.stop_all()
        if keep:
            print(f"kept {folder}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_with_processes("keygate-bench-", args.keep, lambda procs, folder: bench(args, procs, folder))


if __name__ == "__main__":
    sys.exit(main())
