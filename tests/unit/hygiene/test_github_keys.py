"""GitHub's secret-scanning keys against a stand-in on 127.0.0.1: signature checks, caching, rotation, outages."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.hygiene.github_keys import (
    GitHubKeys, KeysUnavailable, UnknownKeyIdentifier, parse_public_keys, signature_valid,
)

from ...clocks import FakeClock
from ...github_scanning import GitHubScanning, ScanningKey, match, report

BODY = report([match("kg_example")])


@pytest.fixture
async def github() -> AsyncIterator[GitHubScanning]:
    async with GitHubScanning() as running:
        yield running


@pytest.fixture
def monotonic() -> FakeClock[float]:
    """The key cache's clock: the TTL, the refetch interval, the retry delay."""
    return FakeClock()


@pytest.fixture
async def keys(github: GitHubScanning, monotonic: FakeClock[float]) -> AsyncIterator[GitHubKeys]:
    cache = GitHubKeys(github.keys_url, ttl=3600, timeout=2.0, clock=monotonic)
    try:
        yield cache
    finally:
        await cache.close()


# -- the signature ----------------------------------------------------------------------------------

SIGNER = ScanningKey.generate()


def _flip(signature: str) -> str:
    der = bytearray(base64.b64decode(signature))
    der[-1] ^= 1
    return base64.b64encode(bytes(der)).decode()


@pytest.mark.parametrize(
    ("body", "signature", "valid"),
    [
        (BODY, SIGNER.signature(BODY), True),
        (BODY + b" ", SIGNER.signature(BODY), False),  # a byte more than was signed
        (json.dumps(json.loads(BODY)).encode(), SIGNER.signature(BODY), False),  # the same JSON, spaced otherwise
        (BODY, SIGNER.signature(BODY + b"x"), False),  # a signature over other bytes
        (BODY, ScanningKey.generate().signature(BODY), False),  # another key's
        (BODY, _flip(SIGNER.signature(BODY)), False),
        (BODY, "", False),
        (BODY, "not base64 at all!", False),
        (BODY, base64.b64encode(b"\x30\x02\x02\x00").decode(), False),  # base64 of malformed DER
    ],
    ids=["valid", "extra-byte", "reserialised", "other-bytes", "other-key", "flipped", "empty", "not-base64",
         "bad-der"],
)
def test_a_signature_holds_only_for_the_exact_bytes_and_key(body: bytes, signature: str, valid: bool) -> None:
    """ECDSA P-256 / SHA-256 over the raw body, DER in base64, as GitHub signs: nothing else verifies."""
    assert signature_valid(SIGNER.private_key.public_key(), body, signature) is valid


def test_the_key_list_keeps_only_p256_keys_by_identifier() -> None:
    """Malformed entries and keys of another curve or type are left out; the rest are keyed by identifier."""
    good, other_curve = ScanningKey.generate(), ScanningKey.generate(ec.SECP384R1())
    document = {"public_keys": [
        {"key_identifier": good.identifier, "key": good.pem(), "is_current": True},
        {"key_identifier": other_curve.identifier, "key": other_curve.pem(), "is_current": False},
        {"key_identifier": "broken", "key": "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"},
        {"key_identifier": 5, "key": good.pem()},
        {"key": good.pem()},
        "not an object",
    ]}
    assert list(parse_public_keys(document)) == [good.identifier]


@pytest.mark.parametrize("document", [[], {}, {"public_keys": {}}, "keys", None])
def test_a_document_that_is_no_key_list_is_refused(document: object) -> None:
    with pytest.raises(ValueError):
        parse_public_keys(document)


# -- the cache --------------------------------------------------------------------------------------

async def test_the_key_list_is_fetched_once_and_cached(github: GitHubScanning, keys: GitHubKeys) -> None:
    """Many reports within the TTL cost one fetch; concurrent ones on a cold cache share it."""
    found = await asyncio.gather(*(keys.key_for(github.signing.identifier) for _ in range(10)))
    assert all(signature_valid(key, BODY, github.signing.signature(BODY)) for key in found)
    assert github.fetches["keys"] == 1


async def test_the_list_is_fetched_again_after_its_ttl_conditionally(
    github: GitHubScanning, keys: GitHubKeys, monotonic: FakeClock[float],
) -> None:
    """After keys_ttl the list is asked for again with If-None-Match; a 304 keeps the keys for another TTL."""
    await keys.key_for(github.signing.identifier)
    monotonic.advance(3599)
    await keys.key_for(github.signing.identifier)
    assert github.fetches["keys"] == 1
    monotonic.advance(1)
    await keys.key_for(github.signing.identifier)
    assert (github.fetches["keys"], github.fetches["conditional"]) == (2, 1)
    monotonic.advance(3599)
    await keys.key_for(github.signing.identifier)
    assert github.fetches["keys"] == 2


async def test_an_unknown_identifier_refetches_at_most_once_a_minute(
    github: GitHubScanning, keys: GitHubKeys, monotonic: FakeClock[float],
) -> None:
    """A rotated key is found by one refetch; another unknown identifier within 60 s fetches nothing; after, once."""
    await keys.key_for(github.signing.identifier)
    second = github.rotate()
    assert signature_valid(await keys.key_for(second.identifier), BODY, second.signature(BODY))
    assert github.fetches["keys"] == 2

    monotonic.advance(59)
    for _ in range(5):
        with pytest.raises(UnknownKeyIdentifier):
            await keys.key_for("0" * 64)
    third = github.rotate()
    with pytest.raises(UnknownKeyIdentifier):
        await keys.key_for(third.identifier)
    assert github.fetches["keys"] == 2

    monotonic.advance(1)
    assert signature_valid(await keys.key_for(third.identifier), BODY, third.signature(BODY))
    assert github.fetches["keys"] == 3


@pytest.mark.parametrize("identifier", ["", "x" * 129, "a b", "ä" * 10, "../keys", "abc\n"])
async def test_text_that_is_no_identifier_fetches_nothing(
    github: GitHubScanning, keys: GitHubKeys, identifier: str,
) -> None:
    with pytest.raises(UnknownKeyIdentifier):
        await keys.key_for(identifier)
    assert github.fetches["keys"] == 0


@pytest.mark.parametrize("outage", ["status", "offline", "not-json", "no-key-list", "redirect", "too-large"])
async def test_a_key_list_out_of_reach_is_unavailable_never_unknown(
    github: GitHubScanning, keys: GitHubKeys, monotonic: FakeClock[float], outage: str,
) -> None:
    """Without a cached list, a failing URL is KeysUnavailable with a Retry-After, asked again only after 5 s."""
    if outage == "status":
        github.status = 503
    elif outage == "offline":
        await github.go_offline()
    elif outage == "not-json":
        github.body = b"<html>"
    elif outage == "no-key-list":
        github.body = b'{"keys": []}'
    elif outage == "redirect":
        github.redirect = github.keys_url + "?elsewhere"
    else:
        github.body = b'{"public_keys": [], "padding": "' + b"x" * (1024 * 1024) + b'"}'
    with pytest.raises(KeysUnavailable) as raised:
        await keys.key_for(github.signing.identifier)
    assert raised.value.retry_after == 5.0
    fetched = github.fetches["keys"]
    monotonic.advance(4)
    with pytest.raises(KeysUnavailable):
        await keys.key_for(github.signing.identifier)
    assert github.fetches["keys"] == fetched  # not asked again before the retry interval

    github.status = github.body = github.redirect = None
    await github.go_online()
    monotonic.advance(1)
    assert signature_valid(await keys.key_for(github.signing.identifier), BODY, github.signing.signature(BODY))


async def test_a_cached_list_is_served_while_the_url_fails(
    github: GitHubScanning, keys: GitHubKeys, monotonic: FakeClock[float],
) -> None:
    """Past the TTL with the URL down, known identifiers still verify; an unknown one is unavailable, not unknown."""
    await keys.key_for(github.signing.identifier)
    github.status = 500
    monotonic.advance(3600)
    assert signature_valid(await keys.key_for(github.signing.identifier), BODY, github.signing.signature(BODY))
    monotonic.advance(60)  # a refetch for an unknown identifier is due, and fails
    with pytest.raises(KeysUnavailable):
        await keys.key_for("f" * 64)


async def test_an_https_only_url_is_checked_before_fetching(monotonic: FakeClock[float]) -> None:
    """http to anything but a loopback host is never fetched (the setting refuses it too, at load)."""
    cache = GitHubKeys("http://keys.example/secret_scanning", clock=monotonic)
    try:
        with pytest.raises(KeysUnavailable, match="neither https nor http to a loopback host"):
            await cache.key_for("a" * 64)
    finally:
        await cache.close()
