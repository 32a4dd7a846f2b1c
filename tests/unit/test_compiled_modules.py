"""The modules the compiled build compiles avoid what mypyc (the release pyproject.toml pins) gets wrong.

Two shapes of async code run right in CPython and wrong once compiled: the
exception in flight is lost when a coroutine suspends inside an ``except``
block and then re-raises it with a bare ``raise``, or inside an ``async
with`` whose ``__aexit__`` awaits while an exception leaves the block. The
task is then woken with "TypeError: invalid exception object", logged as an
error of the event loop, and whoever awaited it waits for ever (seen in
tests/e2e/test_200.py's failure-limiter cases, which hung on the compiled
build). A named re-raise (``except Denied as denied: ... raise denied``)
is compiled right; an ``async with`` over an exit that never suspends
(``asyncio.timeout``, a semaphore's release) is too. This checks the
compiled modules, as pyproject.toml lists them, for both shapes.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# `async with` targets whose __aexit__ never suspends: asyncio.timeout(...) (its exit only reschedules),
# the verification slots (an asyncio.Semaphore) and the recorder's flush lock (an asyncio.Lock), whose
# exits are release().
NON_SUSPENDING_EXITS = {"asyncio.timeout", "self._slots", "self._flush_lock"}


def compiled_modules() -> list[Path]:
    hook = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"][
        "hooks"]["mypyc"]
    excluded = {ROOT / pattern.lstrip("/") for pattern in hook["exclude"]}
    found: list[Path] = []
    for pattern in hook["include"]:
        path = ROOT / pattern.lstrip("/")
        found += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return [path for path in found if path not in excluded]


def misshapen(source: str) -> list[str]:
    """Each suspension mypyc cannot carry an exception across, as "line: what"."""
    problems: list[str] = []
    for function in ast.walk(ast.parse(source)):
        if not isinstance(function, ast.AsyncFunctionDef):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.Try):
                for handler in node.handlers:
                    inside = [n for statement in handler.body for n in ast.walk(statement)]
                    suspends = any(isinstance(n, (ast.Await, ast.AsyncWith, ast.AsyncFor)) for n in inside)
                    if suspends and any(isinstance(n, ast.Raise) and n.exc is None for n in inside):
                        problems.append(f"{handler.lineno}: bare raise after an await in an except block")
            elif isinstance(node, ast.AsyncWith):
                for item in node.items:
                    target = item.context_expr
                    name = ast.unparse(target.func if isinstance(target, ast.Call) else target)
                    if name not in NON_SUSPENDING_EXITS:
                        problems.append(f"{node.lineno}: async with {name} (its exit may await)")
    return problems


def test_the_hook_compiles_the_request_path() -> None:
    names = {path.relative_to(ROOT).as_posix() for path in compiled_modules()}
    assert {"gateway/dataplane/http1.py", "gateway/dataplane/forward.py", "gateway/pipeline/authenticate.py",
            "gateway/dataplane/proxy.py"} <= names
    # the cache MAC and redaction; stage 9's buffers and the rows their flush writes; the redis policy's connection
    assert {"gateway/keys.py", "gateway/recorder.py", "gateway/store/rows.py", "gateway/cache/resp.py"} <= names
    assert "gateway/pipeline/lookup.py" not in names and "gateway/dataplane/client_gone.py" not in names


@pytest.mark.parametrize("module", compiled_modules(), ids=lambda path: path.relative_to(ROOT).as_posix())
def test_no_exception_is_carried_across_a_suspension_mypyc_loses_it_at(module: Path) -> None:
    assert misshapen(module.read_text()) == []


@pytest.mark.parametrize(("source", "found"), [
    ("async def f():\n    try:\n        await g()\n    except E:\n        await h()\n        raise\n",
     ["4: bare raise after an await in an except block"]),
    ("async def f():\n    try:\n        await g()\n    except E as e:\n        await h()\n        raise e\n", []),
    ("async def f():\n    try:\n        await g()\n    except E:\n        raise\n", []),
    ("async def f():\n    async with store.read() as tx:\n        await tx.get()\n",
     ["2: async with store.read (its exit may await)"]),
    ("async def f():\n    async with asyncio.timeout(1):\n        await g()\n", []),
], ids=["bare-raise-after-await", "named-raise", "bare-raise-without-await", "async-with-store", "timeout"])
def test_the_check_finds_what_it_looks_for(source: str, found: list[str]) -> None:
    assert misshapen(source) == found
