"""Starting real processes for end-to-end tests: an upstream and ``keygate serve``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.config.schema import Settings
from gateway.manage.audit import AuditFilter
from gateway.models import KeyRecord, RequestRecord
from gateway.manage.service import KeyService
from gateway.store import create_store

KEYGATE = str(Path(sys.executable).with_name("keygate"))
UPSTREAM_SCRIPT = str(Path(__file__).with_name("upstream_server.py"))
CHEAP = Settings.model_validate({"keys": {"argon2": {"memory_cost": 1024}}})


def free_port() -> int:
    """A port free on every address: some servers (Caddy's ":PORT" sites) bind all of them, and tests
    bind client sockets to 127.0.0.2 and 127.0.0.3, whose ports a loopback-only check would not see."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` different free ports (as free_port): each held bound until all are drawn, so no two
    are the same port."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


# Sockets behind refusing_port(): bound, never listening, open until the test run ends.
_REFUSING: list[socket.socket] = []


def refusing_port() -> int:
    """A loopback port that refuses connections for the rest of the run: a socket of the test's own
    holds it bound without listening, so no server a later test starts can be given it."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    _REFUSING.append(s)
    return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 20.0, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGATE_")}
    env.update(extra)
    return env


class Upstream:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, UPSTREAM_SCRIPT, str(self.port)], env=clean_env())
        wait_http(self.url + "/__count", process=self.process)

    def count(self, what: str = "seen") -> int:
        """Requests that arrived ("seen") or whose body was read whole ("completed")."""
        with urllib.request.urlopen(self.url + "/__count", timeout=5) as r:
            return int(json.load(r)[what])

    def stop(self) -> None:
        terminate(self.process)


def terminate(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s: a helper server never outlives its test."""
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


@dataclass
class Keygate:
    """A ``keygate serve`` subprocess with its own config file and SQLite store."""

    folder: Path
    upstream_url: str
    config: str = ""
    proxy: str = ""
    workers: int = 1
    upstream_timeout: float = 3
    store_url: str = ""
    env: dict[str, str] = field(default_factory=dict)
    # Settings of the [authz] table besides listen; None = no authz listener.
    authz: str | None = None
    process: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.proxy_port, self.admin_port, self.authz_port = free_ports(3)
        self.proxy_url = f"http://127.0.0.1:{self.proxy_port}"
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        self.authz_url = f"http://127.0.0.1:{self.authz_port}"
        self.store_url = self.store_url or f"sqlite:///{self.folder / 'keygate.db'}"
        self.log_path = self.folder / f"keygate-{self.proxy_port}.log"
        self.config_path = self.folder / f"keygate-{self.proxy_port}.toml"
        self.config_path.write_text(
            f'[proxy]\nlisten = "127.0.0.1:{self.proxy_port}"\nworkers = {self.workers}\nshutdown_grace = 10\n'
            + self.proxy +
            f'[admin]\nlisten = "127.0.0.1:{self.admin_port}"\n'
            + (f'[authz]\nlisten = "127.0.0.1:{self.authz_port}"\n{self.authz}\n' if self.authz is not None else "") +
            f'[store]\nurl = "{self.store_url}"\n'
            f'[recorder]\nflush_interval = 0.2\n'
            f'[keys.argon2]\nmemory_cost = 1024\n'
            f'[[upstreams]]\nname = "app"\nurl = "{self.upstream_url}"\nconnect_timeout = 2\n'
            f'timeout = {self.upstream_timeout}\n'
            + self.config
        )

    def start(self) -> "Keygate":
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [KEYGATE, "--config", str(self.config_path), "serve"], env=clean_env(**self.env),
            stdout=self._log, stderr=self._log, stdin=subprocess.DEVNULL,
        )
        wait_http(self.admin_url + "/healthz", process=self.process)
        wait_http(self.admin_url + "/readyz", process=self.process)
        if self.workers > 1:
            # Every worker must be listening before tests spread requests over them.
            deadline = time.monotonic() + 20
            while self.log().count('"event": "listening"') < self.workers and time.monotonic() < deadline:
                time.sleep(0.05)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            # Leave nothing running, and show why it did not stop (a stuck shutdown logs its tasks;
            # SIGUSR1 has every process write its stacks to the log).
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGUSR1)
            time.sleep(1.0)
            _kill_tree(self.process.pid)
            self.process.wait(5)
            self._log.close()
            raise AssertionError(f"keygate did not stop within {timeout}s of signal {sig}; log tail:\n"
                                 + "\n".join(self.log().splitlines()[-80:])) from None
        self._log.close()
        return code

    async def key(self, **kwargs: Any) -> tuple[KeyRecord, str]:
        """Create a key in this gateway's store, as an operator would."""
        async with self.service() as service:
            return await service.create_key(**kwargs)

    def service(self) -> "_ServiceContext":
        return _ServiceContext(self.store_url)


class _ServiceContext:
    def __init__(self, url: str) -> None:
        self.store = create_store(url)

    async def __aenter__(self) -> KeyService:
        await self.store.open()
        return KeyService(self.store, CHEAP, actor="test:operator")

    async def __aexit__(self, *_exc: object) -> None:
        await self.store.close()


async def audit_events(gateway: Keygate, key_id: str) -> list[tuple[str, dict[str, Any]]]:
    """The key's management events, oldest first, as ``(action, details)``."""
    async with gateway.service() as service:
        page = await service.audit(AuditFilter(key=key_id, type="event"), limit=50)
    return [(entry.item.action, entry.item.details) for entry in reversed(page.entries)]  # type: ignore[union-attr]


async def stored_requests(gateway: Keygate, key_id: str, count: int = 1) -> list[RequestRecord]:
    """The key's request records once the recorder has written at least ``count`` (it flushes every
    0.2 s, so requests a moment apart may land in different flushes)."""
    requests: list[RequestRecord] = []
    for _ in range(100):
        async with gateway.service() as service, service.store.read() as tx:
            requests = await tx.list_requests(key_id=key_id)
        if len(requests) >= count:
            return requests
        await asyncio.sleep(0.1)
    raise AssertionError(f"{len(requests)} of {count} request records reached the store")



def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and its children (the workers of ``keygate serve --workers N``)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry))
    for target in (pid, *children):
        try:
            os.kill(target, signal.SIGKILL)
        except ProcessLookupError:
            pass
