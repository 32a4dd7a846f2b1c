"""Missing Chromium: a clear failure in CI, a skip on a developer's machine, never a silent pass."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
A_BROWSER_TEST = "tests/browser/test_page.py::test_sign_in_page_loads_only_its_own_files_under_the_csp"


def run_without_chromium(ci: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    # Only the virtualenv's own scripts: no chromium, no chromedriver.
    env["PATH"] = str(Path(sys.executable).parent)
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", A_BROWSER_TEST],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("ci", ["true", "1"])
def test_ci_fails_when_chromium_is_missing(ci: str) -> None:
    """With CI set, a browser test errors out naming what to install."""
    done = run_without_chromium(ci)
    assert done.returncode == 1, done.stdout
    assert "1 error" in done.stdout and "scripts/test" in done.stdout


def test_a_developer_run_skips_when_chromium_is_missing() -> None:
    """Without CI, a browser test is skipped with the reason."""
    done = run_without_chromium(None)
    assert done.returncode == 0, done.stdout
    assert "1 skipped" in done.stdout and "chromium" in done.stdout
