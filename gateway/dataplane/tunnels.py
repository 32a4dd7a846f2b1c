"""WebSocket tunnels held to their key: a tunnel ends once its key would no longer be let in.

A tunnel is judged once, by its handshake; then bytes flow for as long as
both sides keep it open, hours for an IDE agent. So that revoking a key (or
narrowing it) reaches its tunnels as it reaches the cache, each open tunnel
is registered under its key's id. When the key cache is told that a key
changed (a change notice, the change feed) or that anything may have
(a role or member change, a lost notice channel), the key is read anew
from the store and put through the stages its handshake passed: status (3:
revoked, expired, its user gone), the IP allowlist (5) and the scope of the
tunnel's route (6). Every tunnel the key no longer passes ends; the others
go on, to the key's expiry or scheduled revocation as now read (a tunnel
ends at that time, on the sweeper, and a re-check moves it). A change
heard while a handshake was being judged or relayed (before its tunnel was
registered here) is not missed: the admission carries the cache's
generation from before the key was read (a cache hit; a key the lookup read
may come from a read that began earlier, so it is re-checked anyway), and a
tunnel opened after any change since is re-checked at once.

While the store cannot be read (or answers with an error), tunnels stay
open and the read is tried again every ``RETRY`` seconds, for at most
``cache.stale_if_error`` seconds (as long as a cached key may outlive an
unreachable store); then they are cut. Keys are read a few at a time, so a
revocation does not wait behind every other key when anything changed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from ..cache.local import KeyCache
from ..pipeline.allowlist import check_allowlist
from ..pipeline.client_ip import IPAddress
from ..pipeline.outcomes import Denied
from ..pipeline.prepared import PreparedKey
from ..pipeline.scope import Target, check_scope
from ..pipeline.status import check_status
from ..store import StoreUnavailable

log = logging.getLogger("keygate.proxy")

RETRY: Final = 1.0  # seconds between reads of a key while the store is unavailable
CONCURRENCY: Final = 16  # keys read at once by a re-check
# A generation no key cache has: a tunnel admitted with it is re-checked as it opens (its key was read
# by a lookup that may have begun before the last change: see Admission).
UNSEEN: Final = -1


class Endable(Protocol):
    def end(self) -> None: ...

    def end_at(self, epoch: float) -> None: ...


@dataclass(frozen=True, slots=True)
class Admission:
    """What a tunnel's handshake was let in as: the key, the client, the route."""

    key_id: str
    client_ip: IPAddress | None
    client: str
    target: Target
    generation: int  # the key cache's before the key was read (UNSEEN when not known)


def still_admitted(key: PreparedKey | None, admission: Admission, now: float) -> bool:
    """Whether ``key`` (as the store has it now; None if gone) still lets this admission in."""
    if key is None or key.canary:
        return False
    try:
        check_status(key, now)
        check_allowlist(key.networks, admission.client_ip, None, admission.client)
        check_scope(key.servers, key.grants, admission.target)
    except Denied:
        return False
    return True


class TunnelGuard:
    """The open tunnels by key id, and the re-check that ends those whose key no longer admits them."""

    def __init__(self, cache: KeyCache[Any], current: Callable[[str], Awaitable[PreparedKey | None]], *,
                 clock: Callable[[], float] = time.time, retry: float = RETRY,
                 concurrency: int = CONCURRENCY) -> None:
        self._cache = cache
        self._current = current  # KeyLookup.current: the key as the store has it
        self._clock = clock  # wall-clock seconds, as keys' expiry and revocation times are
        self._retry = retry
        self._concurrency = concurrency
        self._open: dict[str, dict[Endable, Admission]] = {}
        self._due: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        # Keys whose read failed: since when (wall clock), and the timer that puts them back in _due.
        self._failing: dict[str, float] = {}
        self._retry_timer: asyncio.TimerHandle | None = None
        self.ended = 0  # tunnels ended by a re-check (for tests and logs)
        cache.watchers.append(self.changed)

    def __len__(self) -> int:
        return sum(len(tunnels) for tunnels in self._open.values())

    def opened(self, tunnel: Endable, admission: Admission) -> None:
        self._open.setdefault(admission.key_id, {})[tunnel] = admission
        if admission.generation != self._cache.generation:
            # Something changed after the key was read and before now: it may have been this key.
            self.changed(admission.key_id)

    def closed(self, tunnel: Endable, key_id: str) -> None:
        tunnels = self._open.get(key_id)
        if tunnels is not None:
            tunnels.pop(tunnel, None)
            if not tunnels:
                del self._open[key_id]
                self._failing.pop(key_id, None)

    def changed(self, key_id: str | None) -> None:
        """A KeyCache watcher: ``key_id`` changed, or (None) anything may have."""
        if key_id is None:
            self._due.update(self._open)
        elif key_id in self._open:
            self._due.add(key_id)
        else:
            return
        if self._due and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._recheck(), name="keygate-tunnel-recheck")

    async def _recheck(self) -> None:
        # A few keys at a time: a revocation's notice does not wait behind every other key's read
        # (anything-changed queues every key with a tunnel).
        while self._due:
            batch = [self._due.pop() for _ in range(min(len(self._due), self._concurrency))]
            await asyncio.gather(*[self._recheck_key(key_id) for key_id in batch])

    async def _recheck_key(self, key_id: str) -> None:
        if key_id not in self._open:
            return
        try:
            key = await self._current(key_id)
        except Exception as exc:  # the store down, or refusing, or a row it cannot read: tried again
            self._failed(key_id, exc)
            return
        self._failing.pop(key_id, None)
        now = self._clock()
        for tunnel, admission in list(self._open.get(key_id, {}).items()):
            if key is not None and still_admitted(key, admission, now):
                tunnel.end_at(min(key.expires_at, key.revoked_at))  # both may have moved
            else:
                self._end(tunnel, key_id, "the key no longer admits it")

    def _failed(self, key_id: str, exc: Exception) -> None:
        now = self._clock()
        since = self._failing.setdefault(key_id, now)
        first = since == now
        if now - since >= self._cache.stale_if_error:
            # As long as a cached key may outlive an unreachable store, and no longer: a key that
            # changed and cannot be read again is not trusted beyond it.
            self._failing.pop(key_id, None)
            for tunnel in list(self._open.get(key_id, {})):
                self._end(tunnel, key_id, "its key changed and could not be read for cache.stale_if_error")
            return
        if first:  # (once per key and outage: retries every second would flood the log)
            event = {"event": "tunnel_recheck_failed", "key_id": key_id, "error": f"{type(exc).__name__}: {exc}",
                     "retry": self._retry}
            if isinstance(exc, StoreUnavailable):
                log.warning(json.dumps(event))
            else:
                log.error(json.dumps(event), exc_info=exc)
        if self._retry_timer is None:
            self._retry_timer = asyncio.get_running_loop().call_later(self._retry, self._retry_failed)

    def _retry_failed(self) -> None:
        self._retry_timer = None
        for key_id in self._failing:
            self.changed(key_id)

    def _end(self, tunnel: Endable, key_id: str, reason: str) -> None:
        self.ended += 1
        log.info(json.dumps({"event": "tunnel_ended", "key_id": key_id, "reason": reason}))
        try:
            tunnel.end()  # (its handler calls closed() once it resumes)
        except Exception:  # one tunnel's failure must not spare the others
            log.exception(json.dumps({"event": "tunnel_end_failed", "key_id": key_id}))

    async def close(self) -> None:
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


__all__ = ["UNSEEN", "Admission", "TunnelGuard", "still_admitted"]
