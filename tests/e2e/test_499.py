"""499 (recorded, never sent): clients that go away while their response is being written."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from .harness import Keygate, stored_requests

def download_then_hang_up(port: int, key: str, path: str, read: int, stall: float) -> int:
    """Start a download, read ``read`` bytes of it, stop reading for ``stall`` s, close; returns the bytes read."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n".encode())
        got = 0
        while got < read:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += len(chunk)
        time.sleep(stall)
        return got

# Closing while the gateway is writing, and closing while it waits for a client that stopped reading
# (aiohttp raises a different error for each).
@pytest.mark.parametrize("stall", [0.0, 0.5], ids=["closes-while-reading", "stops-reading-then-closes"])
async def test_client_hanging_up_mid_download_is_recorded_as_closed(gateway: Keygate, stall: float) -> None:
    """A client that closes mid-download is recorded as allowed with status 499, and nothing is logged as a fault."""
    record, key = await gateway.key(name="ci", role="admin")
    log_before = len(gateway.log())
    got = await asyncio.to_thread(
        download_then_hang_up, gateway.proxy_port, key, f"/bytes/{1 << 30}", 1 << 20, stall,
    )
    assert got >= 1 << 20  # the response really was streaming when the client went away
    [request] = await stored_requests(gateway, record.id)
    assert (request.path, request.decision, request.status, request.reason) == (f"/bytes/{1 << 30}", "allowed", 499, None)
    logged = gateway.log()[log_before:]
    assert "Traceback" not in logged and "internal_error" not in logged, logged
    assert gateway.process is not None and gateway.process.poll() is None
