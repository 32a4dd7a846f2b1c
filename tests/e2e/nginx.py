"""A real nginx as an upstream: it decodes and normalises request paths before it routes them.

nginx reads ``/api%2fservers%2fprod-2%2fdeploy`` and ``/api/servers/prod-2/x/..%2fdeploy``
as ``/api/servers/prod-2/deploy``: the kind of upstream a gateway's path rules must hold
against. Its access log records each request's method and normalised path (``$uri``).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from .harness import free_port, terminate, wait_http

CONFIG = """\
daemon off;
master_process off;
worker_processes 1;
pid {folder}/nginx.pid;
error_log {folder}/error.log;
events {{ worker_connections 256; }}
http {{
    log_format uris '$request_method $uri';
    access_log {folder}/access.log uris;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location = /api/servers/prod-2/deploy {{ return 200 "deployed\\n"; }}
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


def nginx_binary() -> str:
    """nginx from PATH or Debian's /usr/sbin; scripts/test installs it (Debian's nginx-light)."""
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if found is None:
        raise RuntimeError("nginx is not installed: run scripts/test (as root it installs Debian's nginx-light)")
    return found


class Nginx:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = folder / "nginx.conf"
        config.write_text(CONFIG.format(folder=folder, port=self.port))
        self.process = subprocess.Popen(
            [nginx_binary(), "-p", str(folder), "-c", str(config), "-e", str(folder / "error.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_http(self.url + "/__ready", process=self.process)

    def requests(self) -> list[str]:
        """Every request nginx served so far, as ``METHOD /normalised/path``."""
        log = self.folder / "access.log"
        time.sleep(0.1)  # nginx writes the line as the request ends, just after the answer
        return log.read_text().splitlines() if log.exists() else []

    def stop(self) -> None:
        terminate(self.process)
