"""Every ``keygate`` command and group says what it does in ``--help``."""

from __future__ import annotations

from collections.abc import Iterator

import click
import pytest
from click.testing import CliRunner

from gateway.cli import main


def commands(group: click.Group, path: tuple[str, ...] = ("keygate",)) -> Iterator[tuple[str, click.Command]]:
    yield " ".join(path), group
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from commands(command, path + (name,))
        else:
            yield " ".join(path + (name,)), command


ALL = list(commands(main))


def test_the_walk_finds_the_commands() -> None:
    names = {name for name, _ in ALL}
    assert {"keygate roles list", "keygate roles show", "keygate roles delete", "keygate members list",
            "keygate members set", "keygate keys revoke", "keygate check-config"} <= names


@pytest.mark.parametrize("name", [name for name, _ in ALL])
def test_every_command_has_help(name: str) -> None:
    command = dict(ALL)[name]
    assert (command.help or "").strip() and command.get_short_help_str().strip(), f"{name} has no help text"
    shown = CliRunner().invoke(main, [*name.split()[1:], "--help"])
    assert shown.exit_code == 0 and " ".join(command.help.split()[:3]) in " ".join(shown.output.split())
