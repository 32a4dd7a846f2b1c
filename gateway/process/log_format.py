"""Logging: one line per event on stderr, JSON by default; keys appear only as their id.

Every record goes through the root logger's one handler, Keygate's own and
those of libraries (aiohttp, asyncio, asyncpg) alike, so each is one line:
``time`` (RFC 3339, UTC), ``level``, ``logger``, then the event's fields (or
``message``), then ``exception`` (the whole traceback, as one string).
Keygate's events pass their fields as a dict (``log.info({"event": ...})``);
a message that is a JSON object (the older spelling) is read as fields too.

A record written while a request is handled carries that request's
``request_id``, from :data:`REQUEST_ID`, which the listeners set when a
request begins. Each listener runs a connection's requests one after
another in one task: the admin listener resets the value after each
request; the proxy and authz listeners' next request sets its own first.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable
from contextvars import ContextVar
from types import TracebackType
from typing import Any

# The request being handled in this task: its id goes into every record written meanwhile.
REQUEST_ID: ContextVar[str | None] = ContextVar("keygate_request_id", default=None)

Redactor = Callable[[str], str]
_STANDARD = frozenset({"time", "level", "logger"})
# Loggers whose fields Keygate builds from parts already redacted (the access log's path is the
# request record's): their lines skip the redactor, which would cost a fifth of each line.
_REDACTED_AT_SOURCE = frozenset({"keygate.access"})
# One encoder for every line (json.dumps with an argument makes a new one each call).
_encode = json.JSONEncoder(default=str).encode


class _Clock:
    """RFC 3339 UTC timestamps with milliseconds; the part up to the second is made once a second."""

    __slots__ = ("_second", "_prefix")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return "%s.%03dZ" % (self._prefix, int((created - second) * 1000))


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    """The event's fields: the dict it was logged with, a JSON object message read back, or ``message``."""
    msg = record.msg
    if isinstance(msg, dict):
        return dict(msg) if not record.args else {"message": record.getMessage()}
    message = record.getMessage()
    if message.startswith("{"):
        try:
            fields = json.loads(message)
        except ValueError:
            pass
        else:
            if isinstance(fields, dict):
                return fields
    return {"message": message}


def _redacted(value: Any, redact: Redactor) -> Any:
    """``value`` with ``redact`` applied to every string in it, inside lists and dicts too."""
    kind = type(value)
    if kind is str:
        return redact(value)
    if kind is dict:
        return {name: _redacted(item, redact) for name, item in value.items()}
    if kind is list or kind is tuple:
        return [_redacted(item, redact) for item in value]
    return value


class _Formatter(logging.Formatter):
    def __init__(self, redact: Redactor | None = None) -> None:
        super().__init__()
        self._clock = _Clock()
        # SECURITY: a key inside free text (a library's error, an exception's message, a URL) is shown
        # as its id. Fields Keygate builds itself hold ids only (paths are redacted where they are read).
        self._redact = redact if redact is not None else (lambda text: text)

    def fields(self, record: logging.LogRecord) -> dict[str, Any]:
        fields = _fields(record)
        redact = self._redact
        if record.name not in _REDACTED_AT_SOURCE:
            for name, value in fields.items():
                fields[name] = _redacted(value, redact)
        request_id = REQUEST_ID.get()
        if request_id is not None and "request_id" not in fields:
            fields["request_id"] = request_id
        if record.exc_info:
            fields["exception"] = redact(self.formatException(record.exc_info))
        if record.stack_info:
            fields["stack"] = redact(self.formatStack(record.stack_info))
        return fields


class JsonFormatter(_Formatter):
    """One JSON object per line (newlines inside values are escaped, so a traceback stays on its line)."""

    def __init__(self, redact: Redactor | None = None) -> None:
        super().__init__(redact)
        self._heads: dict[tuple[str, str], str] = {}

    def format(self, record: logging.LogRecord) -> str:
        fields = self.fields(record)
        if not _STANDARD.isdisjoint(fields):
            # A field named like a standard one cannot replace it.
            fields = {"field_" + name if name in _STANDARD else name: value for name, value in fields.items()}
        # The standard fields' text, made once per logger and level: most of the line's fixed part.
        head = self._heads.get((record.name, record.levelname))
        if head is None:
            head = self._heads[record.name, record.levelname] = \
                ', "level": %s, "logger": %s' % (_encode(record.levelname.lower()), _encode(record.name))
        body = _encode(fields)
        return '{"time": "%s"%s%s' % (self._clock(record.created), head, ", " + body[1:] if fields else "}")


class TextFormatter(_Formatter):
    """``time LEVEL logger event name=value ...`` for people reading a terminal; tracebacks follow on their lines."""

    def format(self, record: logging.LogRecord) -> str:
        fields = self.fields(record)
        exception = fields.pop("exception", None)
        stack = fields.pop("stack", None)
        head = fields.pop("event", None)
        if head is None:
            head = fields.pop("message", "")
        parts = [self._clock(record.created), record.levelname, record.name, _text(head, bare=True)]
        parts.extend([f"{name}={_text(value)}" for name, value in fields.items() if value is not None])
        line = " ".join(part for part in parts if part)
        for extra in (exception, stack):
            if extra:
                line += "\n" + extra
        return line


_PLAIN = re.compile(r'[^ "=\\\x00-\x1f\x7f]+')


def _text(value: Any, *, bare: bool = False) -> str:
    """A value as a text line shows it: plain words bare, anything else as JSON (quoted, escaped)."""
    kind = type(value)
    if kind is str:
        if _PLAIN.fullmatch(value) or (bare and value and "\n" not in value and "\r" not in value):
            return value  # type: ignore[no-any-return]
        return _encode(value)
    if kind is int or kind is float:
        return repr(value)
    return _encode(value)


FORMATTERS: dict[str, type[_Formatter]] = {"json": JsonFormatter, "text": TextFormatter}


def configure_logging(level: str, log_format: str = "json", redact: Redactor | None = None) -> None:
    """Send every record of this process to stderr in ``log_format``, from ``level`` up."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(FORMATTERS[log_format](redact))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # No format shows the caller's file and line, thread or process names: spare every record finding
    # them (logging's documented optimisation; a third of an access line's cost otherwise).
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # Python's warnings become records too, rather than lines of their own.
    logging.captureWarnings(True)
    # An exception nothing caught is a record (one line) rather than a bare traceback.
    sys.excepthook = _log_uncaught
    # aiohttp's own access logger is replaced by ours (proxy.access_log).
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # The change watcher reports store outages once, as JSON; asyncpg's own
    # reconnect attempts would repeat them with tracebacks.
    logging.getLogger("asyncpg.pool").setLevel(logging.ERROR)


def _log_uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    logging.getLogger("keygate").critical({"event": "uncaught_exception", "error": kind.__name__},
                                          exc_info=(kind, exc, tb))


__all__ = ["FORMATTERS", "REQUEST_ID", "JsonFormatter", "TextFormatter", "configure_logging"]
