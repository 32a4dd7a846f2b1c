"""Scale fixtures: one upstream per module; fleets are started by each test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ..e2e.harness import Upstream


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    yield server
    server.stop()
