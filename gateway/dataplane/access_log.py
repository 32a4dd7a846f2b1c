"""The access log (``proxy.access_log``): one record per request the proxy or authz listener answered.

Off by default: a line costs CPU on every request (see tests/perf/log_cost.py).
When off, a listener pays one boolean test per request and none of this runs.
The record's fields are built here from what stage 9 already made (the path
is the request record's, with any key in it shown as its id), so nothing on
the request's way changes for it.
"""

from __future__ import annotations

import logging
from typing import Any

from ..models import RequestRecord
from ..pipeline.scope import Target
from .http1 import Request

access_log = logging.getLogger("keygate.access")


def log_access(listener: str, request_id: str, request: Request, record: RequestRecord,
               target: Target | None) -> None:
    """Write ``record``'s access line: who (key id, client), what (method, path, route), and how it went."""
    body = request.body
    upstream = target.upstream if target is not None else None
    fields: dict[str, Any] = {
        "event": "request",
        "listener": listener,
        "request_id": request_id,
        "key_id": record.key_id,
        "client": record.client_ip,
        "method": record.method,
        "path": record.path,
        "server": record.server,
        "operation": record.operation,
        "upstream": upstream.name if upstream is not None and listener == "proxy" else None,
        "status": record.status,
        "decision": record.decision,
        "reason": record.reason,
        "bytes_in": body.received if body is not None else 0,
        "bytes_out": request.bytes_out,
        "duration_ms": record.duration_ms,
    }
    access_log.info(fields)


__all__ = ["access_log", "log_access"]
