"""Request ids: the client's ``X-Request-Id`` when it is sane, else a fresh one; the same on every listener.

The id goes upstream, comes back in ``X-Request-Id`` and in every answer
Keygate makes itself (the proxy's JSON ``request_id``, the admin API's
problem ``instance``), so one request can be followed through the logs of
the client, Keygate and the upstream.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable, Mapping
from typing import ClassVar, Final

from multidict import istr

from ..keys import BODY_LENGTH

_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# SECURITY: a run of letters and digits as long as a key's body may be a key (or one without its
# prefix) sent as the id by mistake; the id is logged, sent upstream and answered, so it is not used.
_KEY_SIZED: Final = re.compile(rf"[0-9A-Za-z]{{{BODY_LENGTH}}}")
# (an istr: a case-insensitive lookup lowers nothing per request; see gateway/dataplane/http1.py)
_X_REQUEST_ID: Final[str] = istr("X-Request-Id")


class RequestIds:
    """Fresh request ids: 32 hex digits of ``os.urandom`` each, like a uuid4's randomness.

    Read 128 ids at a time: one ``getrandom`` call per 128 requests rather than one per
    request. Each process makes its own after the fork, so workers never share ids.
    """

    BATCH: ClassVar[int] = 128

    def __init__(self) -> None:
        self._ready: list[str] = []

    def __call__(self) -> str:
        if not self._ready:
            block = os.urandom(16 * self.BATCH).hex()
            self._ready = [block[i:i + 32] for i in range(0, len(block), 32)]
        return self._ready.pop()


def request_id_of(headers: Mapping[str, str], fresh: Callable[[], str] = lambda: secrets.token_hex(16)) -> str:
    """The client's X-Request-Id if it is sane (and cannot be a key), else a fresh one."""
    given = headers.get(_X_REQUEST_ID)
    if given is not None and _REQUEST_ID.fullmatch(given) and not _KEY_SIZED.search(given):
        return given
    return fresh()
