"""The CPU cost of one access-log line: Keygate's stdlib-logging formatters against structlog.

Run from the repository root::

    .venv/bin/python tests/perf/log_cost.py [--lines 50000] [--rounds 5] [--json results.json]

A few seconds. Not part of the test suite: pytest does not collect
``tests/perf``. The structlog rows need ``pip install structlog`` in the
venv (Keygate does not depend on it); without it they are left out and
the output says so.

Every way writes the same access line (the 16 fields of
``gateway/dataplane/access_log.py``, the request id from the context, as
on a request's task) to ``/dev/null``, one write and flush per line, as a
stderr handler does:

- ``off``: ``proxy.access_log = false``: the one boolean test a request pays;
- ``keygate_json`` / ``keygate_text``: ``log_access`` itself through
  ``configure_logging`` (stdlib ``logging``, ``JsonFormatter`` /
  ``TextFormatter``), as ``keygate serve`` runs it;
- ``structlog_native``: structlog's own pipeline, as fast as it is
  configured (``merge_contextvars``, ``add_log_level``, an ISO UTC
  ``TimeStamper``, ``JSONRenderer``, ``WriteLoggerFactory``, the logger
  cached on first use); it sees only what is logged through structlog, so
  library records (aiohttp, asyncio) would still need the stdlib path;
- ``structlog_stdlib``: structlog rendering through stdlib ``logging``
  (``ProcessorFormatter``), the set-up that also formats library records,
  i.e. what replacing Keygate's formatter with structlog would mean.

The ways take turns within each round. It reports each one's best round's CPU time (``time.process_time``) per line in
microseconds, and that as a share of a proxied request (96.2 us/req,
``keygate_1w`` in README's benchmark).
"""

from __future__ import annotations

import argparse
import contextvars
import io
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gateway.config.schema import UpstreamSettings  # noqa: E402
from gateway.dataplane.access_log import log_access  # noqa: E402
from gateway.keys import KeyParser  # noqa: E402
from gateway.models import RequestRecord  # noqa: E402
from gateway.pipeline.scope import Target  # noqa: E402
from gateway.process.log_format import REQUEST_ID, configure_logging  # noqa: E402

KEYGATE_US_PER_REQUEST = 96.2  # README, "Benchmark": keygate_1w
REQUEST_ID_VALUE = "5f0c6d4e2b1a49c8a7e3d2f1b0c9a8e7"

RECORD = RequestRecord(datetime.now(UTC), "kg_TuUeSTOROzXk", "POST", "/api/servers/prod-1/deploy", "prod-1",
                       "deploy", "allowed", 200, "10.1.2.3", 1.234, None)
TARGET = Target(UpstreamSettings(name="app", url="http://127.0.0.1:8080"), "prod-1", "deploy", False)
REQUEST = SimpleNamespace(body=SimpleNamespace(received=123), bytes_out=744)


def _fields() -> dict[str, object]:
    """The access line's fields as log_access makes them (for structlog, which takes them as keywords)."""
    return {
        "listener": "proxy", "request_id": REQUEST_ID_VALUE, "key_id": RECORD.key_id, "client": RECORD.client_ip,
        "method": RECORD.method, "path": RECORD.path, "server": RECORD.server, "operation": RECORD.operation,
        "upstream": "app", "status": RECORD.status, "decision": RECORD.decision, "reason": RECORD.reason,
        "bytes_in": 123, "bytes_out": 744, "duration_ms": RECORD.duration_ms,
    }


def _sink() -> io.TextIOWrapper:
    return open(os.devnull, "w")  # noqa: SIM115 (kept open for the run)


def way_off() -> Callable[[], None]:
    enabled = False

    def line() -> None:
        if enabled:
            raise AssertionError("unreachable")
    return line


def way_keygate(log_format: str) -> Callable[[], None]:
    sink = _sink()
    sys.stderr, saved = sink, sys.stderr
    try:
        configure_logging("info", log_format, redact=KeyParser(["kg_", "kga_"]).redact_text)
    finally:
        sys.stderr = saved

    def line() -> None:
        log_access("proxy", REQUEST_ID_VALUE, REQUEST, RECORD, TARGET)  # type: ignore[arg-type]
    return line


def way_structlog_native() -> Callable[[], None]:
    import structlog
    structlog.reset_defaults()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.WriteLoggerFactory(file=_sink()),
        cache_logger_on_first_use=True,
    )
    log = structlog.get_logger("keygate.access")
    fields = _fields()
    fields.pop("request_id")
    structlog.contextvars.bind_contextvars(request_id=REQUEST_ID_VALUE)

    def line() -> None:
        # As log_access would build them per request: a new dict each time.
        log.info("request", **dict(fields))
    return line


def way_structlog_stdlib() -> Callable[[], None]:
    import structlog
    structlog.reset_defaults()
    handler = logging.StreamHandler(_sink())
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, structlog.processors.JSONRenderer()],
        foreign_pre_chain=[structlog.stdlib.add_log_level, structlog.processors.TimeStamper(fmt="iso", utc=True)],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    log = structlog.get_logger("keygate.access")
    fields = _fields()
    fields.pop("request_id")
    structlog.contextvars.bind_contextvars(request_id=REQUEST_ID_VALUE)

    def line() -> None:
        log.info("request", **dict(fields))
    return line


def measure(ways: dict[str, Callable[[], Callable[[], None]]], lines: int, rounds: int) -> dict[str, float]:
    """Each way's best round, in CPU microseconds per line; the ways take turns in every round, so a busy
    machine slows them alike. Run inside a context holding the request id (as a request's task)."""
    def run() -> dict[str, float]:
        REQUEST_ID.set(REQUEST_ID_VALUE)
        best = dict.fromkeys(ways, float("inf"))
        for _ in range(rounds):
            for name, make in ways.items():
                line = make()  # configured afresh: the ways share the root logger
                for _ in range(min(lines, 1000)):
                    line()  # warm caches (structlog's logger, the formatter's clock)
                started = time.process_time()
                for _ in range(lines):
                    line()
                best[name] = min(best[name], (time.process_time() - started) / lines * 1e6)
        return best
    return contextvars.copy_context().run(run)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args()
    ways: dict[str, Callable[[], Callable[[], None]]] = {
        "off": way_off,
        "keygate_json": lambda: way_keygate("json"),
        "keygate_text": lambda: way_keygate("text"),
    }
    try:
        import structlog
        ways["structlog_native"] = way_structlog_native
        ways["structlog_stdlib"] = way_structlog_stdlib
        structlog_version = structlog.__version__
    except ImportError:
        structlog_version = None
        print("structlog is not installed (pip install structlog): its rows are left out", file=sys.stderr)
    results = measure(ways, args.lines, args.rounds)
    print(f"{'way':<18} {'us/line':>8} {'% of a request':>15}   ({args.lines} lines x {args.rounds} rounds, "
          f"best; a request = {KEYGATE_US_PER_REQUEST} us)")
    for name, cost in results.items():
        print(f"{name:<18} {cost:8.2f} {cost / KEYGATE_US_PER_REQUEST * 100:14.1f}%")
    if args.json:
        args.json.write_text(json.dumps({"us_per_line": results, "structlog": structlog_version,
                                         "python": sys.version.split()[0]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
