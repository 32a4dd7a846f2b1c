"""The ``keygate`` command's edges, as a user meets them: a store that is not there yet, confirmations,
output formats, help and shell completion."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import time
from pathlib import Path

import pytest

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
    ["trust", "remove", "shop", "--yes"],
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
