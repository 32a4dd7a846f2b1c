"""Exact bytes over a raw connection, for the tests of what Keygate refuses before parsing a request whole."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Response:
    status: int
    head: bytes
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def read_response(reader: asyncio.StreamReader, timeout: float = 5.0) -> Response | None:
    """The next response on the connection (its body read by Content-Length), or None at EOF."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    except asyncio.IncompleteReadError as exc:
        assert not exc.partial, f"connection closed inside a response head: {exc.partial!r}"
        return None
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = await asyncio.wait_for(reader.readexactly(length), timeout)
    return Response(int(head.split(b" ", 2)[1]), head, body)


async def until_last_chunk(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    """What arrives until a chunked answer's last chunk (the connection kept open) or the connection's end
    (a close or a reset: a body cut short)."""
    received = b""
    try:
        async with asyncio.timeout(timeout):
            while not received.endswith(b"\r\n0\r\n\r\n") and (data := await reader.read(65536)):
                received += data
    except ConnectionResetError:
        pass
    return received


async def closed_by_server(reader: asyncio.StreamReader, timeout: float) -> bool:
    """Whether the server closes the connection within ``timeout`` seconds (anything it sends is skipped)."""
    try:
        async with asyncio.timeout(timeout):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


async def exchange(port: int, payload: bytes | list[bytes], timeout: float = 5.0) -> tuple[list[Response], bool]:
    """Send ``payload`` (a list: pieces 0.1 s apart, each in a read of its own); return the
    responses that came back and whether the server then closed the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    responses: list[Response] = []
    # Sent while reading: a server that refuses early may stop reading long before the payload is sent.
    sending = asyncio.create_task(_send(writer, [payload] if isinstance(payload, bytes) else payload))
    try:
        while (response := await read_response(reader, timeout)) is not None:
            responses.append(response)
    except ConnectionResetError:
        pass  # closed too, only less politely
    except TimeoutError:
        return responses, False
    finally:
        sending.cancel()
        writer.close()
    return responses, True


async def _send(writer: asyncio.StreamWriter, pieces: list[bytes]) -> None:
    try:
        for i, piece in enumerate(pieces):
            if i:
                await asyncio.sleep(0.1)
            writer.write(piece)
            await writer.drain()
    except ConnectionError:
        pass


def pieces(data: bytes, size: int) -> list[bytes]:
    """``data`` cut into pieces of ``size`` bytes."""
    return [data[i:i + size] for i in range(0, len(data), size)]
