"""Settings as people see them: secrets masked, and TOML text (``keygate check-config``).

Which settings are secret is declared in :mod:`.schema`; error lines from
:mod:`.load` show values through :func:`masked_value` too, so a secret never
reaches a terminal or a log.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from .schema import Settings


def _secret_fields(model: type[BaseModel], path: tuple[str, ...] = ()) -> dict[tuple[str, ...], str]:
    found: dict[tuple[str, ...], str] = {}
    for name, field in model.model_fields.items():
        extra = field.json_schema_extra
        if isinstance(extra, dict) and "secret" in extra:
            found[path + (name,)] = str(extra["secret"])
        elif isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            found |= _secret_fields(field.annotation, path + (name,))
    return found


_SECRETS = _secret_fields(Settings)


def masked_value(path: tuple[str | int, ...], value: Any) -> Any:
    """``value``, found at ``path`` in the settings, with its secrets hidden."""
    kind = _SECRETS.get(path)
    if kind == "url" and isinstance(value, str):
        return mask_url(value)
    if kind is not None:
        return value if value in ("", None) else "***"
    if isinstance(value, Mapping):
        return {key: masked_value(path + (key,), item) for key, item in value.items()}
    # SECURITY: text given where a table holding a secret belongs (e.g. store as
    # a string, or bad JSON in KEYGATE_STORE) may well be that secret.
    if isinstance(value, str) and any(secret[: len(path)] == path for secret in _SECRETS):
        return "***"
    return value


def mask_url(url: str) -> str:
    """``url`` with its password hidden: ``postgresql://user:***@host/db``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    # SECURITY: the user info is taken to end at the URL's last '@', so an unencoded '/', '?', '#' or
    # '@' in a password hides more of the URL rather than showing part of it.
    at = rest.rfind("@")
    if at >= 0 and ":" in rest[:at]:
        rest = rest[: rest.index(":")] + ":***" + rest[at:]
    authority, question, query = rest.partition("?")
    query = re.sub(r"(?i)((?:^|&)password=)[^&]*", r"\1***", query)
    return scheme + sep + authority + question + query


def masked(settings: Settings) -> dict[str, Any]:
    """The settings as JSON-able data with passwords and the pepper hidden."""
    return masked_value((), settings.model_dump(mode="json"))


def render_toml(data: Mapping[str, Any]) -> str:
    """``data`` (e.g. :func:`masked` output) as TOML text; ``None`` values are left out."""
    lines: list[str] = []
    _render_table(lines, (), data, array=False)
    return "\n".join(lines).strip() + "\n"


def _render_table(lines: list[str], path: tuple[str, ...], data: Mapping[str, Any], *, array: bool) -> None:
    def is_table_array(value: Any) -> bool:
        return isinstance(value, list) and bool(value) and all(isinstance(item, Mapping) for item in value)

    scalars = {
        key: value for key, value in data.items()
        if value is not None and not isinstance(value, Mapping) and not is_table_array(value)
    }
    has_subtables = len(scalars) < sum(value is not None for value in data.values())
    # A table holding only subtables needs no header of its own; an array
    # element always does, since the header is what starts a new element.
    if path and (array or scalars or not has_subtables):
        header = ".".join(_toml_key(part) for part in path)
        lines += ["", f"[[{header}]]" if array else f"[{header}]"]
    lines += [f"{_toml_key(key)} = {_toml_value(value)}" for key, value in scalars.items()]
    for key, value in data.items():
        if isinstance(value, Mapping):
            _render_table(lines, path + (key,), value, array=False)
        elif is_table_array(value):
            for item in value:
                _render_table(lines, path + (key,), item, array=True)


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_string(key)


def _toml_string(text: str) -> str:
    # JSON's escapes are all valid TOML; DEL is the one character TOML also
    # forbids raw in a string and JSON leaves alone.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items() if v is not None) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")
