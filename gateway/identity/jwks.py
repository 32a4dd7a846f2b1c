"""The signing keys of OIDC issuers: discovery and the JWKS over HTTP, cached; or a JWKS file on disk.

An issuer's keys come from its discovery document
(``{issuer}/.well-known/openid-configuration``), whose ``issuer`` must be the
configured one exactly and whose ``jwks_uri`` names the key set. The set is
cached for ``ttl`` (or the response's ``Cache-Control: max-age``, held within
[``MIN_MAX_AGE``, ``ttl``]). A token naming a ``kid`` the set lacks makes us
fetch the set again, at most once per ``refetch_interval`` per issuer: the
issuer may have rotated its keys, but a stream of made-up ``kid`` values must
not turn us into a load generator against it (oauth2-proxy's go-oidc and
PyJWT's ``PyJWKClient`` rate-limit the same refetch).

When the issuer cannot be reached, answers something other than 200, or
sends something that is not a key set, a cached set keeps being served (keys
rotate rarely, outages are common) and the issuer is not asked again for
``refetch_interval``; without a cached set the caller gets
:class:`IssuerUnavailable` with the seconds until we will try again.

A policy may name a JWKS file instead (a Kubernetes API server's JWKS
often needs credentials to fetch): it is read from disk and read again when
it changes (mtime, size or inode), never fetched.

Keys are parsed into :class:`jwt.PyJWK` once, when a set enters the cache,
each bound to the one algorithm its type allows: RSA keys to RS256, EC P-256
keys to ES256. Keys of any other type, curve or declared ``alg``, or not for
signatures, are left out, so a token can only be checked with a key of the
type its ``alg`` names.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import jwt

log = logging.getLogger("keygate.identity")

# The algorithms a token may be signed with, and the key type (kty, crv) each needs.
# SECURITY: asymmetric only. "none" and HS* are absent, so neither an unsigned token nor an HMAC
# "signed" with a public key (the RS256 -> HS256 confusion) can ever find a key here.
KEY_TYPES: Mapping[str, tuple[str, str | None]] = {"RS256": ("RSA", None), "ES256": ("EC", "P-256")}

# The shortest time a key set is cached, whatever the issuer's Cache-Control says: a max-age of 0
# would otherwise make every exchange a fetch.
MIN_MAX_AGE = 60.0

DISCOVERY_PATH = "/.well-known/openid-configuration"


class IssuerUnavailable(Exception):
    """The issuer's keys could not be had: the token can be neither trusted nor refused. Try again later."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UnknownSigningKey(Exception):
    """The issuer's key set has no key for the token's ``kid`` and ``alg`` (after a refetch, when one was due)."""


class _FetchFailed(Exception):
    """One fetch or read of a key set (or discovery document) failed; the message says why, for the log."""


def url_allowed(url: str) -> bool:
    """An https URL, or http to a loopback host (127.0.0.0/8, ::1, localhost): where keys may be fetched from."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return False
    if not host:
        return False
    if parts.scheme == "https":
        return True
    if parts.scheme != "http":
        return False
    # SECURITY: plain http only where no network sits between us and the issuer, so nobody on the path
    # can swap the keys we trust.
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _algorithm_for(jwk: Any) -> str | None:
    """The one allowed algorithm this JWK may verify, or None when it fits none."""
    if not isinstance(jwk, dict):
        return None
    if jwk.get("use", "sig") != "sig":
        return None
    key_ops = jwk.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        return None
    for alg, (kty, crv) in KEY_TYPES.items():
        if jwk.get("kty") == kty and (crv is None or jwk.get("crv") == crv):
            # A key that declares another algorithm (PS256, RSA-OAEP, ES384 ...) is not ours to use as this one.
            return alg if jwk.get("alg", alg) == alg else None
    return None


def parse_key_set(document: Any) -> tuple[jwt.PyJWK, ...]:
    """The usable signing keys of a JWKS document, each bound to its algorithm; ValueError when it is not a JWKS."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError('not a JWKS (an object with a "keys" array)')
    keys = []
    for jwk in document["keys"]:
        alg = _algorithm_for(jwk)
        if alg is None:
            continue
        try:
            keys.append(jwt.PyJWK(jwk, algorithm=alg))
        except jwt.PyJWTError:  # malformed members (bad modulus, off-curve point ...) are skipped, like PyJWKSet does
            continue
    return tuple(keys)


def _pick(keys: tuple[jwt.PyJWK, ...], kid: str | None, alg: str) -> jwt.PyJWK | None:
    """The key for ``kid`` and ``alg``; None when no key has that kid; UnknownSigningKey when the kid's key does not fit."""
    named = [key for key in keys if kid is None or key.key_id == kid]
    if not named:
        return None
    fitting = [key for key in named if key.algorithm_name == alg]
    if len(fitting) != 1:
        # SECURITY: a key of another type than the token's alg names is never used (an RSA key for
        # ES256, an EC key for RS256); and without a kid we only guess when exactly one key fits.
        what = f"kid {kid!r}" if kid is not None else "a token without kid"
        raise UnknownSigningKey(f"{len(fitting)} keys of the set fit {what} with alg {alg}")
    return fitting[0]


def _max_age(cache_control: str | None) -> float | None:
    for directive in (cache_control or "").split(","):
        name, _, value = directive.strip().partition("=")
        if name.lower() == "max-age":
            try:
                return float(int(value.strip().strip('"')))
            except ValueError:
                return None
    return None


@dataclass(slots=True)
class _IssuerState:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    keys: tuple[jwt.PyJWK, ...] | None = None
    keys_until: float = 0.0  # the set is due to be fetched again
    jwks_uri: str | None = None
    discovered_until: float = 0.0  # the discovery document is due to be fetched again
    retry_at: float = 0.0  # a fetch failed: the issuer is not asked again before this
    refetched_at: float | None = None  # the last fetch made for an unknown kid
    problem: str = ""  # why the last fetch failed
    generation: int = 0  # key sets fetched so far


@dataclass(slots=True)
class _FileState:
    keys: tuple[jwt.PyJWK, ...] | None = None
    stamp: tuple[int, int, int] | None = None  # (mtime_ns, size, inode) of the version read last
    problem: str | None = None  # why that version could not be used


class SigningKeys:
    """Every issuer's signing keys, fetched when first needed and cached; one HTTP client session for all."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        ttl: float = 3600.0,
        refetch_interval: float = 60.0,
        retry_interval: float = 5.0,
        timeout: float = 5.0,
        max_bytes: int = 1024 * 1024,
    ) -> None:
        self._clock = clock
        self._ttl = ttl
        self._refetch_interval = refetch_interval
        # An issuer that failed is asked again after this, not after refetch_interval: a client told
        # Retry-After should find it back soon after it is (a CI job's ID token lives minutes).
        self._retry_interval = retry_interval
        self._timeout = timeout
        self._max_bytes = max_bytes
        self._session: aiohttp.ClientSession | None = None
        self._issuers: dict[str, _IssuerState] = {}
        self._files: dict[str, _FileState] = {}

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def key_for(self, issuer: str, kid: str | None, alg: str, *, jwks_file: str | None) -> jwt.PyJWK:
        """The key that verifies a token of ``issuer`` with header ``kid`` and ``alg``.

        Raises UnknownSigningKey when the set has none (after a refetch, when
        one is due), IssuerUnavailable when the set cannot be had.
        """
        if alg not in KEY_TYPES:
            raise UnknownSigningKey(f"alg {alg!r} is not accepted")
        if jwks_file is not None:
            keys = await self._file_keys(jwks_file)
            key = _pick(keys, kid, alg)
            if key is None:  # a file is read again when it changes; there is nothing to refetch
                raise UnknownSigningKey(f"{jwks_file} has no key {kid!r}")
            return key
        state = self._issuers.setdefault(issuer, _IssuerState())
        generation = state.generation
        key = _pick(await self._issuer_keys(issuer, state), kid, alg)
        if key is None and state.generation == generation:
            # The set predates this token: the issuer may have rotated since. (A set fetched while this
            # token waited already shows the issuer as it is now.)
            key = _pick(await self._refetch_for_unknown_kid(issuer, state), kid, alg)
        if key is None:
            raise UnknownSigningKey(f"{issuer} has no key {kid!r}")
        return key

    # -- issuers over HTTP -------------------------------------------------------------------

    async def _issuer_keys(self, issuer: str, state: _IssuerState) -> tuple[jwt.PyJWK, ...]:
        if state.keys is not None and self._clock() < state.keys_until:
            return state.keys
        async with state.lock:  # one fetch per issuer at a time; those waiting use its result
            now = self._clock()
            if state.keys is not None and now < state.keys_until:
                return state.keys
            if now >= state.retry_at:
                try:
                    await self._fetch(issuer, state)
                except _FetchFailed as exc:
                    self._failed(issuer, state, exc, now)
            if state.keys is None:
                raise IssuerUnavailable(f"no signing keys of {issuer}: {state.problem}",
                                        retry_after=state.retry_at - now)
            return state.keys

    async def _refetch_for_unknown_kid(self, issuer: str, state: _IssuerState) -> tuple[jwt.PyJWK, ...]:
        async with state.lock:
            now = self._clock()
            if now < state.retry_at:
                # The issuer is down: we cannot tell a rotated key from a made-up one, so this is no refusal.
                raise IssuerUnavailable(f"{issuer} is unavailable: {state.problem}", retry_after=state.retry_at - now)
            # SECURITY: at most one refetch per refetch_interval per issuer, however many unknown kids arrive.
            # Tokens that waited behind another's refetch see its set without a fetch of their own.
            if state.refetched_at is not None and now - state.refetched_at < self._refetch_interval:
                return state.keys or ()
            state.refetched_at = now
            try:
                await self._fetch(issuer, state)
            except _FetchFailed as exc:
                self._failed(issuer, state, exc, now)
                raise IssuerUnavailable(f"{issuer} is unavailable: {exc}", retry_after=state.retry_at - now) from exc
            return state.keys or ()

    def _failed(self, issuer: str, state: _IssuerState, exc: _FetchFailed, now: float) -> None:
        state.retry_at, state.problem = now + self._retry_interval, str(exc)
        cached = "serving the cached key set" if state.keys is not None else "no key set cached"
        log.warning("signing keys of %s: %s; %s, next attempt in %.0f s", issuer, exc, cached, self._retry_interval)

    async def _fetch(self, issuer: str, state: _IssuerState) -> None:
        now = self._clock()
        jwks_uri = state.jwks_uri
        if jwks_uri is None or now >= state.discovered_until:
            jwks_uri = await self._discover(issuer)
            state.jwks_uri, state.discovered_until = jwks_uri, now + self._ttl
        document, max_age = await self._get_json(jwks_uri)
        try:
            keys = parse_key_set(document)
        except ValueError as exc:
            raise _FetchFailed(f"{jwks_uri}: {exc}") from exc
        ttl = self._ttl if max_age is None else min(max(max_age, MIN_MAX_AGE), self._ttl)
        state.keys, state.keys_until, state.retry_at = keys, now + ttl, 0.0
        state.generation += 1

    async def _discover(self, issuer: str) -> str:
        # SECURITY: the issuer comes from a trust policy, never from a token: a token's iss only selects
        # among configured policies, so no token can make us fetch from a URL of its choosing.
        if not url_allowed(issuer):
            raise _FetchFailed(f"issuer {issuer!r} is neither https nor http to a loopback host")
        url = issuer.rstrip("/") + DISCOVERY_PATH
        document, _ = await self._get_json(url)
        if not isinstance(document, dict):
            raise _FetchFailed(f"{url}: not a JSON object")
        # SECURITY: a discovery document speaking for another issuer (a misrouted or hijacked URL) is not ours.
        if document.get("issuer") != issuer:
            raise _FetchFailed(f"{url} names issuer {document.get('issuer')!r}, not {issuer!r}")
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not url_allowed(jwks_uri):
            # SECURITY: keys fetched over plain http across a network could be swapped on the way.
            raise _FetchFailed(f"{url}: jwks_uri {jwks_uri!r} is neither https nor http to a loopback host")
        return jwks_uri

    async def _get_json(self, url: str) -> tuple[Any, float | None]:
        """The JSON at ``url`` and its Cache-Control max-age; _FetchFailed for anything but a 200 with JSON."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                cookie_jar=aiohttp.DummyCookieJar(),
                headers={"Accept": "application/json"},
            )
        try:
            # SECURITY: no redirects: the URL we checked is the one we fetch.
            async with self._session.get(url, allow_redirects=False) as response:
                if response.status != 200:
                    raise _FetchFailed(f"{url} answered {response.status}")
                # SECURITY: a bounded read (after decompression), so a huge or endless answer cannot
                # exhaust our memory.
                if response.content_length is not None and response.content_length > self._max_bytes:
                    raise _FetchFailed(f"{url}: {response.content_length} bytes, more than {self._max_bytes}")
                body = bytearray()
                async for chunk in response.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > self._max_bytes:
                        raise _FetchFailed(f"{url}: more than {self._max_bytes} bytes")
                max_age = _max_age(response.headers.get("Cache-Control"))
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise _FetchFailed(f"{url}: {exc!r}") from exc
        try:
            return json.loads(body), max_age
        except (ValueError, RecursionError) as exc:
            raise _FetchFailed(f"{url}: not JSON") from exc

    # -- JWKS files ----------------------------------------------------------------------------

    async def _file_keys(self, path: str) -> tuple[jwt.PyJWK, ...]:
        state = self._files.setdefault(path, _FileState())
        problem: str | None
        stamp: tuple[int, int, int] | None
        try:
            stat = os.stat(path)
        except OSError as exc:
            problem, stamp = f"cannot stat: {exc.strerror}", None
        else:
            problem, stamp = None, (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if stamp is not None and stamp == state.stamp:
            problem = state.problem  # the version read last, as it was
        elif stamp is not None:
            try:
                if stat.st_size > self._max_bytes:
                    raise _FetchFailed(f"{stat.st_size} bytes, more than {self._max_bytes}")
                data = await asyncio.to_thread(Path(path).read_bytes)
                state.keys = parse_key_set(json.loads(data))
            except (OSError, ValueError, RecursionError, _FetchFailed) as exc:
                problem = str(exc) or type(exc).__name__
        if problem is not None and (stamp != state.stamp or problem != state.problem):
            # Once per version of the file, not once per token.
            served = "serving the version read before" if state.keys is not None else "no keys"
            log.warning("JWKS file %s: %s; %s", path, problem, served)
        state.stamp, state.problem = stamp, problem
        if state.keys is None:
            assert problem is not None
            raise IssuerUnavailable(f"JWKS file {path}: {problem}", retry_after=self._refetch_interval)
        # A file being replaced or half-written must not refuse every token: the version read last
        # is served, as an issuer's cached set is while the issuer is down.
        return state.keys
