"""SigningKeys against a real issuer on 127.0.0.1: discovery, caching, rotation, outages, refusals, JWKS files."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.identity.jwks import IssuerUnavailable, SigningKeys, UnknownSigningKey

from ...clocks import FakeClock
from ...identity_issuer import IssuerKey, OidcIssuer


async def test_discovery_and_key_set_are_fetched_once_and_cached(issuer: OidcIssuer, keys: SigningKeys) -> None:
    """Many lookups within the TTL cost one discovery fetch and one JWKS fetch."""
    for _ in range(5):
        key = await keys.key_for(issuer.url, issuer.signing.kid, "RS256", jwks_file=None)
        assert key.key_id == issuer.signing.kid and key.algorithm_name == "RS256"
    assert issuer.fetches == {"discovery": 1, "jwks": 1}


async def test_concurrent_lookups_on_a_cold_cache_share_one_fetch(issuer: OidcIssuer, keys: SigningKeys) -> None:
    """Tokens arriving together for an issuer not yet cached wait for one fetch, not one each."""
    found = await asyncio.gather(*(keys.key_for(issuer.url, issuer.signing.kid, "RS256", jwks_file=None)
                                   for _ in range(10)))
    assert {key.key_id for key in found} == {issuer.signing.kid}
    assert issuer.fetches == {"discovery": 1, "jwks": 1}


@pytest.mark.parametrize(
    ("cache_control", "lifetime"),
    [
        (None, 3600.0),  # no header: the TTL
        ("max-age=120", 120.0),  # honoured within [60 s, TTL]
        ("public, max-age=600, must-revalidate", 600.0),
        ("max-age=0", 60.0),  # held to the floor: not a fetch per token
        ("no-cache", 3600.0),
        ("max-age=86400", 3600.0),  # held to the TTL
    ],
)
async def test_key_set_lives_for_max_age_within_bounds(
    issuer: OidcIssuer, keys: SigningKeys, monotonic: FakeClock[float], cache_control: str | None, lifetime: float
) -> None:
    """The JWKS is fetched again once its Cache-Control max-age (held within [60 s, TTL]) has passed, not before."""
    issuer.cache_control = cache_control
    await keys.key_for(issuer.url, issuer.signing.kid, "RS256", jwks_file=None)
    monotonic.advance(lifetime - 1)
    await keys.key_for(issuer.url, issuer.signing.kid, "RS256", jwks_file=None)
    assert issuer.fetches["jwks"] == 1
    monotonic.advance(1)
    await keys.key_for(issuer.url, issuer.signing.kid, "RS256", jwks_file=None)
    assert issuer.fetches["jwks"] == 2


async def test_rotation_refetches_once_per_interval(
    issuer: OidcIssuer, keys: SigningKeys, monotonic: FakeClock[float]
) -> None:
    """An unknown kid refetches the JWKS once; a second within 60 s does not; after 60 s one does again."""
    await keys.key_for(issuer.url, issuer.signing.kid, "RS256", jwks_file=None)
    second = issuer.rotate()
    assert (await keys.key_for(issuer.url, second.kid, "RS256", jwks_file=None)).key_id == second.kid
    assert issuer.fetches == {"discovery": 1, "jwks": 2}  # the JWKS again, not discovery

    monotonic.advance(59)
    third = issuer.rotate("ES256")
    with pytest.raises(UnknownSigningKey):
        await keys.key_for(issuer.url, third.kid, "ES256", jwks_file=None)
    assert issuer.fetches["jwks"] == 2

    monotonic.advance(1)
    assert (await keys.key_for(issuer.url, third.kid, "ES256", jwks_file=None)).key_id == third.kid
    assert issuer.fetches["jwks"] == 3


async def test_an_unknown_kid_on_a_cold_cache_costs_one_fetch(issuer: OidcIssuer, keys: SigningKeys) -> None:
    """A set fetched for this very token is current: an unknown kid in it is refused without a second fetch."""
    with pytest.raises(UnknownSigningKey):
        await keys.key_for(issuer.url, "made-up", "RS256", jwks_file=None)
    assert issuer.fetches == {"discovery": 1, "jwks": 1}
    # The refetch allowance was not used up: a rotated key is still found at once.
    rotated = issuer.rotate()
    assert (await keys.key_for(issuer.url, rotated.kid, "RS256", jwks_file=None)).key_id == rotated.kid
    assert issuer.fetches == {"discovery": 1, "jwks": 2}


async def test_made_up_kids_cost_one_refetch(issuer: OidcIssuer, keys: SigningKeys) -> None:
    """A stream of unknown kids (concurrent ones too) makes at most one refetch per interval."""
    await keys.key_for(issuer.url, issuer.signing.kid, "RS256", jwks_file=None)
    results = await asyncio.gather(
        *(keys.key_for(issuer.url, f"made-up-{n}", "RS256", jwks_file=None) for n in range(20)),
        return_exceptions=True,
    )
    assert all(isinstance(result, UnknownSigningKey) for result in results)
    assert issuer.fetches == {"discovery": 1, "jwks": 2}


@pytest.mark.parametrize("outage", ["503", "offline"])
async def test_issuer_down_without_a_cached_set(
    issuer: OidcIssuer, keys: SigningKeys, monotonic: FakeClock[float], outage: str
) -> None:
    """No cached set and no issuer: IssuerUnavailable with retry_after (the 5 s retry interval, not the minute of
    unknown-kid refetches: a client told Retry-After finds the issuer soon after it is back), and no new attempt
    before it has passed."""
    if outage == "503":
        issuer.status = 503
    else:
        await issuer.go_offline()
    with pytest.raises(IssuerUnavailable) as first:
        await keys.key_for(issuer.url, issuer.signing.kid, "RS256", jwks_file=None)
    assert first.value.retry_after == 5.0
    attempts = issuer.fetches.total()

    monotonic.advance(2)
    with pytest.raises(IssuerUnavailable) as second:
        await keys.key_for(issuer.url, issuer.signing.kid, "RS256", jwks_file=None)
    assert second.value.retry_after == 3.0
    assert issuer.fetches.total() == attempts

    issuer.status = None
    await issuer.go_online()
    monotonic.advance(3)
    assert (await keys.key_for(issuer.url, issuer.signing.kid, "RS256", jwks_file=None)).key_id == issuer.signing.kid


@pytest.mark.parametrize("outage", ["503", "offline"])
async def test_issuer_down_with_a_cached_set(
    issuer: OidcIssuer, keys: SigningKeys, monotonic: FakeClock[float], outage: str
) -> None:
    """A cached set keeps working past its TTL while the issuer is down, asked again once per interval."""
    await keys.key_for(issuer.url, issuer.signing.kid, "RS256", jwks_file=None)
    if outage == "503":
        issuer.status = 503
    else:
        await issuer.go_offline()
    monotonic.advance(3600)
    for _ in range(3):
        assert (await keys.key_for(issuer.url, issuer.signing.kid, "RS256", jwks_file=None)).key_id == issuer.signing.kid
    if outage == "503":
        assert issuer.fetches == {"discovery": 2, "jwks": 1}  # one attempt (at discovery), then the wait

    # An unknown kid while the issuer is down is no refusal: it may be a rotated key we cannot fetch.
    # Nor is it a reason to ask the issuer again before the retry delay has passed.
    attempts = issuer.fetches.total()
    monotonic.advance(2)
    with pytest.raises(IssuerUnavailable) as unknown:
        await keys.key_for(issuer.url, "rotated-meanwhile", "RS256", jwks_file=None)
    assert unknown.value.retry_after == 3.0
    assert issuer.fetches.total() == attempts

    issuer.status = None
    await issuer.go_online()
    monotonic.advance(3)
    await keys.key_for(issuer.url, issuer.signing.kid, "RS256", jwks_file=None)
    assert issuer.fetches["jwks"] == 2


@pytest.mark.parametrize(
    ("misbehaviour", "reason"),
    [
        ({"discovery_overrides": {"issuer": "https://token.actions.githubusercontent.com"}}, "names issuer"),
        ({"discovery_overrides": {"issuer": None}}, "names issuer"),
        ({"discovery_overrides": {"jwks_uri": "http://192.0.2.1/jwks.json"}}, "neither https nor http to a loopback"),
        ({"discovery_overrides": {"jwks_uri": "file:///etc/passwd"}}, "neither https nor http to a loopback"),
        ({"discovery_overrides": {"jwks_uri": None}}, "neither https nor http to a loopback"),
        ({"jwks_padding": 1024 * 1024}, "more than 1048576"),
        ({"jwks_padding": 1024 * 1024, "jwks_chunked": True}, "more than 1048576"),
        ({"jwks_body": b"<html>maintenance</html>"}, "not JSON"),
        ({"jwks_body": b'{"keys": {}}'}, "not a JWKS"),
        ({"jwks_body": b"[" * 100_000 + b"]" * 100_000}, "not JSON"),
        ({"status": 404}, "answered 404"),
    ],
    ids=["other-issuer", "no-issuer", "http-jwks-uri", "file-jwks-uri", "no-jwks-uri", "oversized",
         "oversized-chunked", "not-json", "not-a-key-set", "nested-too-deep", "not-found"],
)
async def test_a_misbehaving_issuer_is_unavailable(
    issuer: OidcIssuer, keys: SigningKeys, misbehaviour: dict[str, object], reason: str
) -> None:
    """Discovery for another issuer, a jwks_uri over plain http to a non-loopback host, an oversized,
    malformed or missing key set: IssuerUnavailable, saying why."""
    for name, value in misbehaviour.items():
        setattr(issuer, name, value)
    with pytest.raises(IssuerUnavailable) as refused:
        await keys.key_for(issuer.url, issuer.signing.kid, "RS256", jwks_file=None)
    assert reason in str(refused.value)


@pytest.mark.parametrize(
    "issuer_url",
    ["http://192.0.2.1", "http://keygate-issuer.invalid", "ftp://127.0.0.1", "https://", "not a url"],
)
async def test_an_issuer_neither_https_nor_loopback_is_never_contacted(keys: SigningKeys, issuer_url: str) -> None:
    """A policy's issuer over plain http to another host is refused before any request."""
    with pytest.raises(IssuerUnavailable):
        await keys.key_for(issuer_url, "kid", "RS256", jwks_file=None)
    assert keys._session is None  # no client was even opened


async def test_issuer_with_a_trailing_slash(keys: SigningKeys) -> None:
    """An issuer configured with a trailing "/" finds discovery without "//", and its document must keep the "/"."""
    async with OidcIssuer(path="/tenant") as issuer:
        issuer.discovery_overrides = {"issuer": issuer.url + "/"}
        key = await keys.key_for(issuer.url + "/", issuer.signing.kid, "RS256", jwks_file=None)
        assert key.key_id == issuer.signing.kid
        with pytest.raises(IssuerUnavailable):  # the document names url + "/", not url
            await keys.key_for(issuer.url, issuer.signing.kid, "RS256", jwks_file=None)


async def test_a_jwks_uri_on_localhost_over_http_is_fetched(issuer: OidcIssuer, keys: SigningKeys) -> None:
    """http is fine for a loopback host named localhost."""
    issuer.discovery_overrides = {"jwks_uri": f"http://localhost:{issuer.port}/jwks.json"}
    assert (await keys.key_for(issuer.url, issuer.signing.kid, "RS256", jwks_file=None)).key_id == issuer.signing.kid


async def test_a_redirect_is_not_followed(issuer: OidcIssuer, keys: SigningKeys) -> None:
    """The URL checked is the URL fetched: a 3xx is a failure, not a hop to somewhere else."""
    issuer.jwks_redirect = issuer.url + "/attacker/jwks.json"
    with pytest.raises(IssuerUnavailable, match="answered 302"):
        await keys.key_for(issuer.url, issuer.attacker.kid, "RS256", jwks_file=None)
    assert issuer.fetches["attacker"] == 0


# -- keys that do not fit the token's alg ------------------------------------------------------------

@pytest.fixture
async def mixed_issuer() -> AsyncIterator[OidcIssuer]:
    """An issuer publishing one key of each kind: RSA, EC P-256, EC P-384, and members we must skip."""
    async with OidcIssuer() as running:
        rsa_key, ec_key = running.signing, IssuerKey.generate("ES256")
        p384 = IssuerKey.generate("ES384")
        ps256 = IssuerKey.generate("RS256")
        encryption = IssuerKey.generate("RS256")
        running.published = [rsa_key, ec_key, p384, ps256, encryption]
        jwks = {"keys": [rsa_key.public_jwk(), ec_key.public_jwk(),
                         p384.public_jwk(alg="ES256"),  # claims ES256, is P-384
                         ps256.public_jwk(alg="PS256"),
                         encryption.public_jwk(use="enc"),
                         {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0"},
                         {"kty": "RSA", "kid": "broken", "n": "AQAB", "e": "AQAB", "alg": "RS256"},
                         "not a key"]}
        running.jwks_body = json.dumps(jwks).encode()
        yield running


@pytest.mark.parametrize(
    ("which", "alg"),
    [
        ("rsa", "ES256"),  # an RSA key for an ES256 token
        ("ec", "RS256"),  # an EC key for an RS256 token
        ("p384", "ES256"),  # the wrong curve, whatever its alg member says
        ("ps256", "RS256"),  # an RSA key declared for another algorithm
        ("encryption", "RS256"),  # use: enc
        ("hmac", "HS256"),  # a symmetric key: never
        ("hmac", "none"),
        ("broken", "RS256"),  # a member that is no key at all
    ],
)
async def test_a_key_that_does_not_fit_the_alg_is_never_used(
    mixed_issuer: OidcIssuer, keys: SigningKeys, which: str, alg: str
) -> None:
    """A JWK whose kty, crv, alg or use does not fit the token's alg fails as an unknown key."""
    kids = {"rsa": mixed_issuer.published[0].kid, "ec": mixed_issuer.published[1].kid,
            "p384": mixed_issuer.published[2].kid, "ps256": mixed_issuer.published[3].kid,
            "encryption": mixed_issuer.published[4].kid, "hmac": "hmac", "broken": "broken"}
    with pytest.raises(UnknownSigningKey):
        await keys.key_for(mixed_issuer.url, kids[which], alg, jwks_file=None)


async def test_the_fitting_keys_of_a_mixed_set_are_found(mixed_issuer: OidcIssuer, keys: SigningKeys) -> None:
    """The RSA key verifies RS256, the P-256 key ES256."""
    rsa_key, ec_key = mixed_issuer.published[0], mixed_issuer.published[1]
    assert (await keys.key_for(mixed_issuer.url, rsa_key.kid, "RS256", jwks_file=None)).algorithm_name == "RS256"
    assert (await keys.key_for(mixed_issuer.url, ec_key.kid, "ES256", jwks_file=None)).algorithm_name == "ES256"


async def test_without_kid_only_a_single_fitting_key_is_used(mixed_issuer: OidcIssuer, keys: SigningKeys) -> None:
    """No kid: the one key that fits the alg; with two that fit, none."""
    assert (await keys.key_for(mixed_issuer.url, None, "ES256", jwks_file=None)).key_id == mixed_issuer.published[1].kid
    # Two RSA keys fit RS256 once the second is published: no guessing.
    mixed_issuer.jwks_body = json.dumps({"keys": [mixed_issuer.published[0].public_jwk(),
                                                  IssuerKey.generate("RS256").public_jwk()]}).encode()
    fresh = SigningKeys(clock=FakeClock())
    try:
        with pytest.raises(UnknownSigningKey):
            await fresh.key_for(mixed_issuer.url, None, "RS256", jwks_file=None)
    finally:
        await fresh.close()


# -- JWKS files (the Kubernetes case) ---------------------------------------------------------------

async def test_a_jwks_file_is_read_without_any_request(issuer: OidcIssuer, keys: SigningKeys, tmp_path: Path) -> None:
    """A policy's jwks_file is the key set: nothing is fetched, not even discovery."""
    path = issuer.write_jwks(tmp_path / "jwks.json")
    key = await keys.key_for("https://kubernetes.default.svc.cluster.local", issuer.signing.kid, "RS256",
                             jwks_file=str(path))
    assert key.key_id == issuer.signing.kid
    assert issuer.fetches.total() == 0 and keys._session is None


async def test_a_jwks_file_is_read_again_when_it_changes(
    issuer: OidcIssuer, keys: SigningKeys, tmp_path: Path
) -> None:
    """A rotated key written to the file is found; a key dropped from it is no longer accepted."""
    path = str(issuer.write_jwks(tmp_path / "jwks.json"))
    old = issuer.signing
    await keys.key_for(issuer.url, old.kid, "RS256", jwks_file=path)
    new = issuer.rotate(keep_old=False)
    with pytest.raises(UnknownSigningKey):  # not in the file yet
        await keys.key_for(issuer.url, new.kid, "RS256", jwks_file=path)
    issuer.write_jwks(path)
    assert (await keys.key_for(issuer.url, new.kid, "RS256", jwks_file=path)).key_id == new.kid
    with pytest.raises(UnknownSigningKey):
        await keys.key_for(issuer.url, old.kid, "RS256", jwks_file=path)


async def test_an_unchanged_jwks_file_is_not_read_again(
    issuer: OidcIssuer, keys: SigningKeys, tmp_path: Path
) -> None:
    """The file is re-read only when its mtime, size or inode changes."""
    path = issuer.write_jwks(tmp_path / "jwks.json")
    before = os.stat(path)
    await keys.key_for(issuer.url, issuer.signing.kid, "RS256", jwks_file=str(path))
    # Same inode, same size, mtime put back: to the cache this is the version it read.
    text = path.read_text()
    path.write_text(text.replace(issuer.signing.kid, "x" * len(issuer.signing.kid)))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (await keys.key_for(issuer.url, issuer.signing.kid, "RS256", jwks_file=str(path))).key_id == issuer.signing.kid
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))
    with pytest.raises(UnknownSigningKey):
        await keys.key_for(issuer.url, issuer.signing.kid, "RS256", jwks_file=str(path))


async def test_a_broken_jwks_file_keeps_the_version_read_before(
    issuer: OidcIssuer, keys: SigningKeys, tmp_path: Path
) -> None:
    """A file half-written or removed leaves the last good key set in use; with none, IssuerUnavailable."""
    missing = tmp_path / "missing.json"
    with pytest.raises(IssuerUnavailable) as unavailable:
        await keys.key_for(issuer.url, issuer.signing.kid, "RS256", jwks_file=str(missing))
    assert unavailable.value.retry_after > 0

    path = issuer.write_jwks(tmp_path / "jwks.json")
    await keys.key_for(issuer.url, issuer.signing.kid, "RS256", jwks_file=str(path))
    path.write_text('{"keys": [')
    assert (await keys.key_for(issuer.url, issuer.signing.kid, "RS256", jwks_file=str(path))).key_id == issuer.signing.kid
    path.unlink()
    assert (await keys.key_for(issuer.url, issuer.signing.kid, "RS256", jwks_file=str(path))).key_id == issuer.signing.kid


async def test_an_oversized_jwks_file_is_refused(issuer: OidcIssuer, tmp_path: Path) -> None:
    """A file larger than max_bytes is not read."""
    path = issuer.write_jwks(tmp_path / "jwks.json")
    small = SigningKeys(clock=FakeClock(), max_bytes=100)
    try:
        with pytest.raises(IssuerUnavailable, match="more than 100"):
            await small.key_for(issuer.url, issuer.signing.kid, "RS256", jwks_file=str(path))
    finally:
        await small.close()
