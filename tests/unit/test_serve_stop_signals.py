"""Once stopping, SIGTERM and SIGINT are ignored to the end of the process, under either event loop."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import asyncio, signal, sys
from gateway.serve import _ignore_further_stops

def seen(sig):
    handler = signal.getsignal(sig)
    return {signal.SIG_IGN: "ignored", signal.SIG_DFL: "default"}.get(handler, "handled")

async def main():
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: None)
    before = seen(signal.SIGTERM)
    _ignore_further_stops(loop)
    return before, seen(signal.SIGTERM), seen(signal.SIGINT)

if sys.argv[1] == "uvloop":
    import uvloop
    run = uvloop.run
else:
    run = asyncio.run
print(*run(main()), seen(signal.SIGTERM), seen(signal.SIGINT))
"""


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_stop_signals_stay_ignored_after_the_loop_closes(loop: str) -> None:
    """The loop's handler, then ignored while it runs, and still ignored once it has closed (where a
    loop that restores the default action would let a late SIGTERM end the process as killed)."""
    out = subprocess.run([sys.executable, "-c", SCRIPT, loop], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["handled", "ignored", "ignored", "ignored", "ignored"]
