"""Settings as people see them: secrets masked, and TOML that loads back to the same settings."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from gateway.config.render import mask_url, masked, render_toml
from gateway.config.schema import Settings

from .loading import APP, PEPPER, load, write


# --- secrets --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://user:secret@db:5432/keygate", "postgresql://user:***@db:5432/keygate"),
        ("postgresql://user@db/keygate", "postgresql://user@db/keygate"),
        ("postgresql://db/keygate?sslmode=require&password=secret", "postgresql://db/keygate?sslmode=require&password=***"),
        ("postgresql://user:pa/ss@word@db/kg", "postgresql://user:***@db/kg"),
        ("redis://:pa?ss@cache:6379", "redis://:***@cache:6379"),
        ("redis://:pa#ss@cache:6379/0", "redis://:***@cache:6379/0"),
        ("redis://:x[pass]y@cache", "redis://:***@cache"),
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
