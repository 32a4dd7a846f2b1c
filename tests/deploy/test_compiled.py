"""The compiled build (pyproject.toml's mypyc hook) behaves as the pure-Python one does.

The build compiles the request path to C with mypyc, which also checks at run
time every type the code declares: a value of another type than its
annotation says (a list where a tuple is declared) is a TypeError there and
nothing in pure Python. So the request-path tests run again, against a wheel
built as the Dockerfile builds the image (``HATCH_BUILD_HOOK_ENABLE_MYPYC=true
pip install .``), installed in a virtualenv of its own: the tests are copied
to a folder without ``gateway/`` beside them, so ``import gateway`` there
finds the compiled package, and the ``keygate`` the end-to-end tests start is
that virtualenv's.

One test, about eight minutes here: the build (mypy and a C compiler, a
minute and a half) and the 1,500 tests below. It needs gcc and Python's headers, which a
machine of this kind has; missing, the build fails and so does this test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# The tests of what the compiled modules do: the HTTP/1.1 listener and the upstream pool, the pipeline
# stages, the proxy against both stores and Redis, and end to end (a real `keygate serve`, run from the
# compiled build) every status of the proxy and authz listeners, the HTTP corpus and fuzzing, flow
# control, draining, the access log and the metrics the request path feeds, and the key cache.
SUITES = [
    "tests/unit/dataplane",
    "tests/unit/pipeline",
    "tests/unit/cache",
    "tests/unit/test_keys.py",
    "tests/contract/test_recorder.py",
    "tests/unit/store/test_sqlite_time.py",
    "tests/contract/dataplane",
    "tests/contract/pipeline",
    "tests/contract/cache",
    "tests/e2e/test_200.py",
    "tests/e2e/test_400_403_target.py",
    "tests/e2e/test_400_413.py",
    "tests/e2e/test_401.py",
    "tests/e2e/test_403.py",
    "tests/e2e/test_408_414_431_505.py",
    "tests/e2e/test_429.py",
    "tests/e2e/test_499.py",
    "tests/e2e/test_502_504.py",
    "tests/e2e/test_503.py",
    "tests/e2e/test_authz.py",
    "tests/e2e/test_http_corpus.py",
    "tests/e2e/test_smuggling_via_connection.py",
    "tests/e2e/test_upstream_misbehaving.py",
    "tests/e2e/test_client_not_reading_pipelined.py",
    "tests/e2e/test_client_not_reading_response.py",
    "tests/e2e/test_dataplane_role.py",
    "tests/e2e/test_exchange_requests.py",
    "tests/e2e/test_http_fuzz.py",
    "tests/e2e/test_lifecycle.py",
    "tests/e2e/test_logs.py",
    "tests/e2e/test_metrics.py",
    "tests/e2e/test_server_header.py",
    # Plain-Python callers of the compiled stages: the identity exchange, whoami and self-revoke, and the
    # canaries and idle keys of every listener.
    "tests/e2e/test_exchange.py",
    "tests/e2e/test_hygiene.py",
]
# What those tests import beyond Keygate's own dependencies (pyproject.toml's test extra, in part).
TEST_PACKAGES = ["pytest>=8.3", "pytest-aiohttp>=1.1", "pytest-asyncio>=0.24"]


def _project_copy(dest: Path) -> Path:
    """What the wheel is built from, as the Dockerfile copies it: never this checkout itself, where the
    build would leave its .so files beside the sources (and shadow them for an editable install)."""
    dest.mkdir()
    shutil.copytree(ROOT / "gateway", dest / "gateway",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.c"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    return dest


def _tests_copy(dest: Path) -> Path:
    """The tests and pytest's settings, with no ``gateway/`` beside them."""
    dest.mkdir()
    shutil.copytree(ROOT / "tests", dest / "tests",
                    ignore=shutil.ignore_patterns("__pycache__", "node_modules", ".pytest_cache"))
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def test_the_request_path_tests_pass_on_the_compiled_build(tmp_path: Path) -> None:
    source = _project_copy(tmp_path / "source")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    env = {**os.environ, "HATCH_BUILD_HOOK_ENABLE_MYPYC": "true", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    built = subprocess.run([python, "-m", "pip", "install", "-q", str(source), *TEST_PACKAGES],
                           env=env, capture_output=True, text=True, timeout=1200)
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]

    run = _tests_copy(tmp_path / "run")
    where = subprocess.run(
        [python, "-c", "import gateway.dataplane.http1 as h, gateway.pipeline.authenticate as a; "
                       "print(h.__file__); print(a.__file__)"],
        cwd=run, env=env, capture_output=True, text=True, timeout=60, check=True)
    compiled = where.stdout.split()
    assert len(compiled) == 2 and all(path.endswith(".so") and str(venv) in path for path in compiled), where.stdout

    env.pop("HATCH_BUILD_HOOK_ENABLE_MYPYC")
    tested = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SUITES],
                            cwd=run, env=env, capture_output=True, text=True, timeout=1500)
    summary = tested.stdout.strip().splitlines()[-1] if tested.stdout.strip() else ""
    assert tested.returncode == 0, tested.stdout[-12000:] + tested.stderr[-4000:]
    assert " passed" in summary and "skipped" not in summary, summary
