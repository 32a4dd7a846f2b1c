"""RESP encoding of the lean Redis client: the bytes redis-py would send."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, NoScriptError, ResponseError

from gateway.cache.resp import command, reply_error


@pytest.mark.parametrize("args", [
    ("PING",),
    ("EVALSHA", "a" * 40, 1, "keygate:rl:kg_AAAA", 20, 0.005555555555555556, 1, 0),
    ("SET", b"\x00\xffbytes", "t\u00e9xt"),
    ("X", 1666666.6666666667, -3, 0.0),
])
def test_commands_are_encoded_as_redis_py_encodes_them(args: tuple[str | bytes | int | float, ...]) -> None:
    """Every argument reaches Redis as the same bytes redis-py would send."""
    expected = b"".join(Redis().connection_pool.make_connection().pack_command(*args))
    assert command(*args) == expected


@pytest.mark.parametrize(("message", "kind"), [
    ("NOSCRIPT No matching script. Please use EVAL.", NoScriptError),
    ("WRONGPASS invalid username-password pair or user is disabled.", AuthenticationError),
    ("NOAUTH Authentication required.", AuthenticationError),
    ("ERR invalid password", AuthenticationError),
    ("ERR value is not an integer or out of range", ResponseError),
    ("BUSY Redis is busy running a script.", ResponseError),
])
def test_error_replies_become_redis_py_exceptions(message: str, kind: type[Exception]) -> None:
    """An error reply is the exception redis-py raises for it: callers tell NOSCRIPT and refused AUTH apart."""
    error = reply_error(message)
    assert type(error) is kind and str(error) == message
