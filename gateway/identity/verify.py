"""Is this OIDC token one a trust policy accepts? Signature, issuer, audience, time, claim conditions.

:meth:`TokenVerifier.verify` runs the checks in a fixed order, each cheap
one before the costly ones:

1. the token is a JWS of bounded size whose ``alg`` is RS256 or ES256;
2. its ``iss`` (unverified yet) selects the policies naming that issuer, so
   a token for no configured issuer costs us no fetch and no signature check;
3. the signature, with the issuer's key for the header's ``kid`` (PyJWT,
   with a fixed algorithm allowlist and a key bound to its algorithm);
4. ``exp`` (required), ``nbf`` and ``iat`` against the injected clock,
   with ``leeway``;
5. each policy's audience and claim conditions: exactly one must hold (or
   the named one).

Everything a token gets wrong is :class:`InvalidToken`, whose message is for
the log only: the client learns that the grant is invalid, never which
check failed, so a caller cannot probe a policy's conditions one by one.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

import jwt

from ..models import TrustPolicy
from .jwks import KEY_TYPES, IssuerUnavailable, SigningKeys, UnknownSigningKey

# The algorithms PyJWT may verify with, fixed here and never taken from the token (RFC 8725 §2.1).
ALGORITHMS = tuple(KEY_TYPES)

# The longest token we parse. GitHub's and Kubernetes' are 1-2 KiB; the bound caps the base64 and
# JSON work an unauthenticated caller can make us do before any signature check.
MAX_TOKEN_LENGTH = 16 * 1024

# PyJWT checks the signature and the shape of sub and jti. It does not check the time claims: it
# reads the wall clock (datetime.now) with no way to pass another, and Keygate's clocks are
# injected, so exp/nbf/iat are checked below against ours. iss and aud are compared per policy.
_DECODE_OPTIONS: dict[str, Any] = {
    "verify_signature": True,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_iss": False,
    "verify_aud": False,
    "verify_sub": True,
    "verify_jti": True,
    "require": [],
    "enforce_minimum_key_length": True,  # no RSA key under 2048 bits
}


class InvalidToken(Exception):
    """The token is not one any policy accepts. The message says why, for the log, never for the client."""


class AmbiguousPolicy(Exception):
    """More than one policy accepts the token and none was named: the caller must say which."""


class Verified(NamedTuple):
    policy: TrustPolicy
    claims: dict[str, Any]
    token_id: str  # what a replay of the same token is known by
    expires_at: datetime  # the token's exp


def glob_match(pattern: str, text: str) -> bool:
    """Whether ``text`` matches ``pattern``: ``*`` any run of characters (``/`` and ``:`` too), ``?`` any
    one, every other character itself.

    Greedy with one backtrack point (the last ``*``), so O(len(pattern) x
    len(text)) at worst: no regular expression, so no pattern can make a
    match take exponential time, and ``[``, ``.``, ``\\`` are plain characters.
    """
    p = t = 0
    star, star_t = -1, 0
    while t < len(text):
        if p < len(pattern) and pattern[p] == "*":
            star, star_t = p, t
            p += 1
        elif p < len(pattern) and pattern[p] in ("?", text[t]):
            p += 1
            t += 1
        elif star >= 0:  # let the last * take one more character
            star_t += 1
            p, t = star + 1, star_t
        else:
            return False
    while p < len(pattern) and pattern[p] == "*":
        p += 1
    return p == len(pattern)


def claim_text(value: Any) -> str | None:
    """A claim's value as a condition compares it: a string as it is, a number by its JSON text, else None."""
    if isinstance(value, str):
        return value
    # bool is an int in Python but not a number in JSON: true never matches "1" (nor "true").
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return json.dumps(value)


def condition_holds(pattern: str, value: Any) -> bool:
    text = claim_text(value)
    if text is None:
        return False
    if "*" in pattern or "?" in pattern:
        return glob_match(pattern, text)
    return text == pattern


def _numeric_date(claims: dict[str, Any], name: str) -> float | None:
    if name not in claims:
        return None
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidToken(f"{name} is not a number")
    return float(value)


def _audiences(claims: dict[str, Any]) -> frozenset[str]:
    aud = claims.get("aud")
    if aud is None:
        return frozenset()
    if isinstance(aud, str):
        return frozenset((aud,))
    if isinstance(aud, list) and all(isinstance(item, str) for item in aud):
        return frozenset(aud)
    raise InvalidToken("aud is neither a string nor a list of strings")


class TokenVerifier:
    def __init__(self, keys: SigningKeys, *, leeway: float = 60.0, clock: Callable[[], datetime]) -> None:
        self.keys = keys
        self.leeway = leeway
        self._clock = clock

    async def verify(
        self, token: str, policies: Sequence[TrustPolicy], *, policy_name: str | None = None
    ) -> Verified:
        """The one policy that accepts ``token`` (or ``policy_name``, when it does), and the token's claims.

        Raises InvalidToken, AmbiguousPolicy, or IssuerUnavailable when the
        issuer's keys cannot be had (the token is then neither good nor bad).
        """
        header, unverified = self._read(token)
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in ALGORITHMS:
            raise InvalidToken(f"alg {alg!r} is not allowed")
        issuer = unverified.get("iss")
        if not isinstance(issuer, str):
            raise InvalidToken("no iss")
        # SECURITY: iss only selects among the configured policies, compared exactly. The header's
        # jku, x5u, jwk and x5c are never read: the key comes from the policy's issuer (or file) alone,
        # so no token can name the key that verifies it.
        candidates = [
            policy for policy in policies
            if policy.issuer == issuer and (policy_name is None or policy.name == policy_name)
        ]
        if not candidates:
            named = f" named {policy_name!r}" if policy_name is not None else ""
            raise InvalidToken(f"no policy{named} trusts issuer {issuer!r}")

        claims, candidates = await self._verified(token, issuer, kid, alg, candidates)
        expires_at = self._check_time(claims)
        audiences = _audiences(claims)
        matching = [
            policy for policy in candidates
            if policy.audience in audiences
            and all(condition_holds(pattern, claims.get(claim)) for claim, pattern in policy.conditions)
        ]
        if not matching:
            raise InvalidToken(f"no policy of issuer {issuer!r} accepts sub {claims.get('sub')!r}")
        if len(matching) > 1:
            names = ", ".join(policy.name for policy in matching)
            raise AmbiguousPolicy(f"policies {names} all accept the token: name one")

        jti = claims.get("jti")
        # Without a jti the signed part (header and payload as sent) identifies the token: not the whole
        # text, whose signature segment can be varied without breaking it (ECDSA's (r, n-s), base64 padding).
        identity = f"{issuer}\n{jti}" if jti else token.rpartition(".")[0]
        token_id = hashlib.sha256(identity.encode()).hexdigest()
        return Verified(matching[0], claims, token_id, expires_at)

    @staticmethod
    def _read(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The header and the (not yet verified) claims; InvalidToken when the text is no JWT."""
        if len(token) > MAX_TOKEN_LENGTH:
            raise InvalidToken(f"{len(token)} characters, more than {MAX_TOKEN_LENGTH}")
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"not a JWT: {exc}") from exc
        return header, claims

    async def _verified(
        self, token: str, issuer: str, kid: Any, alg: str, candidates: list[TrustPolicy]
    ) -> tuple[dict[str, Any], list[TrustPolicy]]:
        """The claims, with the signature checked, and the candidates whose key source verified it.

        Policies of one issuer normally share a key source; when some name a
        JWKS file and others discovery, each source is tried and a policy
        stays a candidate only if its own source verified the token.
        """
        if kid is not None and not isinstance(kid, str):  # PyJWT refuses these already; the type checker cannot tell
            raise InvalidToken("kid is not a string")
        sources = list(dict.fromkeys(policy.jwks_file for policy in candidates))
        claims: dict[str, Any] | None = None
        verified: set[str | None] = set()
        failure: InvalidToken | IssuerUnavailable | None = None
        for jwks_file in sources:
            try:
                key = await self.keys.key_for(issuer, kid, alg, jwks_file=jwks_file)
                claims = jwt.decode(
                    token, key, algorithms=list(ALGORITHMS), options=_DECODE_OPTIONS,  # type: ignore[arg-type]
                )
            except UnknownSigningKey as exc:
                failure = failure or InvalidToken(f"no key: {exc}")
            except jwt.PyJWTError as exc:
                failure = failure or InvalidToken(f"rejected: {exc}")
            except IssuerUnavailable as exc:
                # An unreachable source outranks a refusal from another: the token may be good.
                failure = exc if not isinstance(failure, IssuerUnavailable) else failure
            else:
                verified.add(jwks_file)
        if claims is None:
            assert failure is not None
            raise failure
        return claims, [policy for policy in candidates if policy.jwks_file in verified]

    def _check_time(self, claims: dict[str, Any]) -> datetime:
        now = self._clock().timestamp()
        exp = _numeric_date(claims, "exp")
        if exp is None:
            raise InvalidToken("no exp")
        if exp <= now - self.leeway:
            raise InvalidToken(f"expired {now - exp:.0f} s ago")
        for name in ("nbf", "iat"):
            at = _numeric_date(claims, name)
            if at is not None and at > now + self.leeway:
                raise InvalidToken(f"not valid for {at - now:.0f} s ({name})")
        try:
            return datetime.fromtimestamp(exp, UTC)
        except (OverflowError, OSError, ValueError) as exc:
            raise InvalidToken("exp is out of range") from exc
