"""The keygate-login action and the example workflow against GitHub's schemas.

``check-jsonschema`` (a test dependency) vendors SchemaStore's schemas for action metadata
(``vendor.github-actions``) and workflows (``vendor.github-workflows``); its command line
validates the files as they are, and each broken copy below must be refused, so a check that
passes everything cannot hide behind the real files. Nothing is downloaded.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
GITHUB_ACTIONS = ROOT / "deploy" / "github-actions"
ACTION = GITHUB_ACTIONS / "keygate-login" / "action.yml"
WORKFLOW = GITHUB_ACTIONS / "example-workflow.yml"


def check(schema: str, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", schema, str(path)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("schema", "path"), [
    ("vendor.github-actions", ACTION),
    ("vendor.github-workflows", WORKFLOW),
    ("vendor.github-workflows", GITHUB_ACTIONS / "deploy.yml"),
], ids=["action", "example-workflow", "deploy-workflow"])
def test_the_file_matches_githubs_schema(schema: str, path: Path) -> None:
    """The shipped action and workflows pass check-jsonschema with GitHub's vendored schema."""
    result = check(schema, path)
    assert result.returncode == 0, result.stdout + result.stderr


# (what is broken, the schema, the file, the text replaced, its replacement, a word of the error)
BROKEN = [
    ("composite-with-post", "vendor.github-actions", ACTION,
     "using: node24\n  main: main.cjs\n", "using: composite\n  steps: []\n", "post"),
    ("unknown-node-runtime", "vendor.github-actions", ACTION, "using: node24", "using: node99", "node99"),
    ("input-without-description", "vendor.github-actions", ACTION,
     "  env-var:\n    description: The environment variable that holds the key in the job's later steps.\n",
     "  env-var:\n", "description"),
    ("misspelt-permission", "vendor.github-workflows", WORKFLOW, "\n  id-token: write\n", "\n  id-token: writ\n",
     "permissions"),
    ("step-with-uses-and-run", "vendor.github-workflows", WORKFLOW, "        uses: ./.github/actions/keygate-login\n",
     "        uses: ./.github/actions/keygate-login\n        run: echo\n", "steps"),
]


@pytest.mark.parametrize(("schema", "path", "old", "new", "word"), [case[1:] for case in BROKEN],
                         ids=[case[0] for case in BROKEN])
def test_a_broken_copy_fails_validation(schema: str, path: Path, old: str, new: str, word: str,
                                        tmp_path: Path) -> None:
    """Each mistake in a copy of the file is refused, naming what is wrong."""
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} is not once in {path.name}"
    broken = tmp_path / path.name
    broken.write_text(text.replace(old, new))
    result = check(schema, broken)
    assert result.returncode == 1, result.stdout + result.stderr
    assert word in result.stdout


def test_the_action_runs_on_the_newest_node_the_schema_knows() -> None:
    """runs.using is the newest node runtime the vendored action schema accepts (GitHub retires old ones)."""
    import importlib.resources
    import json

    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads(vendor.joinpath("github-actions.json").read_text())
    runtimes = schema["definitions"]["runs-javascript"]["properties"]["using"]["enum"]
    newest = max(runtimes, key=lambda name: int(name.removeprefix("node")))
    action = yaml.safe_load(ACTION.read_text())
    assert action["runs"]["using"] == newest
    # The post step is what makes this a JavaScript action rather than a composite one.
    assert action["runs"]["post"] == "post.cjs" and action["runs"]["post-if"] == "always()"
    assert "post" not in schema["definitions"]["runs-composite"]["properties"]
