"""argon2 verification, isolated: its own threads, bounded concurrency and a bounded queue.

argon2 is the one CPU-heavy step of a request, and only cache misses take
it. It runs in a thread pool of its own (argon2-cffi releases the GIL), at
a lower CPU priority than the event loop, at most ``concurrency`` at a
time -- by default one less than the CPUs, so the event loop keeps a core
for the cache-hit path -- and at most ``queue`` more misses wait for it.
Past that a miss is shed with 429 and Retry-After rather than queued
without bound, so a flood of wrong secrets costs the server a bounded
amount of CPU and memory. The cache-hit path never comes here.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Final, Protocol

from .outcomes import Denied, Outcome


# How much lower than the event loop's the verification threads' CPU priority is (nice, Linux).
THREAD_NICENESS: Final = 10


def _lower_priority() -> None:
    """Runs in each verification thread: let the event loop (cache hits) win the CPU when both want it."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), THREAD_NICENESS)
    except (AttributeError, OSError):  # not Linux, or not allowed: equal priority is still correct
        pass


def default_concurrency(cpus: int | None = None) -> int:
    """One verification thread per CPU but one, left to the event loop; at least one."""
    return max(1, (cpus if cpus is not None else os.cpu_count() or 1) - 1)


class SecretHashing(Protocol):
    """What verification needs of :class:`gateway.keys.SecretHasher`."""

    def hash(self, secret: str) -> str: ...

    def verify(self, secret_hash: str, secret: str) -> bool: ...


class SecretVerifier:
    def __init__(self, hasher: SecretHashing, *, concurrency: int = 0, queue: int = 64) -> None:
        self.concurrency = concurrency or default_concurrency()
        self.queue = queue
        self._hasher = hasher
        self._executor = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="argon2",
                                            initializer=_lower_priority)
        self._slots = asyncio.Semaphore(self.concurrency)
        # Misses admitted (verifying or waiting to); bounded by concurrency + queue.
        self.admitted = 0
        self.shed = 0

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    @contextmanager
    def admit(self) -> Iterator[None]:
        """A place among the misses that may need argon2, or Denied(VERIFICATION_BUSY) when none is left.

        Taken before the store read, for known and unknown ids alike, so that
        being shed says nothing about whether an id exists.
        """
        if self.admitted >= self.concurrency + self.queue:
            self.shed += 1
            raise Denied(Outcome.VERIFICATION_BUSY, "argon2 queue full")
        self.admitted += 1
        try:
            yield
        finally:
            self.admitted -= 1

    async def verify(self, secret_hash: str, secret: str) -> bool:
        """Whether ``secret`` matches ``secret_hash``; waits for one of the ``concurrency`` threads."""
        async with self._slots:
            return await asyncio.get_running_loop().run_in_executor(
                self._executor, self._hasher.verify, secret_hash, secret)

    async def calibrate(self) -> float:
        """Seconds one verification takes here, measured once on a throwaway secret."""
        secret = secrets.token_urlsafe(24)
        loop = asyncio.get_running_loop()
        secret_hash = await loop.run_in_executor(self._executor, self._hasher.hash, secret)
        started = time.perf_counter()
        await self.verify(secret_hash, secret)
        return time.perf_counter() - started
