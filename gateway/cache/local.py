"""The in-process key cache: verified keys by a MAC (keyed BLAKE2b) of the full key, plus short negative entries.

Entries are indexed by key id too, so a change notice for one key drops
exactly its entries. Expired entries are kept (until evicted) so that a key
can keep working for ``stale_if_error`` seconds while the store is down.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Generic, TypeVar

V = TypeVar("V")


class KeyCache(Generic[V]):
    def __init__(
        self, *, ttl: float, negative_ttl: float, stale_if_error: float, max_entries: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.stale_if_error = stale_if_error
        self.max_entries = max_entries
        self._clock = clock
        # digest -> (value, key id, stored at); dict order is insertion order, so
        # the first item is the oldest and eviction is O(1).
        self._entries: dict[str, tuple[V, str, float]] = {}
        self._by_id: dict[str, set[str]] = {}
        self._negative: dict[str, float] = {}
        self.hits = 0
        self.misses = 0
        # Bumped by every invalidation: a fill that read the store before an
        # invalidation must not cache what it read (see ``put``).
        self.generation = 0
        # Told of every invalidation: the key id, or None when anything may have changed
        # (what else holds on to a verified key: an open WebSocket tunnel, say).
        self.watchers: list[Callable[[str | None], None]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, digest: str) -> V | None:
        """A fresh entry, or None."""
        value = self.probe(digest)
        if value is None:
            self.misses += 1
        return value

    def probe(self, digest: str) -> V | None:
        """:meth:`get` counting hits only: for a look that a full lookup follows on a miss (which counts it)."""
        entry = self._entries.get(digest)
        if entry is not None and self._clock() - entry[2] < self.ttl:
            self.hits += 1
            return entry[0]
        return None

    def get_stale(self, digest: str) -> V | None:
        """An expired entry still within ``stale_if_error``, for when the store is down."""
        entry = self._entries.get(digest)
        if entry is not None and self._clock() - entry[2] < self.ttl + self.stale_if_error:
            return entry[0]
        return None

    def put(self, digest: str, key_id: str, value: V, *, generation: int | None = None) -> None:
        """Cache ``value``, unless an invalidation happened since ``generation`` was read."""
        if generation is not None and generation != self.generation:
            return
        self._negative.pop(digest, None)
        self._drop(digest)
        while len(self._entries) >= self.max_entries:
            self._drop(next(iter(self._entries)))
        self._entries[digest] = (value, key_id, self._clock())
        self._by_id.setdefault(key_id, set()).add(digest)

    def is_negative(self, digest: str) -> bool:
        until = self._negative.get(digest)
        if until is None:
            return False
        if self._clock() < until:
            return True
        del self._negative[digest]
        return False

    def put_negative(self, digest: str) -> None:
        if self.negative_ttl <= 0:
            return
        if len(self._negative) >= self.max_entries:
            # Negative entries are cheap to lose: at worst one more store read.
            self._negative.pop(next(iter(self._negative)))
        self._negative[digest] = self._clock() + self.negative_ttl

    def invalidate_key(self, key_id: str) -> None:
        self.generation += 1
        for digest in self._by_id.pop(key_id, ()):
            self._entries.pop(digest, None)
        for watcher in self.watchers:
            watcher(key_id)

    def clear(self) -> None:
        self.generation += 1
        self._entries.clear()
        self._by_id.clear()
        self._negative.clear()
        for watcher in self.watchers:
            watcher(None)

    def _drop(self, digest: str) -> None:
        entry = self._entries.pop(digest, None)
        if entry is not None:
            ids = self._by_id.get(entry[1])
            if ids is not None:
                ids.discard(digest)
                if not ids:
                    del self._by_id[entry[1]]
