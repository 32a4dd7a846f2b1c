from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pydantic
import pytest

from gateway.config.load import (
    ConfigError,
    Settings,
    load_settings,
    mask_url,
    masked,
    render_toml,
)

EXAMPLE = Path(__file__).resolve().parents[3] / "config.example.toml"
APP = {"name": "app", "url": "http://127.0.0.1:8080"}
PEPPER = "p" * 40


def load(tmp_path: Path, **kwargs: Any) -> Settings:
    kwargs.setdefault("environ", {})
    return load_settings(cwd=tmp_path, **kwargs)


def problems(tmp_path: Path, **kwargs: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, **kwargs)
    return caught.value.problems


def write(tmp_path: Path, text: str, name: str = "settings.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- defaults -------------------------------------------------------------


def test_no_sources_give_the_defaults(tmp_path: Path) -> None:
    """With no file, environment or overrides the settings are the built-in defaults."""
    assert load(tmp_path) == Settings()


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
        (lambda s: s.recorder.flush_interval, 5),
        (lambda s: (s.audit.retention_days, s.audit.prune_interval), (90, 3600)),
        (lambda s: s.keys.pepper, ""),
        (lambda s: {name: kind.prefix for name, kind in s.keys.kinds.items()}, {"integration": "kg_", "automation": "kga_"}),
        (lambda s: s.keys.default_kind, "integration"),
        (lambda s: (s.keys.argon2.time_cost, s.keys.argon2.memory_cost, s.keys.argon2.parallelism), (1, 8192, 1)),
        (lambda s: s.log.level, "info"),
        (lambda s: (s.upstreams, s.routes, s.default_upstream), ([], [], None)),
    ],
)
def test_defaults_match_the_design(read: Any, expected: object) -> None:
    """Each default is the one DESIGN.md documents."""
    assert read(Settings()) == expected


def test_settings_are_immutable() -> None:
    """Settings cannot be changed after loading."""
    with pytest.raises(pydantic.ValidationError):
        Settings().proxy.workers = 2  # type: ignore[misc]


# --- precedence -----------------------------------------------------------


@pytest.mark.parametrize(
    ("in_file", "in_env", "in_overrides", "expected"),
    [
        (None, None, None, 1),
        (2, None, None, 2),
        (2, "3", None, 3),
        (2, "3", 4, 4),
        (None, None, 4, 4),
        (2, None, 4, 4),
    ],
)
def test_each_layer_beats_the_one_below(
    tmp_path: Path, in_file: int | None, in_env: str | None, in_overrides: int | None, expected: int
) -> None:
    """Defaults < config file < environment < overrides."""
    path = write(tmp_path, f"[proxy]\nworkers = {in_file}\n" if in_file else "")
    environ = {"KEYGATE_PROXY__WORKERS": in_env} if in_env else {}
    overrides = {"proxy.workers": in_overrides} if in_overrides else None
    settings = load(tmp_path, config_file=path, environ=environ, overrides=overrides)
    assert settings.proxy.workers == expected


def test_tables_merge_across_layers(tmp_path: Path) -> None:
    """Settings of one table from different layers combine instead of replacing each other."""
    path = write(tmp_path, '[proxy]\nlisten = "0.0.0.0:9000"\n')
    settings = load(tmp_path, config_file=path, environ={"KEYGATE_PROXY__WORKERS": "4"})
    assert (settings.proxy.listen, settings.proxy.workers) == ("0.0.0.0:9000", 4)


def test_lists_are_replaced_not_appended(tmp_path: Path) -> None:
    """A list from a higher layer replaces the lower layer's list."""
    path = write(tmp_path, '[proxy]\ntrusted_proxies = ["10.0.0.0/8", "192.168.0.0/16"]\n')
    settings = load(tmp_path, config_file=path, environ={"KEYGATE_PROXY__TRUSTED_PROXIES": '["172.16.0.0/12"]'})
    assert settings.proxy.trusted_proxies == ["172.16.0.0/12"]


# --- which file -------------------------------------------------------------


def test_keygate_config_names_the_file(tmp_path: Path) -> None:
    """KEYGATE_CONFIG is read when no file is named explicitly."""
    path = write(tmp_path, "[proxy]\nworkers = 3\n", name="elsewhere.toml")
    assert load(tmp_path, environ={"KEYGATE_CONFIG": str(path)}).proxy.workers == 3


def test_named_file_beats_keygate_config(tmp_path: Path) -> None:
    """An explicit config_file wins over KEYGATE_CONFIG."""
    named = write(tmp_path, "[proxy]\nworkers = 2\n", name="named.toml")
    from_env = write(tmp_path, "[proxy]\nworkers = 3\n", name="env.toml")
    settings = load(tmp_path, config_file=named, environ={"KEYGATE_CONFIG": str(from_env)})
    assert settings.proxy.workers == 2


def test_keygate_toml_in_cwd_is_picked_up(tmp_path: Path) -> None:
    """./keygate.toml is read when no file is named."""
    write(tmp_path, "[proxy]\nworkers = 5\n", name="keygate.toml")
    assert load(tmp_path).proxy.workers == 5


def test_keygate_toml_is_ignored_when_a_file_is_named(tmp_path: Path) -> None:
    """A named file replaces ./keygate.toml rather than adding to it."""
    write(tmp_path, "[proxy]\nworkers = 5\n", name="keygate.toml")
    named = write(tmp_path, "", name="named.toml")
    assert load(tmp_path, config_file=named).proxy.workers == 1


def test_relative_file_is_found_from_cwd(tmp_path: Path) -> None:
    """A relative file name is resolved against cwd."""
    (tmp_path / "conf").mkdir()
    write(tmp_path, "[proxy]\nworkers = 6\n", name="conf/k.toml")
    assert load(tmp_path, config_file="conf/k.toml").proxy.workers == 6


@pytest.mark.parametrize(
    "source",
    [{"config_file": "missing.toml"}, {"environ": {"KEYGATE_CONFIG": "missing.toml"}}],
    ids=["config_file", "KEYGATE_CONFIG"],
)
def test_missing_named_file_is_an_error(tmp_path: Path, source: dict[str, Any]) -> None:
    """A file that was asked for but does not exist stops loading."""
    assert problems(tmp_path, **source) == ["config file missing.toml: no such file"]


def test_toml_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    """Invalid TOML is reported with the file name and where in it."""
    path = write(tmp_path, '[proxy]\nworkers = 2\nlisten = "unterminated\n')
    [line] = problems(tmp_path, config_file=path)
    assert line.startswith(f"config file {path}, line 3, column ")
    assert "invalid TOML" in line


def test_unreadable_file_still_reports_environment_problems(tmp_path: Path) -> None:
    """A broken file does not hide problems in the environment."""
    path = write(tmp_path, "workers = = 2\n")
    found = problems(tmp_path, config_file=path, environ={"KEYGATE_BOGUS": "1"})
    assert len(found) == 2
    assert found[1] == "unknown setting bogus (from KEYGATE_BOGUS)"


def test_file_that_is_not_utf8_is_an_error(tmp_path: Path) -> None:
    """A file that is not UTF-8 text is reported, not raised."""
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[store]\nurl = "sqlite:///caf\xe9.db"\n')
    assert problems(tmp_path, config_file=path) == [f"config file {path}: not UTF-8 text"]


# --- unknown settings ---------------------------------------------------------


def test_unknown_key_in_file_names_the_file(tmp_path: Path) -> None:
    """A misspelt setting in the file is reported with the file name and a suggestion."""
    path = write(tmp_path, '[proxy]\nlisen = "0.0.0.0:80"\n')
    assert problems(tmp_path, config_file=path) == [
        f"unknown setting proxy.lisen (in {path}); did you mean proxy.listen?"
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[proxxy]\nworkers = 2\n", "unknown setting proxxy"),
        ('[[upstreams]]\nname = "a"\nurl = "http://a"\ntimout = 5\n', "unknown setting upstreams.0.timout"),
        ('[keys.kinds.ci]\nprefix = "ci_"\nprefx = "x"\n', "unknown setting keys.kinds.ci.prefx"),
        ("[keys.argon2]\nmemory = 1\n", "unknown setting keys.argon2.memory"),
        ("stray = 1\n", "unknown setting stray"),
    ],
)
def test_unknown_keys_are_found_at_any_depth(tmp_path: Path, text: str, expected: str) -> None:
    """Unknown keys in tables, arrays of tables and kinds are all rejected."""
    path = write(tmp_path, text)
    [line] = problems(tmp_path, config_file=path)
    assert line.startswith(expected)


def test_unknown_environment_variable_is_named(tmp_path: Path) -> None:
    """An unknown KEYGATE_ variable is reported by its name."""
    assert problems(tmp_path, environ={"KEYGATE_PROXY__LISEN": "0.0.0.0:80"}) == [
        "unknown setting proxy.lisen (from KEYGATE_PROXY__LISEN); did you mean proxy.listen?"
    ]


def test_unknown_key_inside_json_variable_is_named(tmp_path: Path) -> None:
    """Unknown keys inside a JSON value are reported with the variable that held them."""
    environ = {"KEYGATE_UPSTREAMS": '[{"name": "app", "url": "http://a", "weight": 2}]'}
    assert problems(tmp_path, environ=environ) == ["unknown setting upstreams.0.weight (from KEYGATE_UPSTREAMS)"]


def test_unknown_override_is_reported(tmp_path: Path) -> None:
    """An override naming no setting is an error too."""
    assert problems(tmp_path, overrides={"proxy.wrkers": 2}) == [
        "unknown setting proxy.wrkers (in overrides); did you mean proxy.workers?"
    ]


def test_unrelated_environment_is_ignored(tmp_path: Path) -> None:
    """Variables without the KEYGATE_ prefix, and KEYGATE_CONFIG itself, are not settings."""
    environ = {"PATH": "/bin", "KEYGATEWAY": "x", "keygate_proxy__workers": "9", "KEYGATE_CONFIG": ""}
    assert load(tmp_path, environ=environ) == Settings()


# --- all problems at once ------------------------------------------------------


def test_every_problem_is_reported_together(tmp_path: Path) -> None:
    """Unknown keys and invalid values from every layer come back in one ConfigError."""
    path = write(tmp_path, "[proxy]\nworkers = 0\ncolour = 'red'\n[cache]\nttl = -1\n")
    environ = {"KEYGATE_STORE__URL": "mysql://x", "KEYGATE_NOPE": "1"}
    found = problems(tmp_path, config_file=path, environ=environ, overrides={"ratelimit.default": "lots"})
    assert found[:2] == [f"unknown setting proxy.colour (in {path})", "unknown setting nope (from KEYGATE_NOPE)"]
    assert [line.split(" = ")[0] for line in found[2:]] == [
        "proxy.workers", "store.url", "cache.ttl", "ratelimit.default"
    ]


def test_config_error_text_is_one_line_per_problem(tmp_path: Path) -> None:
    """str(ConfigError) is its problems, one per line."""
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, overrides={"proxy.workers": 0, "admin.listen": "nowhere"})
    assert str(caught.value) == "\n".join(caught.value.problems)
    assert len(caught.value.problems) == 2


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
        ({"upstreams": [APP], "routes": [{"path": "/a/{id}", "operation": "read"}]}, "routes.0.path = '/a/{id}': the only placeholder allowed is {server}"),
        ({"upstreams": [APP], "routes": [{"path": "/a/x{server}", "operation": "read"}]}, "routes.0.path = '/a/x{server}': the only placeholder"),
        ({"upstreams": [APP], "routes": [{"path": "/{server}/{server}", "operation": "read"}]}, "routes.0.path = '/{server}/{server}': the only placeholder"),
        ({"upstreams": [APP], "routes": [{"path": "/", "operation": "Deploy"}]}, "routes.0.operation = 'Deploy': must be lowercase letters"),
        ({"upstreams": [APP], "routes": [{"path": "/", "operation": ":read"}]}, "routes.0.operation = ':read': must be lowercase letters"),
        ({"upstreams": [APP], "routes": [{"path": "/", "operation": "read", "methods": ["GET", "GET /"]}]}, "routes.0.methods.1 = 'GET /': must be an HTTP method"),
        ({"upstreams": [APP], "routes": [{"path": "/", "operation": "read", "upstream": "billing"}]}, "routes.0.upstream = 'billing': must be a configured upstream (app)"),
        ({"routes": [{"path": "/", "operation": "read"}]}, "routes.0.upstream = None: no upstreams are configured"),
        ({"upstreams": [APP], "routes": [{"path": "/", "operation": "read", "pass_credentials": "sometimes"}]}, "routes.0.pass_credentials = 'sometimes': must be true or false"),
        ({"upstreams": {"name": "app"}}, "upstreams = {'name': 'app'}: must be a list"),
        ({"proxy": "fast"}, "proxy = 'fast': must be a table"),
    ],
)
def test_invalid_value_is_reported_with_setting_value_and_rule(
    tmp_path: Path, overrides: dict[str, Any], expected: str
) -> None:
    """Each rule's violation produces a line naming the setting, the value and what is allowed."""
    found = problems(tmp_path, overrides=overrides)
    assert any(line.startswith(expected) for line in found), found


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
        ({"redis.timeout": "100ms"}, lambda s: s.redis.timeout, 0.1),
        ({"ratelimit.policy": "local-first"}, lambda s: s.ratelimit.policy, "local-first"),
        ({"cache.negative_ttl": 0}, lambda s: s.cache.negative_ttl, 0.0),
        ({"ratelimit.default": "10/second; burst=50"}, lambda s: s.ratelimit.default, "10/second; burst=50"),
        ({"keys.pepper": PEPPER}, lambda s: s.keys.pepper, PEPPER),
        ({"keys.kinds.ci.prefix": "ci_", "keys.default_kind": "ci"}, lambda s: s.keys.default_kind, "ci"),
        ({"keys.kinds.rk-t.prefix": "rk_t_"}, lambda s: s.keys.kinds["rk-t"].prefix, "rk_t_"),
        ({"keys.kinds.long.prefix": "a_long_prefix_1_"}, lambda s: s.keys.kinds["long"].prefix, "a_long_prefix_1_"),
        ({"log.level": "WARNING"}, lambda s: s.log.level, "warning"),
        ({"upstreams": [APP], "routes": [{"path": "/", "operation": "read", "methods": ["get", "Post"]}]}, lambda s: s.routes[0].methods, ["GET", "POST"]),
        ({"upstreams": [APP], "routes": [{"path": "/api/servers/{server}/deploy", "operation": "deploy"}]}, lambda s: s.routes[0].path, "/api/servers/{server}/deploy"),
        ({"upstreams": [APP], "routes": [{"path": "/", "operation": "*:read"}]}, lambda s: s.routes[0].operation, "*:read"),
        ({"upstreams": [APP], "routes": [{"path": "/", "operation": "read"}]}, lambda s: s.routes[0].upstream, None),
        ({"upstreams": [{"name": "api.v2", "url": "https://api.example:8443/base"}]}, lambda s: s.upstreams[0].name, "api.v2"),
        ({"upstreams": [{**APP, "timeout": "2m"}]}, lambda s: s.upstreams[0].timeout, 120.0),
    ],
)
def test_valid_value_is_accepted(tmp_path: Path, overrides: dict[str, Any], read: Any, expected: object) -> None:
    """Values the rules allow load, normalised where the rule says so."""
    assert read(load(tmp_path, overrides=overrides)) == expected


def test_default_upstream_is_the_first(tmp_path: Path) -> None:
    """The first configured upstream is the default one."""
    second = {"name": "billing", "url": "http://127.0.0.1:8081"}
    settings = load(tmp_path, overrides={"upstreams": [APP, second]})
    assert settings.default_upstream is not None and settings.default_upstream.name == "app"


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


# --- key kinds --------------------------------------------------------------------


def test_configured_kinds_are_added_to_the_defaults(tmp_path: Path) -> None:
    """A kind set in the file joins integration and automation."""
    path = write(tmp_path, '[keys.kinds.ci]\nprefix = "ci_"\n')
    kinds = load(tmp_path, config_file=path).keys.kinds
    assert {name: kind.prefix for name, kind in kinds.items()} == {
        "integration": "kg_", "automation": "kga_", "ci": "ci_"
    }


def test_a_default_kind_prefix_can_be_changed(tmp_path: Path) -> None:
    """Setting a built-in kind's prefix replaces it and keeps the other kinds."""
    path = write(tmp_path, '[keys.kinds.integration]\nprefix = "clt_"\n')
    kinds = load(tmp_path, config_file=path).keys.kinds
    assert {name: kind.prefix for name, kind in kinds.items()} == {"integration": "clt_", "automation": "kga_"}


def test_kinds_from_the_environment_are_added(tmp_path: Path) -> None:
    """KEYGATE_KEYS__KINDS__<KIND>__PREFIX adds a kind."""
    kinds = load(tmp_path, environ={"KEYGATE_KEYS__KINDS__CI__PREFIX": "ci_"}).keys.kinds
    assert list(kinds) == ["integration", "automation", "ci"]


# --- environment values ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "read", "expected"),
    [
        ({"KEYGATE_STORE__URL": "postgresql://db/kg"}, lambda s: s.store.url, "postgresql://db/kg"),
        ({"KEYGATE_REDIS__URL": "redis://cache:6379"}, lambda s: s.redis.url, "redis://cache:6379"),
        ({"KEYGATE_PROXY__WORKERS": "8"}, lambda s: s.proxy.workers, 8),
        ({"KEYGATE_PROXY__ACCESS_LOG": "true"}, lambda s: s.proxy.access_log, True),
        ({"KEYGATE_CACHE__TTL": "1m"}, lambda s: s.cache.ttl, 60.0),
        ({"KEYGATE_PROXY__TRUSTED_PROXIES": '["10.0.0.0/8"]'}, lambda s: s.proxy.trusted_proxies, ["10.0.0.0/8"]),
        ({"KEYGATE_PROXY__TRUSTED_PROXIES": "10.0.0.0/8, 192.168.0.1"}, lambda s: s.proxy.trusted_proxies, ["10.0.0.0/8", "192.168.0.1/32"]),
        ({"KEYGATE_PROXY__TRUSTED_PROXIES": ""}, lambda s: s.proxy.trusted_proxies, []),
        ({"KEYGATE_UPSTREAMS": '[{"name":"app","url":"http://127.0.0.1:8080"}]'}, lambda s: s.default_upstream.url, "http://127.0.0.1:8080"),
        ({"KEYGATE_KEYS__KINDS": '{"ci": {"prefix": "ci_"}}'}, lambda s: len(s.keys.kinds), 3),
        ({"KEYGATE_PROXY": '{"workers": 2}', "KEYGATE_PROXY__LISTEN": "0.0.0.0:80"}, lambda s: (s.proxy.workers, s.proxy.listen), (2, "0.0.0.0:80")),
        ({"KEYGATE_KEYS__PEPPER": "{" + PEPPER}, lambda s: s.keys.pepper, "{" + PEPPER),
    ],
)
def test_environment_values_are_converted(environ: dict[str, str], read: Any, expected: object, tmp_path: Path) -> None:
    """Text from the environment becomes numbers, booleans, lists and tables; JSON only where a list or table goes."""
    assert read(load(tmp_path, environ=environ)) == expected


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"KEYGATE_UPSTREAMS": "[{name: app}]"}, "KEYGATE_UPSTREAMS = '[{name: app}]': not valid JSON"),
        ({"KEYGATE_STORE": '{"url": "postgresql://u:hunter2@db'}, "KEYGATE_STORE = '***': not valid JSON"),
    ],
)
def test_invalid_json_in_environment_is_reported(tmp_path: Path, environ: dict[str, str], expected: str) -> None:
    """Bad JSON names the variable, hiding it when it may hold a secret."""
    [line] = problems(tmp_path, environ=environ)
    assert line.startswith(expected)


# --- overrides ---------------------------------------------------------------------------


def test_dotted_and_nested_overrides_combine(tmp_path: Path) -> None:
    """Overrides take dotted keys and nested tables alike."""
    settings = load(tmp_path, overrides={"proxy.listen": "0.0.0.0:9000", "proxy": {"workers": 3}})
    assert (settings.proxy.listen, settings.proxy.workers) == ("0.0.0.0:9000", 3)


def test_none_overrides_are_skipped(tmp_path: Path) -> None:
    """An override of None (a flag not given) leaves the lower layers' value."""
    settings = load(tmp_path, environ={"KEYGATE_PROXY__WORKERS": "4"}, overrides={"proxy.workers": None})
    assert settings.proxy.workers == 4


# --- secrets --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://user:secret@db:5432/keygate", "postgresql://user:***@db:5432/keygate"),
        ("postgresql://user@db/keygate", "postgresql://user@db/keygate"),
        ("postgresql://db/keygate?sslmode=require&password=secret", "postgresql://db/keygate?sslmode=require&password=***"),
        ("postgresql://user:pa/ss@word@db/kg", "postgresql://user:***@db/kg"),
        ("redis://:secret@cache:6379/0", "redis://:***@cache:6379/0"),
        ("unix://:secret@/run/redis.sock?db=0", "unix://:***@/run/redis.sock?db=0"),
        ("sqlite:///keygate.db", "sqlite:///keygate.db"),
        ("", ""),
    ],
)
def test_mask_url_hides_only_the_password(url: str, expected: str) -> None:
    """Passwords in user info or a password= parameter are replaced by ***."""
    assert mask_url(url) == expected


def test_masked_hides_secrets(tmp_path: Path) -> None:
    """masked() hides URL passwords and the whole pepper, and leaves the rest as loaded."""
    settings = load(
        tmp_path,
        overrides={
            "store.url": "postgresql://kg:hunter2@db/keygate",
            "redis.url": "redis://:hunter3@cache:6379",
            "keys.pepper": PEPPER,
        },
    )
    data = masked(settings)
    assert (data["store"]["url"], data["redis"]["url"], data["keys"]["pepper"]) == (
        "postgresql://kg:***@db/keygate", "redis://:***@cache:6379", "***"
    )
    assert data["proxy"] == Settings().proxy.model_dump()
    assert "hunter" not in repr(data) and PEPPER not in repr(data)


def test_masked_keeps_an_empty_pepper_empty() -> None:
    """An unset pepper shows as empty, so users can see it will be generated."""
    assert masked(Settings())["keys"]["pepper"] == ""


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"keys.pepper": "hunter2"}, "keys.pepper = '***': "),
        ({"keys.pepper": 12345}, "keys.pepper = '***': "),
        ({"store.url": "mysql://kg:hunter2@db/kg"}, "store.url = 'mysql://kg:***@db/kg': "),
        ({"redis.url": "http://:hunter2@cache"}, "redis.url = 'http://:***@cache': "),
        ({"store": "postgresql://kg:hunter2@db/kg"}, "store = '***': "),
    ],
)
def test_problems_never_show_secrets(tmp_path: Path, overrides: dict[str, Any], expected: str) -> None:
    """Error lines hide secret values the way masked() does."""
    [line] = problems(tmp_path, overrides=overrides)
    assert line.startswith(expected) and "hunter2" not in line


# --- TOML output ------------------------------------------------------------------------------


def test_rendered_toml_loads_back_to_the_same_settings(tmp_path: Path) -> None:
    """check-config output is a config file that gives the same settings."""
    settings = load(
        tmp_path,
        overrides={
            "proxy.trusted_proxies": ["10.0.0.0/8"],
            "keys.kinds.ci.prefix": "ci_",
            "upstreams": [APP, {"name": "billing", "url": "http://b", "timeout": 5}],
            "routes": [
                {"methods": ["POST"], "path": "/api/servers/{server}/deploy", "operation": "deploy"},
                {"path": "/bills", "upstream": "billing", "operation": "read", "pass_credentials": True},
            ],
        },
    )
    path = write(tmp_path, render_toml(masked(settings)))
    assert load(tmp_path, config_file=path) == settings


def test_rendered_toml_escapes_strings_and_omits_none() -> None:
    """Quotes, backslashes, control characters and odd keys survive; None values are left out."""
    data = {"t": {"s": 'a "q" \\ \n \x7f é', "none": None, "odd key": 1, "f": 1.5, "b": True, "l": [1, "x"]}}
    assert tomllib.loads(render_toml(data)) == {"t": {"s": 'a "q" \\ \n \x7f é', "odd key": 1, "f": 1.5, "b": True, "l": [1, "x"]}}


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
    assert settings.default_upstream is not None and settings.routes[0].operation == "deploy"


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
