"""The request target, decided once: what the route table judges is exactly what the upstream receives.

Upstreams read a path in many ways: nginx and most frameworks decode
percent-escapes (``%2F`` becomes a ``/``) and resolve ``..``; Servlet
containers drop ``;`` path parameters (and read ``..;`` as ``..``); some
servers treat ``\\`` as ``/``; a fragment is never sent on at all. When the
gateway matches one spelling and forwards another, a request can be judged
as one route and run as another. So the target is put in one canonical form
before routing, the route table matches that form, and that form (not the
client's bytes) goes upstream. Ambiguous spellings are refused instead
(Envoy's ``path_with_escaped_slashes_action`` and ``normalize_path`` name the
same choices):

- a fragment (``#``) is refused: it is not part of a request target;
- ``%2F``, ``%5C`` and a raw ``\\`` are refused with ``encoded_slashes =
  "reject"`` (the default); with ``"pass"`` they stay inside their segment,
  sent as ``%2F`` / ``%5C``, for upstreams that do not decode them (nginx does,
  by default), and never around an empty or dot part (``x%2F..%2Fdeploy``);
- escaped control characters (``%00``-``%1F``, ``%7F``) and malformed escapes
  (``%zz``, a lone ``%``) are always refused;
- ``;`` path parameters (``%3B`` too: some upstreams decode before they drop
  parameters) are refused with ``path_parameters = "reject"`` (the default) or
  removed from every segment with ``"strip"``, so a Servlet container and a
  server that reads ``;`` literally see the same path;
- escapes of unreserved characters are decoded (``%64eploy`` is ``deploy``),
  other escapes get upper-case hex, characters that must be escaped are;
- empty, ``.`` and ``..`` segments are removed (``..`` removes the one before).

The query is neither matched nor changed.
"""

from __future__ import annotations

import re
from typing import ClassVar, Final, Literal, NamedTuple

from .outcomes import Denied, Outcome

EncodedSlashes = Literal["reject", "pass"]
PathParameters = Literal["reject", "strip"]

_UNRESERVED: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# What may stand unescaped in a segment (RFC 3986 pchar; ";" is handled before this).
_RAW_OK: Final = _UNRESERVED | frozenset("!$&'()*+,=:@")
_HEX: Final = frozenset("0123456789ABCDEFabcdef")
_ENCODED_SLASH: Final = re.compile("%2F|%5C")  # canonical escapes are upper-case
# A path that is canonical as it stands, when it also has no "//" and no "/." (no empty or dot segment).
_PLAIN: Final = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,=:@/]*")


class RequestTarget(NamedTuple):
    """The target of one request in canonical form."""

    path: str  # percent-encoded, normalised: what the route table matches and the upstream receives
    query: str  # "" or "?" and the query exactly as sent

    @property
    def forwarded(self) -> str:
        """The request target sent upstream (after the upstream URL's own path)."""
        return self.path + self.query if self.query else self.path


class _Refused(Exception):
    pass


class TargetCanonicalizer:
    """Turns a client's raw request target into its :class:`RequestTarget`, or refuses it (400).

    Answers are remembered per raw path (up to :attr:`MEMO_SIZE` paths no
    longer than :attr:`MEMO_LENGTH`; the query takes no part): a service sees
    the same paths over and over, and a flood of new ones only evicts old ones.
    """

    MEMO_LENGTH: ClassVar[int] = 512
    MEMO_SIZE: ClassVar[int] = 2048

    def __init__(self, *, encoded_slashes: EncodedSlashes = "reject", path_parameters: PathParameters = "reject") -> None:
        self._pass_slashes = encoded_slashes == "pass"
        self._strip_parameters = path_parameters == "strip"
        # raw path -> its target without a query, or the reason it is refused
        self._memo: dict[str, RequestTarget | str] = {}

    def __call__(self, raw: str) -> RequestTarget:
        path, mark, query = raw.partition("?")
        # SECURITY: a fragment is never sent upstream, so "/deploy#x" would be judged as one
        # path ("deploy#x") and run as another ("deploy"); one in the query is refused alike.
        if "#" in query:
            raise Denied(Outcome.INVALID_TARGET, "fragment in the request target")
        known = self._memo.get(path)
        if known is None:
            try:
                known = RequestTarget(self._canonical(path), "")
            except _Refused as refused:
                known = str(refused)
            if len(path) <= self.MEMO_LENGTH:
                if len(self._memo) >= self.MEMO_SIZE:
                    del self._memo[next(iter(self._memo))]
                self._memo[path] = known
        if type(known) is str:
            raise Denied(Outcome.INVALID_TARGET, known)
        return RequestTarget(known[0], mark + query) if mark else known  # type: ignore[return-value,index]

    def _canonical(self, path: str) -> str:
        """The canonical form of a path (no query)."""
        if "#" in path:
            raise _Refused("fragment in the request target")
        # Origin-form only; the HTTP server refuses the other forms before the pipeline runs.
        if not path.startswith("/"):
            raise _Refused("not an origin-form request target")
        if _PLAIN.fullmatch(path) is not None and "//" not in path and "/." not in path:
            return path
        segments: list[str] = []
        segment = ""
        for raw_segment in path.split("/")[1:]:
            segment = self._segment(raw_segment)
            if segment == "..":
                if segments:
                    segments.pop()
            elif segment and segment != ".":
                segments.append(segment)
        # The trailing slash is kept ("/dir/" and "/dir" may differ upstream); routes ignore it.
        trailing = "/" if segments and segment in ("", ".", "..") else ""
        return "/" + "/".join(segments) + trailing

    def _segment(self, raw: str) -> str:
        """One segment in canonical form: parameters handled, escapes normalised."""
        if ";" in raw:
            # SECURITY: Tomcat, Jetty and Spring drop ";..." from each segment ("deploy;x" is
            # "deploy", "..;" is ".."); servers that read it literally do not.
            if not self._strip_parameters:
                raise _Refused("path parameters (;) in the request target")
            raw = raw.partition(";")[0]
        if "%" not in raw and "\\" not in raw and all(c in _RAW_OK for c in raw):
            return raw
        out: list[str] = []
        i, end = 0, len(raw)
        while i < end:
            c = raw[i]
            if c == "%":
                digits = raw[i + 1:i + 3]
                if len(digits) != 2 or digits[0] not in _HEX or digits[1] not in _HEX:
                    raise _Refused("malformed percent-encoding in the request target")
                code = int(digits, 16)
                decoded = chr(code)
                if decoded in _UNRESERVED:
                    out.append(decoded)  # RFC 3986 section 6.2.2.2: the same character
                elif code == 0x3B:
                    # SECURITY: an upstream that decodes before it drops parameters reads "deploy%3Bx"
                    # as "deploy": an escaped ";" is a parameter too.
                    if not self._strip_parameters:
                        raise _Refused("path parameters (;) in the request target")
                    break
                elif code < 0x20 or code == 0x7F:
                    # SECURITY: C-based upstreams end the path at a NUL, and a regex route
                    # "^/deploy$" matches "/deploy\n" (PCRE's $ stops before a final newline).
                    raise _Refused("encoded control character in the request target")
                elif decoded in "/\\" and not self._pass_slashes:
                    # SECURITY: an upstream that decodes %2F (or reads \ as /) sees other segments.
                    raise _Refused("encoded slash in the request target")
                else:
                    out.append("%" + digits.upper())
                i += 3
                continue
            if c in _RAW_OK:
                out.append(c)
            elif c == "\\" and not self._pass_slashes:
                raise _Refused("backslash in the request target")
            else:
                out.extend(f"%{b:02X}" for b in c.encode("utf-8", "surrogateescape"))
            i += 1
        segment = "".join(out)
        if self._pass_slashes and "%" in segment:
            # SECURITY: kept encoded, "x%2F..%2Fdeploy" is one segment here, but an upstream that
            # decodes %2F after routing began (or despite the setting) resolves it to "deploy":
            # no part of a segment between encoded slashes may be empty or a dot segment.
            parts = _ENCODED_SLASH.split(segment)
            if len(parts) > 1 and any(part in ("", ".", "..") for part in parts):
                raise _Refused("dot or empty segment between encoded slashes in the request target")
        return segment
