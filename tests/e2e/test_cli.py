"""The ``keygate`` command as a user runs it: a real subprocess on a real store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

KEYGATE = str(Path(sys.executable).with_name("keygate"))
CHEAP_ARGON2 = {"KEYGATE_KEYS__ARGON2__MEMORY_COST": "1024"}


def keygate(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([KEYGATE, *args], env={**env, **CHEAP_ARGON2}, capture_output=True, text=True,
                            timeout=60, stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise AssertionError(f"keygate {' '.join(args)} exited {result.returncode}: {result.stderr}")
    return result


def create_args(*extra: str) -> list[str]:
    return ["keys", "create", "--name", "ci", "--operation", "deploy", "--server", "prod-1",
            "--allow-ip", "10.0.0.0/8", "--rate-limit", "100/minute", "--expires", "30d", "--json", *extra]


@pytest.fixture(params=["sqlite", "postgres"])
def env(request: pytest.FixtureRequest, fixed_env: dict[str, str]) -> dict[str, str]:
    """A CLI environment on each kind of store (PostgreSQL migrated first, as a user would)."""
    if request.param == "postgres":
        url = request.getfixturevalue("pg_database")
        fixed_env = {**fixed_env, "KEYGATE_STORE__URL": url}
        keygate(fixed_env, "migrate")
    return fixed_env


def test_key_lifecycle_as_documented(env: dict[str, str]) -> None:
    """create prints the key once; list/show never do; revoke shows in status and audit."""
    created = keygate(env, *create_args())
    record = json.loads(created.stdout)
    full_key = record.pop("key")
    assert full_key.startswith(record["id"]) and len(full_key) == len(record["id"]) + 38
    assert "only time" in created.stderr
    assert record["status"] == "active" and record["servers"] == ["prod-1"]
    assert record["ip_allowlist"] == ["10.0.0.0/8"] and record["rate_limit"] == "100/minute"

    listed = keygate(env, "keys", "list", "--json")
    shown = keygate(env, "keys", "show", record["id"], "--json")
    for output in (listed.stdout, shown.stdout):
        assert full_key not in output and full_key[len(record["id"]):-6] not in output
        assert "argon2" not in output
    assert json.loads(shown.stdout)["status"] == "active"
    assert [k["id"] for k in json.loads(listed.stdout)] == [record["id"]]

    keygate(env, "keys", "revoke", record["id"], "--yes")
    assert json.loads(keygate(env, "keys", "show", record["id"], "--json").stdout)["status"] == "revoked"
    events = json.loads(keygate(env, "audit", "--key", record["id"], "--json").stdout)
    assert [e["action"] for e in events] == ["key.revoke", "key.create"]
    assert all(e["actor"].startswith("cli:") for e in events)


def test_table_output_is_readable(fixed_env: dict[str, str]) -> None:
    """Without --json, list prints a table with a header and one row per key."""
    record = json.loads(keygate(fixed_env, *create_args()).stdout)
    lines = keygate(fixed_env, "keys", "list").stdout.splitlines()
    assert lines[0].split()[:3] == ["ID", "NAME", "KIND"]
    assert lines[1].startswith(record["id"]) and "active" in lines[1]


def test_create_without_json_says_it_is_shown_once(fixed_env: dict[str, str]) -> None:
    """The plain output prints the key and warns it will not be shown again."""
    out = keygate(fixed_env, "keys", "create", "--name", "x", "--role", "admin").stdout
    assert "only time the full key is shown" in out


def test_rotate_and_agent_print_the_new_key(fixed_env: dict[str, str]) -> None:
    """rotate and agent return the new full key once, in JSON."""
    record = json.loads(keygate(fixed_env, *create_args()).stdout)
    rotated = json.loads(keygate(fixed_env, "keys", "rotate", record["id"], "--grace", "1h", "--json").stdout)
    assert rotated["key"].startswith(rotated["id"]) and rotated["rotated_from"] == record["id"]
    assert json.loads(keygate(fixed_env, "keys", "show", record["id"], "--json").stdout)["status"] == "rotating"
    keygate(fixed_env, "members", "set", "acme", "bob", "admin")
    agent = json.loads(keygate(fixed_env, "keys", "agent", "--org", "acme", "--user", "bob", "--json").stdout)
    again = json.loads(keygate(fixed_env, "keys", "agent", "--org", "acme", "--user", "bob", "--json").stdout)
    assert agent["agent"] and again["revoked_previous"] == agent["id"]
    assert json.loads(keygate(fixed_env, "keys", "show", agent["id"], "--json").stdout)["status"] == "revoked"


def test_roles_and_members_commands(fixed_env: dict[str, str]) -> None:
    """roles set/list/show/delete and members set/list/remove work on the store."""
    keygate(fixed_env, "roles", "set", "ci", "--grant", "deploy", "--grant", "servers:read")
    roles = json.loads(keygate(fixed_env, "roles", "list", "--json").stdout)
    assert {r["name"]: r["grants"] for r in roles} == {"admin": ["*"], "ci": ["deploy", "servers:read"]}
    keygate(fixed_env, "members", "set", "acme", "bob", "ci")
    assert json.loads(keygate(fixed_env, "members", "list", "acme", "--json").stdout)[0]["role"] == "ci"
    refused = keygate(fixed_env, "roles", "delete", "ci", "--yes", check=False)
    assert refused.returncode == 2 and "in use" in refused.stderr
    keygate(fixed_env, "members", "remove", "acme", "bob", "--yes")
    keygate(fixed_env, "roles", "delete", "ci", "--yes")
    assert "ci" not in keygate(fixed_env, "roles", "list").stdout


def test_set_role_and_update(fixed_env: dict[str, str]) -> None:
    """set-role and update change the stored key."""
    record = json.loads(keygate(fixed_env, *create_args()).stdout)
    keygate(fixed_env, "roles", "set", "ci", "--grant", "deploy")
    keygate(fixed_env, "keys", "set-role", record["id"], "ci")
    keygate(fixed_env, "keys", "update", record["id"], "--name", "renamed", "--server", "prod-2")
    shown = json.loads(keygate(fixed_env, "keys", "show", record["id"], "--json").stdout)
    assert (shown["role"], shown["name"], shown["servers"]) == ("ci", "renamed", ["prod-2"])
    keygate(fixed_env, "keys", "update", record["id"], "--role", "")  # '' removes the role
    assert json.loads(keygate(fixed_env, "keys", "show", record["id"], "--json").stdout)["role"] is None


BAD_INPUT = [
    (["--allow-ip", "10.0.0.0/33", "--role", "admin"], "allow-ip"),
    (["--role", "ghost"], "no such role"),
    (["--kind", "ghost", "--role", "admin"], "kind 'ghost'"),
    (["--rate-limit", "lots", "--role", "admin"], "rate-limit"),
    (["--rate-limit", "0/minute", "--role", "admin"], "rate-limit"),
    (["--expires", "whenever", "--role", "admin"], "expires"),
    ([], "needs a role"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUT)
def test_bad_input_is_one_line_and_exit_2(env: dict[str, str], args: list[str], message: str) -> None:
    """Each bad value gets one clear line on stderr, exit status 2, and nothing is written."""
    keygate(env, "migrate")
    result = keygate(env, "keys", "create", "--name", "x", *args, check=False)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert json.loads(keygate(env, "keys", "list", "--json").stdout) == []
    audit = json.loads(keygate(env, "audit", "--json").stdout)
    assert [e["action"] for e in audit] == ["role.set"]  # only the built-in admin role


@pytest.mark.parametrize(("args", "message"), [a for a in BAD_INPUT if "no such role" not in a[1]])
def test_bad_input_creates_no_store(fixed_env: dict[str, str], tmp_path: Path, args: list[str], message: str) -> None:
    """Input that is wrong on its face is refused before the embedded store is even created."""
    result = keygate(fixed_env, "keys", "create", "--name", "x", *args, check=False)
    assert result.returncode == 2 and message in result.stderr
    assert not list(tmp_path.glob("cli.db*"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["keys", "update", "kg_unknown00000", "--allow-ip", "nope"], "allow-ip 'nope'"),
        (["keys", "rotate", "kg_unknown00000", "--grace", "forever"], "grace 'forever'"),
        (["keys", "set-role", "kg_unknown00000", "bad role"], "role 'bad role'"),
        (["keys", "agent", "--org", "bad org", "--user", "bob"], "org 'bad org'"),
        (["roles", "set", "ci", "--grant", "Bad!"], "operation 'Bad!'"),
        (["members", "set", "acme", "bob", "bad role"], "role 'bad role'"),
    ],
)
def test_every_command_refuses_bad_input_before_the_store(
    fixed_env: dict[str, str], tmp_path: Path, args: list[str], message: str,
) -> None:
    """Whatever the command, input refused on its face is one line, exit 2, and no embedded store is created."""
    result = keygate(fixed_env, *args, check=False)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.glob("cli.db*"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["keys", "create", "--name", "x", "--role", "admin", "--expires", "9000y"], "expires"),
        (["keys", "create", "--name", "x", "--role", "admin", "--expires", "9999-12-31T23:59:59-01:00"], "expires"),
        (["keys", "rotate", "kg_unknown00000", "--grace", "99999999999d"], "grace"),
        (["audit", "--since", "99999999999d"], "since"),
        (["keys", "update", "kg_unknown00000", "--allow-ip", "nope"], "allow-ip"),
        (["keys", "update", "kg_unknown00000"], "nothing to change"),
        (["keys", "set-role", "kg_unknown00000", "admin"], "kg_unknown00000"),
    ],
)
def test_out_of_range_input_is_one_line(fixed_env: dict[str, str], args: list[str], message: str) -> None:
    """Absurd durations and dates, and bad updates, are one line with exit 2, never a traceback."""
    keygate(fixed_env, "migrate")
    result = keygate(fixed_env, *args, check=False)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_pasted_full_key_counts_as_its_id_and_is_never_echoed(fixed_env: dict[str, str]) -> None:
    """Revoking by pasting the whole (leaked) key works, and no message repeats its secret."""
    record = json.loads(keygate(fixed_env, *create_args()).stdout)
    full = record["key"]
    revoked = keygate(fixed_env, "keys", "revoke", full, "--yes")
    assert record["id"] in revoked.stdout and full not in revoked.stdout + revoked.stderr
    assert json.loads(keygate(fixed_env, "keys", "show", record["id"], "--json").stdout)["status"] == "revoked"
    typo = full[:-1] + ("A" if full[-1] != "A" else "B")
    missing = keygate(fixed_env, "keys", "show", typo, check=False)
    assert missing.returncode == 2 and typo[15:-6] not in missing.stderr


def test_update_can_clear_the_allowlist(fixed_env: dict[str, str]) -> None:
    """--clear-allow-ip takes a key back to any client address."""
    record = json.loads(keygate(fixed_env, *create_args()).stdout)
    keygate(fixed_env, "keys", "update", record["id"], "--clear-allow-ip")
    assert json.loads(keygate(fixed_env, "keys", "show", record["id"], "--json").stdout)["ip_allowlist"] == []


def test_sqlite_store_is_private(fixed_env: dict[str, str], tmp_path: Path) -> None:
    """The embedded store (hashes and the generated pepper) is readable by its owner only."""
    keygate(fixed_env, *create_args())
    for path in tmp_path.glob("cli.db*"):
        assert path.stat().st_mode & 0o077 == 0, path


def test_bad_store_url_port_is_a_config_error(fixed_env: dict[str, str]) -> None:
    """A store URL whose port is not a number is refused at load, naming the setting."""
    result = keygate({**fixed_env, "KEYGATE_STORE__URL": "postgresql://u:pw@h:notaport/db"}, "keys", "list",
                     check=False)
    assert result.returncode == 2 and "store.url" in result.stderr and "pw" not in result.stderr


def test_least_privilege_database_user_can_manage_keys(fixed_env: dict[str, str], pg_database: str) -> None:
    """A role with only SELECT/INSERT/UPDATE/DELETE (no DDL) can run the CLI once migrated."""
    import uuid

    keygate({**fixed_env, "KEYGATE_STORE__URL": pg_database}, "migrate")
    role = f"keygate_app_{uuid.uuid4().hex[:8]}"
    admin = ["psql", pg_database.rsplit("/", 1)[0] + "/postgres", "-qc"]
    subprocess.run([*admin, f'CREATE ROLE "{role}" LOGIN'], check=True, capture_output=True)
    try:
        grants = (f'REVOKE CREATE ON SCHEMA public FROM PUBLIC; '
                  f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO "{role}"; '
                  f'GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO "{role}"')
        subprocess.run(["psql", pg_database, "-qc", grants], check=True, capture_output=True)
        url = pg_database.replace("postgres@", f"{role}@")
        env = {**fixed_env, "KEYGATE_STORE__URL": url}
        record = json.loads(keygate(env, "keys", "create", "--name", "x", "--role", "admin", "--json").stdout)
        keygate(env, "keys", "revoke", record["id"], "--yes")
        assert json.loads(keygate(env, "keys", "list", "--json").stdout)[0]["status"] == "revoked"
    finally:
        subprocess.run(["psql", pg_database, "-qc", f'DROP OWNED BY "{role}"'], capture_output=True)
        subprocess.run([*admin, f'DROP ROLE IF EXISTS "{role}"'], capture_output=True)


@pytest.mark.parametrize("command", [["keys", "show"], ["keys", "revoke", "--yes"], ["keys", "rotate"]])
def test_unknown_key_id_is_exit_2(fixed_env: dict[str, str], command: list[str]) -> None:
    """An unknown id is named in one line with exit status 2."""
    keygate(fixed_env, "migrate")
    result = keygate(fixed_env, *command, "kg_unknown00000", check=False)
    assert result.returncode == 2 and "kg_unknown00000" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("url", "message"),
    [("postgresql://postgres@127.0.0.1:1/keygate", "store unavailable"),
     # A read never creates the embedded store's file: it says there is none.
     ("sqlite:////nonexistent-dir/keygate.db", "no store at /nonexistent-dir/keygate.db")],
)
@pytest.mark.parametrize("command", [["keys", "list"], ["trust", "list"]])
def test_unreachable_store_is_exit_1(fixed_env: dict[str, str], url: str, message: str, command: list[str]) -> None:
    """An unreachable store is one line and exit status 1, with no traceback."""
    result = keygate({**fixed_env, "KEYGATE_STORE__URL": url}, *command, check=False)
    assert result.returncode == 1, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_unmigrated_postgres_says_to_migrate(fixed_env: dict[str, str], pg_database: str) -> None:
    """Management commands on an unmigrated PostgreSQL store ask for `keygate migrate`."""
    result = keygate({**fixed_env, "KEYGATE_STORE__URL": pg_database}, "keys", "list", check=False)
    assert result.returncode == 1 and "keygate migrate" in result.stderr


def test_invalid_config_is_exit_2_with_every_problem(fixed_env: dict[str, str], tmp_path: Path) -> None:
    """A bad config file stops the CLI with one line per problem and exit status 2."""
    config = tmp_path / "bad.toml"
    config.write_text('[proxy]\nworkers = 0\nlisen = "x"\n[ratelimit]\ndefault = "lots"\n')
    result = keygate(fixed_env, "--config", str(config), "keys", "list", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3
    assert any("proxy.workers" in l for l in lines) and any("ratelimit.default" in l for l in lines)
    assert any("lisen" in l for l in lines)


@pytest.mark.parametrize(
    ("path", "operation", "expected"),
    [
        ("/api/registry/{credential}/{credential}", "registry_login:{credential}",
         "routes.0.path = '/api/registry/{credential}/{credential}': {credential} appears twice"),
        ("/api/registry/x{credential}/login", "registry_login",
         "routes.0.path = '/api/registry/x{credential}/login': a placeholder must be a whole path segment"),
        ("/api/servers/{server}/deploy", "deploy:{server}",
         "routes.0.operation = 'deploy:{server}': {server} cannot be part of the operation"),
        ("/api/registry/{credential}/login", "registry_login:{cred}",
         "routes.0.operation = 'registry_login:{cred}': {cred} is not a placeholder of the path"),
        ("/api/registry/{credential/login", "registry_login",
         "routes.0.path = '/api/registry/{credential/login': malformed placeholder"),
    ],
    ids=["twice", "part-of-a-segment", "server-in-operation", "undefined", "malformed"],
)
def test_bad_route_placeholder_is_one_line_and_exit_2(
    fixed_env: dict[str, str], tmp_path: Path, path: str, operation: str, expected: str
) -> None:
    """check-config on a route with a bad placeholder prints one line naming the route, exit status 2."""
    config = tmp_path / "routes.toml"
    config.write_text(f'[[upstreams]]\nname = "app"\nurl = "http://127.0.0.1:9"\n'
                      f'[[routes]]\npath = "{path}"\noperation = "{operation}"\n')
    result = keygate(fixed_env, "--config", str(config), "check-config", check=False)
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"keygate: invalid configuration: {expected}"), line


def test_check_config_masks_secrets(fixed_env: dict[str, str]) -> None:
    """check-config prints the effective settings with passwords and the pepper masked."""
    env = {**fixed_env, "KEYGATE_STORE__URL": "postgresql://kg:hunter2@db/keygate",
           "KEYGATE_KEYS__PEPPER": "p" * 40, "KEYGATE_PROXY__LISTEN": "0.0.0.0:9000",
           "KEYGATE_UPSTREAMS": '[{"name": "app", "url": "http://127.0.0.1:9"}]'}
    out = keygate(env, "check-config").stdout
    assert "hunter2" not in out and "p" * 40 not in out
    assert "0.0.0.0:9000" in out and "***" in out


def test_migrate_reports_then_is_idempotent(fixed_env: dict[str, str]) -> None:
    """migrate applies the schema once, then says the store is up to date."""
    assert "applied migrations: 1" in keygate(fixed_env, "migrate").stdout
    assert "up to date" in keygate(fixed_env, "migrate").stdout


def test_no_secret_in_sqlite_file(fixed_env: dict[str, str], tmp_path: Path) -> None:
    """Neither the full key nor its secret is anywhere in the SQLite files."""
    keys = [json.loads(keygate(fixed_env, *create_args()).stdout)["key"] for _ in range(3)]
    blob = b"".join(p.read_bytes() for p in tmp_path.glob("cli.db*"))
    assert blob  # the store really is there
    for key in keys:
        assert key.encode() not in blob and key[-38:-6].encode() not in blob
        assert key[:-38].encode() in blob  # the id is stored, so the scan is looking in the right place


def test_no_secret_in_postgres_dump(fixed_env: dict[str, str], pg_database: str) -> None:
    """Neither the full key nor its secret is anywhere in a pg_dump of the store."""
    env = {**fixed_env, "KEYGATE_STORE__URL": pg_database}
    keygate(env, "migrate")
    keys = [json.loads(keygate(env, *create_args()).stdout)["key"] for _ in range(3)]
    dump = subprocess.run(["pg_dump", "--data-only", pg_database], capture_output=True, text=True,
                          check=True, timeout=60).stdout
    for key in keys:
        assert key not in dump and key[-38:-6] not in dump
        assert key[:-38] in dump


# -- trust policies --------------------------------------------------------
ISSUER = "https://token.actions.githubusercontent.com"
AUDIENCE = "https://keygate.example.com"


def trust_args(name: str = "shop", **options: str | list[str] | None) -> list[str]:
    """``trust add NAME`` with a valid policy's options; ``options`` replace them (None drops one)."""
    given: dict[str, str | list[str] | None] = {
        "issuer": ISSUER, "audience": AUDIENCE, "claim": ["repository=acme/shop", "ref=refs/heads/*"],
        "org": "acme", "operation": "deploy", **options,
    }
    args = ["trust", "add", name]
    for option, value in given.items():
        for one in [value] if isinstance(value, str) else value or []:
            args += [f"--{option.replace('_', '-')}", one]
    return args


def trust_events(env: dict[str, str]) -> list[dict[str, object]]:
    return [e for e in json.loads(keygate(env, "audit", "--type", "event", "--json").stdout)
            if str(e["action"]).startswith("trust.")]


def test_trust_policy_lifecycle(env: dict[str, str]) -> None:
    """trust add/list/show/remove with --json on each store, each change audited with the CLI as its actor."""
    added = json.loads(keygate(env, *trust_args(
        server="prod-1", allow_ip="10.1.2.3/8", rate_limit="10/second", ttl="30m"), "--json").stdout)
    assert {k: v for k, v in added.items() if k not in ("created_by", "created_at", "updated_at")} == {
        "name": "shop", "issuer": ISSUER, "audience": AUDIENCE,
        "conditions": {"ref": "refs/heads/*", "repository": "acme/shop"}, "org": "acme", "role": None,
        "operations": ["deploy"], "servers": ["prod-1"], "ip_allowlist": ["10.0.0.0/8"],
        "rate_limit": "10/second", "lifetime": 1800, "jwks_file": None,
    }
    assert added["created_by"].startswith("cli:")
    assert json.loads(keygate(env, "trust", "list", "--json").stdout) == [added]
    assert json.loads(keygate(env, "trust", "show", "shop", "--json").stdout) == added

    assert keygate(env, "trust", "remove", "shop", "--yes").stdout == "removed trust policy shop\n"
    assert json.loads(keygate(env, "trust", "list", "--json").stdout) == []
    assert [(e["action"], e["target"]) for e in trust_events(env)] == [("trust.remove", "shop"), ("trust.set", "shop")]
    assert all(str(e["actor"]).startswith("cli:") for e in trust_events(env))


def test_trust_add_refuses_an_existing_name_unless_replace(fixed_env: dict[str, str]) -> None:
    """A second add of a name is refused (one line, exit 2, nothing changed); --replace replaces it."""
    first = json.loads(keygate(fixed_env, *trust_args(), "--json").stdout)
    again = keygate(fixed_env, *trust_args(operation="read"), check=False)
    assert again.returncode == 2 and "shop" in again.stderr and again.stdout == ""
    assert len(again.stderr.strip().splitlines()) == 1
    assert json.loads(keygate(fixed_env, "trust", "show", "shop", "--json").stdout) == first

    replaced = json.loads(keygate(fixed_env, *trust_args(operation=None, role="admin"), "--replace",
                                  "--json").stdout)
    assert (replaced["role"], replaced["operations"]) == ("admin", [])
    assert replaced["created_at"] == first["created_at"]
    assert [e["action"] for e in trust_events(fixed_env)] == ["trust.set", "trust.set"]


def test_trust_add_takes_an_empty_role_as_none(fixed_env: dict[str, str]) -> None:
    """--role '' is no role, as for keys create (a command line has no null)."""
    added = json.loads(keygate(fixed_env, *trust_args(role=""), "--json").stdout)
    assert (added["role"], added["operations"]) == (None, ["deploy"])


def test_trust_tables_are_readable(fixed_env: dict[str, str]) -> None:
    """Without --json, list is a table (or "(none)"), show one line per setting, lifetimes as durations."""
    keygate(fixed_env, "migrate")
    assert keygate(fixed_env, "trust", "list").stdout.splitlines()[1] == "(none)"
    added = keygate(fixed_env, *trust_args()).stdout.splitlines()
    assert added[0] == "saved trust policy shop"
    lines = keygate(fixed_env, "trust", "list").stdout.splitlines()
    assert lines[0].split() == ["NAME", "ISSUER", "AUDIENCE", "CONDITIONS", "ORG", "ACCESS", "SERVERS", "LIFETIME"]
    assert lines[1].split() == ["shop", ISSUER, AUDIENCE, "ref=refs/heads/*,", "repository=acme/shop", "acme",
                                "[deploy]", "*", "15m"]
    shown = keygate(fixed_env, "trust", "show", "shop").stdout.splitlines()
    assert shown == added[1:]
    assert "conditions:   ref=refs/heads/*, repository=acme/shop" in shown
    assert "lifetime:     15m" in shown and "role:         -" in shown


def jwks_without_keys(folder: Path) -> str:
    path = folder / "not-a-jwks.json"
    path.write_text('{"kty": "RSA"}')
    return str(path)


TRUST_BAD_INPUT = [
    (trust_args(issuer="http://issuer.example.com"), "issuer"),
    (trust_args(issuer="https://issuer.example.com/?tenant=a"), "issuer"),
    (trust_args(issuer="issuer.example.com"), "issuer"),
    (trust_args(audience=""), "audience"),
    (trust_args(claim=None), "sub"),
    (trust_args(claim=["ref=refs/heads/main"]), "sub"),
    (trust_args(claim=["repository"]), "CLAIM=PATTERN"),
    (trust_args(claim=["repository=acme/shop", "=main"]), "claim"),
    (trust_args(claim=["repository="]), "repository"),
    (trust_args(claim=["repository=acme/shop", "repository=acme/web"]), "given twice"),
    (trust_args(name="bad name"), "bad name"),
    (trust_args(org="bad org"), "org 'bad org'"),
    (trust_args(operation=None), "role"),
    (trust_args(operation="Bad!"), "operation 'Bad!'"),
    (trust_args(server="bad!"), "server 'bad!'"),
    (trust_args(allow_ip="10.0.0.0/33"), "allow-ip"),
    (trust_args(rate_limit="lots"), "rate-limit"),
    (trust_args(lifetime="30s"), "lifetime"),
    (trust_args(lifetime="2h"), "lifetime"),
    (trust_args(lifetime="soon"), "lifetime"),
    (trust_args(jwks_file="keys/jwks.json"), "jwks"),
    (trust_args(jwks_file="/nonexistent/jwks.json"), "jwks"),
    (trust_args(jwks_file="{not_a_jwks}"), "jwks"),
    (trust_args(operation=None, role="ghost"), "no such role"),
]


@pytest.mark.parametrize(("args", "message"), TRUST_BAD_INPUT)
def test_trust_bad_input_is_one_line_and_exit_2(
    env: dict[str, str], tmp_path: Path, args: list[str], message: str,
) -> None:
    """Each bad value of a trust policy gets one clear line on stderr, exit status 2, and nothing is written."""
    keygate(env, "migrate")
    args = [a.replace("{not_a_jwks}", jwks_without_keys(tmp_path)) for a in args]
    result = keygate(env, *args, check=False)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert json.loads(keygate(env, "trust", "list", "--json").stdout) == []
    assert trust_events(env) == []


@pytest.mark.parametrize(("args", "message"), [a for a in TRUST_BAD_INPUT if "no such role" not in a[1]])
def test_trust_bad_input_creates_no_store(
    fixed_env: dict[str, str], tmp_path: Path, args: list[str], message: str,
) -> None:
    """A trust policy wrong on its face is refused before the embedded store is even created."""
    args = [a.replace("{not_a_jwks}", jwks_without_keys(tmp_path)) for a in args]
    result = keygate(fixed_env, *args, check=False)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not list(tmp_path.glob("cli.db*"))


@pytest.mark.parametrize("command", [["trust", "show"], ["trust", "remove", "--yes"]])
def test_unknown_trust_policy_is_exit_2(fixed_env: dict[str, str], command: list[str]) -> None:
    """An unknown policy is named in one line with exit status 2."""
    keygate(fixed_env, "migrate")
    result = keygate(fixed_env, *command, "nope", check=False)
    assert result.returncode == 2 and "nope" in result.stderr and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
