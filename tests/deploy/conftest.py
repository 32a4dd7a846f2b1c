"""Fixtures for the keygate-login tests: its two HTTP peers and a runner for its steps."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from .actions_runner import Runner, node_binary
from .login_peers import ACTION_DIR, IdTokenService, KeygateStandIn, serve


@pytest.fixture
async def github() -> AsyncIterator[IdTokenService]:
    """The stand-in for GitHub's ID token service."""
    service = IdTokenService()
    runner, service.url = await serve([web.get("/_apis/token", service.handle)])
    try:
        yield service
    finally:
        await runner.cleanup()


@pytest.fixture
async def keygate() -> AsyncIterator[KeygateStandIn]:
    """The recording stand-in for Keygate's exchange, revoke and one guarded API route."""
    stand_in = KeygateStandIn()
    runner, stand_in.url = await serve(stand_in.routes())
    try:
        yield stand_in
    finally:
        await runner.cleanup()


@pytest.fixture
def action(tmp_path: Path) -> Runner:
    """keygate-login's steps, run by the machine's node in the test's folder."""
    return Runner(ACTION_DIR, tmp_path, node_binary())
