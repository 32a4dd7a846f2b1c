"""Loading settings: the layers and their precedence, which file, unknown keys, and every problem at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.config.load import ConfigError
from gateway.config.schema import Settings

from .loading import PEPPER, load, problems, write


# --- defaults -------------------------------------------------------------


def test_no_sources_give_the_defaults(tmp_path: Path) -> None:
    """With no file, environment or overrides the settings are the built-in defaults."""
    assert load(tmp_path) == Settings()


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
        ({"KEYGATE_UPSTREAMS": '[{"name":"app","url":"http://127.0.0.1:8080"}]'}, lambda s: s.upstreams[0].url, "http://127.0.0.1:8080"),
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


# --- secrets in error lines ----------------------------------------------------------------


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
