"""The route grammar: how a route's path and operation read, for the settings that check them and the
route table that compiles them (:mod:`gateway.pipeline.scope`), so what loads is what is matched.

A path is segments, each literal text or one whole placeholder (``{server}`` names the server,
any other name a value the route's operation may use: ``registry_login:{credential}``); a
trailing ``/*`` matches the path and everything below it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import unquote

SERVER_PLACEHOLDER = "server"  # the placeholder naming the server

# A placeholder names one whole path segment: {server} names the server, any other
# name a value that the route's operation may use ("registry_login:{credential}").
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_BRACED = re.compile(r"(\{[^{}]*\})")


def path_segments(raw_path: str) -> tuple[str, ...]:
    """The path as upstream servers commonly read it: segments percent-decoded one by one,
    without empty, ``.`` and ``..`` segments (and without the query)."""
    segments: list[str] = []
    for segment in raw_path.split("?", 1)[0].split("/"):
        if "%" in segment:
            # Decoded per segment, so an encoded "/" (%2F) stays inside its segment.
            segment = unquote(segment)
        if segment == "..":
            if segments:
                segments.pop()
        elif segment not in ("", "."):
            segments.append(segment)
    return tuple(segments)


def route_path(path: str) -> tuple[tuple[str | None, ...], dict[str, int], list[str]]:
    """A route's path as the table reads it: its segments (literal text, or None for a
    placeholder; a trailing ``/*`` left out), the segment index of each placeholder by name,
    and what is wrong with it, one line per problem.

    The settings check routes with this, so what loads is exactly what the table compiles.
    """
    segments: list[str | None] = []
    placeholders: dict[str, int] = {}
    problems: list[str] = []
    for part in path_segments(path[:-2] if path.endswith("/*") else path):
        placeholder = _PLACEHOLDER.fullmatch(part)
        if placeholder is None:
            if "{" in part or "}" in part:
                problems.append(
                    f"a placeholder must be a whole path segment, not part of one ({part})"
                    if _PLACEHOLDER.search(part) else
                    f"malformed placeholder in {part!r}: write {{name}}, a name of letters, digits and '_'"
                )
            segments.append(part)
            continue
        if placeholder[1] in placeholders:
            problems.append(f"{part} appears twice in the path; give each placeholder its own name")
        placeholders.setdefault(placeholder[1], len(segments))
        segments.append(None)
    return tuple(segments), placeholders, problems


def route_operation(operation: str, placeholders: Mapping[str, int] | None) -> tuple[tuple[str | int, ...], list[str]]:
    """A route's operation in pieces (literal text, or the index of the path segment whose value
    goes there) and what is wrong with it, one line per problem.

    ``placeholders`` are the path's (:func:`route_path`); None when the path is itself wrong,
    and then only the operation's own form is checked.
    """
    pieces: list[str | int] = []
    problems: list[str] = []
    for text in _BRACED.split(operation):
        placeholder = _PLACEHOLDER.fullmatch(text)
        if placeholder is None:
            if "{" in text or "}" in text:
                problems.append(f"malformed placeholder in {text!r}: write {{name}}, a name of letters, digits and '_'")
            elif text:
                pieces.append(text)
        elif placeholder[1] == SERVER_PLACEHOLDER:
            problems.append("{server} cannot be part of the operation: the server is checked on its own, "
                            "against the key's servers")
        elif placeholders is not None and placeholder[1] not in placeholders:
            defined = ", ".join(f"{{{name}}}" for name in placeholders if name != SERVER_PLACEHOLDER)
            problems.append(f"{text} is not a placeholder of the path ({defined or 'it has none'})")
        elif placeholders is not None:
            pieces.append(placeholders[placeholder[1]])
    # SECURITY: values hold no ":", so one placeholder per ":"-separated part keeps every
    # operation naming one set of values; "{owner}-{repo}" would read "a-b-c" two ways.
    for part in operation.split(":"):
        if len(_PLACEHOLDER.findall(part)) > 1:
            problems.append(f"{part!r} holds two placeholders, which could not be told apart; "
                            "separate them with ':'")
    return tuple(pieces), problems
