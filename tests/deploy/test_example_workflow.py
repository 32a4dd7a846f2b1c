"""deploy/github-actions/example-workflow.yml, its job run step by step as the runner would.

keygate-login's main step (node), the deploy step's script (bash, as GitHub runs a ``run:``
step) with what main exported, then the post step, against the stand-ins of
tests/deploy/login_peers.py. The ``${{ }}`` expressions the job uses are filled in from the
job's env and the login step's outputs; any other expression fails the test. The same job
against a real ``keygate serve`` is added when the exchange endpoint lands.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from .actions_runner import Runner, StepResult, assert_never_printed
from .login_peers import ACTION_DIR, IdTokenService, KeygateStandIn, oidc_env

GITHUB_ACTIONS = ACTION_DIR.parent
WORKFLOW = GITHUB_ACTIONS / "example-workflow.yml"
# Where README.md tells people to copy the action, which the workflow's `uses:` names.
COPIED_TO = "./.github/actions/keygate-login"
SHA = "a7c9e1b2" * 5


def job() -> dict[str, Any]:
    (only,) = yaml.safe_load(WORKFLOW.read_text())["jobs"].values()
    return only


def step(key: str, value: str) -> dict[str, Any]:
    (found,) = [s for s in job()["steps"] if s.get(key) == value]
    return found


def fill(text: str, values: dict[str, str]) -> str:
    """``${{ expr }}`` replaced from ``values``; an expression the test does not know is an error."""
    def one(match: re.Match[str]) -> str:
        assert match.group(1) in values, f"unknown expression {match.group(0)}"
        return values[match.group(1)]
    return re.sub(r"\$\{\{\s*(.*?)\s*\}\}", one, text)


def test_the_workflow_asks_for_an_id_token_and_keeps_no_key() -> None:
    """id-token: write and contents: read only; the action from where the README copies it; no secret in sight."""
    workflow = yaml.safe_load(WORKFLOW.read_text())
    assert workflow["permissions"] == {"id-token": "write", "contents": "read"}
    assert "permissions" not in job()
    login = step("uses", COPIED_TO)
    assert set(login["with"]) <= set(yaml.safe_load((ACTION_DIR / "action.yml").read_text())["inputs"])
    assert COPIED_TO.removeprefix("./") in (GITHUB_ACTIONS / "README.md").read_text()
    assert "secrets." not in WORKFLOW.read_text()
    for s in job()["steps"]:
        # Values reach scripts through env:, never as ${{ }} pasted into the shell text.
        assert "${{" not in s.get("run", "")


async def run_deploy_step(folder: Path, keygate: KeygateStandIn, main: StepResult) -> tuple[int, str]:
    """The deploy step's script under bash, with the job's env, the step's env and what main exported."""
    deploy = next(s for s in job()["steps"] if "run" in s)
    values = {"env.KEYGATE_URL": keygate.url, **{f"steps.keygate.outputs.{k}": v for k, v in main.outputs.items()}}
    env = {"PATH": os.environ["PATH"], "HOME": str(folder), **job()["env"], "KEYGATE_URL": keygate.url,
           **{name: fill(str(value), values) for name, value in deploy.get("env", {}).items()},
           **main.env, "GITHUB_SHA": SHA, "GITHUB_RUN_ID": "1234", "GITHUB_RUN_ATTEMPT": "1"}
    script = folder / "deploy.sh"
    script.write_text(deploy["run"])
    process = await asyncio.create_subprocess_exec(
        "bash", "--noprofile", "--norc", "-eo", "pipefail", str(script), cwd=folder, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, output.decode()


async def test_the_job_logs_in_calls_the_api_with_the_key_and_revokes_it(
    action: Runner, github: IdTokenService, keygate: KeygateStandIn,
) -> None:
    """Login exports the key, the deploy step sends it as Bearer, post revokes it: a second call is refused."""
    login = step("uses", COPIED_TO)
    inputs = {name: fill(str(value), {"env.KEYGATE_URL": keygate.url}) for name, value in login["with"].items()}
    main = await action.run("main", inputs=inputs, environ=oidc_env(github))
    assert main.returncode == 0, main.stdout
    ((key, key_id),) = keygate.keys.items()

    status, output = await run_deploy_step(action.folder, keygate, main)
    assert status == 0, output
    (call,) = keygate.api_calls
    assert call["path"] == "/api/servers/prod-1/deploy" and call["authorization"] == f"Bearer {key}"
    assert json.loads(call["body"]) == {"ref": SHA}
    assert f"deploying with Keygate key {key_id}" in output and "HTTP 200" in output
    assert key not in output

    post = await action.run("post", inputs=inputs, environ={}, state=main.state)
    assert post.returncode == 0 and keygate.revocations == [f"Bearer {key}"]
    assert_never_printed(post, key)
    status, output = await run_deploy_step(action.folder, keygate, main)
    assert status != 0 and "::error::deploy failed: HTTP 401" in output
