"""The settings' schema: defaults, the rule each setting follows, and config.example.toml, which documents them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pydantic
import pytest

from gateway.config.load import ConfigError, load_settings
from gateway.config.schema import Settings

from .loading import APP, PEPPER, load, problems, write

EXAMPLE = Path(__file__).resolve().parents[3] / "config.example.toml"


# --- defaults -------------------------------------------------------------


@pytest.mark.parametrize(
    ("read", "expected"),
    [
        (lambda s: s.proxy.listen, "127.0.0.1:8000"),
        (lambda s: s.proxy.trusted_proxies, []),
        (lambda s: s.proxy.shutdown_grace, 30),
        (lambda s: s.proxy.workers, 1),
        (lambda s: s.proxy.max_body_bytes, 100 * 1024**2),
        (lambda s: s.proxy.access_log, False),
        (lambda s: s.admin.listen, "127.0.0.1:8001"),
        (lambda s: s.store.url, "sqlite:///keygate.db"),
        (lambda s: s.redis.url, ""),
        (lambda s: s.cache.ttl, 30),
        (lambda s: s.ratelimit.default, "100/minute"),
        (lambda s: s.ratelimit.on_backend_error, "local"),
        (lambda s: (s.ratelimit.policy, s.ratelimit.batch, s.ratelimit.sync_interval), ("redis", 0.1, 1.0)),
        (lambda s: (s.redis.prefix, s.redis.timeout, s.redis.reconnect_backoff_max), ("keygate:", 0.25, 5.0)),
        (lambda s: (s.redis.cluster, s.redis.nodes, s.redis.enabled), (False, [], False)),
        (lambda s: s.recorder.flush_interval, 5),
        (lambda s: (s.audit.retention_days, s.audit.prune_interval), (90, 3600)),
        (lambda s: s.keys.pepper, ""),
        (lambda s: {name: kind.prefix for name, kind in s.keys.kinds.items()}, {"integration": "kg_", "automation": "kga_"}),
        (lambda s: s.keys.default_kind, "integration"),
        (lambda s: (s.keys.argon2.time_cost, s.keys.argon2.memory_cost, s.keys.argon2.parallelism), (1, 8192, 1)),
        (lambda s: s.log.level, "info"),
        (lambda s: s.log.format, "json"),
        (lambda s: (s.upstreams, s.routes), ([], [])),
    ],
)
def test_defaults_match_the_design(read: Any, expected: object) -> None:
    """Each default is the one DESIGN.md documents."""
    assert read(Settings()) == expected


def test_settings_are_immutable() -> None:
    """Settings cannot be changed after loading."""
    with pytest.raises(pydantic.ValidationError):
        Settings().proxy.workers = 2  # type: ignore[misc]


# --- validation rules -----------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"proxy.listen": ":8000"}, "proxy.listen = ':8000': invalid listen address ':8000': the host is required"),
        ({"proxy.listen": "127.0.0.1:70000"}, "proxy.listen = '127.0.0.1:70000': invalid listen address"),
        ({"admin.listen": "::1:8001"}, "admin.listen = '::1:8001': invalid listen address '::1:8001': put an IPv6"),
        ({"proxy.trusted_proxies": ["10.0.0.0/8", "ten"]}, "proxy.trusted_proxies.1 = 'ten': must be an IP address or CIDR"),
        ({"proxy.shutdown_grace": -1}, "proxy.shutdown_grace = -1: invalid duration -1: must be a finite number"),
        ({"proxy.shutdown_grace": "soon"}, "proxy.shutdown_grace = 'soon': invalid duration 'soon': use a number"),
        ({"proxy.workers": 0}, "proxy.workers = 0: must be at least 1"),
        ({"proxy.workers": 65}, "proxy.workers = 65: must be at most 64"),
        ({"proxy.workers": "two"}, "proxy.workers = 'two': must be a whole number"),
        ({"proxy.max_body_size": "lots"}, "proxy.max_body_size = 'lots': invalid size 'lots': use a byte count"),
        ({"proxy.max_body_size": -1}, "proxy.max_body_size = -1: invalid size -1: must not be negative"),
        ({"proxy.header_timeout": 0}, "proxy.header_timeout = 0: must be greater than 0"),
        ({"proxy.max_header_size": "512"}, "proxy.max_header_size = '512': must be at least 1KiB"),
        ({"proxy.max_header_size": 0}, "proxy.max_header_size = 0: must be at least 1KiB"),
        ({"proxy.max_header_size": "big"}, "proxy.max_header_size = 'big': invalid size 'big': use a byte count"),
        ({"proxy.access_log": "maybe"}, "proxy.access_log = 'maybe': must be true or false"),
        ({"store.url": "mysql://x"}, "store.url = 'mysql://x': must be sqlite:///PATH"),
        ({"store.url": "sqlite:///"}, "store.url = 'sqlite:///': must be sqlite:///PATH"),
        ({"store.url": "sqlite://keygate.db"}, "store.url = 'sqlite://keygate.db': must be sqlite:///PATH"),
        ({"store.pool_min_size": 5, "store.pool_max_size": 2}, "store.pool_max_size = 2: must be at least store.pool_min_size (5)"),
        ({"store.pool_max_size": 0}, "store.pool_max_size = 0: must be at least 1"),
        ({"store.connect_timeout": 0}, "store.connect_timeout = 0: must be greater than 0"),
        ({"redis.url": "http://cache"}, "redis.url = 'http://cache': must be empty (no Redis) or a redis://"),
        ({"redis.url": "unix://"}, "redis.url = 'unix://': a unix:// URL names the socket by its absolute path"),
        ({"redis.url": "unix://redis.sock"},
         "redis.url = 'unix://redis.sock': a unix:// URL names the socket by its absolute path"),
        ({"redis.url": "unix://run/redis.sock"},  # redis-py would connect to /redis.sock
         "redis.url = 'unix://run/redis.sock': a unix:// URL names the socket by its absolute path"),
        ({"redis.url": "redis://cache:99999"}, "redis.url = 'redis://cache:99999': cannot be read as a URL: the port"),
        ({"redis.url": "redis://cache:port"}, "redis.url = 'redis://cache:port': cannot be read as a URL: the port"),
        ({"redis.url": "rediss://cache:0"}, "redis.url = 'rediss://cache:0': the port must be a number from 1"),
        ({"redis.url": "redis://cache:6379/cache"},
         "redis.url = 'redis://cache:6379/cache': the path is the database number, e.g. redis://cache:6379/0"),
        ({"redis.url": "redis://cache:6379/\u00b2"},  # a digit to str.isdigit, not to int()
         "redis.url = 'redis://cache:6379/\u00b2': the path is the database number"),
        ({"cache.ttl": 0}, "cache.ttl = 0: must be greater than 0"),
        ({"cache.negative_ttl": -1}, "cache.negative_ttl = -1: invalid duration"),
        ({"cache.max_entries": 0}, "cache.max_entries = 0: must be at least 1"),
        ({"ratelimit.default": "lots"}, "ratelimit.default = 'lots': invalid rate limit 'lots': use"),
        ({"ratelimit.default": "10/minute; burst=5"}, "ratelimit.default = '10/minute; burst=5': invalid rate limit"),
        ({"ratelimit.on_backend_error": "panic"}, "ratelimit.on_backend_error = 'panic': must be one of 'local', 'allow' or 'deny'"),
        ({"ratelimit.policy": "cluster"}, "ratelimit.policy = 'cluster': must be one of 'redis', 'local-first' or 'local'"),
        ({"ratelimit.batch": 0}, "ratelimit.batch = 0: must be greater than 0"),
        ({"ratelimit.batch": 2}, "ratelimit.batch = 2: must be at most 1"),
        ({"ratelimit.sync_interval": 0}, "ratelimit.sync_interval = 0: must be greater than 0"),
        ({"redis.prefix": ""}, "redis.prefix = '': "),
        ({"redis.timeout": 0}, "redis.timeout = 0: must be greater than 0"),
        ({"redis.reconnect_backoff_max": "soon"}, "redis.reconnect_backoff_max = 'soon': invalid duration"),
        ({"redis.cluster": True}, "redis.nodes = []: redis.cluster = true needs at least one seed node"),
        ({"redis.nodes": ["cache:6379"]}, "redis.nodes = ['cache:6379']: seed nodes are for a Redis Cluster"),
        ({"redis.cluster": True, "redis.nodes": ["cache"]}, "redis.nodes.0 = 'cache': must be \"host:port\""),
        ({"redis.cluster": True, "redis.url": "unix:///run/redis.sock"},
         "redis.cluster = True: a Redis Cluster is reached over TCP"),
        ({"redis.cluster": True, "redis.url": "redis://cache:6379/2"},
         "redis.cluster = True: a Redis Cluster has only database 0"),
        # The key id in braces is the hash tag: braces of the prefix's own would take its place.
        ({"redis.cluster": True, "redis.url": "redis://cache:6379", "redis.prefix": "kg{1}:"},
         "redis.cluster = True: redis.prefix must not contain { or }"),
        ({"recorder.flush_interval": 0}, "recorder.flush_interval = 0: must be greater than 0"),
        ({"recorder.max_buffer": 0}, "recorder.max_buffer = 0: must be at least 1"),
        ({"audit.retention_days": -1}, "audit.retention_days = -1: must be at least 0"),
        ({"audit.prune_interval": 0}, "audit.prune_interval = 0: must be greater than 0"),
        ({"keys.argon2.time_cost": 0}, "keys.argon2.time_cost = 0: must be at least 1"),
        ({"keys.argon2.memory_cost": 512}, "keys.argon2.memory_cost = 512: must be at least 1024"),
        ({"keys.argon2.parallelism": 0}, "keys.argon2.parallelism = 0: must be at least 1"),
        ({"keys.argon2.concurrency": -1}, "keys.argon2.concurrency = -1: must be at least 0"),
        ({"keys.argon2.queue": -1}, "keys.argon2.queue = -1: must be at least 0"),
        ({"failures.per_client": 0}, "failures.per_client = 0: must be at least 1"),
        ({"failures.per_network": 0}, "failures.per_network = 0: must be at least 1"),
        ({"failures.per_key": 0}, "failures.per_key = 0: must be at least 1"),
        ({"failures.window": 0}, "failures.window = 0: must be greater than 0"),
        ({"failures.verify_per_second": -1}, "failures.verify_per_second = -1: must be at least 0"),
        ({"keys.pepper": "short"}, "keys.pepper = '***': must be at least 32 characters"),
        ({"keys.kinds.ci.prefix": "CI_"}, "keys.kinds.ci.prefix = 'CI_': must be 2-16 characters"),
        ({"keys.kinds.ci.prefix": "ci"}, "keys.kinds.ci.prefix = 'ci': must be 2-16 characters"),
        ({"keys.kinds.ci.prefix": "a_very_long_prefix_"}, "keys.kinds.ci.prefix = 'a_very_long_prefix_': must be 2-16"),
        ({"keys.kinds.ci": {}}, "keys.kinds.ci.prefix is required"),
        ({"keys.kinds.CI.prefix": "ci_"}, "keys.kinds.CI = 'CI': a kind name must be lowercase"),
        ({"keys.kinds.ci.prefix": "kg_"}, "keys.kinds.ci.prefix = 'kg_': already the prefix of kind integration"),
        ({"keys.default_kind": "ci"}, "keys.default_kind = 'ci': must be one of the configured kinds (integration, automation)"),
        ({"log.level": "verbose"}, "log.level = 'verbose': must be one of 'debug', 'info', 'warning' or 'error'"),
        ({"log.format": "yaml"}, "log.format = 'yaml': must be one of 'json' or 'text'"),
        ({"upstreams": [{"url": "http://a"}]}, "upstreams.0.name is required"),
        ({"upstreams": [{"name": "app"}]}, "upstreams.0.url is required"),
        ({"upstreams": [{"name": "admin", "url": "http://a"}]}, "upstreams.0.name = 'admin': 'admin' is reserved"),
        ({"upstreams": [{"name": "-app", "url": "http://a"}]}, "upstreams.0.name = '-app': must be 1-63 letters"),
        ({"upstreams": [{"name": "a b", "url": "http://a"}]}, "upstreams.0.name = 'a b': must be 1-63 letters"),
        ({"upstreams": [{"name": "app", "url": "ftp://a"}]}, "upstreams.0.url = 'ftp://a': must be an http:// or https:// URL"),
        ({"upstreams": [{"name": "app", "url": "http://"}]}, "upstreams.0.url = 'http://': must be an http:// or https:// URL"),
        ({"upstreams": [{"name": "app", "url": "http://a:port"}]}, "upstreams.0.url = 'http://a:port': must be an http://"),
        ({"upstreams": [{"name": "app", "url": "http://u:pw@a"}]}, "upstreams.0.url = 'http://u:pw@a': must be scheme, host, port"),
        ({"upstreams": [{"name": "app", "url": "http://a/api?k=v"}]}, "upstreams.0.url = 'http://a/api?k=v': must be scheme, host"),
        ({"upstreams": [{"name": "app", "url": "http://a/api#top"}]}, "upstreams.0.url = 'http://a/api#top': must be scheme, host"),
        ({"upstreams": [{"name": "app", "url": "http://a/?"}]}, "upstreams.0.url = 'http://a/?': must be scheme, host"),
        ({"upstreams": [{**APP, "timeout": 0}]}, "upstreams.0.timeout = 0: must be greater than 0"),
        ({"upstreams": [{**APP, "connect_timeout": "x"}]}, "upstreams.0.connect_timeout = 'x': invalid duration"),
        ({"upstreams": [APP, {"name": "app", "url": "http://b"}]}, "upstreams.1.name = 'app': already the name of upstreams.0"),
        ({"upstreams": [APP], "routes": [{"operation": "read"}]}, "routes.0.path is required"),
        ({"upstreams": [APP], "routes": [{"path": "/"}]}, "routes.0.operation is required"),
        ({"upstreams": [APP], "routes": [{"path": "api", "operation": "read"}]}, "routes.0.path = 'api': must start with '/'"),
        ({"upstreams": [APP], "routes": [{"path": "/a?b=1", "operation": "read"}]}, "routes.0.path = '/a?b=1': must start with '/'"),
        ({"upstreams": [APP], "routes": [{"path": "/a/x{server}", "operation": "read"}]}, "routes.0.path = '/a/x{server}': a placeholder must be a whole path segment"),
        ({"upstreams": [APP], "routes": [{"path": "/{server}/{server}", "operation": "read"}]}, "routes.0.path = '/{server}/{server}': {server} appears twice"),
        ({"upstreams": [APP], "routes": [{"path": "/", "operation": "Deploy"}]}, "routes.0.operation = 'Deploy': must be lowercase letters"),
        ({"upstreams": [APP], "routes": [{"path": "/", "operation": ":read"}]}, "routes.0.operation = ':read': must be lowercase letters"),
        ({"upstreams": [APP], "routes": [{"path": "/", "operation": "read", "methods": ["GET", "GET /"]}]}, "routes.0.methods.1 = 'GET /': must be an HTTP method"),
        ({"upstreams": [APP], "routes": [{"path": "/", "operation": "read", "upstream": "billing"}]}, "routes.0.upstream = 'billing': must be a configured upstream (app)"),
        ({"routes": [{"path": "/", "operation": "read"}]}, "routes.0.upstream = None: no upstreams are configured"),
        ({"upstreams": [APP], "routes": [{"path": "/", "operation": "read", "pass_credentials": "sometimes"}]}, "routes.0.pass_credentials = 'sometimes': must be true or false"),
        ({"upstreams": {"name": "app"}}, "upstreams = {'name': 'app'}: must be a list"),
        ({"proxy": "fast"}, "proxy = 'fast': must be a table"),
        # A name that only begins like a loopback address is anyone's host: ID tokens would cross the network in clear.
        ({"login.issuer": "http://127.attacker.example", "login.client_id": "cli"},
         "login.issuer = 'http://127.attacker.example': must be an https URL"),
    ],
)
def test_invalid_value_is_reported_with_setting_value_and_rule(
    tmp_path: Path, overrides: dict[str, Any], expected: str
) -> None:
    """Each rule's violation produces a line naming the setting, the value and what is allowed."""
    found = problems(tmp_path, overrides=overrides)
    assert any(line.startswith(expected) for line in found), found


@pytest.mark.parametrize("url", [
    "redis://default:/Zq9Hunter2+xY=@cache:6379/0",  # a "/" in the password: the rest reads as the path
    "redis://:x[Hunter2]y@cache:6379",  # brackets: read as an IPv6 host
    "redis://:p#Hunter2@cache:6379",  # a "#": the rest reads as a fragment
    "redis://:p?Hunter2@cache:6379",  # a "?": the rest reads as the query
])
def test_a_redis_url_with_an_unencoded_password_is_refused_without_showing_it(tmp_path: Path, url: str) -> None:
    """SECURITY: the message says what to encode and shows no part of the password, wherever it landed."""
    found = problems(tmp_path, overrides={"redis.url": url})
    assert any("must be percent-encoded" in line for line in found), found
    assert not any("Hunter2" in line for line in found), found


@pytest.mark.parametrize(
    ("overrides", "read", "expected"),
    [
        ({"proxy.listen": "[::1]:0"}, lambda s: s.proxy.listen, "[::1]:0"),
        ({"proxy.listen": "localhost:8000"}, lambda s: s.proxy.listen, "localhost:8000"),
        ({"proxy.trusted_proxies": ["10.1.2.3/8", "192.168.1.10", "2001:db8::1/32"]}, lambda s: s.proxy.trusted_proxies, ["10.0.0.0/8", "192.168.1.10/32", "2001:db8::/32"]),
        ({"proxy.shutdown_grace": "2m"}, lambda s: s.proxy.shutdown_grace, 120.0),
        ({"proxy.shutdown_grace": 0}, lambda s: s.proxy.shutdown_grace, 0.0),
        ({"proxy.max_body_size": "1GiB"}, lambda s: s.proxy.max_body_bytes, 1024**3),
        ({"proxy.max_body_size": "10MB"}, lambda s: s.proxy.max_body_bytes, 10_000_000),
        ({"proxy.max_body_size": 0}, lambda s: s.proxy.max_body_bytes, 0),
        ({"proxy.max_body_size": "1MiB"}, lambda s: s.proxy.max_body_size, "1MiB"),
        ({"proxy.max_header_size": "16KiB"}, lambda s: s.proxy.max_header_bytes, 16384),
        ({"proxy.header_timeout": "30s"}, lambda s: s.proxy.header_timeout, 30.0),
        ({"proxy.workers": 64}, lambda s: s.proxy.workers, 64),
        ({"store.url": "sqlite:////var/lib/keygate/keygate.db"}, lambda s: s.store.url, "sqlite:////var/lib/keygate/keygate.db"),
        ({"store.url": "postgresql://kg:pw@db/keygate"}, lambda s: s.store.url, "postgresql://kg:pw@db/keygate"),
        ({"store.url": "postgres://db/keygate"}, lambda s: s.store.url, "postgres://db/keygate"),
        ({"store.pool_min_size": 0, "store.pool_max_size": 1}, lambda s: s.store.pool_min_size, 0),
        ({"redis.url": "rediss://cache:6380/0"}, lambda s: s.redis.url, "rediss://cache:6380/0"),
        ({"redis.url": "unix:///run/redis.sock"}, lambda s: s.redis.url, "unix:///run/redis.sock"),
        ({"redis.url": "unix:///run/redis.sock?db=2"}, lambda s: s.redis.url, "unix:///run/redis.sock?db=2"),
        ({"redis.url": "redis://cache"}, lambda s: s.redis.url, "redis://cache"),
        ({"redis.url": "redis://:secret@cache:6379/15"}, lambda s: s.redis.url, "redis://:secret@cache:6379/15"),
        # As redis-py reads them: ?db= over the path, the path percent-decoded, spaces around the number.
        ({"redis.url": "redis://cache/x?db=2"}, lambda s: s.redis.url, "redis://cache/x?db=2"),
        ({"redis.url": "redis://cache:6379/%31"}, lambda s: s.redis.url, "redis://cache:6379/%31"),
        ({"redis.url": "redis://[::1]:6379/2"}, lambda s: s.redis.url, "redis://[::1]:6379/2"),
        ({"redis.url": "rediss://user:p%2Fw@cache?ssl_cert_reqs=none"}, lambda s: s.redis.url,
         "rediss://user:p%2Fw@cache?ssl_cert_reqs=none"),
        ({"redis.url": "unix://user:pw@/run/redis.sock?db=3"}, lambda s: s.redis.url,
         "unix://user:pw@/run/redis.sock?db=3"),
        ({"redis.cluster": True, "redis.nodes": ["redis-0:6379", "[::1]:7000"]},
         lambda s: (s.redis.cluster, s.redis.enabled), (True, True)),
        ({"redis.cluster": True, "redis.url": "rediss://:pw@cache:6380"}, lambda s: s.redis.nodes, []),
        ({"redis.timeout": "100ms"}, lambda s: s.redis.timeout, 0.1),
        ({"ratelimit.policy": "local-first"}, lambda s: s.ratelimit.policy, "local-first"),
        ({"cache.negative_ttl": 0}, lambda s: s.cache.negative_ttl, 0.0),
        ({"ratelimit.default": "10/second; burst=50"}, lambda s: s.ratelimit.default, "10/second; burst=50"),
        ({"keys.pepper": PEPPER}, lambda s: s.keys.pepper, PEPPER),
        ({"keys.kinds.ci.prefix": "ci_", "keys.default_kind": "ci"}, lambda s: s.keys.default_kind, "ci"),
        ({"keys.kinds.rk-t.prefix": "rk_t_"}, lambda s: s.keys.kinds["rk-t"].prefix, "rk_t_"),
        ({"keys.kinds.long.prefix": "a_long_prefix_1_"}, lambda s: s.keys.kinds["long"].prefix, "a_long_prefix_1_"),
        ({"log.level": "WARNING"}, lambda s: s.log.level, "warning"),
        ({"log.format": "Text"}, lambda s: s.log.format, "text"),
        ({"upstreams": [APP], "routes": [{"path": "/", "operation": "read", "methods": ["get", "Post"]}]}, lambda s: s.routes[0].methods, ["GET", "POST"]),
        ({"upstreams": [APP], "routes": [{"path": "/api/servers/{server}/deploy", "operation": "deploy"}]}, lambda s: s.routes[0].path, "/api/servers/{server}/deploy"),
        ({"upstreams": [APP], "routes": [{"path": "/", "operation": "*:read"}]}, lambda s: s.routes[0].operation, "*:read"),
        ({"upstreams": [APP], "routes": [{"path": "/a/{id}", "operation": "read"}]}, lambda s: s.routes[0].path, "/a/{id}"),
        ({"upstreams": [APP], "routes": [{"path": "/api/registry/{credential}/login", "operation": "registry_login:{credential}"}]}, lambda s: s.routes[0].operation, "registry_login:{credential}"),
        ({"upstreams": [APP], "routes": [{"path": "/api/servers/{server}/secrets/{name}/*", "operation": "secrets:{name}:read"}]}, lambda s: s.routes[0].operation, "secrets:{name}:read"),
        ({"upstreams": [APP], "routes": [{"path": "/orgs/{org}/repos/{repo}", "operation": "repos:{org}:{repo}-push"}]}, lambda s: s.routes[0].operation, "repos:{org}:{repo}-push"),
        ({"upstreams": [APP], "routes": [{"path": "/", "operation": "read"}]}, lambda s: s.routes[0].upstream, None),
        ({"upstreams": [{"name": "api.v2", "url": "https://api.example:8443/base"}]}, lambda s: s.upstreams[0].name, "api.v2"),
        ({"upstreams": [{**APP, "timeout": "2m"}]}, lambda s: s.upstreams[0].timeout, 120.0),
    ],
)
def test_valid_value_is_accepted(tmp_path: Path, overrides: dict[str, Any], read: Any, expected: object) -> None:
    """Values the rules allow load, normalised where the rule says so."""
    assert read(load(tmp_path, overrides=overrides)) == expected


def test_upstreams_keep_their_configured_order(tmp_path: Path) -> None:
    """Upstreams load in the order written, so the first one written is the default (the route table's)."""
    second = {"name": "billing", "url": "http://127.0.0.1:8081"}
    settings = load(tmp_path, overrides={"upstreams": [APP, second]})
    assert [upstream.name for upstream in settings.upstreams] == ["app", "billing"]


def test_upstream_and_route_problems_come_from_a_file_with_their_index(tmp_path: Path) -> None:
    """Array-of-tables problems point at the element that is wrong."""
    path = write(
        tmp_path,
        '[[upstreams]]\nname = "app"\nurl = "http://a"\n\n'
        '[[routes]]\npath = "/ok"\noperation = "read"\n\n'
        '[[routes]]\npath = "/deploy"\noperation = "deploy"\nupstream = "nope"\n',
    )
    assert problems(tmp_path, config_file=path) == [
        "routes.1.upstream = 'nope': must be a configured upstream (app)"
    ]


# --- route placeholders -------------------------------------------------------------


BAD_PLACEHOLDERS = [
    ("/a/{id}/b/{id}", "read:{id}", "routes.1.path = '/a/{id}/b/{id}': {id} appears twice in the path; give each placeholder its own name"),
    ("/{server}/x/{server}", "read", "routes.1.path = '/{server}/x/{server}': {server} appears twice in the path"),
    ("/api/x{id}", "read", "routes.1.path = '/api/x{id}': a placeholder must be a whole path segment, not part of one (x{id})"),
    ("/api/{a}{b}", "read", "routes.1.path = '/api/{a}{b}': a placeholder must be a whole path segment, not part of one ({a}{b})"),
    ("/api/{id}.json", "read", "routes.1.path = '/api/{id}.json': a placeholder must be a whole path segment"),
    ("/api/servers/{server}/deploy", "deploy:{server}", "routes.1.operation = 'deploy:{server}': {server} cannot be part of the operation"),
    ("/api/registry/{credential}/login", "registry_login:{cred}", "routes.1.operation = 'registry_login:{cred}': {cred} is not a placeholder of the path ({credential})"),
    ("/api/registry/login", "registry_login:{credential}", "routes.1.operation = 'registry_login:{credential}': {credential} is not a placeholder of the path (it has none)"),
    ("/api/{id", "read", "routes.1.path = '/api/{id': malformed placeholder in '{id': write {name}"),
    ("/api/id}", "read", "routes.1.path = '/api/id}': malformed placeholder in 'id}'"),
    ("/api/{}", "read", "routes.1.path = '/api/{}': malformed placeholder in '{}'"),
    ("/api/{a-b}", "read", "routes.1.path = '/api/{a-b}': malformed placeholder in '{a-b}'"),
    ("/api/{id}", "read:{id", "routes.1.operation = 'read:{id': malformed placeholder in 'read:{id'"),
    ("/api/{id}", "read:id}", "routes.1.operation = 'read:id}': malformed placeholder in 'read:id}'"),
    ("/api/{id}", "read:{i d}", "routes.1.operation = 'read:{i d}': malformed placeholder in '{i d}'"),
    ("/{org}/{repo}", "push:{org}{repo}", "routes.1.operation = 'push:{org}{repo}': '{org}{repo}' holds two placeholders"),
    ("/{org}/{repo}", "push:{org}-{repo}", "routes.1.operation = 'push:{org}-{repo}': '{org}-{repo}' holds two placeholders"),
]


@pytest.mark.parametrize(("path", "operation", "expected"), BAD_PLACEHOLDERS)
def test_bad_placeholder_is_one_line_naming_the_route(tmp_path: Path, path: str, operation: str, expected: str) -> None:
    """Each placeholder mistake in a route is one problem line naming the route and its path or operation."""
    config = write(tmp_path, f'[[upstreams]]\nname = "app"\nurl = "http://a"\n\n'
                             f'[[routes]]\npath = "/ok/{{id}}"\noperation = "read:{{id}}"\n\n'
                             f'[[routes]]\npath = "{path}"\noperation = "{operation}"\n')
    [line] = problems(tmp_path, config_file=config)
    assert line.startswith(expected), line


def test_every_bad_placeholder_of_a_route_is_reported() -> None:
    """A route with several placeholder mistakes gets a line for each, path and operation alike."""
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={}, overrides={"upstreams": [APP], "routes": [
            {"path": "/a/{id}/{id}/x{y}", "operation": "read"},
            {"path": "/b/{id}", "operation": "read:{server}:{name}"},
        ]})
    assert [line.partition("': ")[0] for line in caught.value.problems] == [
        "routes.0.path = '/a/{id}/{id}/x{y}", "routes.0.path = '/a/{id}/{id}/x{y}",
        "routes.1.operation = 'read:{server}:{name}", "routes.1.operation = 'read:{server}:{name}",
    ]


# --- config.example.toml ------------------------------------------------------------------------


def test_example_file_holds_the_defaults(tmp_path: Path) -> None:
    """config.example.toml loads to exactly the built-in defaults, so it cannot drift."""
    assert load(tmp_path, config_file=EXAMPLE) == Settings()


def _fields(model: type[pydantic.BaseModel]) -> set[str]:
    names = set()
    for name, field in model.model_fields.items():
        names.add(name)
        for inner in (field.annotation, *getattr(field.annotation, "__args__", ())):
            if isinstance(inner, type) and issubclass(inner, pydantic.BaseModel):
                names |= _fields(inner)
    return names


@pytest.mark.parametrize("name", sorted(_fields(Settings)))
def test_example_file_documents_every_setting(name: str) -> None:
    """Every field of every settings model appears in config.example.toml, as a key or a table."""
    text = EXAMPLE.read_text(encoding="utf-8")
    as_key = re.search(rf"^#?{name} = ", text, re.MULTILINE)
    as_table = re.search(rf"^#?\[+([\w.]+\.)?{name}[\].]", text, re.MULTILINE)
    assert as_key or as_table


def test_example_file_commented_settings_are_valid(tmp_path: Path) -> None:
    """The commented-out upstream and route examples load once uncommented."""
    text = EXAMPLE.read_text(encoding="utf-8")
    uncommented = re.sub(r"^#(?=[\[a-z])", "", text, flags=re.MULTILINE)
    settings = load(tmp_path, config_file=write(tmp_path, uncommented))
    assert settings.upstreams[0].name == "app"
    assert [route.operation for route in settings.routes] == ["deploy", "registry_login:{credential}"]


@pytest.mark.parametrize(
    ("argon2", "setting"),
    [
        ({"parallelism": 1000, "memory_cost": 1024}, "keys.argon2.parallelism"),
        ({"memory_cost": 99999999999}, "keys.argon2.memory_cost"),
    ],
)
def test_argon2_settings_the_library_cannot_use_are_refused(tmp_path: Path, argon2: dict, setting: str) -> None:
    """argon2 costs that would fail at hashing time are refused when the config loads."""
    with pytest.raises(ConfigError) as error:
        load_settings(overrides={"keys": {"argon2": argon2}}, environ={}, cwd=tmp_path)
    assert any(line.startswith(setting) for line in error.value.problems)
