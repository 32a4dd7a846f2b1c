"""Redis for tests: a namespace on the shared server, or a ``redis-server`` of the test's own to kill.

The shared server (``TEST_REDIS_URL``, default 127.0.0.1:6379 db 0) is only
ever used under a prefix unique to the test, and only that prefix's keys are
deleted afterwards. Tests that need Redis to die start their own server on a
free port; that one they may kill and restart.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import redis
import redis.asyncio

SHARED_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def unique_prefix() -> str:
    return f"kgtest:{uuid.uuid4().hex[:12]}:"


def drop_prefix(url: str, prefix: str) -> None:
    """Delete this test's keys, and nothing else."""
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        batch = list(client.scan_iter(match=prefix + "*", count=1000))
        while batch:
            client.delete(*batch[:1000])
            batch = batch[1000:]
    finally:
        client.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_cluster_ports(count: int) -> list[int]:
    """``count`` free ports whose cluster bus ports (each + 10000) are free too: each pair held bound until
    all are drawn, so no two nodes are given the same port, nor one node's port another's bus port."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            held.append(s)
            port = int(s.getsockname()[1])
            if port + 10000 > 65535:
                continue
            bus = socket.socket()
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                bus.close()
                continue
            held.append(bus)
            ports.append(port)
    finally:
        for s in held:
            s.close()
    return ports


class RedisServer:
    """A ``redis-server`` process on a free loopback port, with no persistence."""

    def __init__(self, folder: Path, *args: str, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH (Debian: apt-get install redis-server)")
        self.binary = binary
        self.folder = folder
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.args = args  # more redis-server options (a unix socket, a TLS port); the plain port stays
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> "RedisServer":
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.folder), "--enable-debug-command", "local", *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                # (Its port or cluster bus port taken meanwhile: another server may answer on the port.)
                raise RuntimeError(f"redis-server on port {self.port} exited ({self.process.returncode})")
            try:
                client = redis.Redis(port=self.port, socket_timeout=1)
                client.ping()
                client.close()
                return self
            except redis.RedisError:
                time.sleep(0.02)
        raise TimeoutError(f"redis-server on port {self.port} did not start")

    def kill(self) -> None:
        """Stop it dead (SIGKILL): connections reset, nothing answers on the port."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None


class ClusterServers:
    """A Redis Cluster of ``masters`` masters, each with ``replicas_each`` replicas, on free loopback ports.

    Built with ``redis-server --cluster-enabled yes`` and ``redis-cli --cluster create``;
    ``cluster-node-timeout`` is short, so a killed master is replaced by its replica in a second or two.
    """

    NODE_TIMEOUT_MS = 1000

    def __init__(self, folder: Path, *, masters: int = 3, replicas_each: int = 1) -> None:
        if shutil.which("redis-cli") is None:
            raise RuntimeError("redis-cli is not on PATH (Debian: apt-get install redis-tools)")
        self.folder = folder
        self.masters = masters
        self.replicas_each = replicas_each
        self.servers: list[RedisServer] = []
        self._attempt = 0
        self._new_servers()

    def _new_servers(self) -> None:
        self._attempt += 1
        self.servers = []
        for i, port in enumerate(free_cluster_ports(self.masters * (1 + self.replicas_each))):
            node_dir = self.folder / f"try{self._attempt}-node{i}"
            node_dir.mkdir(parents=True)
            self.servers.append(RedisServer(
                node_dir, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(self.NODE_TIMEOUT_MS), "--cluster-replica-validity-factor", "0",
                port=port,
            ))

    @property
    def url(self) -> str:
        """One seed node, as ``redis.url``: the client discovers the others."""
        return f"redis://127.0.0.1:{self.servers[0].port}"

    @property
    def nodes(self) -> list[str]:
        return [f"127.0.0.1:{server.port}" for server in self.servers]

    def start(self) -> "ClusterServers":
        """Started and healthy; a cluster that does not come up is built once more on new ports (it failed
        once in CI, under the compiled-build test, with no trace of why: the failure now says what each
        node reported)."""
        try:
            self._start_once()
        except (TimeoutError, RuntimeError, subprocess.CalledProcessError) as first:
            report = self.report()
            self.stop()
            self._new_servers()
            try:
                self._start_once()
            except Exception as second:
                self.stop()
                raise RuntimeError(f"the Redis Cluster did not come up twice: {first!r} ({report}); "
                                   f"then {second!r} ({self.report()})") from second
        return self

    def _start_once(self) -> None:
        for server in self.servers:
            server.start()
        subprocess.run(
            ["redis-cli", "--cluster", "create", *self.nodes, "--cluster-replicas", str(self.replicas_each),
             "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, timeout=60,
        )
        self.wait_until_healthy()

    def report(self) -> str:
        """What each node says of itself: its port, whether it runs, its cluster state and role."""
        parts = []
        for server in self.servers:
            running = server.process is not None and server.process.poll() is None
            state = role = "?"
            client = redis.Redis(port=server.port, socket_timeout=1)
            try:
                info = client.execute_command("CLUSTER", "INFO")
                text = info.decode() if isinstance(info, bytes) else str(info)
                state = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                              if line.startswith("cluster_state:")), "?")
                found = client.execute_command("ROLE")[0]
                role = found.decode() if isinstance(found, bytes) else str(found)
            except redis.RedisError as exc:
                state = type(exc).__name__
            finally:
                client.close()
            parts.append(f"{server.port}: {'running' if running else 'not running'}, {state}, {role}")
        return "; ".join(parts)

    def wait_until_healthy(self, timeout: float = 30.0) -> None:
        """Until every live node says the cluster is ok and every slot has a live master."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._healthy():
                return
            time.sleep(0.1)
        raise TimeoutError("the Redis Cluster did not become healthy")

    def _healthy(self) -> bool:
        live = [s for s in self.servers if s.process is not None]
        masters = 0
        for server in live:
            client = redis.Redis(port=server.port, socket_timeout=1)
            try:
                info = client.execute_command("CLUSTER", "INFO")
                text = info.decode() if isinstance(info, bytes) else str(info)
                if "cluster_state:ok" not in text:
                    return False
                if client.execute_command("ROLE")[0] in (b"master", "master"):
                    masters += 1 if client.execute_command("CLUSTER", "COUNTKEYSINSLOT", 0) is not None else 0
            except redis.RedisError:
                return False
            finally:
                client.close()
        return masters == len(self.servers) // (1 + self.replicas_each)

    def master_for(self, key: str) -> RedisServer:
        """The live server that is master of ``key``'s hash slot now."""
        for server in self.servers:
            if server.process is None:
                continue
            client = redis.Redis(port=server.port, socket_timeout=1)
            try:
                slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
                for start, end, master, *_replicas in client.execute_command("CLUSTER", "SLOTS"):
                    if start <= slot <= end:
                        port = int(master[1])
                        return next(s for s in self.servers if s.port == port)
            finally:
                client.close()
        raise LookupError(f"no live node knows the master of {key!r}")

    def drop_prefix(self, prefix: str) -> None:
        """Delete a test's keys on every master."""
        for server in self.servers:
            if server.process is None:
                continue
            client = redis.Redis(port=server.port, socket_timeout=5)
            try:
                if client.execute_command("ROLE")[0] not in (b"master", "master"):
                    continue
                for name in list(client.scan_iter(match=prefix + "*", count=1000)):
                    client.delete(name)
            except redis.RedisError:
                pass
            finally:
                client.close()

    def stop(self) -> None:
        for server in self.servers:
            server.kill()


class _WholeCluster(redis.asyncio.RedisCluster):
    """A cluster client whose KEYS asks every master, as KEYS on one server sees every key."""

    async def keys(self, pattern: object = "*", **kwargs: object) -> list[bytes]:  # type: ignore[override]
        return await super().keys(pattern, target_nodes=redis.asyncio.RedisCluster.PRIMARIES)  # type: ignore[no-any-return]


def raw_client(url: str, *, cluster: bool) -> redis.asyncio.Redis | redis.asyncio.RedisCluster:
    """A plain client of the test's Redis (one server or the cluster), to look behind Keygate's back."""
    if cluster:
        return _WholeCluster.from_url(url)
    return redis.asyncio.Redis.from_url(url)
