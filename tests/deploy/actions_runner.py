"""What the GitHub Actions runner does around a JavaScript action's step, for the tests.

The runner starts ``node <main>`` (later ``node <post>``) with the step's inputs as
``INPUT_<NAME>`` variables (every input the metadata declares, its default when the
workflow gives none), empty files named by ``GITHUB_ENV``, ``GITHUB_STATE`` and
``GITHUB_OUTPUT``, and reads those files back afterwards (``name=value`` lines, or
``name<<DELIMITER`` ... ``DELIMITER`` for values with line breaks); a post step sees the
saved state as ``STATE_<name>``. Workflow commands are lines on stdout (``::add-mask::``,
``::error::`` ...). This module does the same with the machine's ``node``.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

# Node's built-in fetch (and AbortSignal.timeout) arrived in 18; GitHub runs the action on node24.
OLDEST_NODE = 18


def node_binary(environ: Mapping[str, str] = os.environ) -> str:
    """The machine's ``node`` (18 or newer); skip without it, fail under CI=true."""
    found = shutil.which("node", path=environ.get("PATH"))
    if found is None:
        message = "node is not installed: scripts/test installs it (as root: apt-get install nodejs)"
        if environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    version = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=30).stdout
    major = re.match(r"v(\d+)\.", version)
    assert major and int(major.group(1)) >= OLDEST_NODE, f"{found} is {version.strip()}: need node {OLDEST_NODE}+"
    return found


def parse_file_commands(text: str) -> dict[str, str]:
    """An environment file as the runner reads it: later entries win."""
    values: dict[str, str] = {}
    lines = iter(text.split("\n"))
    for line in lines:
        if not line:
            continue
        equals, heredoc = line.find("="), line.find("<<")
        if equals >= 0 and (heredoc < 0 or equals < heredoc):
            values[line[:equals]] = line[equals + 1:]
            continue
        assert heredoc > 0, f"neither name=value nor name<<DELIMITER: {line!r}"
        name, delimiter = line[:heredoc], line[heredoc + 2:]
        body = []
        for inner in lines:
            if inner == delimiter:
                break
            body.append(inner)
        else:
            raise AssertionError(f"{name}: no closing {delimiter}")
        values[name] = "\n".join(body)
    return values


@dataclass
class StepResult:
    returncode: int
    stdout: str
    stderr: str
    env: dict[str, str] = field(default_factory=dict)
    state: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)

    @property
    def lines(self) -> list[str]:
        return self.stdout.splitlines()

    def commands(self, name: str) -> list[str]:
        """The data of every ``::name::`` workflow command printed."""
        return [line[len(name) + 4:] for line in self.lines if line.startswith(f"::{name}::")]


class Runner:
    """Runs one JavaScript action's main and post steps as the runner does, in ``folder``."""

    def __init__(self, action_dir: Path, folder: Path, node: str) -> None:
        self.action_dir = action_dir
        self.metadata = yaml.safe_load((action_dir / "action.yml").read_text())
        self.folder = folder
        self.node = node

    def inputs_env(self, given: Mapping[str, str]) -> dict[str, str]:
        declared = self.metadata.get("inputs", {})
        unknown = set(given) - set(declared)
        assert not unknown, f"inputs the action does not declare: {unknown}"
        return {
            f"INPUT_{name.replace(' ', '_').upper()}": given.get(name, spec.get("default", ""))
            for name, spec in declared.items()
        }

    async def run(self, which: str, *, inputs: Mapping[str, str], environ: Mapping[str, str],
                  state: Mapping[str, str] | None = None) -> StepResult:
        """``which`` is ``main`` or ``post``; ``state`` is what main saved (post only)."""
        files = {}
        for variable in ("GITHUB_ENV", "GITHUB_STATE", "GITHUB_OUTPUT"):
            path = self.folder / f"{which}-{variable.lower()}"
            path.write_text("")
            files[variable] = path
        env = {"PATH": os.environ["PATH"], "HOME": str(self.folder), **self.inputs_env(inputs), **environ,
               **{name: str(path) for name, path in files.items()},
               **{f"STATE_{name}": value for name, value in (state or {}).items()}}
        process = await asyncio.create_subprocess_exec(
            self.node, str(self.action_dir / self.metadata["runs"][which]), cwd=self.folder, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=90)
        assert process.returncode is not None
        return StepResult(
            process.returncode, stdout.decode(), stderr.decode(),
            env=parse_file_commands(files["GITHUB_ENV"].read_text()),
            state=parse_file_commands(files["GITHUB_STATE"].read_text()),
            outputs=parse_file_commands(files["GITHUB_OUTPUT"].read_text()),
        )


def assert_never_printed(result: StepResult, *secrets: str) -> None:
    """A secret appears only in ``::add-mask::`` lines (which the runner consumes), and in no stderr."""
    for secret in secrets:
        assert secret not in result.stderr
        for line in result.lines:
            assert secret not in line or line == f"::add-mask::{secret}", line
