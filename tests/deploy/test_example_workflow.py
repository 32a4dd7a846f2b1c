"""deploy/github-actions/example-workflow.yml, its job run step by step as the runner would.

keygate-login's main step (node), the deploy step's script (bash, as GitHub runs a ``run:``
step) with what main exported, then the post step, against a real ``keygate serve`` in front
of a real upstream, with a trust policy for the job's repository and environment. Only
GitHub's ID token service is a stand-in (tests/deploy/login_peers.py), its tokens signed by
an OIDC issuer run by the test that Keygate verifies them against. The ``${{ }}``
expressions the job uses are filled in from the job's env and the login step's outputs;
any other expression fails the test.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from tests.e2e.harness import Keygate
from tests.identity_issuer import OidcIssuer

from .actions_runner import Runner, StepResult, assert_never_printed
from .login_peers import ACTION_DIR, IdTokenService, claims_of, oidc_env, trust
from .test_keygate_login import audit_events

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


async def run_deploy_step(folder: Path, gateway: Keygate, main: StepResult) -> tuple[int, str]:
    """The deploy step's script under bash, with the job's env, the step's env and what main exported."""
    deploy = next(s for s in job()["steps"] if "run" in s)
    values = {"env.KEYGATE_URL": gateway.proxy_url,
              **{f"steps.keygate.outputs.{k}": v for k, v in main.outputs.items()}}
    env = {"PATH": os.environ["PATH"], "HOME": str(folder), **job()["env"], "KEYGATE_URL": gateway.proxy_url,
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
    action: Runner, github: IdTokenService, issuer: OidcIssuer, gateway: Keygate,
) -> None:
    """Login exports the key, the deploy step's call passes Keygate to the upstream, post revokes it: then 401.

    The trust policy is the README's for this job (repository acme/shop, environment production,
    operation deploy on server prod-1), its audience the action's default (the gateway URL).
    """
    await trust(gateway, issuer, conditions={"repository": "acme/shop", "environment": job()["environment"]},
                servers=[job()["env"]["SERVER"]])
    login = step("uses", COPIED_TO)
    inputs = {name: fill(str(value), {"env.KEYGATE_URL": gateway.proxy_url}) for name, value in login["with"].items()}
    main = await action.run("main", inputs=inputs, environ=oidc_env(github))
    assert main.returncode == 0, main.stdout + main.stderr
    key, key_id = main.env["KEYGATE_TOKEN"], main.outputs["key-id"]

    status, output = await run_deploy_step(action.folder, gateway, main)
    assert status == 0, output
    assert f"deploying with Keygate key {key_id}" in output and f"deployed {SHA} to prod-1 (HTTP 200)" in output
    # What the upstream received, as it echoes it: the deploy call with the job's body, and no key.
    echoed = json.loads(output.splitlines()[1])
    assert (echoed["method"], echoed["path"]) == ("POST", "/api/servers/prod-1/deploy")
    assert echoed["body_sha256"] == hashlib.sha256(json.dumps({"ref": SHA}).encode()).hexdigest()
    headers = {name.lower(): value for name, value in echoed["headers"]}
    assert headers["x-request-id"] == "gha-1234-1" and headers["x-keygate-key-id"] == key_id
    assert "authorization" not in headers
    assert key not in output
    (exchanged, details), = await audit_events(gateway, key_id)
    assert exchanged == "key.exchanged" and details["claims"]["run_id"] == claims_of(github.issued[0])["run_id"]

    post = await action.run("post", inputs=inputs, environ={}, state=main.state)
    assert post.returncode == 0 and f"Revoked Keygate key {key_id}" in post.lines
    assert_never_printed(post, key)
    status, output = await run_deploy_step(action.folder, gateway, main)
    assert status != 0 and "::error::deploy failed: HTTP 401" in output
    assert [a for a, _ in await audit_events(gateway, key_id)] == ["key.exchanged", "key.revoke"]
