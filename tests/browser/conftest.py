"""Browser fixtures: a real ``keygate serve`` in front of a real upstream, and headless Chromium.

Chromium and ChromeDriver are Debian's packages, installed by ``scripts/test``.
Without them these tests skip on a developer's machine and fail in CI.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import upstream  # noqa: F401 -- the same real upstream as the end-to-end tests
from tests.e2e.harness import KEYGATE, Keygate, Upstream, clean_env

from .browser import Browser, browser_binaries, in_ci


@pytest.fixture(scope="session")
def binaries() -> tuple[str, str]:
    found = browser_binaries()
    if isinstance(found, str):
        if in_ci():
            pytest.fail(found)
        pytest.skip(found)
    return found


@pytest.fixture(scope="session")
def screenshots(pytestconfig: pytest.Config) -> Path:
    """The test run's output folder for screenshots (gitignored)."""
    folder = pytestconfig.rootpath / "test-output" / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def gateway(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keygate]:
    keygate = Keygate(tmp_path_factory.mktemp("keygate-ui"), upstream.url).start()
    yield keygate
    keygate.stop()


@dataclass(frozen=True)
class AdminKey:
    id: str
    key: str


def cli(gateway: Keygate, *args: str) -> str:
    """Runs the management CLI on the gateway's store, as an operator would; its stdout."""
    done = subprocess.run([KEYGATE, "--config", str(gateway.config_path), *args], env=clean_env(),
                          check=True, capture_output=True, timeout=60)
    return done.stdout.decode()


@pytest.fixture(scope="module")
def admin_key(gateway: Keygate) -> AdminKey:
    """The first admin key, bootstrapped with the CLI (no server involved).

    Every page load is a few admin API calls and a module signs in many times: a
    generous rate limit keeps the default 100/minute out of what these tests prove.
    """
    record = json.loads(cli(gateway, "keys", "create", "--name", "ui-admin", "--role", "admin",
                            "--server", "admin", "--rate-limit", "6000/minute", "--json"))
    return AdminKey(record["id"], record["key"])


@pytest.fixture
def browser(binaries: tuple[str, str], gateway: Keygate, screenshots: Path, tmp_path: Path) -> Iterator[Browser]:
    chromium, chromedriver = binaries
    session = Browser.start(chromium, chromedriver, tmp_path / "profile", gateway.admin_url, screenshots)
    try:
        yield session
    finally:
        session.quit()
