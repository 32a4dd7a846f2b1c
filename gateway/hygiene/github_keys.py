"""The public keys that sign GitHub's secret-scanning reports, fetched from ``leaks.github_keys_url`` and cached.

GitHub publishes them as ``{"public_keys": [{"key_identifier", "key" (PEM),
"is_current"}]}`` and names the one that signed a report in its
``Github-Public-Key-Identifier`` header; the signature
(``Github-Public-Key-Signature``) is ECDSA P-256 / SHA-256 over the raw body,
DER-encoded, in base64.

The caching follows :mod:`gateway.identity.jwks`: the key list is kept for
``ttl``; an identifier the list lacks makes us fetch it again, at most once
per ``refetch_interval`` (GitHub may have rotated; a stream of made-up
identifiers must not turn us into a load generator against GitHub, whose
unauthenticated API allows 60 requests an hour); refetches are conditional
(``If-None-Match``), which GitHub does not count against that limit. When
the list cannot be had, a cached one keeps being served and the URL is not
asked again for ``retry_interval``; without one, :class:`KeysUnavailable`
says when to try again -- a report then gets 503, never 401, so GitHub sends
it again rather than being told it is forged.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..identity.jwks import url_allowed

log = logging.getLogger("keygate.leaks")

# Identifiers are hex SHA-256 digests today; anything outside this shape names no key and fetches nothing.
MAX_IDENTIFIER = 128


class UnknownKeyIdentifier(Exception):
    """No published key has the report's identifier (after a refetch, when one was due)."""


class KeysUnavailable(Exception):
    """The key list could not be had: the report can be neither trusted nor refused. Try again later."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _FetchFailed(Exception):
    """One fetch of the key list failed; the message says why, for the log."""


def parse_public_keys(document: Any) -> dict[str, ec.EllipticCurvePublicKey]:
    """The P-256 keys of a key list, by identifier; ValueError when it is not a key list.

    Entries that are malformed, or keys of another type or curve, are left out: a report can only
    be checked with the kind of key GitHub signs with.
    """
    if not isinstance(document, dict) or not isinstance(document.get("public_keys"), list):
        raise ValueError('not a key list (an object with a "public_keys" array)')
    keys: dict[str, ec.EllipticCurvePublicKey] = {}
    for entry in document["public_keys"]:
        if not isinstance(entry, dict):
            continue
        identifier, pem = entry.get("key_identifier"), entry.get("key")
        if not isinstance(identifier, str) or not identifier or not isinstance(pem, str):
            continue
        try:
            key = serialization.load_pem_public_key(pem.encode())
        except (ValueError, TypeError, UnsupportedAlgorithm):
            continue
        # SECURITY: ECDSA P-256 only, as GitHub documents; no other key may vouch for a report.
        if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
            keys[identifier] = key
    return keys


def signature_valid(key: ec.EllipticCurvePublicKey, body: bytes, signature: str) -> bool:
    """Whether ``signature`` (base64 of a DER ECDSA signature) is ``key``'s over exactly ``body``'s bytes."""
    try:
        der = base64.b64decode(signature, validate=True)
        key.verify(der, body, ec.ECDSA(hashes.SHA256()))
    except (binascii.Error, ValueError, InvalidSignature):
        return False
    return True


def identifier_shaped(identifier: str) -> bool:
    return 0 < len(identifier) <= MAX_IDENTIFIER and identifier.isascii() and identifier.replace("-", "").replace(
        "_", "").isalnum()


class GitHubKeys:
    """The key list at ``url``, fetched when first needed and cached; one HTTP client session."""

    def __init__(
        self, url: str, *, ttl: float = 86400.0, timeout: float = 5.0, clock: Callable[[], float] = time.monotonic,
        refetch_interval: float = 60.0, retry_interval: float = 5.0, max_bytes: int = 1024 * 1024,
    ) -> None:
        self.url = url
        self._ttl = ttl
        self._timeout = timeout
        self._clock = clock
        self._refetch_interval = refetch_interval
        # A failed fetch is tried again after this: GitHub, told Retry-After, should find us back soon.
        self._retry_interval = retry_interval
        self._max_bytes = max_bytes
        self._session: aiohttp.ClientSession | None = None
        self._lock = asyncio.Lock()
        self._keys: dict[str, ec.EllipticCurvePublicKey] | None = None
        self._keys_until = 0.0
        self._etag: str | None = None
        self._retry_at = 0.0  # a fetch failed: the URL is not asked again before this
        self._refetched_at: float | None = None  # the last fetch made for an unknown identifier
        self._problem = ""
        self._generation = 0  # key lists fetched (or confirmed unchanged) so far
        self.fetches = 0

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def key_for(self, identifier: str) -> ec.EllipticCurvePublicKey:
        """The key named ``identifier``: UnknownKeyIdentifier when none is (after a refetch, when one is
        due), KeysUnavailable when the list cannot be had."""
        if not identifier_shaped(identifier):
            raise UnknownKeyIdentifier("not a key identifier")
        generation = self._generation
        key = (await self._current()).get(identifier)
        if key is None and self._generation == generation:
            # The list predates this report: GitHub may have rotated since. (A list fetched while
            # this report waited already shows GitHub's keys as they are now.)
            key = (await self._refetch()).get(identifier)
        if key is None:
            raise UnknownKeyIdentifier(f"no published key {identifier!r}")
        return key

    async def _current(self) -> Mapping[str, ec.EllipticCurvePublicKey]:
        if self._keys is not None and self._clock() < self._keys_until:
            return self._keys
        async with self._lock:  # one fetch at a time; those waiting use its result
            now = self._clock()
            if self._keys is not None and now < self._keys_until:
                return self._keys
            if now >= self._retry_at:
                try:
                    await self._fetch()
                except _FetchFailed as exc:
                    self._failed(exc, now)
            if self._keys is None:
                raise KeysUnavailable(f"no keys from {self.url}: {self._problem}",
                                      retry_after=self._retry_at - now)
            return self._keys

    async def _refetch(self) -> Mapping[str, ec.EllipticCurvePublicKey]:
        async with self._lock:
            now = self._clock()
            if now < self._retry_at:
                # The URL is failing: a rotated key cannot be told from a made-up one, so this is no refusal.
                raise KeysUnavailable(f"{self.url} is unavailable: {self._problem}", retry_after=self._retry_at - now)
            # SECURITY: at most one refetch per refetch_interval, however many unknown identifiers arrive.
            if self._refetched_at is not None and now - self._refetched_at < self._refetch_interval:
                return self._keys or {}
            self._refetched_at = now
            try:
                await self._fetch()
            except _FetchFailed as exc:
                self._failed(exc, now)
                raise KeysUnavailable(f"{self.url} is unavailable: {exc}", retry_after=self._retry_at - now) from exc
            return self._keys or {}

    def _failed(self, exc: _FetchFailed, now: float) -> None:
        self._retry_at, self._problem = now + self._retry_interval, str(exc)
        cached = "serving the cached keys" if self._keys is not None else "no keys cached"
        log.warning(json.dumps({"event": "leak_keys_unavailable", "url": self.url, "error": str(exc),
                                "cached": cached, "retry_in": self._retry_interval}))

    async def _fetch(self) -> None:
        now = self._clock()
        # SECURITY: https (or http to a loopback host only), checked again here as the setting was at load.
        if not url_allowed(self.url):
            raise _FetchFailed(f"{self.url!r} is neither https nor http to a loopback host")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout), cookie_jar=aiohttp.DummyCookieJar(),
                headers={"Accept": "application/json"},
            )
        headers = {"If-None-Match": self._etag} if self._etag and self._keys is not None else {}
        self.fetches += 1
        try:
            # SECURITY: no redirects: the URL we checked is the one we fetch.
            async with self._session.get(self.url, allow_redirects=False, headers=headers) as response:
                if response.status == 304 and self._keys is not None:
                    body = None
                elif response.status != 200:
                    raise _FetchFailed(f"{self.url} answered {response.status}")
                else:
                    # SECURITY: a bounded read (after decompression): a huge or endless answer cannot exhaust memory.
                    if response.content_length is not None and response.content_length > self._max_bytes:
                        raise _FetchFailed(f"{self.url}: {response.content_length} bytes, more than {self._max_bytes}")
                    body = bytearray()
                    async for chunk in response.content.iter_chunked(64 * 1024):
                        body += chunk
                        if len(body) > self._max_bytes:
                            raise _FetchFailed(f"{self.url}: more than {self._max_bytes} bytes")
                etag = response.headers.get("ETag")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise _FetchFailed(f"{self.url}: {exc!r}") from exc
        if body is not None:
            try:
                self._keys = parse_public_keys(json.loads(body))
            except (ValueError, RecursionError) as exc:
                raise _FetchFailed(f"{self.url}: {exc}") from exc
            self._etag = etag
        self._keys_until, self._retry_at = now + self._ttl, 0.0
        self._generation += 1
