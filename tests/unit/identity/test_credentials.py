"""The credentials file of `keygate login`: where it is, who may read it, one entry per gateway and org."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from gateway.identity.credentials import (
    Credential, CredentialsError, credentials_path, find, load, put, save, without,
)
from gateway.identity.login import token

ALICE = Credential("https://gw.example", "acme", "alice@example.com", "kg_AAAAAAAAAAAA", "kg_AAAAAAAAAAAAsecret")
ALICE_OPS = Credential("https://gw.example", "ops", "alice@example.com", "kg_BBBBBBBBBBBB", "kg_BBBBBBBBBBBBsecret")
OTHER = Credential("https://other.example", "acme", "alice@example.com", "kg_CCCCCCCCCCCC", "kg_CCCCCCCCCCCCsecret")


@pytest.mark.parametrize(("environ", "expected"), [
    ({"XDG_CONFIG_HOME": "/x/config", "HOME": "/home/a"}, "/x/config/keygate/credentials.toml"),
    ({"HOME": "/home/a"}, "/home/a/.config/keygate/credentials.toml"),
    ({"XDG_CONFIG_HOME": "", "HOME": "/home/a"}, "/home/a/.config/keygate/credentials.toml"),
])
def test_the_file_is_under_xdg_config_home(environ: dict[str, str], expected: str) -> None:
    assert credentials_path(environ) == Path(expected)


def test_saved_entries_load_back_and_the_file_is_0600_in_a_0700_folder(tmp_path: Path) -> None:
    path = tmp_path / "config" / "keygate" / "credentials.toml"
    tricky = Credential('https://gw.example/"quoted"', "acme", "al\\ice\n@example.com", "kg_DDDDDDDDDDDD", "k")
    old_umask = os.umask(0o022)
    try:
        save(path, [ALICE, tricky])
    finally:
        os.umask(old_umask)
    assert load(path) == [ALICE, tricky]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    # Rewritten whole, still 0600, nothing left beside it.
    save(path, [ALICE_OPS])
    assert load(path) == [ALICE_OPS]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["credentials.toml"]


def test_a_file_others_may_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "credentials.toml"
    save(path, [ALICE])
    path.chmod(0o644)
    with pytest.raises(CredentialsError, match="chmod 600"):
        load(path)


@pytest.mark.parametrize(("text", "says"), [
    ("credentials = [", "not a credentials file"),
    ('[[credentials]]\ngateway = "https://gw"\n', "entry 1 is not a credential"),
])
def test_a_broken_file_is_one_clear_error(tmp_path: Path, text: str, says: str) -> None:
    path = tmp_path / "credentials.toml"
    path.write_text(text)
    path.chmod(0o600)
    with pytest.raises(CredentialsError, match=says):
        load(path)


def test_no_file_is_no_entries(tmp_path: Path) -> None:
    assert load(tmp_path / "missing.toml") == []


@pytest.mark.parametrize(("gateway", "org", "expected"), [
    ("https://gw.example", "acme", ALICE),
    ("https://gw.example/", "ops", ALICE_OPS),  # a trailing slash names the same gateway
    ("https://other.example", None, OTHER),
    (None, "ops", ALICE_OPS),
])
def test_find_picks_the_one_entry_that_fits(gateway: str | None, org: str | None, expected: Credential) -> None:
    assert find([ALICE, ALICE_OPS, OTHER], gateway, org) == expected


@pytest.mark.parametrize(("gateway", "org", "says"), [
    (None, None, "several"),
    ("https://gw.example", None, "several"),
    ("https://nowhere.example", None, "not signed in for --gateway https://nowhere.example"),
])
def test_find_says_what_to_name(gateway: str | None, org: str | None, says: str) -> None:
    with pytest.raises(CredentialsError, match=says):
        find([ALICE, ALICE_OPS, OTHER], gateway, org)


def test_put_replaces_the_entry_of_the_same_gateway_and_org() -> None:
    rotated = Credential(ALICE.gateway, ALICE.org, ALICE.user, "kg_EEEEEEEEEEEE", "new")
    assert put([ALICE, OTHER], rotated) == [OTHER, rotated]
    assert without([ALICE, OTHER], rotated) == [OTHER]


def test_keygate_token_in_the_environment_wins_over_the_file(tmp_path: Path) -> None:
    environ = {"XDG_CONFIG_HOME": str(tmp_path)}
    save(credentials_path(environ), [ALICE])
    assert token(None, None, environ) == ALICE.key
    assert token(None, None, {**environ, "KEYGATE_TOKEN": "kg_from_env\n"}) == "kg_from_env"


def test_saving_never_writes_through_a_link_planted_at_its_temporary_name(tmp_path: Path) -> None:
    """A folder others can write (a shared XDG_CONFIG_HOME) must not let them aim the key at a file of theirs."""
    path = tmp_path / "credentials.toml"
    victim = tmp_path / "victim"
    victim.write_text("mine\n")
    (tmp_path / f".credentials.toml.{os.getpid()}").symlink_to(victim)
    save(path, [ALICE])
    assert victim.read_text() == "mine\n"
    assert not path.is_symlink() and load(path) == [ALICE]
