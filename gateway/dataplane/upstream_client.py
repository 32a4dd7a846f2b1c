"""The forwarder's one ``aiohttp.ClientSession``: the client's headers go upstream as given, nothing invented.

aiohttp adds ``User-Agent``, ``Accept`` and ``Accept-Encoding`` to every
request unless told to skip them, and a session's ``skip_auto_headers`` is
re-sorted into a new ``CIMultiDict`` on every request; the request's headers
are then copied one by one in Python. A proxy sends many headers per request
(the client's, ``X-Forwarded-*``, ``Via``, the identity headers), so
:class:`UpstreamRequest` (the session's ``request_class``, a documented
extension point) does both once in C: one ``extend`` of the headers, and one
skip list made at import.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextvars import ContextVar
from typing import Any

import aiohttp
from aiohttp import hdrs
from multidict import CIMultiDict, istr
from yarl import URL

# What aiohttp would otherwise add to a forwarded request, or guess from the body.
NOT_INVENTED: tuple[istr, ...] = (hdrs.ACCEPT, hdrs.ACCEPT_ENCODING, hdrs.CONTENT_TYPE, hdrs.USER_AGENT)
_SKIP: CIMultiDict[None] = CIMultiDict((name, None) for name in NOT_INVENTED)


# The headers of the one request :func:`send` is making in this task (see there).
_HANDED: ContextVar[CIMultiDict[str] | None] = ContextVar("keygate_upstream_headers", default=None)


class UpstreamRequest(aiohttp.ClientRequest):
    """``aiohttp.ClientRequest`` with the request's headers taken as given."""

    def update_headers(self, headers: object) -> None:
        handed = _HANDED.get()
        if handed is not None and not headers:
            headers = handed
        if not isinstance(headers, CIMultiDict) or hdrs.HOST in headers:
            # Not what the forwarder passes: aiohttp's own handling, Host special case and all.
            super().update_headers(headers)  # type: ignore[arg-type]
            return
        host = self.url.host_port_subcomponent
        assert host is not None  # the forwarder's URLs are absolute
        self.headers = CIMultiDict(((hdrs.HOST, host),))
        self.headers.extend(headers)

    def update_auto_headers(self, skip_auto_headers: Iterable[str] | None) -> None:
        # SECURITY/transparency: the upstream sees the client's headers, not aiohttp's defaults.
        self._skip_auto_headers = _SKIP


async def send(session: aiohttp.ClientSession, method: str, url: URL, headers: CIMultiDict[str],
               **kwargs: Any) -> aiohttp.ClientResponse:
    """``session.request(method, url, headers=headers, **kwargs)``, past ClientSession's header merge.

    ClientSession merges a request's headers into a copy of its default headers
    one at a time, in Python; :func:`upstream_session` has no default headers,
    so for a dozen forwarded headers that is only cost. The headers go to
    :class:`UpstreamRequest` through a context variable instead: set for this
    call only, and seen by this task only (aiohttp builds the request in it).
    """
    token = _HANDED.set(headers)
    try:
        return await session.request(method, url, **kwargs)
    finally:
        _HANDED.reset(token)


def upstream_session() -> aiohttp.ClientSession:
    """One per process: pooled connections to every upstream, no cookies, no decompression."""
    # No default headers: send() relies on there being none to merge.
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True),
        auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
        request_class=UpstreamRequest,
        # Also given here for ws_connect, whose handshake request is built the same way.
        skip_auto_headers=NOT_INVENTED,
    )
