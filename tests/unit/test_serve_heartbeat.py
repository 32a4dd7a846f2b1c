"""The supervisor's reading of a worker's heartbeat (its metrics snapshot's modification time)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.serve import _silent_for


class _Worker:
    def __init__(self, pid: int, alive: bool = True) -> None:
        self.pid, self._alive = pid, alive

    def is_alive(self) -> bool:
        return self._alive


@pytest.mark.parametrize(("beat_age", "born_age", "alive", "expected"), [
    (None, 60, True, None),     # no snapshot yet: still starting, not silent
    (5, 60, True, 5),           # beating 5 s ago
    (90, 60, True, None),       # a snapshot from before it was born: a dead worker's with the same pid
    (5, 60, False, None),       # exited: the restart path's business, not the heartbeat's
], ids=["starting", "beating", "pid-reused", "exited"])
def test_silent_for(tmp_path: Path, beat_age: float | None, born_age: float, alive: bool,
                    expected: float | None) -> None:
    now = time.time()
    if beat_age is not None:
        snapshot = tmp_path / "4242.json"
        snapshot.write_text("{}")
        os.utime(snapshot, (now - beat_age, now - beat_age))
    worker: Any = _Worker(4242, alive)
    silent = _silent_for(tmp_path, worker, now - born_age)
    if expected is None:
        assert silent is None
    else:
        assert silent == pytest.approx(expected, abs=1.0)
