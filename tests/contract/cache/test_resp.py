"""The lean RESP client against a redis-server of the test's own: pipelining, errors, AUTH, TLS, a dying server."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.exceptions import AuthenticationError, NoScriptError, RedisError, ResponseError

from gateway.cache.redis_link import RedisLink, RedisUnavailable, redis_client
from gateway.cache.resp import CONNECT_TASK, RespClient, command
from gateway.config.schema import RedisSettings

from ...redis_server import RedisServer, free_port


def resp_for(url: str, timeout: float = 2.0) -> RespClient:
    """A lean client configured as Keygate configures redis-py for ``url`` (as RedisLink makes it)."""
    return RespClient(redis_client(RedisSettings(url=url, timeout=timeout)), timeout=timeout)


def batch(*commands: tuple[str | int | float, ...]) -> tuple[bytes, int]:
    return b"".join(command(*c) for c in commands), len(commands)


@pytest.fixture
async def resp(own_redis: RedisServer) -> AsyncIterator[RespClient]:
    client = resp_for(own_redis.url)
    yield client
    await client.close()


@pytest.fixture
def admin(own_redis: RedisServer) -> Iterator[redis.Redis]:
    """redis-py on the test's server, to set it up and look at what the lean client did."""
    client = redis.Redis(port=own_redis.port, socket_timeout=5)
    yield client
    client.close()


# --- pipelining ------------------------------------------------------------------------------------


async def test_pipelined_batches_are_answered_in_order(resp: RespClient) -> None:
    """Batches sent before the first is answered share one connection, and each gets its own replies."""
    first = asyncio.ensure_future(resp.execute(*batch(("DEBUG", "SLEEP", "1"), ("INCR", "n"))))
    await asyncio.sleep(0.05)  # the first batch is on the wire, Redis asleep on it
    second = asyncio.ensure_future(resp.execute(*batch(("INCR", "n"))))
    third = asyncio.ensure_future(resp.execute(*batch(("INCR", "n"), ("GET", "n"))))
    await asyncio.sleep(0.05)
    assert resp.in_flight == 3
    assert await asyncio.gather(first, second, third) == [[b"OK", 1], [2], [3, b"3"]]
    assert resp.connects == 1 and resp.in_flight == 0


async def test_a_batch_larger_than_one_read_is_reassembled(resp: RespClient) -> None:
    """Replies split across many reads still reach their batch whole and in order."""
    commands = [("ECHO", f"{i}:" + "x" * 1000) for i in range(2000)]
    replies = await resp.execute(*batch(*commands))
    assert replies == [c[1].encode() for c in commands]


async def test_error_replies_are_values_of_redis_py_types(resp: RespClient) -> None:
    """An error reply is returned in its slot as the exception redis-py raises, the other replies intact."""
    replies = await resp.execute(*batch(
        ("SET", "s", "text"), ("EVALSHA", "0" * 40, 0), ("INCR", "s"), ("GET", "s"),
    ))
    assert replies[0] == b"OK" and replies[3] == b"text"
    assert isinstance(replies[1], NoScriptError)
    assert type(replies[2]) is ResponseError and "not an integer" in str(replies[2])


# --- connecting: what redis.url says -----------------------------------------------------------------


async def test_password_from_the_url(own_redis: RedisServer, admin: redis.Redis) -> None:
    """A password in the URL is sent with AUTH before the first command."""
    admin.config_set("requirepass", "s3cret")
    client = resp_for(f"redis://:s3cret@127.0.0.1:{own_redis.port}/0")
    try:
        assert await client.execute(*batch(("PING",))) == [b"PONG"]
    finally:
        await client.close()


async def test_user_and_password_from_the_url(own_redis: RedisServer, admin: redis.Redis) -> None:
    """A user and password in the URL authenticate as that ACL user."""
    admin.acl_setuser("alice", enabled=True, passwords=["+pa:ss"], keys=["*"], commands=["+@all"])
    client = resp_for(f"redis://alice:pa%3Ass@127.0.0.1:{own_redis.port}/0")
    try:
        assert await client.execute(*batch(("ACL", "WHOAMI"))) == [b"alice"]
    finally:
        await client.close()


async def test_wrong_password_is_an_authentication_error(own_redis: RedisServer, admin: redis.Redis) -> None:
    """A refused AUTH fails the call with redis-py's AuthenticationError, a RedisError the link counts as down."""
    admin.config_set("requirepass", "s3cret")
    client = resp_for(f"redis://:wrong@127.0.0.1:{own_redis.port}/0")
    try:
        with pytest.raises(AuthenticationError):
            await client.execute(*batch(("PING",)))
    finally:
        await client.close()


async def test_a_server_that_never_answers_costs_one_connect_timeout() -> None:
    """A peer that accepts the connection but not the AUTH fails within the timeout, as a connection error."""
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen()  # the handshake completes in the backlog; nothing is ever read or answered
        client = resp_for(f"redis://:s3cret@127.0.0.1:{mute.getsockname()[1]}/0", timeout=0.2)
        try:
            started = time.monotonic()
            with pytest.raises(redis.exceptions.ConnectionError, match="Error connecting"):
                await client.execute(*batch(("PING",)))
            assert time.monotonic() - started < 1.0
        finally:
            await client.close()


async def test_database_from_the_url(own_redis: RedisServer) -> None:
    """The database number in the URL is selected on connect."""
    client = resp_for(f"redis://127.0.0.1:{own_redis.port}/3")
    try:
        await client.execute(*batch(("SET", "where", "three")))
    finally:
        await client.close()
    with redis.Redis(port=own_redis.port, db=3) as three, redis.Redis(port=own_redis.port, db=0) as zero:
        assert three.get("where") == b"three" and zero.get("where") is None


async def test_unix_socket_from_the_url(tmp_path: Path) -> None:
    """A unix:// URL connects to the socket, with its db parameter."""
    socket_path = tmp_path / "redis.sock"
    server = RedisServer(tmp_path, "--unixsocket", str(socket_path)).start()
    client = resp_for(f"unix://{socket_path}?db=2")
    try:
        await client.execute(*batch(("SET", "where", "two")))
        with redis.Redis(port=server.port, db=2) as two:
            assert two.get("where") == b"two"
    finally:
        await client.close()
        server.kill()


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[RedisServer, int, Path]]:
    """A redis-server with a TLS port, its certificate for 127.0.0.1 signed by a CA of the test's own."""
    openssl = shutil.which("openssl")
    assert openssl is not None, "openssl is not on PATH (Debian: apt-get install openssl)"

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=tmp_path, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "1", "-subj", "/CN=keygate test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1")
    (tmp_path / "san.ext").write_text("subjectAltName = IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "1", "-extfile", "san.ext")
    tls_port = free_port()
    server = RedisServer(
        tmp_path, "--tls-port", str(tls_port), "--tls-cert-file", str(tmp_path / "server.pem"),
        "--tls-key-file", str(tmp_path / "server.key"), "--tls-ca-cert-file", str(tmp_path / "ca.pem"),
        "--tls-auth-clients", "no",
    ).start()
    yield server, tls_port, tmp_path / "ca.pem"
    server.kill()


async def test_tls_verified_against_the_configured_ca(tls_redis: tuple[RedisServer, int, Path]) -> None:
    """rediss:// speaks TLS and verifies the server's certificate against ssl_ca_certs, as redis-py does."""
    _server, tls_port, ca = tls_redis
    client = resp_for(f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={ca}")
    try:
        assert await client.execute(*batch(("PING",))) == [b"PONG"]
    finally:
        await client.close()


async def test_tls_refuses_an_unverified_server(tls_redis: tuple[RedisServer, int, Path]) -> None:
    """Without the CA that signed it, the server's certificate is refused: a connection error, no command sent."""
    _server, tls_port, _ca = tls_redis
    client = resp_for(f"rediss://127.0.0.1:{tls_port}/0")
    try:
        with pytest.raises(redis.exceptions.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            await client.execute(*batch(("PING",)))
    finally:
        await client.close()


async def test_a_missing_ca_file_fails_the_connection_not_the_start(tmp_path: Path) -> None:
    """A CA file that cannot be read is a connection error on first use, as with redis-py, not a crash."""
    client = resp_for(f"rediss://127.0.0.1:{free_port()}/0?ssl_ca_certs={tmp_path / 'missing.pem'}")
    try:
        with pytest.raises(redis.exceptions.ConnectionError):
            await client.execute(*batch(("PING",)))
    finally:
        await client.close()


# --- losing the connection ---------------------------------------------------------------------------


async def test_killed_server_fails_pending_batches_with_a_connection_error(
    own_redis: RedisServer, resp: RespClient
) -> None:
    """Batches waiting when Redis dies fail with redis-py's ConnectionError, a RedisError the link counts as down."""
    asleep = asyncio.ensure_future(resp.execute(*batch(("DEBUG", "SLEEP", "5"), ("PING",))))
    queued = asyncio.ensure_future(resp.execute(*batch(("PING",))))
    await asyncio.sleep(0.1)
    own_redis.kill()
    for pending in (asleep, queued):
        with pytest.raises(redis.exceptions.ConnectionError) as caught:
            await pending
        assert isinstance(caught.value, RedisError)


async def test_next_call_after_a_loss_reconnects(own_redis: RedisServer, resp: RespClient) -> None:
    """After the server is back, the next call opens a new connection and is answered."""
    assert await resp.execute(*batch(("PING",))) == [b"PONG"]
    own_redis.kill()
    with pytest.raises(redis.exceptions.ConnectionError):
        await resp.execute(*batch(("PING",)))
    own_redis.start()
    assert await resp.execute(*batch(("PING",))) == [b"PONG"]
    assert resp.connects == 2


class HoldingRelay:
    """A TCP relay to Redis on ``port`` that holds the first connection's replies until :attr:`release` is set,
    and tells when the client has closed that connection."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.release = asyncio.Event()
        self.first_open = asyncio.Event()
        self.first_closed = asyncio.Event()
        self.accepted = 0
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.accepted += 1
            first = self.accepted == 1
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)

            async def up() -> None:
                try:
                    while data := await reader.read(65536):
                        up_writer.write(data)
                        if first:
                            self.first_open.set()  # the client sent its setup: it is waiting for the reply
                finally:  # closed or reset by the client
                    if first:
                        self.first_closed.set()
                    up_writer.close()

            async def down() -> None:
                while data := await up_reader.read(65536):
                    if first:
                        await self.release.wait()
                    writer.write(data)

            await asyncio.gather(up(), down(), return_exceptions=True)
            writer.close()

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


@asynccontextmanager
async def opening_held(own_redis: RedisServer) -> AsyncIterator[tuple[RespClient, HoldingRelay, asyncio.Future[Any]]]:
    """A client whose first connection is being opened (database 1: SELECT is part of opening; the relay holds
    its reply), and the PING batch waiting for it."""
    relay = HoldingRelay(own_redis.port)
    port = await relay.start()
    resp = resp_for(f"redis://127.0.0.1:{port}/1")
    try:
        opening = asyncio.ensure_future(resp.execute(*batch(("PING",))))
        await asyncio.wait_for(relay.first_open.wait(), 5)  # connected, SELECT sent, its reply held
        yield resp, relay, opening
    finally:
        relay.release.set()
        await resp.close()
        relay.close()


async def test_a_connection_being_opened_when_dropped_is_not_kept(own_redis: RedisServer) -> None:
    """RedisLink drops the connection when Redis fails (a failover may have put another server behind redis.url):
    an attempt under way then, opened before the failure, is given up too. Its batch fails as a connection
    error, what it opened is closed, and the next batch goes out on a new connection (it was kept and used)."""
    async with opening_held(own_redis) as (resp, relay, opening):
        resp.drop()
        relay.release.set()
        with pytest.raises(redis.exceptions.ConnectionError, match="given up while it was being opened"):
            await asyncio.wait_for(opening, 5)
        await asyncio.wait_for(relay.first_closed.wait(), 5)
        assert await resp.execute(*batch(("ECHO", "new"))) == [b"new"]
        assert relay.accepted == 2


async def test_a_caller_cancelled_as_its_connection_is_dropped_is_cancelled(own_redis: RedisServer) -> None:
    """A caller waiting for a connection being opened, cancelled in the same turn as drop() gives that attempt
    up, ends cancelled: its canceller (a timeout, a task group) waits for that, not for a connection error."""
    async with opening_held(own_redis) as (resp, relay, opening):
        resp.drop()
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):  # (asyncio.timeout turns only that into TimeoutError)
            await opening
        relay.release.set()
        assert await resp.execute(*batch(("ECHO", "after"))) == [b"after"]


async def test_close_waits_for_an_attempt_that_drop_gave_up(own_redis: RedisServer) -> None:
    """close() right after drop(): the attempt drop() cancelled has finished (and closed its socket) by the time
    close() returns, so nothing is left pending when the loop stops."""
    async with opening_held(own_redis) as (resp, relay, opening):
        resp.drop()
        await resp.close()
        assert [task for task in asyncio.all_tasks() if task.get_name() == CONNECT_TASK and not task.done()] == []
        with pytest.raises(redis.exceptions.ConnectionError):
            await opening
        await asyncio.wait_for(relay.first_closed.wait(), 5)


async def test_a_batch_given_up_drops_the_connection(resp: RespClient) -> None:
    """A call cancelled by its timeout closes the connection; the next call reconnects and gets its own reply."""
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await resp.execute(*batch(("DEBUG", "SLEEP", "0.3"), ("ECHO", "late")))
    assert await resp.execute(*batch(("ECHO", "mine"))) == [b"mine"]
    assert resp.connects == 2


async def test_the_link_opens_its_circuit_when_the_server_dies_mid_batch(own_redis: RedisServer) -> None:
    """Through RedisLink.run, a connection lost mid-call is RedisUnavailable and opens the circuit."""
    link = RedisLink(RedisSettings(url=own_redis.url, prefix="kg:", timeout=2.0, reconnect_backoff_max=0.1))
    try:
        call = asyncio.ensure_future(link.run(lambda _r: link.resp.execute(*batch(("DEBUG", "SLEEP", "5")))))
        await asyncio.sleep(0.1)
        own_redis.kill()
        with pytest.raises(RedisUnavailable):
            await call
        assert not link.up
    finally:
        await link.close()


# --- bounded in time by the connection ---------------------------------------------------------------


async def test_send_writes_only_on_an_open_connection(resp: RespClient) -> None:
    """send() never connects: None until a call opened the connection, then the batch's replies."""
    assert resp.send(*batch(("PING",))) is None
    assert await resp.execute(*batch(("PING",))) == [b"PONG"]
    sent = resp.send(*batch(("ECHO", "a"), ("ECHO", "b")))
    assert sent is not None and await sent == [b"a", b"b"]
    assert resp.connects == 1


async def test_an_empty_batch_is_answered_at_once_and_queues_nothing(resp: RespClient) -> None:
    """No command, no reply to wait for: it must not take a place in the line of replies."""
    assert await resp.execute(b"", 0) == []
    sent = resp.send(b"", 0)
    assert sent is not None and await sent == []
    assert await resp.execute(*batch(("ECHO", "next"))) == [b"next"] and resp.in_flight == 0


@pytest.mark.parametrize("late", ["the first batch", "a batch behind an answered one"])
async def test_a_batch_unanswered_within_the_timeout_fails_and_drops_the_connection(
    own_redis: RedisServer, admin: redis.Redis, late: str
) -> None:
    """Nobody awaiting with a deadline: the connection's own timer fails a batch late past redis.timeout."""
    resp = resp_for(own_redis.url, timeout=0.3)
    try:
        assert await resp.execute(*batch(("PING",))) == [b"PONG"]
        if late == "a batch behind an answered one":
            answered = resp.send(*batch(("PING",)))
            assert answered is not None and await answered == [b"PONG"]
        admin.ping()  # connected: its sleep starts as soon as the executor sends it
        hang = asyncio.get_running_loop().run_in_executor(None, admin.execute_command, "DEBUG", "SLEEP", "1")
        await asyncio.sleep(0.05)
        started = time.monotonic()
        pending = resp.send(*batch(("ECHO", "late")))
        assert pending is not None
        with pytest.raises(redis.exceptions.TimeoutError) as caught:
            await pending
        assert 0.25 <= time.monotonic() - started < 0.9
        assert isinstance(caught.value, RedisError)
        assert resp.send(*batch(("PING",))) is None  # dropped: the late reply is never read as another's
        await hang
        assert await resp.execute(*batch(("ECHO", "mine"))) == [b"mine"]
        assert resp.connects == 2
    finally:
        await resp.close()


async def test_a_batch_in_time_is_not_cut_by_the_timer_an_earlier_one_set(own_redis: RedisServer) -> None:
    """The timer set by an answered batch fires while a later one is out, not yet due: it waits for that one."""
    resp = resp_for(own_redis.url, timeout=1.0)
    try:
        assert await resp.execute(*batch(("PING",))) == [b"PONG"]  # sets the timer, due in 1 s
        await asyncio.sleep(0.6)
        slow = resp.send(*batch(("DEBUG", "SLEEP", "0.7"), ("ECHO", "in time")))  # due 1.6 s, answered 1.3 s
        assert slow is not None and await slow == [b"OK", b"in time"]
        assert resp.connects == 1
    finally:
        await resp.close()
