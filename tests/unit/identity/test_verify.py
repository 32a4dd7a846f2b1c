"""TokenVerifier: GitHub Actions and Kubernetes tokens from a real issuer, against trust policies."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.identity.jwks import IssuerUnavailable, SigningKeys
from gateway.identity.verify import AmbiguousPolicy, InvalidToken, TokenVerifier, Verified, glob_match
from gateway.models import TrustPolicy

from ...clocks import WALL_START, FakeClock
from ...identity_issuer import IssuerKey, OidcIssuer, hmac_token, unsigned_token

AUDIENCE = "https://keygate.example"


def policy(issuer: str, name: str = "deploy", *, audience: str = AUDIENCE,
           conditions: dict[str, str] | None = None, jwks_file: str | None = None) -> TrustPolicy:
    conditions = {"repository": "acme/shop"} if conditions is None else conditions
    return TrustPolicy(
        name=name, issuer=issuer, audience=audience, conditions=tuple(sorted(conditions.items())),
        org="acme", role="deployer", operations=(), servers=(), ip_allowlist=(), rate_limit=None,
        lifetime=900, jwks_file=jwks_file, created_by="admin", created_at=WALL_START, updated_at=WALL_START,
    )


@pytest.fixture
def verifier(keys: SigningKeys, wall: FakeClock[datetime]) -> TokenVerifier:
    return TokenVerifier(keys, leeway=60.0, clock=wall)


async def test_a_github_actions_token_is_verified(issuer: OidcIssuer, verifier: TokenVerifier) -> None:
    """A token shaped like GitHub's yields its policy, its claims, sha256(iss + "\\n" + jti) and its exp."""
    claims = issuer.github_claims(WALL_START)
    accepting = policy(issuer.url, conditions={"repository": "acme/shop", "ref": "refs/heads/main"})
    verified = await verifier.verify(issuer.token(claims), [accepting])
    assert verified == Verified(
        policy=accepting,
        claims=claims,
        token_id=hashlib.sha256(f"{issuer.url}\n{claims['jti']}".encode()).hexdigest(),
        expires_at=datetime.fromtimestamp(claims["exp"], UTC),
    )


async def test_an_es256_token_is_verified(issuer: OidcIssuer, verifier: TokenVerifier) -> None:
    """An issuer signing with EC P-256 keys works the same."""
    issuer.rotate("ES256")
    verified = await verifier.verify(issuer.token(issuer.github_claims(WALL_START)), [policy(issuer.url)])
    assert verified.policy.name == "deploy"


async def test_a_kubernetes_token_is_verified_from_a_jwks_file(
    issuer: OidcIssuer, verifier: TokenVerifier, tmp_path: Path
) -> None:
    """A projected service-account token, keys from the policy's JWKS file: no request to the issuer at all."""
    path = str(issuer.write_jwks(tmp_path / "jwks.json"))
    claims = issuer.kubernetes_claims(WALL_START, namespace="ci", serviceaccount="deployer")
    token = issuer.token(claims, headers={"typ": None})  # Kubernetes' header is alg and kid only
    k8s = policy(issuer.url, conditions={"sub": "system:serviceaccount:ci:*"}, jwks_file=path)
    verified = await verifier.verify(token, [k8s])
    assert verified.policy is k8s and verified.claims["kubernetes.io"]["namespace"] == "ci"
    # No jti: the token is known by the hash of its signed part.
    assert verified.token_id == hashlib.sha256(token.rpartition(".")[0].encode()).hexdigest()
    assert issuer.fetches.total() == 0


async def test_a_rotated_kubernetes_key_is_found_after_the_file_changes(
    issuer: OidcIssuer, verifier: TokenVerifier, tmp_path: Path
) -> None:
    """The API server's keys rotate: once the JWKS file is rewritten, tokens of the new key verify."""
    path = str(issuer.write_jwks(tmp_path / "jwks.json"))
    k8s = policy(issuer.url, conditions={"sub": "system:serviceaccount:ci:deployer"}, jwks_file=path)
    await verifier.verify(issuer.token(issuer.kubernetes_claims(WALL_START)), [k8s])
    issuer.rotate(keep_old=False)
    token = issuer.token(issuer.kubernetes_claims(WALL_START))
    with pytest.raises(InvalidToken):
        await verifier.verify(token, [k8s])
    issuer.write_jwks(path)
    assert (await verifier.verify(token, [k8s])).policy is k8s


# -- bad input: InvalidToken, whatever the token gets wrong ---------------------------------------------

def _with(**overrides: Any) -> Callable[[OidcIssuer, datetime], str]:
    return lambda issuer, now: issuer.token(issuer.github_claims(now, **overrides))


def _with_kid(kid: str) -> Callable[[OidcIssuer, datetime], str]:
    return lambda issuer, now: issuer.token(issuer.github_claims(now), kid=kid)


def _iss_with_slash(issuer: OidcIssuer, now: datetime) -> str:
    return issuer.token(issuer.github_claims(now, iss=issuer.url + "/"))


PROD = {"repository": "acme/shop", "environment": "prod"}


def _bad_signature(issuer: OidcIssuer, now: datetime) -> str:
    head, payload, signature = issuer.token(issuer.github_claims(now)).split(".")
    flipped = base64.urlsafe_b64decode(signature + "==")
    flipped = bytes([flipped[0] ^ 1]) + flipped[1:]
    return ".".join((head, payload, base64.urlsafe_b64encode(flipped).rstrip(b"=").decode()))


def _payload_swapped(issuer: OidcIssuer, now: datetime) -> str:
    """A signature of one token on the claims of another (another repository)."""
    head, _, signature = issuer.token(issuer.github_claims(now)).split(".")
    _, payload, _ = issuer.token(issuer.github_claims(now, repository="acme/other")).split(".")
    return ".".join((head, payload, signature))


def _signed_by_attacker(issuer: OidcIssuer, now: datetime, **headers: Any) -> str:
    """Signed with a key the issuer never published, under the kid of the issuer's real key."""
    return issuer.token(issuer.github_claims(now), key=issuer.attacker, kid=issuer.signing.kid, headers=headers)


def _alg_none(issuer: OidcIssuer, now: datetime) -> str:
    return unsigned_token(issuer.github_claims(now), kid=issuer.signing.kid)


def _hs256_with_public_key(issuer: OidcIssuer, now: datetime) -> str:
    """The RS256 -> HS256 confusion: an HMAC keyed with the issuer's public key, which anyone can fetch."""
    return hmac_token(issuer.github_claims(now), issuer.signing.public_pem(), kid=issuer.signing.kid)


def _hs256_with_public_jwk(issuer: OidcIssuer, now: datetime) -> str:
    jwk = issuer.signing.public_jwk()
    return hmac_token(issuer.github_claims(now), jwk["n"].encode(), kid=issuer.signing.kid)


def _es256_header_on_an_rsa_key(issuer: OidcIssuer, now: datetime) -> str:
    """An ES256 token naming the kid of the issuer's RSA key (signed by some EC key)."""
    return issuer.token(issuer.github_claims(now), key=IssuerKey.generate("ES256"), kid=issuer.signing.kid)


def _weak_rsa_key(issuer: OidcIssuer, now: datetime) -> str:
    weak = IssuerKey.generate("RS256", bits=1024)
    issuer.published = [*issuer.published, weak]
    return issuer.token(issuer.github_claims(now), key=weak)


def _jku_to_attacker_keys(issuer: OidcIssuer, now: datetime) -> str:
    """Signed by the attacker, whose key set the jku/x5u headers point at."""
    return issuer.token(issuer.github_claims(now), key=issuer.attacker,
                        headers={"jku": issuer.url + "/attacker/jwks.json", "x5u": issuer.url + "/attacker/jwks.json"})


def _embedded_jwk(issuer: OidcIssuer, now: datetime) -> str:
    """Signed by the attacker, whose public key rides along in the jwk header, under the real kid."""
    return _signed_by_attacker(issuer, now, jwk=issuer.attacker.public_jwk())


def _jwk_without_kid(issuer: OidcIssuer, now: datetime) -> str:
    return issuer.token(issuer.github_claims(now), key=issuer.attacker,
                        headers={"kid": None, "jwk": issuer.attacker.public_jwk()})


# (case, the token, the policy's conditions (None: repository acme/shop), what the log message says)
BAD_TOKENS: list[tuple[str, Callable[[OidcIssuer, datetime], str], dict[str, str] | None, str]] = [
    ("not a JWT", lambda issuer, now: "not-a-jwt", None, "not a JWT"),
    ("empty", lambda issuer, now: "", None, "not a JWT"),
    ("three dots of junk", lambda issuer, now: "a.b.c", None, "not a JWT"),
    ("JSON array payload", lambda issuer, now: issuer.token({"x": 1}).split(".")[0] + ".WzFd.c2ln", None, "not a JWT"),
    ("too long", _with(padding="x" * 20_000), None, "more than 16384"),
    ("bad signature", _bad_signature, None, "Signature verification failed"),
    ("payload of another token", _payload_swapped, None, "Signature verification failed"),
    ("signed by another key", _signed_by_attacker, None, "Signature verification failed"),
    ("unknown kid after refetch", _with_kid("rotated-away"), None, "has no key 'rotated-away'"),
    ("alg none", _alg_none, None, "alg 'none' is not allowed"),
    ("HS256 with the public key's PEM", _hs256_with_public_key, None, "alg 'HS256' is not allowed"),
    ("HS256 with the public key's modulus", _hs256_with_public_jwk, None, "alg 'HS256' is not allowed"),
    ("ES256 on an RSA key", _es256_header_on_an_rsa_key, None, "0 keys of the set fit"),
    ("RSA key under 2048 bits", _weak_rsa_key, None, "1024 bits"),
    ("jku and x5u to the attacker's keys", _jku_to_attacker_keys, None, "has no key"),
    ("embedded jwk", _embedded_jwk, None, "Signature verification failed"),
    ("embedded jwk without kid", _jwk_without_kid, None, "Signature verification failed"),
    ("wrong iss", _with(iss="https://token.actions.githubusercontent.com"), None, "no policy trusts issuer"),
    ("iss with a trailing slash", _iss_with_slash, None, "no policy trusts issuer"),
    ("no iss", _with(iss=None), None, "no iss"),
    ("wrong aud", _with(aud="https://github.com/acme"), None, "accepts sub"),
    ("aud list without ours", _with(aud=["https://a.example", "https://b.example"]), None, "accepts sub"),
    ("no aud", _with(aud=None), None, "accepts sub"),
    ("aud of another type", _with(aud={"x": AUDIENCE}), None, "aud is neither"),
    ("expired", _with(exp=int(WALL_START.timestamp()) - 61), None, "expired 61 s ago"),
    ("no exp", _with(exp=None), None, "no exp"),
    ("exp as a string", _with(exp=str(int(WALL_START.timestamp()) + 300)), None, "exp is not a number"),
    ("exp true", _with(exp=True), None, "exp is not a number"),
    ("not yet valid (nbf)", _with(nbf=int(WALL_START.timestamp()) + 61), None, "(nbf)"),
    ("issued in the future (iat)", _with(iat=int(WALL_START.timestamp()) + 61), None, "(iat)"),
    ("no policy matches", _with(repository="acme/other"), None, "accepts sub"),
    ("a condition on a claim the token lacks", _with(), PROD, "accepts sub"),
    ("a condition the token's claim fails", _with(environment="staging"), PROD, "accepts sub"),
]


@pytest.mark.parametrize(("make_token", "conditions", "reason"), [case[1:] for case in BAD_TOKENS],
                         ids=[case[0] for case in BAD_TOKENS])
async def test_bad_tokens_are_invalid(
    issuer: OidcIssuer, verifier: TokenVerifier,
    make_token: Callable[[OidcIssuer, datetime], str], conditions: dict[str, str] | None, reason: str,
) -> None:
    """Every token the issue lists as bad input (and its variants) is InvalidToken, for the reason the log gives."""
    await verifier.verify(issuer.token(issuer.github_claims(WALL_START)), [policy(issuer.url)])  # keys cached
    with pytest.raises(InvalidToken) as invalid:
        await verifier.verify(make_token(issuer, WALL_START), [policy(issuer.url, conditions=conditions)])
    assert reason in str(invalid.value)
    assert issuer.fetches["attacker"] == 0  # SECURITY: no header ever made us fetch a key


async def test_an_unknown_kid_is_refused_only_after_a_refetch(issuer: OidcIssuer, verifier: TokenVerifier) -> None:
    """The key set is fetched again before an unknown kid is refused."""
    await verifier.verify(issuer.token(issuer.github_claims(WALL_START)), [policy(issuer.url)])
    with pytest.raises(InvalidToken):
        await verifier.verify(issuer.token(issuer.github_claims(WALL_START), kid="rotated-away"), [policy(issuer.url)])
    assert issuer.fetches["jwks"] == 2


async def test_a_rotated_key_verifies(issuer: OidcIssuer, verifier: TokenVerifier) -> None:
    """After the issuer rotates, the first token of the new key verifies (by a refetch)."""
    await verifier.verify(issuer.token(issuer.github_claims(WALL_START)), [policy(issuer.url)])
    issuer.rotate()
    verified = await verifier.verify(issuer.token(issuer.github_claims(WALL_START)), [policy(issuer.url)])
    assert verified.policy.name == "deploy"


# -- time: the injected clock, with leeway -------------------------------------------------------------

@pytest.mark.parametrize(
    ("claims", "valid"),
    [
        ({"exp": -59}, True),  # within leeway
        ({"exp": -60}, False),  # exp <= now - leeway
        ({"nbf": 60}, True),
        ({"nbf": 61}, False),
        ({"iat": 60}, True),
        ({"iat": 61}, False),
        ({"nbf": None, "iat": None}, True),  # optional
        ({"exp": 0.5}, True),  # NumericDate may be fractional
        ({"nbf": 60.5}, False),
    ],
)
async def test_time_claims_with_leeway(
    issuer: OidcIssuer, verifier: TokenVerifier, claims: dict[str, float | None], valid: bool
) -> None:
    """exp, nbf and iat (seconds from now) hold with 60 s of leeway, on the verifier's clock."""
    now = WALL_START.timestamp()
    overrides = {name: None if offset is None else now + offset for name, offset in claims.items()}
    if "exp" not in claims:
        overrides["exp"] = now + 300
    token = issuer.token(issuer.github_claims(WALL_START, **overrides))
    if valid:
        await verifier.verify(token, [policy(issuer.url)])
    else:
        with pytest.raises(InvalidToken):
            await verifier.verify(token, [policy(issuer.url)])


async def test_expiry_follows_the_injected_clock(
    issuer: OidcIssuer, verifier: TokenVerifier, wall: FakeClock[datetime]
) -> None:
    """A token minted weeks before the machine's date verifies at the injected time, and expires when it moves on."""
    token = issuer.token(issuer.github_claims(WALL_START))  # exp = iat + 300
    await verifier.verify(token, [policy(issuer.url)])
    wall.advance(300 + 59)
    await verifier.verify(token, [policy(issuer.url)])
    wall.advance(1)
    with pytest.raises(InvalidToken):
        await verifier.verify(token, [policy(issuer.url)])


# -- conditions: exact, globs, numbers --------------------------------------------------------------------

@pytest.mark.parametrize(
    ("claim", "pattern", "value", "matches"),
    [
        ("ref", "refs/heads/main", "refs/heads/main", True),
        ("ref", "refs/heads/main", "refs/heads/main2", False),
        ("ref", "refs/heads/main", "refs/heads/MAIN", False),
        ("ref", "refs/heads/*", "refs/heads/main", True),
        ("ref", "refs/heads/*", "refs/heads/feature/login", True),  # * crosses "/"
        ("ref", "refs/heads/*", "refs/tags/v1.0", False),
        ("ref", "refs/heads/*", "refs/heads/", True),
        ("ref", "refs/tags/v?.0", "refs/tags/v1.0", True),
        ("ref", "refs/tags/v?.0", "refs/tags/v10.0", False),
        ("sub", "repo:acme/*:environment:prod", "repo:acme/shop:environment:prod", True),
        ("sub", "repo:acme/*:environment:prod", "repo:acme/shop:environment:staging", False),
        ("sub", "repo:acme/*:environment:prod", "repo:evil/shop:environment:prod", False),
        ("sub", "repo:acme/*:environment:prod", "repo:acme/shop:ref:refs/heads/main", False),
        ("repository", "acme/[s]hop", "acme/shop", False),  # [ is literal, not a character class
        ("repository", "acme/[s]hop", "acme/[s]hop", True),
        ("repository", "acme/sh[!o]p", "acme/shap", False),
        ("repository", "acme/[s]h*", "acme/shop", False),  # ... in a glob too
        ("repository", "acme/[s]h*", "acme/[s]hop", True),
        ("repository", "acme/sh[!x]*", "acme/shop", False),
        ("repository", "acme/sh.p", "acme/shop", False),  # . is literal, not "any character"
        ("repository", "acme/sh.p", "acme/sh.p", True),
        ("repository", "acme/.*", "acme/shop", False),
        ("ref", "refs/heads/release.*", "refs/heads/releaseX1", False),  # ... in a glob too
        ("ref", "refs/heads/release.*", "refs/heads/release.1", True),
        ("ref", "refs/heads/(main|dev)*", "refs/heads/main", False),
        ("ref", "refs/heads/ma+in?", "refs/heads/maaint", False),
        ("repository", "acme/^shop$", "acme/^shop$", True),
        ("repository", "acme\\*", "acme\\shop", True),  # a backslash escapes nothing
        ("repository", "acme\\*", "acme*", False),
        ("repository", "*", "acme/shop", True),
    ],
)
async def test_globs_and_exact_patterns(
    issuer: OidcIssuer, verifier: TokenVerifier, claim: str, pattern: str, value: str, matches: bool
) -> None:
    """A pattern with * or ? is a glob (* any run of characters, ? one), anything else is compared exactly;
    every other character is literal."""
    overrides = {"sub": value} if claim == "sub" else {claim: value}
    token = issuer.token(issuer.github_claims(WALL_START, **overrides))
    conditions = {claim: pattern} if claim in ("sub", "repository") else {"repository": "acme/shop", claim: pattern}
    accepting = policy(issuer.url, conditions=conditions)
    if matches:
        assert (await verifier.verify(token, [accepting])).policy is accepting
    else:
        with pytest.raises(InvalidToken):
            await verifier.verify(token, [accepting])


def test_a_pathological_glob_takes_linear_time() -> None:
    """Many stars against a long near-miss is answered at once (no backtracking blow-up)."""
    assert not glob_match("a*" * 50 + "b", "a" * 16_000)
    assert glob_match("a*" * 50 + "b", "a" * 16_000 + "b")


@pytest.mark.parametrize(
    ("value", "pattern", "matches"),
    [
        (42, "42", True),  # a number by its JSON text
        (42, "4?", True),
        (42, "42.0", False),
        (1.5, "1.5", True),
        (-3, "-3", True),
        (0, "0", True),
        (12345678901234567890, "12345678901234567890", True),
        ("42", "42", True),  # GitHub's ids are strings
        (True, "true", False),  # not a number: never matches
        (True, "1", False),
        (False, "*", False),
        (None, "*", False),
        (["42"], "42", False),
        ({"name": "deployer"}, "*", False),
    ],
)
async def test_claim_values_of_every_type(
    issuer: OidcIssuer, verifier: TokenVerifier, value: Any, pattern: str, matches: bool
) -> None:
    """Strings and numbers (by their JSON text) can match a pattern; booleans, null, lists and objects never do."""
    token = issuer.token(issuer.github_claims(WALL_START, run_number=value))
    if value is None:  # present as null, not dropped
        token = issuer.token({**issuer.github_claims(WALL_START), "run_number": None})
    accepting = policy(issuer.url, conditions={"repository": "acme/shop", "run_number": pattern})
    if matches:
        assert (await verifier.verify(token, [accepting])).policy is accepting
    else:
        with pytest.raises(InvalidToken):
            await verifier.verify(token, [accepting])


async def test_a_missing_claim_never_matches_even_a_bare_star(issuer: OidcIssuer, verifier: TokenVerifier) -> None:
    """A condition on a claim the token lacks fails, whatever its pattern."""
    token = issuer.token(issuer.github_claims(WALL_START))
    with pytest.raises(InvalidToken):
        await verifier.verify(token, [policy(issuer.url, conditions={"repository": "*", "environment": "*"})])


# -- several policies on one issuer ---------------------------------------------------------------------

async def test_several_policies_on_one_issuer(issuer: OidcIssuer, verifier: TokenVerifier) -> None:
    """Among policies sharing an issuer, the one whose audience and conditions hold is chosen."""
    main = policy(issuer.url, "main", conditions={"repository": "acme/shop", "ref": "refs/heads/main"})
    tags = policy(issuer.url, "tags", conditions={"repository": "acme/shop", "ref": "refs/tags/*"})
    other_audience = policy(issuer.url, "other-audience", audience="https://elsewhere.example")
    elsewhere = policy("https://token.actions.githubusercontent.com", "elsewhere")
    everything = [elsewhere, other_audience, tags, main]
    assert (await verifier.verify(issuer.token(issuer.github_claims(WALL_START)), everything)).policy is main
    tag_token = issuer.token(issuer.github_claims(WALL_START, ref="refs/tags/v1.2"))
    assert (await verifier.verify(tag_token, everything)).policy is tags


async def test_two_matching_policies_are_ambiguous_unless_one_is_named(
    issuer: OidcIssuer, verifier: TokenVerifier
) -> None:
    """Two policies accepting one token: AmbiguousPolicy; policy_name picks one; naming one that fails is invalid."""
    build = policy(issuer.url, "build", conditions={"repository": "acme/*"})
    deploy = policy(issuer.url, "deploy", conditions={"repository": "acme/shop"})
    staging = policy(issuer.url, "staging", conditions={"repository": "acme/shop", "environment": "staging"})
    token = issuer.token(issuer.github_claims(WALL_START))
    with pytest.raises(AmbiguousPolicy):
        await verifier.verify(token, [build, deploy, staging])
    assert (await verifier.verify(token, [build, deploy, staging], policy_name="deploy")).policy is deploy
    assert (await verifier.verify(token, [build, deploy, staging], policy_name="build")).policy is build
    with pytest.raises(InvalidToken):
        await verifier.verify(token, [build, deploy, staging], policy_name="staging")
    with pytest.raises(InvalidToken):
        await verifier.verify(token, [build, deploy, staging], policy_name="nonexistent")


async def test_a_kubernetes_audience_list_contains_the_policys(
    issuer: OidcIssuer, verifier: TokenVerifier, tmp_path: Path
) -> None:
    """aud is a list in Kubernetes tokens: it must contain the policy's audience."""
    path = str(issuer.write_jwks(tmp_path / "jwks.json"))
    claims = issuer.kubernetes_claims(WALL_START, aud=["https://kubernetes.default.svc", AUDIENCE])
    k8s = policy(issuer.url, conditions={"sub": "system:serviceaccount:ci:deployer"}, jwks_file=path)
    assert (await verifier.verify(issuer.token(claims), [k8s])).policy is k8s


async def test_policies_of_one_issuer_with_different_key_sources(
    issuer: OidcIssuer, verifier: TokenVerifier, tmp_path: Path
) -> None:
    """A policy is a candidate only if its own key source verified the token."""
    stale = tmp_path / "stale.json"
    stale_issuer_key = IssuerKey.generate("RS256")
    stale.write_text(json.dumps({"keys": [stale_issuer_key.public_jwk()]}))
    by_file = policy(issuer.url, "by-file", conditions={"repository": "acme/*"}, jwks_file=str(stale))
    by_discovery = policy(issuer.url, "by-discovery")
    token = issuer.token(issuer.github_claims(WALL_START))
    assert (await verifier.verify(token, [by_file, by_discovery])).policy is by_discovery


# -- the token's identity, and issuer outages ---------------------------------------------------------------

def _malleate_es256(token: str) -> str:
    """The same ES256 token with the other valid signature (r, n - s)."""
    head, payload, signature = token.split(".")
    raw = base64.urlsafe_b64decode(signature + "==")
    r, s = raw[:32], int.from_bytes(raw[32:], "big")
    n = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    other = r + (n - s).to_bytes(32, "big")
    return ".".join((head, payload, base64.urlsafe_b64encode(other).rstrip(b"=").decode()))


async def test_a_token_without_jti_is_known_by_its_signed_part(
    issuer: OidcIssuer, verifier: TokenVerifier, tmp_path: Path
) -> None:
    """Without jti the token_id ignores the signature: the other valid ECDSA signature is the same token (a replay)."""
    issuer.rotate("ES256")
    path = str(issuer.write_jwks(tmp_path / "jwks.json"))
    k8s = policy(issuer.url, conditions={"sub": "system:serviceaccount:ci:deployer"}, jwks_file=path)
    token = issuer.token(issuer.kubernetes_claims(WALL_START))
    twin = _malleate_es256(token)
    assert twin != token
    first, second = await verifier.verify(token, [k8s]), await verifier.verify(twin, [k8s])
    assert first.token_id == second.token_id
    a_second_later = issuer.kubernetes_claims(WALL_START, iat=int(WALL_START.timestamp()) + 1)
    later = await verifier.verify(issuer.token(a_second_later), [k8s])
    assert later.token_id != first.token_id


async def test_jti_makes_the_token_id(issuer: OidcIssuer, verifier: TokenVerifier) -> None:
    """Two tokens with one jti from one issuer share their token_id (the second is a replay)."""
    one = issuer.token(issuer.github_claims(WALL_START, jti="run-1"))
    two = issuer.token(issuer.github_claims(WALL_START, jti="run-1", run_attempt="2"))
    ids = {(await verifier.verify(token, [policy(issuer.url)])).token_id for token in (one, two)}
    assert ids == {hashlib.sha256(f"{issuer.url}\nrun-1".encode()).hexdigest()}


async def test_an_unreachable_issuer_is_no_refusal(
    issuer: OidcIssuer, verifier: TokenVerifier, tmp_path: Path
) -> None:
    """When the keys cannot be had, verify raises IssuerUnavailable with retry_after, not InvalidToken."""
    await issuer.go_offline()
    with pytest.raises(IssuerUnavailable) as unavailable:
        await verifier.verify(issuer.token(issuer.github_claims(WALL_START)), [policy(issuer.url)])
    assert unavailable.value.retry_after == 5.0
    with pytest.raises(IssuerUnavailable):
        missing = str(tmp_path / "missing.json")
        await verifier.verify(issuer.token(issuer.kubernetes_claims(WALL_START)),
                              [policy(issuer.url, conditions={"sub": "*"}, jwks_file=missing)])


async def test_a_token_of_an_unconfigured_issuer_costs_no_fetch(issuer: OidcIssuer, verifier: TokenVerifier) -> None:
    """iss selects among the policies: a token naming any other issuer is refused without a request."""
    stranger = issuer.token(issuer.github_claims(WALL_START, iss="http://127.0.0.1:9/"))
    with pytest.raises(InvalidToken):
        await verifier.verify(stranger, [policy(issuer.url)])
    assert issuer.fetches.total() == 0 and verifier.keys._session is None


def test_rsa_keys_made_by_the_issuer_are_2048_bits() -> None:
    """The test issuer's RSA keys are of the size real issuers use (the weak-key case makes its own)."""
    key = IssuerKey.generate("RS256").private_key
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
