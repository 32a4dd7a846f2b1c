"""The settings Keygate reads: one section class per table, each setting with its default,
its description (the one ``config.example.toml`` repeats) and the rule it must follow.

Validators here judge one value, or one value against the settings before it
(``store.pool_max_size`` against ``pool_min_size``, a route's ``upstream``
against ``upstreams``); :mod:`.load` gathers the layers and turns what they
raise into one line per problem.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Final, Literal, NoReturn
from urllib.parse import parse_qs, unquote, urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from .ratelimit_spec import parse_new_rate_limit
from .routes import route_operation, route_path
from .units import parse_duration, parse_listen, parse_size

# Marks settings that may carry credentials: "url" hides a URL's password,
# "value" hides the whole value. Read by .render (masked()) and so by error messages.
_SECRET_URL: dict[str, Any] = {"secret": "url"}
_SECRET_VALUE: dict[str, Any] = {"secret": "value"}

_KIND_NAME = re.compile(r"[a-z][a-z0-9_-]*")
_PREFIX = re.compile(r"[a-z][a-z0-9_]{0,14}_")
# Same grammar as the server names a key may list (gateway.manage.inputs), so every
# upstream can be granted.
_UPSTREAM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_OPERATION = re.compile(r"[a-z0-9*][a-z0-9:_.*-]*")
_PLACEHOLDERS = re.compile(r"\{[^{}]*\}")
_METHOD = re.compile(r"[A-Za-z]+")


def _checked(parse: Callable[[Any], object]) -> Callable[[Any], Any]:
    """A validator that keeps the value as written once ``parse`` accepts it."""

    def check(value: Any) -> Any:
        parse(value)
        return value

    return check


def _network(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text.strip(), strict=False))
    except ValueError:
        raise ValueError("must be an IP address or CIDR (e.g. 10.0.0.0/8, 192.168.1.10, 2001:db8::/32)") from None


def _method(text: str) -> str:
    if _METHOD.fullmatch(text) is None:
        raise ValueError("must be an HTTP method such as GET, POST or DELETE")
    return text.upper()


def _fail(problems: Sequence[tuple[tuple[str | int, ...], Any, str]]) -> NoReturn:
    """Raise one error per ``(location, value, reason)``, located inside the field being validated.

    A validator that sees a whole list or table can point at the item that is
    wrong instead of printing the whole list.
    """
    raise ValidationError.from_exception_data(
        "Settings",
        [
            InitErrorDetails(
                type=PydanticCustomError("invalid", "{reason}", {"reason": reason}), loc=loc, input=value
            )
            for loc, value, reason in problems
        ],
    )


Listen = Annotated[str, AfterValidator(_checked(parse_listen))]
Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[str | int, BeforeValidator(_checked(parse_size))]
Network = Annotated[str, AfterValidator(_network)]
Method = Annotated[str, AfterValidator(_method)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProxySettings(_Section):
    listen: Listen = Field("127.0.0.1:8000", description="Address the proxy listener binds (HOST:PORT).")
    trusted_proxies: list[Network] = Field(
        default_factory=list,
        description="Addresses or CIDRs of proxies in front of Keygate whose X-Forwarded-For is believed.",
    )
    shutdown_grace: Duration = Field(
        30.0, ge=0, description="Seconds in-flight requests get to finish after SIGTERM."
    )
    workers: int = Field(1, ge=1, le=64, description="Processes sharing the listeners (SO_REUSEPORT).")
    worker_timeout: Duration = Field(
        30.0, gt=0,
        description="With workers > 1: seconds a worker's event loop may go without a heartbeat (it beats every "
        "second) before the supervisor dumps its stacks to the log, kills it and starts another.",
    )
    max_body_size: Size = Field(
        "100MiB",
        description='Largest request body forwarded (e.g. "100MiB", "10MB"); larger ones get 413; 0 = unlimited.',
    )
    access_log: bool = Field(
        False, description="Log one line per request the proxy and authz listeners answer (costs CPU per request)."
    )
    client_timeout: Duration = Field(
        60.0, gt=0, description="Seconds a client may go without sending request body data before it gets 408, "
                                "or without taking any of its answers before it is cut off."
    )
    encoded_slashes: Literal["reject", "pass"] = Field(
        "reject",
        description='%2F, %5C or a backslash in a request path: "reject" (400) or "pass" (kept inside their '
                    "segment, sent on as %2F and %5C, for upstreams that do not decode them).",
    )
    path_parameters: Literal["reject", "strip"] = Field(
        "reject",
        description='";" path parameters ("/deploy;jsessionid=1"): "reject" (400) or "strip" (removed from '
                    "every segment before routing and forwarding, as Servlet containers read them).",
    )
    header_timeout: Duration = Field(
        10.0, gt=0,
        description="Seconds a client has to send a complete request line and headers, counted from the "
        "connection's start or from the first byte of the next request on a keep-alive connection; "
        "past them it gets 408 and the connection is closed.",
    )
    max_connections: int = Field(
        10000, ge=1,
        description="Open client connections per worker process; past it new ones are closed at once "
        "(keep the process's file-descriptor limit above this plus the upstream connections).",
    )
    idle_timeout: Duration = Field(
        75.0, gt=0, description="Seconds an idle keep-alive connection waits for its next request before it is closed.",
    )
    max_header_size: Size = Field(
        "64KiB",
        description='Largest request line plus headers, in all (e.g. "64KiB"); larger ones get 431 and the '
        "connection is closed. One header line is limited to 8190 bytes and the request target to 8192 "
        "whatever this says.",
    )

    @property
    def max_body_bytes(self) -> int:
        """``max_body_size`` in bytes; 0 means unlimited."""
        return parse_size(self.max_body_size)

    @property
    def max_header_bytes(self) -> int:
        """``max_header_size`` in bytes."""
        return parse_size(self.max_header_size)

    @field_validator("max_header_size")
    @classmethod
    def _header_size(cls, size: str | int) -> str | int:
        # Below this not even an ordinary request (a key, a few headers) fits; 0 is no "unlimited" here,
        # since aiohttp's own limits (128 lines of 8190 bytes) would then be the only bound.
        if parse_size(size) < 1024:
            raise ValueError("must be at least 1KiB")
        return size


class AdminSettings(_Section):
    listen: Listen = Field(
        "127.0.0.1:8001", description="Address the admin listener binds (admin API, web UI, metrics, health)."
    )


def _optional_listen(value: str) -> str:
    return value if value == "" else _checked(parse_listen)(value)


class AuthzSettings(_Section):
    listen: Annotated[str, AfterValidator(_optional_listen)] = Field(
        "", description="Address the decision-only listener binds (HOST:PORT) for nginx auth_request, Envoy "
        "ext_authz, Traefik ForwardAuth and Caddy forward_auth; empty = off.",
    )
    trusted_proxies: list[Network] = Field(
        default_factory=list,
        description="Addresses or CIDRs of the ingresses asking; only from them are X-Original-* / "
        "X-Forwarded-Method, -Uri and X-Forwarded-For believed.",
    )


class ExchangeSettings(_Section):
    """The identity exchange: OIDC tokens (GitHub Actions, Kubernetes, ...) traded for short-lived keys."""

    per_client: str = Field(
        "30/minute; burst=30",
        description="Token exchanges allowed per client address (POST /.well-known/keygate/token).",
    )
    per_policy: str = Field(
        "600/minute; burst=600", description="Token exchanges allowed per trust policy, from every client together."
    )
    jwks_ttl: Duration = Field(
        3600.0, ge=60, le=86400,
        description="Seconds an issuer's signing keys are kept before they are fetched again (an unknown key "
        "id refetches sooner, at most once a minute per issuer).",
    )
    fetch_timeout: Duration = Field(
        5.0, gt=0, le=60, description="Seconds allowed for fetching an issuer's discovery document or keys."
    )

    @field_validator("per_client", "per_policy")
    @classmethod
    def _limit(cls, spec: str) -> str:
        parse_new_rate_limit(spec)
        return spec


def _https_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme != "https" and not (parts.scheme == "http" and loopback_host(parts.hostname)) \
            or not parts.hostname:
        raise ValueError("must be an https URL (http only for 127.0.0.1 or localhost)")
    return url


def loopback_host(host: str | None) -> bool:
    """Whether ``host`` (a URL's hostname) is this machine: localhost or a loopback address, not a name that
    only begins like one (``127.attacker.example`` is anyone's)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def _login_issuer(url: str) -> str:
    if url:
        parts = urlsplit(url)
        loopback = loopback_host(parts.hostname)
        if parts.scheme != "https" and not (parts.scheme == "http" and loopback) or not parts.hostname:
            raise ValueError("must be an https URL (http only for 127.0.0.1 or localhost), or empty for no sign-in")
        if parts.query or parts.fragment:
            raise ValueError("must not have a query or fragment")
    return url


class LoginSettings(_Section):
    """Sign-in for people (`keygate login`): an ID token of this provider is traded for the person's agent key."""

    issuer: Annotated[str, AfterValidator(_login_issuer)] = Field(
        "", description="The sign-in provider (OpenID Connect issuer, exactly as its tokens' iss); empty = no "
        "sign-in.",
    )
    client_id: str = Field("", description="The client id `keygate login` uses at the provider (a public client "
                           "allowed the device grant).")
    user_claim: str = Field("email", description="The ID token claim that names the person, as members are named. "
                            "With email, the token must carry email_verified true.")
    audience: str = Field("", description="The audience ID tokens must carry; empty = client_id.")
    orgs: list[str] = Field(
        default_factory=lambda: ["*"],
        description='Orgs a signed-in person may get an agent key for ("*" = any); they must also be a member.',
    )

    @field_validator("client_id")
    @classmethod
    def _client_id(cls, client_id: str, info: ValidationInfo) -> str:
        if info.data.get("issuer") and not client_id:
            raise ValueError("is required when login.issuer is set")
        return client_id


class StoreSettings(_Section):
    url: str = Field(
        "sqlite:///keygate.db",
        description="Key store: sqlite:///PATH (sqlite:////abs/path for an absolute path) or postgresql://...",
        json_schema_extra=_SECRET_URL,
    )
    pool_min_size: int = Field(1, ge=0, description="Connections a PostgreSQL pool keeps open.")
    pool_max_size: int = Field(10, ge=1, description="Most connections a PostgreSQL pool opens.")
    connect_timeout: Duration = Field(5.0, gt=0, description="Seconds to wait for a store connection.")

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        sqlite_path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else ""
        if not sqlite_path and not url.startswith(("postgresql://", "postgres://")):
            raise ValueError(
                "must be sqlite:///PATH (sqlite:////abs/path for an absolute path) "
                "or postgresql://[USER[:PASSWORD]@]HOST[:PORT]/DATABASE"
            )
        if not sqlite_path:
            try:
                urlsplit(url).port  # raises on a port that is not a number in range
            except ValueError:
                raise ValueError("the port must be a number from 1 to 65535") from None
        return url

    @field_validator("pool_max_size")
    @classmethod
    def _pool(cls, size: int, info: ValidationInfo) -> int:
        smallest = info.data.get("pool_min_size")
        if smallest is not None and size < smallest:
            raise ValueError(f"must be at least store.pool_min_size ({smallest})")
        return size


_URL_UNREADABLE: Final = ("cannot be read as a URL: the port must be a number from 1 to 65535, and / ? # @ [ ] in a "
                          "user name or password must be percent-encoded (%2F %3F %23 %40 %5B %5D)")


class RedisSettings(_Section):
    url: str = Field(
        "",
        description="Redis for shared caches, rate limits and invalidation: redis://, rediss:// or unix://; "
        "empty = none (single node).",
        json_schema_extra=_SECRET_URL,
    )
    prefix: str = Field(
        "keygate:", min_length=1, max_length=64,
        description="Prefix of every Redis key and channel Keygate uses, so several deployments can share a Redis.",
    )
    timeout: Duration = Field(
        0.25, gt=0, le=10,
        description="Seconds any one Redis call may take before Keygate decides without Redis.",
    )
    reconnect_backoff_max: Duration = Field(
        5.0, gt=0, le=300,
        description="Longest wait, in seconds, between attempts to reconnect to an unreachable Redis.",
    )
    cluster: bool = Field(
        False,
        description="Redis is a Redis Cluster (7.0 or later): redis.url (and redis.nodes) name seed nodes; "
        "credentials and TLS come from redis.url.",
    )
    nodes: list[str] = Field(
        default_factory=list, validate_default=True,
        description='With redis.cluster: more seed nodes as "host:port", beside the one in redis.url.',
    )

    @property
    def enabled(self) -> bool:
        """Whether Keygate uses Redis at all."""
        return bool(self.url or self.nodes)

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        if not url:
            return url
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be empty (no Redis) or a redis://, rediss:// or unix:// URL")
        # SECURITY: no part of the URL goes into these messages: a password with a character that should
        # have been percent-encoded lands in the host, port or path (render.py masks only the password).
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise ValueError(_URL_UNREADABLE) from None
        if "@" in parts.path or "@" in parts.query or "@" in parts.fragment:
            raise ValueError(_URL_UNREADABLE)  # a "/", "?" or "#" in the password cut it short
        if url.startswith("unix://"):
            # redis-py would take "unix://" or "unix://run/redis.sock" (a host) and connect elsewhere or nowhere.
            if parts.hostname or not parts.path.startswith("/"):
                raise ValueError("a unix:// URL names the socket by its absolute path, e.g. "
                                 "unix:///run/redis/redis.sock")
            return url
        if port == 0:
            raise ValueError("the port must be a number from 1 to 65535, e.g. redis://cache:6379")
        # redis-py reads the path as the database number (unless ?db= gives it) and quietly uses 0 when the
        # path is not a number.
        database = unquote(parts.path).replace("/", "").strip()
        if database and "db" not in parse_qs(parts.query) and not (database.isascii() and database.isdigit()):
            raise ValueError("the path is the database number, e.g. redis://cache:6379/0")
        return url

    @field_validator("nodes")
    @classmethod
    def _nodes(cls, nodes: list[str], info: ValidationInfo) -> list[str]:
        problems: list[tuple[tuple[str | int, ...], Any, str]] = []
        for index, node in enumerate(nodes):
            host, _, port = node.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                problems.append(((index,), node, 'must be "host:port" (e.g. "redis-0.redis:6379")'))
        cluster = info.data.get("cluster", False)
        if nodes and not cluster:
            problems.append(((), nodes, "seed nodes are for a Redis Cluster: set redis.cluster = true, or use "
                             "redis.url alone for one Redis"))
        if cluster and not nodes and not info.data.get("url"):
            problems.append(((), nodes, "redis.cluster = true needs at least one seed node, in redis.url or "
                             "redis.nodes"))
        if problems:
            _fail(problems)
        return nodes

    @field_validator("cluster")
    @classmethod
    def _cluster(cls, cluster: bool, info: ValidationInfo) -> bool:
        if not cluster:
            return cluster
        url, prefix = info.data.get("url", ""), info.data.get("prefix", "")
        problems: list[tuple[tuple[str | int, ...], Any, str]] = []
        if url.startswith("unix://"):
            problems.append(((), cluster, "a Redis Cluster is reached over TCP: redis.url must be redis:// or "
                             "rediss://, not unix://"))
        elif url and urlsplit(url).path.strip("/") not in ("", "0"):
            problems.append(((), cluster, "a Redis Cluster has only database 0: drop the database number from "
                             "redis.url"))
        if "{" in prefix or "}" in prefix:
            # SECURITY of the scripts' atomicity: Redis hashes the first {...} of a name, which must be the key id.
            problems.append(((), cluster, "redis.prefix must not contain { or } with a Redis Cluster: Keygate "
                             "puts the key id in braces to keep each key's entries in one hash slot"))
        if problems:
            _fail(problems)
        return cluster


class CacheSettings(_Section):
    ttl: Duration = Field(
        30.0, gt=0, description="Seconds a verified key stays cached without a change notice."
    )
    negative_ttl: Duration = Field(
        5.0, ge=0, description="Seconds an unknown key is remembered as unknown; 0 = not at all."
    )
    max_entries: int = Field(100_000, ge=1, description="Most keys each process keeps in its in-process cache.")
    stale_if_error: Duration = Field(
        300.0, ge=0,
        description="Seconds past ttl a cached key keeps working while the store is unreachable; 0 = never.",
    )


class RateLimitSettings(_Section):
    default: str = Field(
        "100/minute", description='Rate limit for keys without their own, e.g. "100/minute" or "10/second; burst=50".'
    )
    on_backend_error: Literal["local", "allow", "deny"] = Field(
        "local",
        description="When Redis is unreachable: local (per-process buckets), allow (no limit) or deny (429).",
    )
    policy: Literal["redis", "local-first", "local"] = Field(
        "redis",
        description="With Redis: redis (exact global buckets, one Redis call per request), local-first "
        "(tokens leased from the global bucket in batches) or local (per-process buckets). Without Redis: local.",
    )
    batch: float = Field(
        0.1, gt=0, le=1,
        description="local-first: share of a key's capacity a process leases from Redis at a time.",
    )
    sync_interval: Duration = Field(
        1.0, gt=0, le=60,
        description="local-first: seconds after which a process returns the unused rest of a lease.",
    )

    @field_validator("default")
    @classmethod
    def _default(cls, spec: str) -> str:
        parse_new_rate_limit(spec)
        return spec


class RecorderSettings(_Section):
    flush_interval: Duration = Field(
        5.0, gt=0, description="Seconds between batched writes of last-used times and audit records."
    )
    max_buffer: int = Field(
        100_000, ge=1, description="Most records held between flushes; beyond it records are dropped and counted. "
        "1,000 waiting (a tenth of it, if less) are written without waiting for flush_interval; "
        "after a failed write, once a tenth of it more are waiting."
    )


class AuditSettings(_Section):
    retention_days: float = Field(
        90.0, ge=0, le=36500,
        description="Days management events and request records are kept; 0 = keep them forever.",
    )
    prune_interval: Duration = Field(
        3600.0, gt=0, description="Seconds between deletions of audit entries older than retention_days.",
    )


class Argon2Settings(_Section):
    """argon2id cost of hashing a key's secret.

    Secrets are ~190 random bits, so brute force is impossible whatever the
    cost: the hash only has to be one-way, and cheap enough to verify on
    every cache miss. Password-strength costs would only slow cache misses.
    """

    time_cost: int = Field(1, ge=1, le=2**32 - 1, description="argon2id passes over memory.")
    memory_cost: int = Field(8192, ge=1024, le=2**32 - 1, description="argon2id memory in KiB.")
    parallelism: int = Field(1, ge=1, le=255, description="argon2id lanes.")
    concurrency: int = Field(
        0, ge=0, le=256,
        description="Verifications run at once, each on a thread of its own; 0 = one less than the CPUs "
        "(at least 1), leaving a core to the event loop.",
    )
    queue: int = Field(
        64, ge=0, le=100_000,
        description="Cache misses that may wait for a verification; past them a miss gets 429 verification_busy.",
    )

    @field_validator("parallelism")
    @classmethod
    def _lanes(cls, lanes: int, info: ValidationInfo) -> int:
        memory = info.data.get("memory_cost")
        if memory is not None and memory < 8 * lanes:
            raise ValueError(f"argon2 needs memory_cost >= 8 x parallelism ({8 * lanes} KiB)")
        return lanes


class FailureSettings(_Section):
    """Limits on failed key lookups (unknown ids, wrong secrets), counted per process.

    A client address, network or key id over its limit is *suspicious*: its
    lookups that argon2 would have to settle get 429 too_many_attempts
    (counted as a failure of the address and network), except
    ``verify_per_second`` per key id for requests from clean addresses (only
    the key id over its limit) and as many for requests from suspicious
    ones. A key already verified by this process (or found in the Redis
    cache) is never refused because of them; one never verified here shares
    the clean addresses' verifications with any guesses from clean addresses.
    """

    per_client: int = Field(30, ge=1, description="Failed lookups from one client address per window.")
    per_network: int = Field(
        300, ge=1, description="Failed lookups from one network (IPv4 /24, IPv6 /56) per window."
    )
    per_key: int = Field(10, ge=1, description="Wrong secrets for one key id per window.")
    window: Duration = Field(60.0, gt=0, description="Seconds over which failures are counted.")
    verify_per_second: float = Field(
        1.0, ge=0,
        description="Verifications per key id per second still let through while suspicious, once for requests "
        "from clean addresses (only the key id over its limit) and once for requests from suspicious ones, so a "
        "key never verified here works from a busy address; 0 = none.",
    )


class KindSettings(_Section):
    prefix: str = Field(
        description="Prefix of this kind's keys: a lowercase letter, then lowercase letters, digits or '_', "
        "ending in '_', at most 16 characters (e.g. kg_, rk_t_)."
    )
    on_leak: Literal["revoke", "flag"] = Field(
        "revoke",
        description="What a reported leak of a key of this kind does (secret-scanning report or `keys "
        "report-leak`): revoke it, or only flag it (audited, leaked_at set, key.leaked webhook).",
    )

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, prefix: str) -> str:
        if _PREFIX.fullmatch(prefix) is None:
            raise ValueError(
                "must be 2-16 characters: a lowercase letter, then lowercase letters, digits or '_', "
                "ending in '_' (e.g. kg_, rk_t_)"
            )
        return prefix


def _default_kinds() -> dict[str, KindSettings]:
    return {"integration": KindSettings(prefix="kg_"), "automation": KindSettings(prefix="kga_")}


class KeysSettings(_Section):
    pepper: str = Field(
        "",
        description="Secret key of the MAC that cache keys are made with, at least 32 characters; empty = generated into the store on first run.",
        json_schema_extra=_SECRET_VALUE,
    )
    # Before default_kind, whose check needs the kinds.
    kinds: dict[str, KindSettings] = Field(
        default_factory=_default_kinds,
        description="Key kinds and their prefixes; configured kinds are added to (or override) "
        "integration (kg_) and automation (kga_).",
    )
    default_kind: str = Field("integration", description="Kind of a new key when none is given.")
    idle_after: Duration = Field(
        0.0, ge=0,
        description="A key unused (or, never used, created) this long is idle: shown as status idle, "
        "key.idle sent once per idle spell; 0 = never (e.g. 90d).",
    )
    idle_action: Literal["flag", "expire"] = Field(
        "flag", description="What becoming idle does: flag (status idle, still works) or expire (expires_at set "
        "to that moment, audited).",
    )
    expiry_warning: Duration = Field(
        604800.0, ge=0,
        description="How long before a key expires key.expiring is sent (only for keys made to live longer than "
        "this); 0 = never.",
    )
    argon2: Argon2Settings = Field(default_factory=Argon2Settings, description=Argon2Settings.__doc__)

    @field_validator("pepper")
    @classmethod
    def _pepper(cls, pepper: str) -> str:
        if pepper and len(pepper) < 32:
            raise ValueError("must be at least 32 characters, or empty to have one generated")
        return pepper

    @field_validator("kinds")
    @classmethod
    def _kinds(cls, kinds: dict[str, KindSettings]) -> dict[str, KindSettings]:
        problems: list[tuple[tuple[str | int, ...], Any, str]] = []
        owners: dict[str, str] = {}
        for name, kind in kinds.items():
            if _KIND_NAME.fullmatch(name) is None:
                problems.append(((name,), name, "a kind name must be lowercase letters, digits, '_' or '-', "
                                 "starting with a letter"))
            # Keys are told apart by prefix alone, so two kinds cannot share one.
            if kind.prefix in owners:
                problems.append(((name, "prefix"), kind.prefix, f"already the prefix of kind {owners[kind.prefix]}"))
            owners.setdefault(kind.prefix, name)
        if problems:
            _fail(problems)
        return kinds

    @field_validator("default_kind")
    @classmethod
    def _default_kind(cls, kind: str, info: ValidationInfo) -> str:
        kinds = info.data.get("kinds")
        if kinds is not None and kind not in kinds:
            raise ValueError(f"must be one of the configured kinds ({', '.join(kinds)})")
        return kind


class LeaksSettings(_Section):
    """Secret-scanning reports of leaked keys (POST /.well-known/keygate/secret-scanning)."""

    github_keys_url: Annotated[str, AfterValidator(_https_url)] = Field(
        "https://api.github.com/meta/public_keys/secret_scanning",
        description="Where the public keys that sign GitHub's secret-scanning reports are published "
        "(https; http only for 127.0.0.1 or localhost).",
    )
    keys_ttl: Duration = Field(
        86400.0, ge=60, description="Seconds those keys are kept before they are fetched again (an unknown key "
        "identifier refetches sooner, at most once a minute)."
    )
    fetch_timeout: Duration = Field(5.0, gt=0, le=60, description="Seconds allowed for fetching those keys.")
    per_client: str = Field(
        "120/minute; burst=120", description="Reports allowed per client address, counted before the body is read."
    )

    @field_validator("per_client")
    @classmethod
    def _limit(cls, spec: str) -> str:
        parse_new_rate_limit(spec)
        return spec


WEBHOOK_EVENTS = ("key.created", "key.revoked", "key.leaked", "key.canary_used", "key.expiring", "key.idle")


def _webhook_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise ValueError("must not carry credentials (the secret signs each delivery)")
    return url


class WebhookSettings(_Section):
    url: Annotated[str, AfterValidator(_webhook_url)] = Field(description="Where events are POSTed (http or https).")
    events: list[Literal[WEBHOOK_EVENTS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(WEBHOOK_EVENTS),
        description="Events sent here: " + ", ".join(WEBHOOK_EVENTS) + " (default all).",
    )
    secret: str = Field(
        description="Key of the HMAC-SHA256 in X-Keygate-Signature (at least 16 characters).",
        json_schema_extra=_SECRET_VALUE,
    )
    timeout: Duration = Field(10.0, gt=0, le=60, description="Seconds one delivery attempt may take.")

    @field_validator("secret")
    @classmethod
    def _secret(cls, secret: str) -> str:
        if len(secret) < 16:
            raise ValueError("must be at least 16 characters")
        return secret


class HygieneSettings(_Section):
    """The background work of key hygiene: idle and expiring keys, webhook delivery."""

    sweep_interval: Duration = Field(
        60.0, gt=0, description="Seconds between looks for keys that became idle or are about to expire."
    )
    webhook_retry_for: Duration = Field(
        86400.0, gt=0, description="Seconds a webhook delivery is retried (with exponential backoff) before it "
        "is given up (counted in /metrics, kept in the store).",
    )
    webhook_max_backoff: Duration = Field(
        600.0, gt=0, description="Longest wait between two attempts of one delivery."
    )


class UpstreamSettings(_Section):
    name: str = Field(description="Server name that keys and routes refer to (the first upstream is the default).")
    url: str = Field(description="Base URL requests are forwarded to: http:// or https://, a host, an optional "
                                 "port and path prefix; no user:password@, query or fragment.")
    connect_timeout: Duration = Field(5.0, gt=0, description="Seconds to connect before answering 502.")
    timeout: Duration = Field(
        60.0, gt=0,
        description="Seconds the upstream may keep Keygate waiting (to take more of the request body, to answer, "
                    "or for more of the response) before a 504, or mid-response a cut connection.",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if _UPSTREAM_NAME.fullmatch(name) is None:
            raise ValueError("must be 1-63 letters, digits or '._-', starting with a letter or digit")
        if name == "admin":
            raise ValueError("'admin' is reserved for the admin API")
        return name

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        parts = urlsplit(url)
        try:
            parts.port
        except ValueError:
            parts = parts._replace(netloc="")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host (e.g. http://127.0.0.1:8080)")
        if "@" in parts.netloc or parts.query or parts.fragment or "?" in url or "#" in url:
            # The client's path and query are appended to the URL's; credentials for the upstream are not
            # Keygate's to send (routes with pass_credentials forward the client's own).
            raise ValueError("must be scheme, host, port and an optional path prefix: no user:password@, "
                             "query or fragment (e.g. http://10.0.0.5:8080/api)")
        return url


class RouteSettings(_Section):
    methods: list[Method] = Field(default_factory=list, description="HTTP methods the route matches; empty = any.")
    path: str = Field(
        description="Path the route matches; a {server} segment names the server, any other {name} segment "
                    "(a whole segment) may be named in the operation."
    )
    upstream: str | None = Field(None, description="Upstream requests go to; unset = the default (first) upstream.")
    operation: str = Field(
        description="Operation a key needs for this route (e.g. deploy, servers:read); {name} stands for the "
                    "path's segment of that name (registry_login:{credential})."
    )
    pass_credentials: bool = Field(False, description="Forward the client's Authorization header upstream.")
    pass_method_override: bool = Field(
        False,
        description="Forward X-HTTP-Method-Override, X-HTTP-Method and X-Method-Override (dropped otherwise: "
                    "an upstream honouring them would run another method than the one the key was checked for).",
    )

    @field_validator("path")
    @classmethod
    def _path(cls, path: str) -> str:
        if not path.startswith("/") or re.search(r"[\s?#]", path):
            raise ValueError(
                "must start with '/' and hold no spaces, query or fragment (e.g. /api/servers/{server}/deploy)"
            )
        problems = route_path(path)[2]
        if problems:
            _fail([((), path, problem) for problem in problems])
        return path

    @field_validator("upstream", mode="before")
    @classmethod
    def _upstream(cls, name: Any) -> Any:
        if name is not None and (not isinstance(name, str) or _UPSTREAM_NAME.fullmatch(name) is None):
            raise ValueError("must be the name of a configured upstream")
        return name

    @field_validator("operation")
    @classmethod
    def _operation(cls, operation: str, info: ValidationInfo) -> str:
        path = info.data.get("path")  # absent when already reported as invalid
        problems = route_operation(operation, None if path is None else route_path(path)[1])[1]
        # Stray braces are route_operation's to report; the rest must be an operation.
        if _OPERATION.fullmatch(re.sub(r"[{}]", "", _PLACEHOLDERS.sub("x", operation))) is None:
            problems.insert(0, "must be lowercase letters, digits and ':_.-', with '*' as a wildcard and {name} "
                               "for a placeholder of the path (e.g. deploy, servers:read, registry_login:{credential})")
        if problems:
            _fail([((), operation, problem) for problem in problems])
        return operation


class LogSettings(_Section):
    level: Annotated[
        Literal["debug", "info", "warning", "error"],
        BeforeValidator(lambda level: level.lower() if isinstance(level, str) else level),
    ] = Field("info", description="Least severe log events written: debug, info, warning or error.")
    format: Annotated[
        Literal["json", "text"],
        BeforeValidator(lambda value: value.lower() if isinstance(value, str) else value),
    ] = Field("json", description='How log lines are written on stderr: "json" (one object per line, for '
                                  'collectors) or "text" (for a terminal).')


class Settings(_Section):
    """Everything Keygate can be configured with."""

    proxy: ProxySettings = Field(default_factory=ProxySettings, description="The proxy listener.")
    admin: AdminSettings = Field(default_factory=AdminSettings, description="The admin listener.")
    authz: AuthzSettings = Field(default_factory=AuthzSettings, description="The decision-only listener.")
    exchange: ExchangeSettings = Field(default_factory=ExchangeSettings, description=ExchangeSettings.__doc__)
    login: LoginSettings = Field(default_factory=LoginSettings, description=LoginSettings.__doc__)
    store: StoreSettings = Field(default_factory=StoreSettings, description="The key store.")
    redis: RedisSettings = Field(default_factory=RedisSettings, description="Optional Redis.")
    cache: CacheSettings = Field(default_factory=CacheSettings, description="Caching of verified keys.")
    ratelimit: RateLimitSettings = Field(default_factory=RateLimitSettings, description="Rate limiting.")
    recorder: RecorderSettings = Field(default_factory=RecorderSettings, description="Last-used and audit batching.")
    audit: AuditSettings = Field(default_factory=AuditSettings, description="The audit trail's retention.")
    keys: KeysSettings = Field(default_factory=KeysSettings, description="Key format and hashing.")
    failures: FailureSettings = Field(default_factory=FailureSettings, description=FailureSettings.__doc__)
    leaks: LeaksSettings = Field(default_factory=LeaksSettings, description=LeaksSettings.__doc__)
    hygiene: HygieneSettings = Field(default_factory=HygieneSettings, description=HygieneSettings.__doc__)
    webhooks: list[WebhookSettings] = Field(
        default_factory=list, description="Where key events (leaked, canary used, idle, expiring, created, revoked) "
        "are sent, signed, from a durable outbox.",
    )
    log: LogSettings = Field(default_factory=LogSettings, description="Logging.")
    # Before routes, whose check needs the upstreams.
    upstreams: list[UpstreamSettings] = Field(
        default_factory=list, description="Servers requests are forwarded to; the first is the default."
    )
    routes: list[RouteSettings] = Field(
        default_factory=list, description="Map requests to a server and an operation; unmatched requests use the "
        "default upstream with operation read (GET/HEAD/OPTIONS) or write."
    )

    @field_validator("upstreams")
    @classmethod
    def _unique_names(cls, upstreams: list[UpstreamSettings]) -> list[UpstreamSettings]:
        first: dict[str, int] = {}
        problems: list[tuple[tuple[str | int, ...], Any, str]] = []
        for index, upstream in enumerate(upstreams):
            if upstream.name in first:
                reason = f"already the name of upstreams.{first[upstream.name]}"
                problems.append(((index, "name"), upstream.name, reason))
            first.setdefault(upstream.name, index)
        if problems:
            _fail(problems)
        return upstreams

    @field_validator("routes")
    @classmethod
    def _known_upstreams(cls, routes: list[RouteSettings], info: ValidationInfo) -> list[RouteSettings]:
        upstreams = info.data.get("upstreams")
        if upstreams is None:  # already reported as invalid
            return routes
        names = [upstream.name for upstream in upstreams]
        problems: list[tuple[tuple[str | int, ...], Any, str]] = []
        for index, route in enumerate(routes):
            if not names:
                reason = "no upstreams are configured; add an [[upstreams]] table"
                problems.append(((index, "upstream"), route.upstream, reason))
            elif route.upstream is not None and route.upstream not in names:
                reason = f"must be a configured upstream ({', '.join(names)})"
                problems.append(((index, "upstream"), route.upstream, reason))
        if problems:
            _fail(problems)
        return routes
