"""How the ``keygate`` list and show commands print: ``-o json|yaml|wide|name`` beside ``--json``.

The default is a table (list) or one ``name: value`` line per field (show); ``wide`` adds
columns to a table (a show already prints every field); ``name`` prints one ``TYPE/NAME``
per line, e.g. ``key/kg_7Hq2ZrT9xLmP``, for ``xargs`` and loops, as kubectl does.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from typing import Any

import click
import yaml

FORMATS = ("json", "yaml", "wide", "name")


def output_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``-o/--output`` and ``--json`` (the same as ``-o json``); the command gets one ``output``:
    None (the default view) or one of :data:`FORMATS`."""

    @click.option("-o", "--output", type=click.Choice(FORMATS),
                  help="json, yaml, wide (more columns) or name (TYPE/NAME per line); default: a table.")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON (the same as -o json).")
    @functools.wraps(command)
    def with_output(*args: Any, output: str | None, as_json: bool, **kwargs: Any) -> Any:
        if as_json and output not in (None, "json"):
            raise click.UsageError(f"--json is -o json: give one of --json and -o {output}")
        return command(*args, output="json" if as_json else output, **kwargs)

    return with_output


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


def emit_yaml(data: Any) -> None:
    click.echo(yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False), nl=False)


def emit_data(output: str, data: Any) -> bool:
    """Print ``data`` as JSON or YAML when ``output`` asks for it; whether it did."""
    if output == "json":
        emit_json(data)
    elif output == "yaml":
        emit_yaml(data)
    else:
        return False
    return True


def emit_names(kind: str, names: Sequence[str]) -> None:
    for name in names:
        click.echo(f"{kind}/{name}")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[("-" if v in (None, "") else str(v)) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()  # noqa: E731
    click.echo(line(headers))
    for row in cells:
        click.echo(line(row))
    if not rows:
        click.echo("(none)")


def details(fields: dict[str, Any]) -> None:
    """One ``name: value`` line per field, lists joined with commas."""
    for name, value in fields.items():
        if isinstance(value, list):
            value = ", ".join(value) if value else "-"
        click.echo(f"{name + ':':<14}{'-' if value in (None, '') else value}")
