"""The ``keygate`` command's edges, as a user meets them: a store that is not there yet, confirmations,
output formats, help and shell completion."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from .test_cli import CHEAP_ARGON2, KEYGATE


def run_in(folder: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([KEYGATE, *args], cwd=folder, env={**env, **CHEAP_ARGON2}, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("args", [
    ["keys", "list"], ["keys", "list", "-o", "json"], ["keys", "show", "kg_unknown00000"],
    ["keys", "suggest-allowlist", "kg_unknown00000"], ["roles", "list"], ["roles", "show", "admin"],
    ["members", "list", "acme"], ["trust", "list"], ["trust", "show", "shop"], ["audit"],
    ["keys", "revoke", "kg_unknown00000", "--yes"], ["keys", "update", "kg_unknown00000", "--name", "x"],
    ["roles", "delete", "ci", "--yes"], ["members", "remove", "acme", "bob", "--yes"],
    ["trust", "remove", "shop", "--yes"], ["export"], ["apply", "-f", "-", "--dry-run"],
], ids=" ".join)
def test_commands_on_what_exists_never_create_the_store(fixed_env: dict[str, str], tmp_path: Path,
                                                       args: list[str]) -> None:
    """In a folder with no store, a command that reads (or changes what must exist) says so and creates nothing."""
    env = {k: v for k, v in fixed_env.items() if k != "KEYGATE_STORE__URL"}  # the default: ./keygate.db
    result = run_in(tmp_path, env, *args)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"keygate: no store at {tmp_path / 'keygate.db'} (store.url = sqlite:///keygate.db): nothing has been "
        "created yet; run `keygate keys create` or `keygate serve` first, or point store.url at your store"]
    assert list(tmp_path.iterdir()) == []


# -- confirmation of destructive commands -------------------------------------
def keygate_on_terminal(env: dict[str, str], args: list[str], answer: str) -> tuple[int, str]:
    """Run keygate on a pseudo-terminal (stdin, stdout, stderr), type ``answer`` at the prompt; (status, screen)."""
    main_fd, terminal = pty.openpty()
    process = subprocess.Popen([KEYGATE, *args], env={**env, **CHEAP_ARGON2}, stdin=terminal, stdout=terminal,
                               stderr=terminal, close_fds=True)
    os.close(terminal)
    screen = b""
    answered = False
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main_fd], [], [], 1.0)
            if not ready:
                if process.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(main_fd, 4096)
            except OSError:  # EIO: the process closed the terminal
                break
            if not chunk:
                break
            screen += chunk
            if not answered and b"[y/N]" in screen:
                os.write(main_fd, answer.encode() + b"\r")
                answered = True
        status = process.wait(30)
    finally:
        os.close(main_fd)
        if process.poll() is None:
            process.kill()
    return status, screen.decode(errors="replace").replace("\r\n", "\n")


def made(env: dict[str, str], *args: str) -> str:
    result = subprocess.run([KEYGATE, *args], env={**env, **CHEAP_ARGON2}, capture_output=True, text=True,
                            timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def things(fixed_env: dict[str, str]) -> dict[str, str]:
    """A store with a key, a role, a member and a trust policy to remove."""
    key = json.loads(made(fixed_env, "keys", "create", "--name", "deploy from CI", "--role", "admin", "--json"))
    made(fixed_env, "roles", "set", "ci", "--grant", "deploy")
    made(fixed_env, "members", "set", "acme", "bob", "admin")
    made(fixed_env, "trust", "add", "shop", "--issuer", "https://token.actions.githubusercontent.com",
         "--audience", "keygate", "--claim", "repository=acme/shop", "--operation", "deploy")
    return {"key": key["id"]}


DESTRUCTIVE = [
    (["keys", "revoke", "{key}"], "Revoke key {key} (deploy from CI)? [y/N]", "revoked {key}"),
    (["roles", "delete", "ci"], "Delete role ci (deploy)? [y/N]", "deleted role ci"),
    (["members", "remove", "acme", "bob"], "Remove bob from acme? Their per-user keys in acme stop working. [y/N]",
     "removed bob from acme"),
    (["trust", "remove", "shop"], "Remove trust policy shop (issuer https://token.actions.githubusercontent.com)? "
     "[y/N]", "removed trust policy shop"),
]
STATE = ["keys list -o json", "roles list -o json", "members list acme -o json", "trust list -o json"]


def state(env: dict[str, str]) -> list[str]:
    return [made(env, *command.split()) for command in STATE]


@pytest.mark.parametrize(("args", "question", "done"), DESTRUCTIVE, ids=lambda v: " ".join(v[:2]) if isinstance(v, list) else None)
@pytest.mark.parametrize("answer", ["y", "n", ""])
def test_destructive_commands_ask_on_a_terminal(fixed_env: dict[str, str], things: dict[str, str], args: list[str],
                                                question: str, done: str, answer: str) -> None:
    """On a terminal, the command names what it will destroy and does it only on y/yes (the default is no)."""
    before = state(fixed_env)
    status, screen = keygate_on_terminal(fixed_env, [a.format(**things) for a in args], answer)
    assert screen.startswith(question.format(**things) + ": " + answer + "\n"), screen
    if answer in ("y", "yes"):
        assert status == 0 and screen.endswith(done.format(**things) + "\n"), screen
        assert state(fixed_env) != before
    else:
        assert status == 1 and screen.endswith("keygate: cancelled: nothing changed\n"), screen
        assert state(fixed_env) == before


@pytest.mark.parametrize(("args", "question", "done"), DESTRUCTIVE, ids=lambda v: " ".join(v[:2]) if isinstance(v, list) else None)
def test_destructive_commands_without_a_terminal_need_yes(fixed_env: dict[str, str], things: dict[str, str],
                                                          args: list[str], question: str, done: str) -> None:
    """A script (stdin not a terminal) must say --yes: without it nothing changes, exit 2, one line."""
    args = [a.format(**things) for a in args]
    before = state(fixed_env)
    refused = subprocess.run([KEYGATE, *args], env={**fixed_env, **CHEAP_ARGON2}, capture_output=True, text=True,
                             timeout=60, stdin=subprocess.DEVNULL)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr == (f"keygate: {' '.join(args[:2])} changes what cannot be undone: add --yes to confirm "
                              "(stdin is not a terminal to ask on)\n")
    assert state(fixed_env) == before
    flag = "-y" if args[0] in ("roles", "trust") else "--yes"  # both spellings, on two commands each
    assert made(fixed_env, *args, flag) == done.format(**things) + "\n"
    assert state(fixed_env) != before


# -- output formats -------------------------------------------------------------
@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An environment whose store holds one of everything the list and show commands print."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGATE_")}
    env["KEYGATE_STORE__URL"] = f"sqlite:///{tmp_path_factory.mktemp('formats') / 'cli.db'}"
    key = json.loads(made(env, "keys", "create", "--name", "ci", "--role", "admin", "--json"))
    made(env, "members", "set", "acme", "bob", "admin")
    made(env, "trust", "add", "shop", "--issuer", "https://token.actions.githubusercontent.com",
         "--audience", "keygate", "--claim", "repository=acme/shop", "--operation", "deploy")
    return {**env, "KEY_ID": key["id"]}


LISTS = [  # command, the names -o name prints, extra columns of -o wide
    ("keys list", ["key/{KEY_ID}"], ["LAST IP", "ALLOW IPS", "RATE LIMIT", "CREATED", "CREATED BY", "REVOKED"]),
    ("keys show {KEY_ID}", ["key/{KEY_ID}"], None),
    ("roles list", ["role/admin"], ["CREATED", "UPDATED"]),
    ("roles show admin", ["role/admin"], ["CREATED", "UPDATED"]),
    ("members list acme", ["member/acme/bob"], ["ORG", "UPDATED"]),
    ("trust list", ["trust/shop"], ["ALLOW IPS", "RATE LIMIT", "JWKS FILE", "UPDATED"]),
    ("trust show shop", ["trust/shop"], None),
    # Events of one instant come in no set order: their names are checked against the JSON's.
    ("audit --type event", None, ["TYPE", "ID", "CLIENT IP"]),
]


@pytest.mark.parametrize(("command", "names", "wide"), LISTS, ids=[c[0].split(" {")[0] for c in LISTS])
def test_output_formats(filled: dict[str, str], command: str, names: list[str] | None,
                        wide: list[str] | None) -> None:
    """-o json is --json; -o yaml the same data; -o name TYPE/NAME per line; -o wide more columns."""
    args = command.format(**filled).split()
    as_json = json.loads(made(filled, *args, "--json"))
    assert json.loads(made(filled, *args, "-o", "json")) == as_json
    assert yaml.safe_load(made(filled, *args, "-o", "yaml")) == as_json
    if names is None:
        names = [f"{e['type']}/{e['id']}" for e in as_json]
        assert len(names) == 4
    assert made(filled, *args, "--output", "name").splitlines() == [n.format(**filled) for n in names]
    plain = made(filled, *args).splitlines()
    wider = made(filled, *args, "-o", "wide").splitlines()
    if wide is None:  # a show prints every field already
        assert wider == plain
    else:
        assert wider[0].split("  ")[0] == plain[0].split("  ")[0]
        assert [c for c in re.split(r"\s{2,}", wider[0]) if c not in re.split(r"\s{2,}", plain[0])] == wide
        assert len(wider) == len(plain)


@pytest.mark.parametrize(("options", "message"), [
    (["-o", "xml"], "Invalid value for '-o' / '--output': 'xml' is not one of 'json', 'yaml', 'wide', 'name'."),
    (["--json", "-o", "yaml"], "--json is -o json: give one of --json and -o yaml"),
])
def test_bad_output_format_is_a_usage_error(filled: dict[str, str], options: list[str], message: str) -> None:
    result = subprocess.run([KEYGATE, "keys", "list", *options], env=filled, capture_output=True, text=True,
                            timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines()[-1] == f"Error: {message}"


# -- shell completion -------------------------------------------------------------
@pytest.mark.parametrize(("shell", "marker"), [
    ("bash", "complete -o nosort -F _keygate_completion keygate"),
    ("zsh", "compdef _keygate_completion keygate"),
    ("fish", "complete --no-files --command keygate"),
])
def test_completion_script_is_produced(shell: str, marker: str) -> None:
    """The line README gives for each shell prints a completion script for it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGATE_")} | {"_KEYGATE_COMPLETE": f"{shell}_source"}
    result = subprocess.run([KEYGATE], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and marker in result.stdout, result.stdout


def test_completion_completes_commands_and_options() -> None:
    """What bash asks the script for: `keygate ke<TAB>` is keys, `keygate keys list -<TAB>` lists -o."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("KEYGATE_")} | {"_KEYGATE_COMPLETE": "bash_complete"}
    words = subprocess.run([KEYGATE], env=base | {"COMP_WORDS": "keygate ke", "COMP_CWORD": "1"},
                           capture_output=True, text=True, timeout=60).stdout.splitlines()
    assert words == ["plain,keys"]
    options = subprocess.run([KEYGATE], env=base | {"COMP_WORDS": "keygate keys list -o ", "COMP_CWORD": "4"},
                             capture_output=True, text=True, timeout=60).stdout.splitlines()
    assert options == ["plain,json", "plain,yaml", "plain,wide", "plain,name"]
