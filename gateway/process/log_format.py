"""Logging: one JSON line per event on stderr; keys appear only as their id."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        try:
            fields = json.loads(message) if message.startswith("{") else {"message": message}
        except ValueError:
            fields = {"message": message}
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat().replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            **fields,
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's own access logger is replaced by ours (off unless enabled).
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # The change watcher reports store outages once, as JSON; asyncpg's own
    # reconnect attempts would repeat them with tracebacks.
    logging.getLogger("asyncpg.pool").setLevel(logging.ERROR)
