"""Settings: built-in defaults < TOML file < ``KEYGATE_*`` environment < overrides.

:func:`load_settings` is the one way in. It rejects unknown settings and
reports every problem at once as a :class:`ConfigError`, one line per problem
naming the setting, the value and what is allowed, so start-up can print the
lines and exit without a traceback. What each setting is and allows is
declared in :mod:`.schema`.
"""

from __future__ import annotations

import difflib
import ipaddress
import functools
import json
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, get_args, get_origin

from pydantic import BaseModel, ValidationError

from .render import masked_value
from .schema import AdminSettings, AuthzSettings, ProxySettings, Settings
from .units import parse_listen

_LISTEN_DEFAULTS = {name: section.model_fields["listen"].default
                    for name, section in (("proxy", ProxySettings), ("admin", AdminSettings), ("authz", AuthzSettings))}

ENV_PREFIX = "KEYGATE_"
CONFIG_ENV = "KEYGATE_CONFIG"
DEFAULT_CONFIG_FILE = "keygate.toml"


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` holds one line per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def load_settings(
    *,
    config_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    cwd: Path | None = None,
    serving: bool = False,
) -> Settings:
    """The effective settings, or :class:`ConfigError` listing every problem.

    The file is ``config_file``, else ``$KEYGATE_CONFIG``, else ``keygate.toml``
    in ``cwd`` when present. ``overrides`` (command-line flags) take nested
    tables or dotted keys (``{"proxy.listen": "0.0.0.0:9000"}``); ``None``
    values are skipped, so options not given can be passed as they are.
    With ``serving``, what :func:`serving_problems` finds is reported too,
    with the other problems: ``keygate serve`` and ``keygate check-config``
    load settings this way.
    """
    environ = os.environ if environ is None else environ
    cwd = Path.cwd() if cwd is None else Path(cwd)
    problems: list[str] = []
    # Starting from the defaults makes tables merge into them: a configured key
    # kind is added to the built-in ones instead of replacing them.
    layers: list[dict[str, Any]] = [Settings().model_dump()]
    unreadable = False
    found = _config_file(config_file, environ, cwd)
    if found is not None:
        path, name = found
        data = _read_toml(path, name, problems)
        unreadable = data is None
        layers.append(_known(data or {}, Settings, (), f"in {name}", problems))
    layers.append(_from_environ(environ, problems))
    layers.append(_from_overrides(overrides or {}, problems))
    if unreadable:
        # Validating without the file would report settings it may well fix.
        raise ConfigError(problems)
    merged = functools.reduce(_merge, layers)
    # On the merged values, so they are reported even when a setting is also wrong.
    unservable = serving_problems(merged) if serving else []
    try:
        settings = Settings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(problems + _describe(exc) + unservable) from None
    if problems or unservable:
        raise ConfigError(problems + unservable)
    return settings


def serving_problems(values: Mapping[str, Any]) -> list[str]:
    """What serving needs beyond settings that are each valid, one line per problem: the one list
    ``keygate serve`` (before it exits 2) and ``keygate check-config`` check. ``values`` are settings as
    merged (a :class:`Settings` dumped, or not yet validated)."""
    problems = []
    if not values.get("upstreams"):
        problems.append("no upstreams configured: add an [[upstreams]] table (name, url)")
    problems += _listener_clashes(values)
    return problems


def _listener_clashes(values: Mapping[str, Any]) -> list[str]:
    """Two listeners on one address, or one on every address of a family (0.0.0.0, ::) and one on an
    address of that family, on one port: serve cannot bind both. (IPv6 sockets are IPv6-only, so
    :: and 0.0.0.0 do not clash; a host name is compared as written, localhost as 127.0.0.1.)"""
    bound: list[tuple[str, str, str | ipaddress.IPv4Address | ipaddress.IPv6Address, int]] = []
    problems = []
    for section in ("proxy", "admin", "authz"):
        given = values.get(section)
        text = (given if isinstance(given, Mapping) else {}).get("listen", _LISTEN_DEFAULTS[section])
        try:
            host, port = parse_listen(text)
        except ValueError:
            continue  # reported as that setting's own problem, or off (authz.listen = "")
        address = _address(host)
        clash = next((other for other in bound if port != 0 and other[3] == port
                      and _overlap(address, other[2])), None)
        if clash is not None:
            problems.append(f"{section}.listen = {text!r}: the address of {clash[0]}.listen ({clash[1]!r}); "
                            "each listener needs a port of its own")
        else:
            bound.append((section, text, address, port))
    return problems


def _address(host: str) -> str | ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address("127.0.0.1" if host.lower() == "localhost" else host)
    except ValueError:
        return host.lower()  # a host name


def _overlap(a: str | ipaddress.IPv4Address | ipaddress.IPv6Address,
             b: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if a == b:
        return True
    if isinstance(a, str) or isinstance(b, str) or a.version != b.version:
        return False
    return a.is_unspecified or b.is_unspecified


def _config_file(
    config_file: str | os.PathLike[str] | None, environ: Mapping[str, str], cwd: Path
) -> tuple[Path, str] | None:
    """The file to read and the name to show for it; a named file is returned even if missing."""
    named = config_file if config_file is not None else environ.get(CONFIG_ENV) or None
    if named is None:
        path = cwd / DEFAULT_CONFIG_FILE
        return (path, str(path)) if path.is_file() else None
    path = Path(named).expanduser()
    return (path if path.is_absolute() else cwd / path), os.fspath(named)


def _read_toml(path: Path, name: str, problems: list[str]) -> dict[str, Any] | None:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except FileNotFoundError:
        problems.append(f"config file {name}: no such file")
    except OSError as exc:
        problems.append(f"config file {name}: cannot read it ({exc.strerror})")
    except UnicodeDecodeError:
        problems.append(f"config file {name}: not UTF-8 text")
    except tomllib.TOMLDecodeError as exc:
        if path.read_bytes().startswith(b"\xef\xbb\xbf"):
            problems.append(f"config file {name}: starts with a byte order mark (BOM): save it as UTF-8 without one")
            return None
        where = re.search(r"\s*\(at line (\d+), column (\d+)\)$", str(exc))
        if where:
            reason = str(exc)[: where.start()]
            problems.append(f"config file {name}, line {where[1]}, column {where[2]}: invalid TOML: {reason}")
        else:
            problems.append(f"config file {name}: invalid TOML: {exc}")
    except ValueError as exc:  # an integer of over 4300 digits, which tomllib leaves to int()
        problems.append(f"config file {name}: invalid TOML: {str(exc).split(';')[0]}")
    return None


def _from_environ(environ: Mapping[str, str], problems: list[str]) -> dict[str, Any]:
    """Settings from ``KEYGATE_*`` variables: ``KEYGATE_STORE__URL`` is ``store.url``.

    A list or table setting takes JSON (``["10.0.0.0/8"]``); a list also takes
    comma-separated text. Other settings take the text as it is, even when it
    starts with ``{`` or ``[``: a pepper may.
    """
    result: dict[str, Any] = {}
    for var in sorted(environ):  # sorted: KEYGATE_PROXY is merged before KEYGATE_PROXY__LISTEN
        if not var.startswith(ENV_PREFIX) or var == CONFIG_ENV:
            continue
        path = tuple(var.removeprefix(ENV_PREFIX).lower().split("__"))
        text = environ[var]
        value: Any = text
        target = _field_type(path)
        structured = get_origin(target) in (list, dict) or (isinstance(target, type) and issubclass(target, BaseModel))
        if structured and text.lstrip().startswith(("[", "{")):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                problems.append(f"{var} = {_shown(path, text)}: not valid JSON ({exc.msg} at column {exc.colno})")
                continue
        elif get_origin(target) is list:
            value = [item.strip() for item in text.split(",") if item.strip()]
        result = _merge(result, _known(_nested(path, value), Settings, (), f"from {var}", problems))
    return result


def _from_overrides(overrides: Mapping[str, Any], problems: list[str]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is not None:
            result = _merge(result, _nested(tuple(key.split(".")), value))
    return _known(result, Settings, (), "in overrides", problems)


def _nested(path: Sequence[str], value: Any) -> dict[str, Any]:
    for part in reversed(path[1:]):
        value = {part: value}
    return {path[0]: value}


def _merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``: tables merge key by key; anything else, lists too, replaces."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _field_type(path: Sequence[str]) -> Any:
    """The type of the setting at ``path``, or ``None`` when there is no such setting."""
    target: Any = Settings
    for part in path:
        if isinstance(target, type) and issubclass(target, BaseModel):
            field = target.model_fields.get(part)
            if field is None:
                return None
            target = field.annotation
        elif get_origin(target) is dict:
            target = get_args(target)[1]
        else:
            return None
    return target


def _known(data: Any, target: Any, path: tuple[str | int, ...], origin: str, problems: list[str]) -> Any:
    """``data`` without the settings ``target`` does not have; each is reported with its ``origin``."""
    if isinstance(target, type) and issubclass(target, BaseModel) and isinstance(data, Mapping):
        kept = {}
        for key, value in data.items():
            field = target.model_fields.get(key)
            if field is None:
                problems.append(_unknown(path + (key,), origin, list(target.model_fields)))
            else:
                kept[key] = _known(value, field.annotation, path + (key,), origin, problems)
        return kept
    if get_origin(target) is dict and isinstance(data, Mapping):
        return {key: _known(value, get_args(target)[1], path + (key,), origin, problems) for key, value in data.items()}
    if get_origin(target) is list and isinstance(data, list):
        return [_known(value, get_args(target)[0], path + (i,), origin, problems) for i, value in enumerate(data)]
    return data


def _unknown(path: tuple[str | int, ...], origin: str, choices: list[str]) -> str:
    line = f"unknown setting {_dotted(path)} ({origin})"
    close = difflib.get_close_matches(str(path[-1]), choices, n=1)
    if close:
        line += f"; did you mean {_dotted(path[:-1] + (close[0],))}?"
    return line


# Friendlier words for pydantic's built-in errors; the rest keep pydantic's message.
_REASONS = {
    "greater_than": "must be greater than {gt}",
    "greater_than_equal": "must be at least {ge}",
    "less_than": "must be less than {lt}",
    "less_than_equal": "must be at most {le}",
    "int_parsing": "must be a whole number",
    "int_type": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "dict_type": "must be a table",
    "model_type": "must be a table",
    "literal_error": "must be one of {expected}",
}


def _describe(exc: ValidationError) -> list[str]:
    """One line per pydantic error: ``setting = value: what is allowed``."""
    lines = []
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        if error["type"] == "missing":
            lines.append(f"{_dotted(loc)} is required")
        elif error["type"] == "extra_forbidden":
            lines.append(f"unknown setting {_dotted(loc)}")
        else:
            ctx = error.get("ctx", {})
            template = _REASONS.get(error["type"])
            if error["type"] == "value_error":
                reason = str(ctx["error"])
            elif template is None:
                # Already worded, and may hold braces of its own ("{id} appears twice").
                reason = error["msg"]
            else:
                reason = template.format(**{k: _plain(v) for k, v in ctx.items()})
            lines.append(f"{_dotted(loc)} = {_shown(loc, error['input'])}: {reason}")
    return lines


def _dotted(path: Sequence[str | int]) -> str:
    return ".".join(str(part) for part in path)


def _plain(value: Any) -> Any:
    # Durations are floats by the time a bound is checked; show `0`, not `0.0`.
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _shown(path: tuple[str | int, ...], value: Any) -> str:
    text = repr(_plain(masked_value(path, value)))
    return text if len(text) <= 100 else text[:97] + "..."
