"""An OIDC issuer run by the tests: discovery and JWKS over HTTP on 127.0.0.1, keys made with cryptography.

    async with OidcIssuer() as issuer:            # RSA key to sign with; issuer.url is http://127.0.0.1:PORT
        token = issuer.token(issuer.github_claims(now, environment="prod"))
        issuer.rotate("ES256")                    # a new signing key, published beside the old ones
        issuer.status = 503                       # discovery and JWKS answer 503 ...
        await issuer.go_offline()                 # ... or nothing listens on the port at all
        issuer.write_jwks(tmp_path / "jwks.json") # the Kubernetes case: the key set as a file

It counts what it serves (``issuer.fetches["discovery"]``, ``["jwks"]``,
``["attacker"]``) and can be told to misbehave: ``discovery_overrides``
replaces members of the discovery document (another ``issuer``, an http
``jwks_uri``), ``cache_control`` sets the JWKS's Cache-Control,
``jwks_padding`` inflates the JWKS (``jwks_chunked`` sends it without a
Content-Length), ``jwks_body`` replaces it, ``jwks_redirect`` answers it
with a 302. ``/attacker/jwks.json`` serves a key set nobody should
trust, for tokens whose ``jku`` header points there.

The claims are shaped like the real ones: :func:`github_claims` like a
GitHub Actions ID token (the claims of GitHub's "OpenID Connect reference";
the ids are strings there), :func:`kubernetes_claims` like a projected
service-account token (a list ``aud``, the ``kubernetes.io`` object, no jti).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from .loopback_site import LoopbackSite

GITHUB_ISSUER = "https://token.actions.githubusercontent.com"


@dataclass(frozen=True)
class IssuerKey:
    """A signing key: its kid, the algorithm it signs with, and the private key."""

    kid: str
    alg: str
    private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

    @classmethod
    def generate(cls, alg: str = "RS256", *, kid: str | None = None, bits: int = 2048) -> IssuerKey:
        if alg == "RS256":
            private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = rsa.generate_private_key(65537, bits)
        elif alg == "ES256":
            private = ec.generate_private_key(ec.SECP256R1())
        elif alg == "ES384":  # for "a key of the wrong curve" cases
            private = ec.generate_private_key(ec.SECP384R1())
        else:
            raise ValueError(alg)
        return cls(kid or secrets.token_hex(10), alg, private)

    def public_jwk(self, **members: Any) -> dict[str, Any]:
        """The public key as a JWK with kid, use and alg, like GitHub's and Kubernetes' key sets have them."""
        algorithm = jwt.get_algorithm_by_name(self.alg)
        jwk = json.loads(algorithm.to_jwk(self.private_key.public_key()))
        return {**jwk, "kid": self.kid, "use": "sig", "alg": self.alg, **members}

    def public_pem(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def github_claims(*, issuer: str, now: datetime, **overrides: Any) -> dict[str, Any]:
    """An ID token's claims as a GitHub Actions job gets them, for acme/shop on main; a None override drops a claim.

    ``sub`` follows GitHub's default template: ``repo:OWNER/REPO:environment:NAME``
    when the job has an environment, else ``repo:OWNER/REPO:ref:REF``. GitHub's
    tokens live 5 minutes from iat, with nbf 10 minutes before it (its documented example).
    """
    iat = int(now.timestamp())
    repository = overrides.get("repository", "acme/shop")
    ref = overrides.get("ref", "refs/heads/main")
    environment = overrides.get("environment")
    sub = f"repo:{repository}:environment:{environment}" if environment else f"repo:{repository}:ref:{ref}"
    owner = repository.split("/")[0]
    claims: dict[str, Any] = {
        "jti": str(uuid.uuid4()),
        "sub": sub,
        "aud": "https://keygate.example",
        "ref": ref,
        "sha": "c040cae0f0dc81641728557b80f09cfa23b83fe5",
        "repository": repository,
        "repository_owner": owner,
        "repository_owner_id": "2020",
        "repository_id": "424242",
        "repository_visibility": "private",
        "run_id": "22259804324",
        "run_number": "42",
        "run_attempt": "1",
        "runner_environment": "github-hosted",
        "actor": "octocat",
        "actor_id": "1001",
        "workflow": "Deploy",
        "workflow_ref": f"{repository}/.github/workflows/deploy.yml@{ref}",
        "workflow_sha": "c040cae0f0dc81641728557b80f09cfa23b83fe5",
        "job_workflow_ref": f"{repository}/.github/workflows/deploy.yml@{ref}",
        "job_workflow_sha": "c040cae0f0dc81641728557b80f09cfa23b83fe5",
        "head_ref": "",
        "base_ref": "",
        "event_name": "push",
        "ref_type": "branch",
        "ref_protected": "true",
        "iss": issuer,
        "nbf": iat - 600,
        "iat": iat,
        "exp": iat + 300,
    }
    if environment:
        claims["environment"] = environment
    claims.update(overrides)
    return {name: value for name, value in claims.items() if value is not None}


def kubernetes_claims(
    *, issuer: str, now: datetime, namespace: str = "ci", serviceaccount: str = "deployer",
    audience: str = "https://keygate.example", lifetime: int = 3600, **overrides: Any,
) -> dict[str, Any]:
    """A projected service-account token's claims (a pod's volume with ``audience``); a None override drops a claim."""
    iat = int(now.timestamp())
    claims: dict[str, Any] = {
        "aud": [audience],
        "exp": iat + lifetime,
        "iat": iat,
        "iss": issuer,
        "kubernetes.io": {
            "namespace": namespace,
            "pod": {"name": f"{serviceaccount}-7d4b9c-x2x7k", "uid": str(uuid.uuid4())},
            "serviceaccount": {"name": serviceaccount, "uid": str(uuid.uuid4())},
            "warnafter": iat + int(lifetime * 0.8),
        },
        "nbf": iat,
        "sub": f"system:serviceaccount:{namespace}:{serviceaccount}",
    }
    claims.update(overrides)
    return {name: value for name, value in claims.items() if value is not None}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segments(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())


def unsigned_token(claims: dict[str, Any], **header: Any) -> str:
    """A token with ``alg: none`` and no signature."""
    return _segments({"alg": "none", "typ": "JWT", **header}, claims) + "."


def hmac_token(claims: dict[str, Any], secret: bytes, *, alg: str = "HS256", **header: Any) -> str:
    """A token "signed" with HMAC over ``secret``: with a public key's PEM, the RS256 -> HS256 confusion.

    Made by hand: PyJWT itself refuses a PEM as an HMAC secret.
    """
    signing_input = _segments({"alg": alg, "typ": "JWT", **header}, claims)
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    return signing_input + "." + _b64(hmac.new(secret, signing_input.encode(), digest).digest())


class OidcIssuer(LoopbackSite):
    """Discovery and a JWKS on 127.0.0.1, served with aiohttp; see the module docstring."""

    def __init__(self, *, alg: str = "RS256", path: str = "") -> None:
        super().__init__()
        self.path = path  # an issuer URL may have a path (e.g. GitHub Enterprise's /_services/token)
        self.signing = IssuerKey.generate(alg)
        self.published: list[IssuerKey] = [self.signing]
        self.fetches: Counter[str] = Counter()
        self.status: int | None = None  # when set, discovery and JWKS answer this status instead
        self.discovery_overrides: dict[str, Any] = {}
        self.cache_control: str | None = None
        self.jwks_padding = 0
        self.jwks_chunked = False
        self.jwks_body: bytes | None = None  # when set, the JWKS answer's body as it is
        self.jwks_redirect: str | None = None  # when set, the JWKS answers 302 to this location

    @cached_property
    def attacker(self) -> IssuerKey:
        """A key this issuer never publishes (made when first asked for: RSA keys take a while)."""
        return IssuerKey.generate("RS256")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(self.path + "/.well-known/openid-configuration", self._discovery)
        app.router.add_get(self.path + "/jwks.json", self._jwks)
        app.router.add_get("/attacker/jwks.json", self._attacker_jwks)
        return app

    # -- keys --------------------------------------------------------------------------------

    def rotate(self, alg: str = "RS256", *, keep_old: bool = True) -> IssuerKey:
        """A new key signs from now on; the old ones stay published unless keep_old is False."""
        self.signing = IssuerKey.generate(alg)
        self.published = [*self.published, self.signing] if keep_old else [self.signing]
        return self.signing

    def jwks(self) -> dict[str, Any]:
        return {"keys": [key.public_jwk() for key in self.published]}

    def write_jwks(self, path: str | os.PathLike[str]) -> Path:
        """Write the published keys to ``path`` as a JWKS, replacing the file at once (as kubelet and ConfigMaps do)."""
        target = Path(path)
        temporary = target.with_name(f".{target.name}.{secrets.token_hex(4)}")
        temporary.write_text(json.dumps(self.jwks()))
        os.replace(temporary, target)
        return target

    # -- tokens ------------------------------------------------------------------------------

    def token(
        self, claims: dict[str, Any], *, alg: str | None = None, kid: str | None = None,
        key: IssuerKey | None = None, headers: dict[str, Any] | None = None,
    ) -> str:
        """``claims`` signed with ``key`` (default: the current signing key), header kid = that key's unless given.

        ``headers`` are added to the JOSE header; a ``"kid": None`` there drops the kid.
        """
        key = key or self.signing
        header: dict[str, Any] = {"typ": "JWT", "kid": kid or key.kid, **(headers or {})}
        if header["kid"] is None:
            del header["kid"]
        return jwt.encode(claims, key.private_key, algorithm=alg or key.alg, headers=header)

    def github_claims(self, now: datetime, **overrides: Any) -> dict[str, Any]:
        return github_claims(issuer=self.url, now=now, **overrides)

    def kubernetes_claims(self, now: datetime, **overrides: Any) -> dict[str, Any]:
        return kubernetes_claims(issuer=self.url, now=now, **overrides)

    # -- HTTP --------------------------------------------------------------------------------

    async def _discovery(self, request: web.Request) -> web.StreamResponse:
        self.fetches["discovery"] += 1
        if self.status is not None:
            return web.Response(status=self.status, text="unavailable")
        document = {
            "issuer": self.url,
            "jwks_uri": self.url + "/jwks.json",
            "subject_types_supported": ["public", "pairwise"],
            "response_types_supported": ["id_token"],
            "claims_supported": ["sub", "aud", "exp", "iat", "iss", "jti", "nbf", "ref", "repository"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "scopes_supported": ["openid"],
            **self.discovery_overrides,
        }
        return web.json_response(document)

    async def _jwks(self, request: web.Request) -> web.StreamResponse:
        self.fetches["jwks"] += 1
        if self.status is not None:
            return web.Response(status=self.status, text="unavailable")
        if self.jwks_redirect is not None:
            raise web.HTTPFound(self.jwks_redirect)
        document: dict[str, Any] = self.jwks()
        if self.jwks_padding:
            document["padding"] = "x" * self.jwks_padding
        body = json.dumps(document).encode() if self.jwks_body is None else self.jwks_body
        headers = {"Content-Type": "application/json"}
        if self.cache_control is not None:
            headers["Cache-Control"] = self.cache_control
        if not self.jwks_chunked:
            return web.Response(body=body, headers=headers)
        response = web.StreamResponse(headers=headers)
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(body), 16 * 1024):
            await response.write(body[start:start + 16 * 1024])
        await response.write_eof()
        return response

    async def _attacker_jwks(self, request: web.Request) -> web.StreamResponse:
        self.fetches["attacker"] += 1
        return web.json_response({"keys": [self.attacker.public_jwk()]})
