"""The ingresses as users run them: the shipped files of ``deploy/ingress/``, started for real.

nginx runs ``deploy/ingress/nginx/example.conf`` with only its addresses and file
locations changed (and the three ``keygate-*.conf`` snippets included as they
are); Caddy runs ``deploy/ingress/caddy/Caddyfile`` unchanged, its addresses
given in the environment. Each listens on 127.0.0.1 and reaches Keygate's
authz listener from 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Protocol

import pytest

from ..e2e.harness import clean_env, free_port, terminate

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "ingress"
NGINX_DIR = DEPLOY / "nginx"
CADDYFILE = DEPLOY / "caddy" / "Caddyfile"


def binary(name: str, package: str) -> str:
    """The ingress's binary; missing, a failure under CI (scripts/test installs it), else a skip."""
    found = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if Path(p).exists()),
                                       None)
    if found is not None:
        return found
    message = (f"{name} is not installed: run scripts/test (as root it installs Debian's {package}), "
               f"or apt-get install {package}")
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def wait_listening(port: int, process: subprocess.Popen[bytes], log: Path, timeout: float = 20.0) -> None:
    """Until something accepts connections on 127.0.0.1:``port`` (any answer will do: every path asks Keygate)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode} before listening:\n{log.read_text(errors='replace')}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listened on {port} within {timeout}s:\n{log.read_text(errors='replace')}")


class Ingress(Protocol):
    url: str

    def stop(self) -> None: ...

    def log(self) -> str: ...


class Nginx:
    """``example.conf`` with this test's ports and paths: one process, in the foreground."""

    name = "nginx"

    def __init__(self, folder: Path, authz: str, app: str) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = folder / "error.log"
        config = render_example(folder, port=self.port, authz=authz, app=app)
        path = folder / "nginx.conf"
        path.write_text(config)
        self.process = subprocess.Popen(
            [binary("nginx", "nginx-light"), "-p", str(folder), "-c", str(path), "-e", str(self.log_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.log_path.open("ab"),
        )
        wait_listening(self.port, self.process, self.log_path)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        terminate(self.process)


def render_example(folder: Path, *, port: int, authz: str, app: str) -> str:
    """``example.conf`` as this test runs it; each change must find its line, so the example cannot drift."""
    text = (NGINX_DIR / "example.conf").read_text()
    changes = {
        "/etc/nginx/keygate/": f"{NGINX_DIR}/",
        "listen 80;": f"listen 127.0.0.1:{port};",
        "server 127.0.0.1:8081;": f"server {authz};",
        "server 127.0.0.1:8080;": f"server {app};",
        # One process, as root: the workers' user could not reach the test's private folder.
        "worker_processes auto;": f"master_process off;\ndaemon off;\npid {folder}/nginx.pid;\n"
                                  f"error_log {folder}/error.log;",
        "http {": f"http {{\n    access_log off;\n    client_body_temp_path {folder}/body;\n"
                  f"    proxy_temp_path {folder}/proxy;\n    fastcgi_temp_path {folder}/fastcgi;\n"
                  f"    uwsgi_temp_path {folder}/uwsgi;\n    scgi_temp_path {folder}/scgi;",
    }
    for old, new in changes.items():
        assert old in text, f"example.conf no longer has {old!r}"
        text = text.replace(old, new)
    return text


class Caddy:
    """The shipped Caddyfile, its addresses from the environment; no admin endpoint, state kept in ``folder``."""

    name = "caddy"

    def __init__(self, folder: Path, authz: str, app: str) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = folder / "caddy.log"
        env = clean_env(
            SITE_ADDRESS=f"http://127.0.0.1:{self.port}", AUTHZ_ADDRESS=authz, APP_ADDRESS=app, CADDY_ADMIN="off",
            HOME=str(folder), XDG_DATA_HOME=str(folder / "data"), XDG_CONFIG_HOME=str(folder / "config"),
        )
        self.process = subprocess.Popen(
            [binary("caddy", "caddy"), "run", "--config", str(CADDYFILE), "--adapter", "caddyfile"],
            env=env, stdin=subprocess.DEVNULL, stdout=self.log_path.open("ab"), stderr=subprocess.STDOUT,
        )
        wait_listening(self.port, self.process, self.log_path)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        terminate(self.process)
