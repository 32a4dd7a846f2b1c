"""Every ``keygate trust add`` command that README.md and deploy/github-actions/README.md show, run as written.

The commands are taken from the documents' shell code blocks (lines joined at a trailing
backslash, a trailing ``# comment`` dropped) and run by the real CLI, each block against a
fresh SQLite store (an operator following that section), in the block's order, with the
``keygate trust list|show|remove`` lines around them. What an operator has before copying them is made first: each role a
command names (``keygate roles set ROLE --grant deploy``), and the Kubernetes API server's
JWKS that ``--jwks-file`` names (saved to the test's folder, the path replaced by that one:
the command checks that the file is a key set). Lines that are templates rather than commands
(``...``, ``[--json]``) are not run, and are counted so that none is skipped unseen.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.e2e.harness import KEYGATE, clean_env
from tests.identity_issuer import IssuerKey

ROOT = Path(__file__).resolve().parents[2]
# (document, the trust add commands it must hold, its template lines)
DOCUMENTS = [
    (ROOT / "README.md", 3, 3),
    (ROOT / "deploy" / "github-actions" / "README.md", 2, 0),
]


def shell_blocks(text: str) -> list[list[str]]:
    """The commands of each of the document's ```sh blocks, continuation lines joined, trailing comments dropped."""
    blocks: list[list[str]] = []
    for block in re.findall(r"^```(?:sh|bash|shell)\n(.*?)^```", text, flags=re.S | re.M):
        commands: list[str] = []
        blocks.append(commands)
        pending = ""
        for line in block.splitlines():
            line = re.sub(r"\s+#\s.*$", "", line) if not line.lstrip().startswith("#") else ""
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            command = (pending + line).strip()
            pending = ""
            if command:
                commands.append(command)
    return blocks


def keygate(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([KEYGATE, *args], env=env, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize(("document", "adds", "templates"), DOCUMENTS, ids=[d[0].relative_to(ROOT).as_posix()
                                                                          for d in DOCUMENTS])
def test_every_documented_trust_command_is_accepted(document: Path, adds: int, templates: int,
                                                    tmp_path: Path) -> None:
    blocks = [[c for c in block if c.startswith("keygate trust ")] for block in shell_blocks(document.read_text())]
    trust = [c for block in blocks for c in block]
    runnable = [c for c in trust if "..." not in c and "[" not in c]
    assert len(trust) - len(runnable) == templates, trust
    assert len([c for c in runnable if c.startswith("keygate trust add ")]) == adds, runnable

    jwks = tmp_path / "cluster-jwks.json"
    jwks.write_text(json.dumps({"keys": [IssuerKey.generate("RS256", bits=1024).public_jwk()]}))
    for number, block in enumerate(b for b in blocks if b):
        env = clean_env(KEYGATE_STORE__URL=f"sqlite:///{tmp_path / f'block-{number}.db'}")
        commands = [shlex.split(c)[1:] for c in block if c in runnable]
        for args in commands:
            for flag, value in zip(args, args[1:]):
                if flag == "--role":
                    made = keygate(env, "roles", "set", value, "--grant", "deploy")
                    assert made.returncode == 0, made.stderr
        for args in commands:
            args = [str(jwks) if a.endswith("/cluster-jwks.json") else a for a in args]
            if args[:2] == ["trust", "remove"]:
                args.append("--yes")  # as written it asks on a terminal; run without one, it needs --yes
            result = keygate(env, *args)
            assert result.returncode == 0, f"{document.name}: keygate {shlex.join(args)}\n{result.stderr}"
            if args[:2] == ["trust", "add"]:
                shown = json.loads(keygate(env, "trust", "show", args[2], "--json").stdout)
                conditions = dict(a.split("=", 1) for f, a in zip(args, args[1:]) if f == "--claim")
                assert shown["conditions"] == conditions, shown
