"""The forwarder's session sends exactly the headers it is given (plus Host), in order, and nothing of aiohttp's."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from gateway.dataplane.upstream_client import send, upstream_session


async def _echo_headers(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response({"headers": [[k.decode(), v.decode()] for k, v in request.raw_headers],
                              "body": body.decode()})


@pytest.fixture
async def server() -> AsyncIterator[TestServer]:
    """A real upstream that answers with the raw header lines it received, in order."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _echo_headers)
    running = TestServer(app, host="127.0.0.1")
    await running.start_server()
    yield running
    await running.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    made = upstream_session()
    yield made
    await made.close()


async def test_exactly_the_given_headers_go_upstream_in_order(server: TestServer,
                                                              session: aiohttp.ClientSession) -> None:
    given = CIMultiDict([("X-One", "1"), ("x-two", "2"), ("X-One", "again"), ("Via", "1.1 keygate")])
    async with session.get(server.make_url("/a?b=c"), headers=given) as r:
        seen = (await r.json())["headers"]
    host = f"127.0.0.1:{server.port}"
    # No User-Agent, Accept or Accept-Encoding invented; repeated names kept; Host first.
    assert seen == [["Host", host], ["X-One", "1"], ["x-two", "2"], ["X-One", "again"], ["Via", "1.1 keygate"]]


async def test_a_body_gets_its_framing_but_no_guessed_content_type(server: TestServer,
                                                                   session: aiohttp.ClientSession) -> None:
    async with session.post(server.make_url("/"), data=b"payload", headers=CIMultiDict()) as r:
        answer = await r.json()
    assert answer["body"] == "payload"
    assert [name.lower() for name, _ in answer["headers"]] == ["host", "content-length"]


async def test_headers_given_another_way_take_aiohttps_own_path(server: TestServer,
                                                                session: aiohttp.ClientSession) -> None:
    async with session.get(server.make_url("/"), headers={"Host": "example.test", "X-A": "1"}) as r:
        seen = (await r.json())["headers"]
    assert seen == [["Host", "example.test"], ["X-A", "1"]]


async def test_send_hands_each_task_its_own_headers_and_leaves_nothing_behind(
    server: TestServer, session: aiohttp.ClientSession,
) -> None:
    async def one(i: int) -> list[list[str]]:
        given = CIMultiDict([("X-Task", str(i)), ("X-Same", "s")])
        response = await send(session, "GET", server.make_url(f"/{i}"), given)
        try:
            return (await response.json())["headers"]
        finally:
            response.release()

    results = await asyncio.gather(*(one(i) for i in range(20)))
    host = f"127.0.0.1:{server.port}"
    assert results == [[["Host", host], ["X-Task", str(i)], ["X-Same", "s"]] for i in range(20)]
    # After send() returns, a plain request of the same task carries none of them.
    async with session.get(server.make_url("/plain")) as r:
        assert (await r.json())["headers"] == [["Host", host]]
    assert not session.headers  # send() relies on the session having no default headers
