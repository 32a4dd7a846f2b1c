"""The admin API's request id: one per request, on its problem and on every record written meanwhile."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Iterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.admin.problems import problem_middleware, request_id_middleware
from gateway.process.log_format import JsonFormatter

Client = TestClient[web.Request, web.Application]


class Lines(logging.Handler):
    """Formats each record as keygate serve would, while it is written (when the request's id is set)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self.lines: list[dict[str, object]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler = Lines()
    logger = logging.getLogger("keygate.admin")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


@pytest.fixture
async def client(aiohttp_client: Callable[[web.Application], Awaitable[Client]]) -> Client:
    async def broken(_request: web.Request) -> web.Response:
        raise RuntimeError("a bug")

    async def fine(_request: web.Request) -> web.Response:
        return web.json_response({"ok": True}, status=201)

    async def moved(_request: web.Request) -> web.Response:
        raise web.HTTPPermanentRedirect("/fine")

    app = web.Application(middlewares=[request_id_middleware, problem_middleware])
    app.router.add_get("/broken", broken)
    app.router.add_get("/fine", fine)
    app.router.add_get("/moved", moved)
    return await aiohttp_client(app)


@pytest.mark.parametrize(("sent", "expected"), [({"X-Request-Id": "admin-2"}, "admin-2"), ({}, None)])
async def test_every_answer_carries_its_request_id(client: Client, sent: dict[str, str], expected: str | None) -> None:
    """A success, a 404 of the router and a redirect raised as aiohttp's own answer carry X-Request-Id, the
    client's if sane."""
    for path, status in (("/fine", 201), ("/nowhere", 404), ("/moved", 308)):
        async with client.get(path, headers=sent, allow_redirects=False) as r:
            assert r.status == status
            assert r.headers["X-Request-Id"] == (expected or r.headers["X-Request-Id"]) and r.headers["X-Request-Id"]


@pytest.mark.parametrize(("sent", "expected"), [({"X-Request-Id": "admin-1"}, "admin-1"), ({}, None)])
async def test_a_bugs_record_names_the_request_its_problem_names(client: Client, lines: Lines,
                                                                 sent: dict[str, str], expected: str | None) -> None:
    """The 500's instance, its X-Request-Id and the admin_internal_error line carry one id (the client's if sane)."""
    seen = []
    for _ in range(2):  # two requests on one connection: each its own id
        async with client.get("/broken", headers=sent) as r:
            problem = await r.json(content_type=None)
            assert r.status == 500
            request_id = r.headers["X-Request-Id"]
        assert problem["instance"] == f"urn:keygate:request:{request_id}"
        assert expected is None or request_id == expected
        line = lines.lines.pop()
        assert (line["event"], line["request_id"]) == ("admin_internal_error", request_id)
        seen.append(request_id)
    assert len(set(seen)) == (1 if expected else 2)
