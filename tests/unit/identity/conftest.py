"""Fixtures of the identity tests: a running test issuer, injected clocks, the key cache."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime

import pytest

from gateway.identity.jwks import SigningKeys

from ...clocks import WALL_START, FakeClock
from ...identity_issuer import OidcIssuer


@pytest.fixture
async def issuer() -> AsyncIterator[OidcIssuer]:
    async with OidcIssuer() as running:
        yield running


@pytest.fixture
def monotonic() -> FakeClock[float]:
    """The key cache's clock: TTLs, the refetch interval, the retry delay."""
    return FakeClock()


@pytest.fixture
def wall() -> FakeClock[datetime]:
    """The verifier's clock: exp, nbf, iat. WALL_START is weeks from the machine's date, so a check made
    against the machine's clock instead would fail the tokens minted at it."""
    return FakeClock(WALL_START)


@pytest.fixture
async def keys(monotonic: FakeClock[float]) -> AsyncIterator[SigningKeys]:
    signing_keys = SigningKeys(clock=monotonic, timeout=2.0)
    try:
        yield signing_keys
    finally:
        await signing_keys.close()

