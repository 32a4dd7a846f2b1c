"""Log lines: one JSON object (or one readable line) per record, the request's id on it, no key in it."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
from collections.abc import Iterator

import pytest

from gateway.keys import KeyParser, generate
from gateway.process.log_format import REQUEST_ID, JsonFormatter, TextFormatter, configure_logging

PARSER = KeyParser(["kg_", "kga_"])
KEY = generate("kg_").full
RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@pytest.fixture
def stderr(capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    """Stderr as the test writes it; the process's logging set up as it was before, after."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level, sys.excepthook
    yield capsys
    root.handlers[:], level, sys.excepthook = saved
    root.setLevel(level)
    logging.captureWarnings(False)


def lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().err.splitlines()


def record(msg: object, *args: object, name: str = "keygate.test", level: int = logging.INFO,
           exc_info: object = None) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args or None, exc_info)  # type: ignore[arg-type]


@pytest.mark.parametrize(("msg", "args", "expected"), [
    ({"event": "listening", "port": 8000}, (), {"event": "listening", "port": 8000}),
    ('{"event": "draining", "grace_seconds": 30}', (), {"event": "draining", "grace_seconds": 30}),
    ("Unclosed client session %r", ("<session>",), {"message": "Unclosed client session '<session>'"}),
    ("{not json", (), {"message": "{not json"}),
    ('["a list"]', (), {"message": '["a list"]'}),
])
def test_json_line_holds_the_standard_fields_then_the_events(msg: object, args: tuple[object, ...],
                                                             expected: dict[str, object]) -> None:
    """A record is one JSON object: time (RFC 3339 UTC), level, logger, then its fields or its message."""
    line = JsonFormatter().format(record(msg, *args))
    assert "\n" not in line
    fields = json.loads(line)
    assert RFC3339_UTC.fullmatch(fields.pop("time"))
    assert fields == {"level": "info", "logger": "keygate.test", **expected}


def test_a_field_named_like_a_standard_one_does_not_replace_it() -> None:
    """An event's own "level" field is kept beside the record's level, not over it."""
    fields = json.loads(JsonFormatter().format(record({"event": "x", "level": "mine"}, level=logging.WARNING)))
    assert (fields["level"], fields["field_level"]) == ("warning", "mine")


def test_an_exception_is_one_json_line_with_its_traceback() -> None:
    """A logged exception stays on its line: the traceback is the "exception" field."""
    try:
        raise ValueError("boom")
    except ValueError:
        line = JsonFormatter().format(record({"event": "failed"}, level=logging.ERROR, exc_info=sys.exc_info()))
    assert len(line.splitlines()) == 1
    fields = json.loads(line)
    assert fields["event"] == "failed"
    assert fields["exception"].startswith("Traceback (most recent call last):")
    assert fields["exception"].rstrip().endswith("ValueError: boom")


@pytest.mark.parametrize(("formatter", "request_id", "present"), [
    (JsonFormatter, "req-1", True),
    (JsonFormatter, None, False),
    (TextFormatter, "req-2", True),
    (TextFormatter, None, False),
])
def test_a_record_written_while_a_request_is_handled_names_it(formatter: type[JsonFormatter],
                                                               request_id: str | None, present: bool) -> None:
    """The request id of the task that wrote the record is on the line; outside a request there is none."""
    async def handle() -> str:
        if request_id is not None:
            REQUEST_ID.set(request_id)
        return formatter().format(record({"event": "canary_key_used"}))

    line = asyncio.run(handle())
    if formatter is JsonFormatter:
        assert json.loads(line).get("request_id") == request_id
    else:
        assert (f"request_id={request_id}" in line) is present
    assert REQUEST_ID.get() is None  # a request's id never leaks out of its task


@pytest.mark.parametrize(("formatter", "msg", "args"), [
    (JsonFormatter, "connection to %s failed", (f"http://u/?token={KEY}",)),
    (JsonFormatter, {"event": "x", "error": f"bad key {KEY}"}, ()),
    (JsonFormatter, {"event": "x", "url": "/a?k=" + KEY.replace("kg_", "kg%5F")}, ()),
    (JsonFormatter, {"event": "x", "details": {"headers": [["Authorization", f"Bearer {KEY}"]]}}, ()),
    (TextFormatter, "connection to %s failed", (f"http://u/?token={KEY}",)),
    (TextFormatter, {"event": "x", "error": f"bad key {KEY}"}, ()),
])
def test_no_key_reaches_a_line(formatter: type[JsonFormatter], msg: object, args: tuple[object, ...]) -> None:
    """A key in a message or field (percent-encoded too) is shown as its id only."""
    line = formatter(PARSER.redact_text).format(record(msg, *args))
    key_id = PARSER.parse(KEY).key_id
    assert KEY not in line and KEY[len(key_id):] not in line
    assert key_id in line


def test_no_key_reaches_a_traceback() -> None:
    """An exception whose message holds a key is logged with the key's id only."""
    try:
        raise RuntimeError(f"refused {KEY}")
    except RuntimeError:
        line = JsonFormatter(PARSER.redact_text).format(record("x", exc_info=sys.exc_info()))
    assert KEY not in line and PARSER.parse(KEY).key_id in json.loads(line)["exception"]


def test_text_line_reads_event_then_fields() -> None:
    """The text format: time, level, logger, event, then name=value (quoted when it has spaces)."""
    line = TextFormatter().format(record({"event": "request", "status": 200, "path": "/a b", "key_id": None}))
    stamp, rest = line.split(" ", 1)
    assert RFC3339_UTC.fullmatch(stamp)
    assert rest == 'INFO keygate.test request status=200 path="/a b"'


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_library_records_and_warnings_go_through_the_format(stderr: pytest.CaptureFixture[str], log_format: str) -> None:
    """Records of libraries (asyncio, aiohttp) and Python warnings are lines of the chosen format."""
    configure_logging("info", log_format)
    logging.getLogger("asyncio").warning("Executing %s took %.3f seconds", "<Task>", 0.25)
    import warnings
    warnings.warn("deprecated thing", DeprecationWarning, stacklevel=1)
    out = lines(stderr)
    assert len(out) == 2
    if log_format == "json":
        first, second = (json.loads(line) for line in out)
        assert (first["logger"], first["message"]) == ("asyncio", "Executing <Task> took 0.250 seconds")
        assert second["logger"] == "py.warnings" and "deprecated thing" in second["message"]
    else:
        assert out[0].split(" ", 1)[1] == "WARNING asyncio Executing <Task> took 0.250 seconds"


def test_an_uncaught_exception_is_one_json_line(stderr: pytest.CaptureFixture[str]) -> None:
    """What nothing caught is logged as one critical record, its traceback a field."""
    configure_logging("info", "json")
    try:
        raise KeyError("lost")
    except KeyError:
        sys.excepthook(*sys.exc_info())
    (line,) = lines(stderr)
    fields = json.loads(line)
    assert (fields["level"], fields["event"], fields["error"]) == ("critical", "uncaught_exception", "KeyError")
    assert "KeyError: 'lost'" in fields["exception"]


@pytest.mark.parametrize(("level", "written"), [("debug", 2), ("info", 1), ("warning", 0)])
def test_level_sets_the_least_severe_record_written(stderr: pytest.CaptureFixture[str], level: str, written: int) -> None:
    """log.level filters records below it."""
    configure_logging(level, "json")
    log = logging.getLogger("keygate.test")
    log.debug({"event": "a"})
    log.info({"event": "b"})
    assert len(lines(stderr)) == written
