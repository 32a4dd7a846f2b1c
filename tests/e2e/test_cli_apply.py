"""``keygate apply`` and ``keygate export`` as a user runs them: a real subprocess on a real store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .test_cli import keygate

STATE = """
[roles.deployer]
grants = ["deploy", "servers:read"]

[members.acme]
alice = "deployer"

[[keys]]
name = "ci-deploy"
org = "acme"
role = "deployer"
servers = ["prod-1"]
rate_limit = "100/minute"

[[keys]]
name = "nightly"
org = "acme"
kind = "automation"
operations = ["deploy"]
expires = "2099-01-31"
"""


@pytest.fixture(params=["sqlite", "postgres"])
def env(request: pytest.FixtureRequest, fixed_env: dict[str, str]) -> dict[str, str]:
    """A CLI environment on each kind of store (PostgreSQL migrated first, as a user would)."""
    if request.param == "postgres":
        fixed_env = {**fixed_env, "KEYGATE_STORE__URL": request.getfixturevalue("pg_database")}
        keygate(fixed_env, "migrate")
    return fixed_env


def write(tmp_path: Path, text: str, name: str = "state.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def audit_count(env: dict[str, str]) -> int:
    return len(json.loads(keygate(env, "audit", "--type", "event", "--json", "--limit", "10000").stdout))


def test_apply_prints_the_plan_and_each_secret_once(env: dict[str, str], tmp_path: Path) -> None:
    """apply creates everything, prints each new key once; a second apply prints No changes. and audits nothing."""
    state = write(tmp_path, STATE)
    first = keygate(env, "apply", "-f", state)
    lines = first.stdout.splitlines()
    assert lines[:5] == ["+ create role deployer: grants [deploy, servers:read]", "+ add member acme/alice: role deployer",
                         "+ create key ci-deploy (acme)", "+ create key nightly (acme)",
                         "Plan: 4 to create, 0 to update, 0 to remove."]
    assert "Applied 4 changes." in lines
    keys = {k["name"]: k for k in json.loads(keygate(env, "keys", "list", "--json").stdout)}
    for key in keys.values():
        full = [line.strip() for line in lines if line.strip().startswith(key["id"]) and len(line.strip()) > 30]
        assert len(full) == 1, key["name"]  # each secret once
        assert first.stdout.count(full[0]) == 1
    assert keys["nightly"]["id"].startswith("kga_") and keys["ci-deploy"]["rate_limit"] == "100/minute"
    assert "only time the full key is shown" in first.stdout

    events = audit_count(env)
    again = keygate(env, "apply", "-f", state)
    assert again.stdout == "No changes.\n"
    assert audit_count(env) == events


def test_dry_run_changes_nothing(env: dict[str, str], tmp_path: Path) -> None:
    """--dry-run prints the plan, exits 0 and changes nothing (on a store that exists: a dry run only reads, so a
    missing embedded store is reported, not created: test_cli_edges)."""
    keygate(env, "migrate")
    result = keygate(env, "apply", "-f", write(tmp_path, STATE), "--dry-run")
    assert result.stdout.splitlines()[-1] == "Dry run: nothing was changed."
    assert json.loads(keygate(env, "keys", "list", "--json").stdout) == []
    assert [r["name"] for r in json.loads(keygate(env, "roles", "list", "--json").stdout)] == ["admin"]


def test_update_and_prune(fixed_env: dict[str, str], tmp_path: Path) -> None:
    """A changed field is one update; --prune revokes a key apply made and leaves a key made by hand."""
    keygate(fixed_env, "apply", "-f", write(tmp_path, STATE))
    manual = json.loads(keygate(fixed_env, "keys", "create", "--name", "bootstrap", "--role", "admin",
                                "--org", "acme", "--json").stdout)
    trimmed = STATE.split("[[keys]]\nname = \"nightly\"")[0].replace("100/minute", "5/second")
    result = keygate(fixed_env, "apply", "-f", write(tmp_path, trimmed), "--prune")
    lines = result.stdout.splitlines()
    assert lines[0].startswith("~ update key ci-deploy (acme) kg_") and lines[0].endswith("rate_limit 100/minute -> 5/second")
    assert lines[1].startswith("- revoke key nightly (acme) kga_")
    statuses = {k["name"]: k["status"] for k in json.loads(keygate(fixed_env, "keys", "list", "--json").stdout)}
    assert statuses == {"ci-deploy": "active", "nightly": "revoked", "bootstrap": "active"}
    revoked = json.loads(keygate(fixed_env, "audit", "--action", "key.revoke", "--json").stdout)
    assert [e["details"] for e in revoked] == [{"reason": "not declared (apply --prune)", "via": "apply"}]
    assert manual["status"] == "active"


def test_export_round_trip(env: dict[str, str], tmp_path: Path) -> None:
    """export -f FILE writes no secret, and apply of it to the same store is No changes."""
    created = keygate(env, "apply", "-f", write(tmp_path, STATE)).stdout
    keygate(env, "keys", "create", "--name", "by hand", "--operation", "read", "--expires", "30d")
    out = tmp_path / "exported.toml"
    keygate(env, "export", "-f", str(out))
    exported = out.read_text()
    assert 'name = "by hand"' in exported and "[roles.deployer]" in exported
    for line in created.splitlines():
        if line.startswith("    kg"):
            assert line.strip() not in exported and line.strip()[-38:-6] not in exported
    assert "argon2" not in exported
    assert keygate(env, "apply", "-f", str(out), "--prune").stdout == "No changes.\n"
    assert keygate(env, "export").stdout == exported  # to stdout without -o


INVALID = [
    ("unknown field",
     '[[keys]]\nname = "a"\nrole = "admin"\nallow_ips = ["10.0.0.0/8"]\n',
     ["keys[0].allow_ips: unknown field"]),
    ("bad type",
     '[[keys]]\nname = "a"\nrole = "admin"\nservers = "prod-1"\n',
     ["keys[0].servers: must be a list of strings"]),
    ("unknown role reference",
     '[members.acme]\nbob = "ghost"\n\n[[keys]]\nname = "a"\nrole = "ghost"\n',
     ["members.acme.bob: role 'ghost': not declared", "keys[0].role: role 'ghost': not declared"]),
    ("duplicate key name",
     '[[keys]]\nname = "a"\nrole = "admin"\n\n[[keys]]\nname = "a"\norg = "default"\nrole = "admin"\n',
     ["keys[1]: key 'a' in org 'default' is declared twice (also keys[0])"]),
    ("bad CIDR",
     '[[keys]]\nname = "a"\nrole = "admin"\nip_allowlist = ["10.0.0.0/8", "10.0.0.0/33"]\n',
     ["keys[0].ip_allowlist[1]: allow-ip '10.0.0.0/33'"]),
    ("bad rate limit",
     '[[keys]]\nname = "a"\nrole = "admin"\nrate_limit = "lots"\n',
     ["keys[0].rate_limit: rate-limit"]),
    ("relative expiry",
     '[[keys]]\nname = "a"\nrole = "admin"\nexpires = "30d"\n',
     ["keys[0].expires: '30d': a relative expiry would move at every apply"]),
    ("several problems, one line each",
     '[[keys]]\nrole = "admin"\nrate_limit = "lots"\n\n[roles.x]\ngrant = ["deploy"]\n\n[extra]\n',
     ["extra: unknown section", "roles.x.grant: unknown field", "roles.x.grants: required",
      "keys[0].name: required", "keys[0].rate_limit: rate-limit"]),
    ("not TOML", 'keys = [\n', ["not valid TOML"]),
    ("an integer of 5000 digits", '[[keys]]\nname = "a"\nrole = "admin"\nexpires = ' + "9" * 5000 + "\n",
     ["not valid TOML: Exceeds the limit (4300 digits)"]),
    ("byte order mark", '\ufeff[[keys]]\nname = "a"\nrole = "admin"\n',
     ["not valid TOML: the file starts with a byte order mark (BOM)"]),
    ("rate limit over a billion",
     '[[keys]]\nname = "a"\nrole = "admin"\nrate_limit = "' + "9" * 5000 + '/second"\n',
     ["keys[0].rate_limit: rate-limit: invalid rate limit '9999"]),
]


@pytest.mark.parametrize(("case", "text", "expected"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_file_is_one_line_per_problem_and_changes_nothing(
        fixed_env: dict[str, str], tmp_path: Path, case: str, text: str, expected: list[str]) -> None:
    """Each problem is one line with its place in the file, exit status 2, and nothing is applied."""
    keygate(fixed_env, "migrate")
    events = audit_count(fixed_env)
    result = keygate(fixed_env, "apply", "-f", write(tmp_path, text), check=False)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == len(expected), lines
    for line, wanted in zip(sorted(lines), sorted(expected)):
        assert line.startswith(f"keygate: {wanted}"), (line, wanted)
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert audit_count(fixed_env) == events
    assert json.loads(keygate(fixed_env, "keys", "list", "--json").stdout) == []


def test_unreadable_file_is_one_line(fixed_env: dict[str, str], tmp_path: Path) -> None:
    """A missing state file is one line and exit status 2."""
    result = keygate(fixed_env, "apply", "-f", str(tmp_path / "missing.toml"), check=False)
    assert result.returncode == 2 and result.stderr.startswith("keygate: ") and len(result.stderr.splitlines()) == 1
