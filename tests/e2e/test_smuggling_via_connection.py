"""``Connection: Content-Length`` cannot remove the framing of a forwarded body: Keygate always writes its own.

forward.upstream_request_headers drops every header the client's ``Connection`` header names, and
Forwarder.forward relies on the client's own ``Content-Length`` line to frame a length-delimited body
(it adds only ``Transfer-Encoding: chunked`` for chunked ones). Naming Content-Length in Connection
sends the body unframed: the upstream reads it as the next request on the connection, which Keygate
never judged, with identity headers the client wrote itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from .harness import Keygate
from .rawhttp import read_response
from .scripted_upstream import ScriptedUpstream


@pytest.fixture(scope="module")
def kg(scripted: ScriptedUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keygate]:
    keygate = Keygate(tmp_path_factory.mktemp("r13smuggle"), scripted.url,
                      config='[[routes]]\npath = "/admin/*"\noperation = "admin"\n').start()
    yield keygate
    keygate.stop()


@pytest.mark.parametrize("connection", ["Content-Length", "keep-alive, content-length"])
async def test_connection_naming_content_length_cannot_unframe_the_body(
    kg: Keygate, scripted: ScriptedUpstream, connection: str,
) -> None:
    record, key = await kg.key(name="low", operations=["write"])  # may POST to the catch-all; not /admin
    smuggled = b"GET /admin/delete-everything HTTP/1.1\r\nHost: a\r\nX-Keygate-Key-Id: kg_forged_admin\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", kg.proxy_port)
    writer.write(b"POST /harmless HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer %s\r\nConnection: %s\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (key.encode(), connection.encode(), len(smuggled), smuggled))
    response = await read_response(reader, 5)
    writer.close()
    assert response is not None and response.status == 200
    await asyncio.sleep(0.5)
    seen = [(s.method, s.path, s.headers.get("x-keygate-key-id"), s.body) for s in scripted.seen]
    assert ("POST", "/harmless", record.id, smuggled) in seen, seen
    assert not [s for s in seen if s[1].startswith("/admin")], f"a request Keygate never judged reached the upstream: {seen}"
