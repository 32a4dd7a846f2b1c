"""``keygate check-config`` checks exactly what ``keygate serve`` checks before it exits 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from .test_cli import keygate

UPSTREAM = '[[upstreams]]\nname = "app"\nurl = "http://127.0.0.1:9"\n'
NO_UPSTREAMS = "keygate: invalid configuration: no upstreams configured: add an [[upstreams]] table (name, url)"


@pytest.mark.parametrize(("config", "lines"), [
    ("", [NO_UPSTREAMS]),
    ('[log]\nlevel = "loud"\n', [
        "keygate: invalid configuration: log.level = 'loud': must be one of 'debug', 'info', 'warning' or 'error'",
        NO_UPSTREAMS]),
    ('[store]\npool_min_size = 5\npool_max_size = 2\n[proxy]\nworkers = 0\n', [
        "keygate: invalid configuration: proxy.workers = 0: must be at least 1",
        "keygate: invalid configuration: store.pool_max_size = 2: must be at least store.pool_min_size (5)",
        NO_UPSTREAMS]),
    ('[[routes]]\npath = "/x/*"\noperation = "read"\nupstream = "nowhere"\n', [
        "keygate: invalid configuration: routes.0.upstream = 'nowhere': no upstreams are configured; add an "
        "[[upstreams]] table",
        NO_UPSTREAMS]),
    (UPSTREAM + '[[routes]]\npath = "/x/*"\noperation = "read"\nupstream = "other"\n[proxy]\nlisen = "x"\n', [
        "keygate: invalid configuration: unknown setting proxy.lisen (in {config}); did you mean proxy.listen?",
        "keygate: invalid configuration: routes.0.upstream = 'other': must be a configured upstream (app)"]),
    ("[proxy\n", ["keygate: invalid configuration: config file {config}, line 1, column 7: invalid TOML: "
                  "Expected ']' at the end of a table declaration"]),
    (UPSTREAM + "[proxy]\nworkers = " + "9" * 5000 + "\n", [
        "keygate: invalid configuration: config file {config}: invalid TOML: Exceeds the limit (4300 digits) for "
        "integer string conversion: value has 5000 digits"]),
    ("\ufeff" + UPSTREAM, [
        "keygate: invalid configuration: config file {config}: starts with a byte order mark (BOM): save it as "
        "UTF-8 without one"]),
    (UPSTREAM + '[ratelimit]\ndefault = "1000000001/second"\n', [
        "keygate: invalid configuration: ratelimit.default = '1000000001/second': invalid rate limit "
        "'1000000001/second': more than 1000000000 a window"]),
    ('[proxy]\nlisten = "127.0.0.1:18923"\n[admin]\nlisten = "127.0.0.1:18923"\n'
     '[authz]\nlisten = "0.0.0.0:18923"\n', [
        NO_UPSTREAMS,
        "keygate: invalid configuration: admin.listen = '127.0.0.1:18923': the address of proxy.listen "
        "('127.0.0.1:18923'); each listener needs a port of its own",
        "keygate: invalid configuration: authz.listen = '0.0.0.0:18923': the address of proxy.listen "
        "('127.0.0.1:18923'); each listener needs a port of its own"]),
    (UPSTREAM + '[proxy]\nlisten = "127.0.0.1:8001"\n', [  # the admin listener's default
        "keygate: invalid configuration: admin.listen = '127.0.0.1:8001': the address of proxy.listen "
        "('127.0.0.1:8001'); each listener needs a port of its own"]),
], ids=["no-upstreams", "bad-field-and-no-upstreams", "cross-field-and-field", "route-without-upstreams",
        "unknown-setting-and-route", "invalid-toml", "integer-of-5000-digits", "byte-order-mark",
        "rate-limit-over-a-billion", "listeners-on-one-port", "proxy-on-the-admin-default"])
def test_check_config_reports_what_serve_stops_on(fixed_env: dict[str, str], tmp_path: Path, config: str,
                                                  lines: list[str]) -> None:
    """Each problem one line, every problem at once, exit 2: the same lines from check-config and serve."""
    path = tmp_path / "keygate.toml"
    path.write_text(config)
    expected = [line.format(config=path) for line in lines]
    checked = keygate(fixed_env, "--config", str(path), "check-config", check=False)
    served = keygate(fixed_env, "--config", str(path), "serve", check=False)
    assert (checked.returncode, checked.stderr.splitlines()) == (2, expected)
    assert (served.returncode, served.stderr.splitlines()) == (2, expected)
    assert checked.stdout == served.stdout == ""


@pytest.mark.parametrize(("config", "options", "status"), [
    (UPSTREAM, [], 0), ("", ["--settings-only"], 0), ('[log]\nlevel = "loud"\n', ["--settings-only"], 2),
], ids=["serve-ready", "settings-only-needs-no-upstream", "settings-only-still-checks-settings"])
def test_check_config_passes_settings_serve_takes(fixed_env: dict[str, str], tmp_path: Path, config: str,
                                                  options: list[str], status: int) -> None:
    """Settings serve starts with pass; --settings-only (a migrate job's) checks each setting but not the upstreams."""
    path = tmp_path / "keygate.toml"
    path.write_text(config)
    checked = keygate(fixed_env, "--config", str(path), "check-config", *options, check=False)
    assert checked.returncode == status, checked.stderr
    assert (checked.stderr == "") is (status == 0)
