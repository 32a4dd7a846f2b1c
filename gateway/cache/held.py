"""The error a lean Redis batch fails with when its callers waited too long before it was even sent.

Its own module, outside the modules the compiled build turns into C
(``[tool.hatch.build.targets.wheel.hooks.mypyc]`` in pyproject.toml): it
subclasses redis-py's ``TimeoutError`` (so that whatever handles a timeout
handles it), a Python class a native class cannot inherit from. A plain
Python class here serves the compiled and the pure-Python build alike.
"""

from __future__ import annotations

from redis.exceptions import TimeoutError as RedisTimeoutError


class HeldTooLong(RedisTimeoutError):
    """A batch's callers waited ``redis.timeout`` from their asking, most of it held before the batch was sent.

    Not the server's fault, as long as the batch has been on the wire less than that: the connection
    is kept, and the batch's replies, when they come, are read and dropped.
    """
