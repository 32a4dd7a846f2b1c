"""A stand-in for GitHub's secret scanning, run by the tests: its public-keys list on 127.0.0.1, and reports signed as
GitHub signs them.

    async with GitHubScanning() as github:          # a P-256 key; github.keys_url is http://127.0.0.1:PORT/...
        body = github.report([match(full_key)])     # the JSON array GitHub POSTs (compact, as its sample)
        headers = github.sign(body)                 # Github-Public-Key-Identifier and -Signature over the bytes
        github.rotate()                             # a new signing key, published beside the old ones
        github.status = 503                         # the key list answers 503 ...
        await github.go_offline()                   # ... or nothing listens on the port at all

The wire format is GitHub's secret-scanning partner programme's: the key
list is ``{"public_keys": [{"key_identifier", "key" (PEM), "is_current"}]}``
(served with an ETag, answered 304 to a matching ``If-None-Match``), the
signature is ECDSA P-256 / SHA-256 over the raw body, DER-encoded, base64 in
``Github-Public-Key-Signature``. ``fetches`` counts the key list's fetches
(``"conditional"`` those that sent If-None-Match).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .loopback_site import LoopbackSite

KEYS_PATH = "/meta/public_keys/secret_scanning"
TYPE = "keygate_api_key"


@dataclass(frozen=True)
class ScanningKey:
    """A signing key and the identifier GitHub would publish it under (hex SHA-256 of its public key)."""

    identifier: str
    private_key: ec.EllipticCurvePrivateKey

    @classmethod
    def generate(cls, curve: ec.EllipticCurve | None = None) -> ScanningKey:
        private = ec.generate_private_key(curve or ec.SECP256R1())
        der = private.public_key().public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
        return cls(hashlib.sha256(der).hexdigest(), private)

    def pem(self) -> str:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    def signature(self, body: bytes) -> str:
        return base64.b64encode(self.private_key.sign(body, ec.ECDSA(hashes.SHA256()))).decode()


def match(token: str, *, type: str = TYPE, url: str = "https://github.com/acme/shop/blob/c040cae/.env",
          source: str | None = "content") -> dict[str, Any]:
    """One match as GitHub sends it (``source`` None leaves it out, as GitHub's older payloads did)."""
    found: dict[str, Any] = {"token": token, "type": type, "url": url}
    if source is not None:
        found["source"] = source
    return found


def report(matches: list[dict[str, Any]]) -> bytes:
    """The body GitHub POSTs: a JSON array, compact as in GitHub's sample."""
    return json.dumps(matches, separators=(",", ":")).encode()


class GitHubScanning(LoopbackSite):
    """GitHub's key list on 127.0.0.1, served with aiohttp; see the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.signing = ScanningKey.generate()
        self.published: list[ScanningKey] = [self.signing]
        self.fetches: Counter[str] = Counter()
        self.status: int | None = None  # when set, the key list answers this status instead
        self.body: bytes | None = None  # when set, the key list's body as it is
        self.redirect: str | None = None  # when set, the key list answers 302 to this location

    @property
    def keys_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{KEYS_PATH}"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(KEYS_PATH, self._keys)
        return app

    # -- keys and signatures -----------------------------------------------------------------

    def rotate(self, *, keep_old: bool = True) -> ScanningKey:
        self.signing = ScanningKey.generate()
        self.published = [*self.published, self.signing] if keep_old else [self.signing]
        return self.signing

    def key_list(self) -> dict[str, Any]:
        return {"public_keys": [{"key_identifier": key.identifier, "key": key.pem(), "is_current": key is self.signing}
                                for key in self.published]}

    def sign(self, body: bytes, *, key: ScanningKey | None = None, identifier: str | None = None) -> dict[str, str]:
        """The headers GitHub sends with ``body``: signed with ``key`` (default the current one), named
        ``identifier`` (default that key's)."""
        key = key or self.signing
        return {"Content-Type": "application/json", "Github-Public-Key-Identifier": identifier or key.identifier,
                "Github-Public-Key-Signature": key.signature(body)}

    # -- HTTP ----------------------------------------------------------------------------------

    async def _keys(self, request: web.Request) -> web.StreamResponse:
        self.fetches["keys"] += 1
        if self.status is not None:
            return web.Response(status=self.status, text="unavailable")
        if self.redirect is not None:
            raise web.HTTPFound(self.redirect)
        body = json.dumps(self.key_list()).encode() if self.body is None else self.body
        etag = '"%s"' % hashlib.sha256(body).hexdigest()[:16]
        if request.headers.get("If-None-Match") is not None:
            self.fetches["conditional"] += 1
            if request.headers["If-None-Match"] == etag:
                return web.Response(status=304, headers={"ETag": etag})
        return web.Response(body=body, headers={"Content-Type": "application/json", "ETag": etag})
