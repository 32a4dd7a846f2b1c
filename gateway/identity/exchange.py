"""Keygate's own endpoints on the proxy listener: ``/.well-known/keygate/...``.

``POST /.well-known/keygate/token`` is the identity exchange (RFC 8693): an
OIDC token that a trust policy accepts is traded for a short-lived key of
kind ``automation``. ``POST /.well-known/keygate/revoke`` lets a key revoke
itself (the GitHub Action's post step). Both answer as an OAuth token
endpoint does: JSON, ``Cache-Control: no-store``, errors as RFC 6749 §5.2
(``{"error", "error_description"}``), never a traceback.

The order of the exchange, and why:

1. the client's rate limit, before the body is read or a store or issuer is
   asked: a flood costs a dict lookup per request;
2. the body (at most :data:`MAX_BODY` bytes), the form and its parameters;
3. the trust policies, from the store (exchanges are rare; a policy removed
   stops working at once);
4. the token's signature and claims against them (:mod:`.verify`): an
   issuer that cannot be reached is 503 with Retry-After, never
   ``invalid_grant``, so a client retries rather than gives up;
5. the policy's rate limit, once the policy is known;
6. the key, minted with the token claimed in one transaction: a token is
   exchanged once.

Why a refusal is refused is logged (``exchange_refused`` with the request
id), never told: "no policy matches" does not say which condition failed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import parse_qsl

import jwt

from ..config.ratelimit_spec import RateLimitSpec, parse_rate_limit
from ..config.schema import Settings
from ..dataplane.client_gone import ClientGone
from ..dataplane.http1 import BodyTimeout, MalformedBody, Request, reason_of
from ..manage import inputs
from ..manage.service import KeyService, Notifier, Replayed, ServiceError, hasher_from
from ..models import KeyRecord, TrustPolicy
from ..pipeline.prepared import PreparedKey
from ..pipeline.allowlist import check_allowlist
from ..pipeline.authenticate import Authenticator
from ..pipeline.credential import bearer_credential
from ..pipeline.outcomes import Denied, Outcome
from ..pipeline.ratelimit import RateLimiter
from ..pipeline.responses import answer_of, retry_after_header
from ..pipeline.status import check_status
from ..store import KeyStore, StoreRefused, StoreUnavailable
from .jwks import IssuerUnavailable
from .verify import AmbiguousPolicy, InvalidToken, TokenVerifier, Verified

log = logging.getLogger("keygate.identity")

DISCOVERY_PATH = "/.well-known/keygate"
PREFIX = DISCOVERY_PATH + "/"
TOKEN_PATH = PREFIX + "token"
REVOKE_PATH = PREFIX + "revoke"
WHOAMI_PATH = PREFIX + "whoami"
SECRET_SCANNING_PATH = PREFIX + "secret-scanning"  # handled by gateway.hygiene.leaks

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
# What a subject token may be declared as: an OIDC ID token, or a JWT (RFC 8693 section 3).
SUBJECT_TOKEN_TYPES = frozenset({"urn:ietf:params:oauth:token-type:id_token", "urn:ietf:params:oauth:token-type:jwt"})
ISSUED_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
FORM = "application/x-www-form-urlencoded"
# A GitHub Actions token is about 1.2 KB, a Kubernetes one about 1.5 KB: a form above this is not an exchange.
MAX_BODY = 16 * 1024
MAX_FIELDS = 16
# Seconds the whole body may take: a runner sends its 2 KB at once, and a client that sends a byte
# now and then (each within proxy.client_timeout) must not hold an exchange and its connection for hours.
BODY_DEADLINE = 10.0
# What the exchange tells a client whose token no policy accepts, whatever the reason.
NOT_ACCEPTED = "The subject token is not accepted: no trust policy matches it, or it is invalid or expired."

_HEADERS = b"Content-Type: application/json; charset=utf-8\r\nCache-Control: no-store\r\nPragma: no-cache\r\n"


class LeakHandler(Protocol):
    async def handle(self, request: Request, request_id: str, client_ip: str) -> dict[str, Any]: ...


class Refusal(Exception):
    """An RFC 6749 section 5.2 answer; ``reason`` is for the log only."""

    def __init__(self, status: int, error: str, description: str, reason: str = "", *,
                 retry_after: float | None = None, headers: bytes = b"") -> None:
        super().__init__(reason or description)
        self.status = status
        self.error = error
        self.description = description
        self.reason = reason or error
        self.retry_after = retry_after
        self.headers = headers


def _invalid_request(description: str) -> Refusal:
    return Refusal(400, "invalid_request", description)


class WellKnown:
    """The handler of every request whose path starts with ``/.well-known/keygate/``."""

    def __init__(
        self, *, store: KeyStore, settings: Settings, authenticator: Authenticator, verifier: TokenVerifier,
        limiter: RateLimiter, notifier: Notifier | None = None, forget_key: Callable[[str], None] | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC), leaks: LeakHandler | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.authenticator = authenticator
        self.verifier = verifier
        self.limiter = limiter
        self.notifier = notifier
        self.forget_key = forget_key  # drops a revoked key from this process's cache at once
        self.clock = clock
        self.leaks = leaks  # GitHub's secret-scanning reports (gateway.hygiene.leaks), when wired
        # Sign-in for people (keygate login): ID tokens of login.issuer, checked as a policy with no conditions
        # beyond the audience; the person is named by login.user_claim.
        login = settings.login
        self.login: TrustPolicy | None = TrustPolicy(
            name="login", issuer=login.issuer, audience=login.audience or login.client_id, conditions=(), org="",
            role=None, operations=(), servers=(), ip_allowlist=(), rate_limit=None, lifetime=0, jwks_file=None,
            created_by="config", created_at=_EPOCH, updated_at=_EPOCH,
        ) if login.issuer else None
        e = settings.exchange
        self.per_client = parse_rate_limit(e.per_client)
        self.per_policy = parse_rate_limit(e.per_policy)
        # Token exchanges by result: "exchanged" or the error code answered (for /metrics).
        self.exchanges: dict[str, int] = {}
        self.hasher = hasher_from(settings)  # one for every action of these endpoints

    def _service(self, actor: str) -> KeyService:
        return KeyService(self.store, self.settings, actor=actor, clock=self.clock, hasher=self.hasher,
                          notifier=self.notifier)

    async def handle(self, request: Request, request_id: str) -> None:
        started = time.perf_counter()
        path = request.raw_path.partition("?")[0]
        client, client_ip = self.authenticator.client_ips.client(request.peer, request.headers)
        details: dict[str, Any] = {"client_ip": client_ip}
        try:
            if path == TOKEN_PATH:
                self._require(request, "POST")
                details.update(await self._exchange(request, client_ip))
            elif path == REVOKE_PATH:
                self._require(request, "POST")
                details.update(await self._revoke(request, client, client_ip, started))
            elif path == WHOAMI_PATH:
                self._require(request, "GET")
                details.update(await self._whoami(request, client, client_ip, started))
            elif path == DISCOVERY_PATH:
                self._require(request, "GET")
                self._discovery(request)
            elif path == SECRET_SCANNING_PATH and self.leaks is not None:
                self._require(request, "POST")
                details.update(await self.leaks.handle(request, request_id, client_ip))
            else:
                raise Refusal(404, "not_found", "No such Keygate endpoint.", "unknown path")
        except ClientGone:
            return
        except StoreUnavailable as exc:
            # Whichever endpoint read or wrote the store: the store's fault, worth a retry.
            self._refuse(request, _denied(Denied(Outcome.STORE_UNAVAILABLE, str(exc))), request_id, path, details)
        except StoreRefused as exc:
            # A data plane whose store role (keygate_dataplane) may not mint or revoke keys: these
            # endpoints belong on a gateway with the owner role. Another replica may be one.
            log.error(json.dumps({"event": "store_write_refused", "request_id": request_id, "path": path,
                                  "error": str(exc)}))
            self._refuse(request, _denied(Denied(Outcome.STORE_UNAVAILABLE, str(exc))), request_id, path, details)
        except Refusal as refusal:
            self._refuse(request, refusal, request_id, path, details)
        except Exception as exc:
            # A bug, not a decision: log it whole, tell the client nothing about it.
            log.error(json.dumps({"event": "internal_error", "request_id": request_id, "path": path}), exc_info=exc)
            if path == TOKEN_PATH:
                self.exchanges["server_error"] = self.exchanges.get("server_error", 0) + 1
            self._answer(request, 500, {"error": "server_error", "error_description": "Keygate failed to handle "
                                        "this request.", "request_id": request_id})
        else:
            if path in (TOKEN_PATH, REVOKE_PATH):
                log.info(json.dumps({"event": "exchange" if path == TOKEN_PATH else "self_revoke", "path": path,
                                     "request_id": request_id, **details}))
        finally:
            if request.body is not None and not request.ended:
                request.body.discard()

    def _refuse(self, request: Request, refusal: Refusal, request_id: str, path: str, details: dict[str, Any]) -> None:
        if path == TOKEN_PATH:
            self.exchanges[refusal.error] = self.exchanges.get(refusal.error, 0) + 1
        log.info(json.dumps({"event": "exchange_refused" if path == TOKEN_PATH else "well_known_refused",
                             "path": path, "status": refusal.status, "error": refusal.error,
                             "reason": refusal.reason, "request_id": request_id, **details}))
        headers = refusal.headers
        if refusal.retry_after is not None:
            headers += b"Retry-After: %d\r\n" % max(1, math.ceil(refusal.retry_after))
        if refusal.status in (408, 413):
            request.keep_alive = False  # the rest of the body is not read
        self._answer(request, refusal.status, {"error": refusal.error, "error_description": refusal.description,
                                               "request_id": request_id}, headers)

    @staticmethod
    def _answer(request: Request, status: int, body: dict[str, Any], headers: bytes = b"") -> None:
        if request.started:
            request.abort()
            return
        request.send(status, reason_of(status), _HEADERS + headers, json.dumps(body).encode())

    @staticmethod
    def _require(request: Request, method: str) -> None:
        if request.method != method and not (method == "GET" and request.method == "HEAD"):
            raise Refusal(405, "invalid_request", f"Use {method}.", f"method {request.method}",
                          headers=b"Allow: %s\r\n" % method.encode())

    def _discovery(self, request: Request) -> None:
        """What `keygate login` needs to know: the sign-in provider and client id (no secrets)."""
        login = self.settings.login
        self._answer(request, 200, {
            "issuer": login.issuer or None, "client_id": login.client_id or None,
            "audience": (login.audience or login.client_id) or None, "user_claim": login.user_claim,
            "token_endpoint": TOKEN_PATH, "revocation_endpoint": REVOKE_PATH, "whoami_endpoint": WHOAMI_PATH,
            "grant_types_supported": [GRANT_TYPE],
            "subject_token_types_supported": sorted(SUBJECT_TOKEN_TYPES),
        })

    # -- the exchange --------------------------------------------------------

    async def _exchange(self, request: Request, client_ip: str) -> dict[str, Any]:
        # 1. The client's own limit first: nothing below runs for a flood.
        await self._take(f"exchange:client:{client_bucket(client_ip)}", self.per_client,
                         "too many token exchanges from this address")
        # 2. The form.
        form = parse_form(request.headers.get("Content-Type"), await read_body(request))
        grant_type = form.get("grant_type")
        if grant_type is None:
            raise _invalid_request("grant_type is required.")
        if grant_type != GRANT_TYPE:
            raise Refusal(400, "unsupported_grant_type", f"Only {GRANT_TYPE} is supported.")
        token = form.get("subject_token")
        if not token:
            raise _invalid_request("subject_token is required.")
        token_type = form.get("subject_token_type")
        if token_type not in SUBJECT_TOKEN_TYPES:
            raise _invalid_request("subject_token_type must be urn:ietf:params:oauth:token-type:id_token or "
                                   "urn:ietf:params:oauth:token-type:jwt.")
        if "actor_token" in form or "actor_token_type" in form:
            raise _invalid_request("Delegation (actor_token) is not supported.")
        requested = form.get("requested_token_type")
        if requested not in (None, ISSUED_TOKEN_TYPE):
            raise _invalid_request(f"Only {ISSUED_TOKEN_TYPE} can be issued.")
        policy_name = form.get("policy") or None
        if self.login is not None and policy_name is None and self._for_login(token):
            # A person signing in (keygate login): their agent key, not a trust policy's key.
            return await self._login(request, token, form.get("org") or None, client_ip)
        # 3. The policies.
        policies = await self._service("exchange").list_trust_policies()
        # 4. The token.
        verified = await self._verified(token, policies, policy_name)
        policy = verified.policy
        # 5. The policy's limit.
        await self._take(f"exchange:policy:{policy.name}", self.per_policy, f"policy {policy.name} exchanged too often")
        # 6. The key.
        try:
            record, full = await self._service(f"exchange:{policy.name}").exchange_token(
                policy, verified.claims, token_id=verified.token_id, token_expires_at=verified.expires_at,
                client_ip=client_ip)
        except Replayed:
            raise Refusal(400, "invalid_grant", "This subject token was already exchanged.", "replayed") from None
        except ServiceError as exc:
            # The policy names what the store no longer allows (its role was deleted, ...): the operator's to fix.
            log.warning(json.dumps({"event": "exchange_policy_broken", "policy": policy.name, "error": str(exc)}))
            raise Refusal(400, "invalid_grant", NOT_ACCEPTED, f"policy {policy.name}: {exc}") from None
        self.exchanges["exchanged"] = self.exchanges.get("exchanged", 0) + 1
        self._answer_token(request, record, full)
        return {"policy": policy.name, "key_id": record.id, "issuer": policy.issuer,
                "subject": verified.claims.get("sub")}

    def _for_login(self, token: str) -> bool:
        """Whether ``token`` is a sign-in: of login.issuer and for login's audience (unverified: only to choose
        how it is checked). One provider may also sign CI jobs' tokens, for a trust policy's audience."""
        assert self.login is not None
        claims = unverified_claims(token)
        aud = claims.get("aud")
        return claims.get("iss") == self.login.issuer and \
            (aud == self.login.audience or isinstance(aud, list) and self.login.audience in aud)

    async def _verified(self, token: str, policies: Sequence[TrustPolicy], policy_name: str | None) -> Verified:
        """The token checked against ``policies``; its refusals as the client sees them."""
        try:
            return await self.verifier.verify(token, policies, policy_name=policy_name)
        except InvalidToken as exc:
            raise Refusal(400, "invalid_grant", NOT_ACCEPTED, str(exc)) from None
        except AmbiguousPolicy as exc:
            raise _invalid_request("Several trust policies accept this token: name one with the policy "
                                   "parameter.") from exc
        except IssuerUnavailable as exc:
            raise Refusal(503, "temporarily_unavailable", "The token's issuer cannot be reached to check its "
                          "signature; retry shortly.", str(exc),
                          retry_after=max(1.0, exc.retry_after)) from None

    def _answer_token(self, request: Request, record: KeyRecord, full: str) -> None:
        assert record.expires_at is not None
        expires_in = max(0, round((record.expires_at - self.clock()).total_seconds()))
        self._answer(request, 200, {
            "access_token": full, "issued_token_type": ISSUED_TOKEN_TYPE, "token_type": "Bearer",
            "expires_in": expires_in, "key_id": record.id,
        })

    async def _take(self, bucket: str, spec: RateLimitSpec, reason: str) -> None:
        """One token of ``bucket``, from the limiter keys use: with Redis the limit holds for the whole fleet."""
        decision = await self.limiter.take(bucket, spec)
        if not decision.allowed:
            raise Refusal(429, "temporarily_unavailable", "Too many token exchanges; retry later.", reason,
                          retry_after=decision.retry_after)

    # -- sign-in -------------------------------------------------------------

    async def _login(self, request: Request, token: str, org: str | None, client_ip: str) -> dict[str, Any]:
        """The person's agent key for ``org``: they must be a member, and the org one login.orgs allows."""
        assert self.login is not None
        verified = await self._verified(token, [self.login], None)
        claims, claim = verified.claims, self.settings.login.user_claim
        # SECURITY: an ID token the provider issued to another client (azp, OpenID Connect Core 3.1.3.7) is that
        # client's to use, even when our client is among its audiences: that client must not sign in as the person.
        azp, client_id = claims.get("azp"), self.settings.login.client_id
        if azp != client_id and (azp is not None or isinstance(claims.get("aud"), list) and len(claims["aud"]) > 1):
            raise Refusal(400, "invalid_grant", NOT_ACCEPTED, f"issued to {azp!r}, not {client_id!r}")
        user = claims.get(claim)
        if not isinstance(user, str) or not user:
            raise Refusal(400, "invalid_grant", NOT_ACCEPTED, f"no {claim} claim")
        # SECURITY: an email names a person only when the provider says it verified it; a provider that says
        # nothing (Entra ID lets an account's mail be set to anyone's) would let one person sign in as another.
        if claim == "email" and claims.get("email_verified") is not True:
            raise Refusal(400, "invalid_grant", "The sign-in provider has not verified this email address.",
                          "email not verified")
        allowed = self.settings.login.orgs
        service = self._service(f"login:{user}")
        # SECURITY: text no member can be named by (a NUL, a lone surrogate, ...) is no member of anything;
        # the store is not asked, since not every store can hold it.
        member_of = [o for o in await service.member_orgs(user) if "*" in allowed or o in allowed] \
            if _names_a_member(user) else []
        if org is None:
            if len(member_of) != 1:
                # Not a member anywhere, or of several orgs: the person is told which they may choose.
                raise Refusal(403 if not member_of else 400, "access_denied" if not member_of else "invalid_request",
                              f"{user} is not a member of any org that may sign in here." if not member_of else
                              f"Name the org to sign in to (keygate login --org ORG): one of {', '.join(member_of)}.",
                              f"{user}: member of {member_of}")
            org = member_of[0]
        elif org not in member_of:
            raise Refusal(403, "access_denied", f"{user} may not sign in to org {org} here (not a member, or the org "
                          "is not in login.orgs).", f"{user} not allowed in {org}")
        try:
            record, full, previous = await service.login_agent_key(
                org, user, issuer=self.login.issuer, subject=_text(claims.get("sub")), token_id=verified.token_id,
                token_expires_at=verified.expires_at, client_ip=client_ip)
        except Replayed:
            raise Refusal(400, "invalid_grant", "This ID token was already used to sign in.", "replayed") from None
        except ServiceError as exc:  # the membership went away meanwhile
            raise Refusal(403, "access_denied", f"{user} may not sign in to org {org} here.", str(exc)) from None
        if previous is not None and self.forget_key is not None:
            self.forget_key(previous)  # the replaced key stops here at once (other processes: the change feed)
        self.exchanges["signed_in"] = self.exchanges.get("signed_in", 0) + 1
        self._answer(request, 200, {
            "access_token": full, "issued_token_type": ISSUED_TOKEN_TYPE, "token_type": "Bearer",
            "key_id": record.id, "org": org, "user": user,
        })
        return {"login": user, "org": org, "key_id": record.id}

    async def _whoami(self, request: Request, client: Any, client_ip: str | None, started: float) -> dict[str, Any]:
        """Who the key in Authorization is: for `keygate whoami` (and anyone checking that a key still works)."""
        record = (await self._authenticated(request, client, client_ip, started)).record
        self._answer(request, 200, {
            "key_id": record.id, "name": record.name, "kind": record.kind, "org": record.org,
            "user": record.user or None, "role": record.role, "agent": record.agent,
            "expires_at": record.expires_at.isoformat().replace("+00:00", "Z") if record.expires_at else None,
        })
        return {"key_id": record.id}

    # -- self-revocation -----------------------------------------------------

    async def _authenticated(self, request: Request, client: Any, client_ip: str | None,
                             started: float) -> PreparedKey:
        """Stages 1-5 for the key in Authorization (no route: these endpoints need no operation)."""
        lookup = self.authenticator.lookup
        # Failures are counted per client as the proxy counts them: by the address's text, "None" when a
        # trusted proxy's hop named none (the compiled stages take a str and refuse None).
        counted_as = str(client_ip)
        try:
            parsed = bearer_credential(request.headers, self.authenticator.parser)
            key = await lookup.lookup(parsed, counted_as)
            if key.canary:  # as on every listener: refused as an unknown key, and an alarm
                raise self.authenticator.refuse_canary(
                    key, client_ip, request.method, request.raw_path.partition("?")[0], request.headers,
                    parsed.full, counted_as)
            check_status(key, time.time())
            check_allowlist(key.networks, client, key.allowlist_seen, client_ip)
        except Denied as denied:
            await lookup.delay_refusal(denied, started)
            raise _denied(denied) from None
        return key

    async def _revoke(self, request: Request, client: Any, client_ip: str | None, started: float) -> dict[str, Any]:
        """The key in Authorization revokes itself."""
        key_id = (await self._authenticated(request, client, client_ip, started)).record.id
        await self._service(f"key:{key_id}").revoke_key(key_id, reason="self")
        if self.forget_key is not None:
            self.forget_key(key_id)
        self._answer(request, 200, {"revoked": key_id})
        return {"key_id": key_id}


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def client_bucket(client_ip: str) -> str:
    """Whose exchange budget a client spends: its address, or for IPv6 its /64 (one host may hold a whole /64)."""
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:
        return client_ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def unverified_claims(token: str) -> dict[str, Any]:
    """The claims a token makes, unverified: only to choose how it is checked."""
    try:
        return jwt.decode(token, options={"verify_signature": False})  # type: ignore[no-any-return]
    except jwt.PyJWTError:
        return {}


def _names_a_member(user: str) -> bool:
    try:
        inputs.user(user)
    except inputs.InvalidField:
        return False
    return True


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _denied(denied: Denied) -> Refusal:
    """The proxy's own answer to a refused key (401, 403, 429, 503), as a refusal of this endpoint."""
    status, error, description, challenge = answer_of(denied.outcome)
    wait = retry_after_header(denied.outcome, denied.retry_after)
    return Refusal(status, error, description, denied.reason, retry_after=float(wait) if wait else None,
                   headers=b"WWW-Authenticate: %s\r\n" % challenge.encode() if challenge else b"")


async def read_body(request: Request, *, limit: int = MAX_BODY, deadline: float = BODY_DEADLINE) -> bytes:
    """The whole request body, at most ``limit`` bytes (413 past it; 408 when it stalls, or is not
    whole within ``deadline`` seconds)."""
    body = request.body
    if body is None:
        return b""
    if body.expected is not None and body.expected > limit:
        raise Refusal(413, "invalid_request", f"The request body is larger than {limit} bytes.", "body too large")
    chunks: list[bytes] = []
    size = 0
    try:
        # SECURITY: a deadline for the whole body, not only between its bytes (slowloris).
        async with asyncio.timeout(deadline):
            while chunk := await body.read():
                size += len(chunk)
                if size > limit:
                    raise Refusal(413, "invalid_request", f"The request body is larger than {limit} bytes.",
                                  "body too large")
                chunks.append(chunk)
    except (BodyTimeout, TimeoutError):
        raise Refusal(408, "invalid_request", "The request body did not arrive in time.", "body timeout") from None
    except MalformedBody:
        raise Refusal(400, "invalid_request", "The request body is not well-formed HTTP.", "bad framing") from None
    return b"".join(chunks)


def parse_form(content_type: str | None, body: bytes) -> dict[str, str]:
    """The form's parameters; a parameter given twice is refused (RFC 6749 section 3.2)."""
    if content_type is None or content_type.split(";", 1)[0].strip().lower() != FORM:
        raise _invalid_request(f"The body must be {FORM}.")
    try:
        text = body.decode("utf-8")
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text), max_num_fields=MAX_FIELDS,
                          errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise _invalid_request("The body is not a well-formed form.") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        if name in form:
            raise _invalid_request(f"{name} is given more than once.")
        form[name] = value
    return form


__all__ = ["PREFIX", "WellKnown", "parse_form", "read_body"]
