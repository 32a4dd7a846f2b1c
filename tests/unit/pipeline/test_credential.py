"""Stage 1 — credential: one ``Authorization: Bearer`` b64token, checked by the key parser without I/O."""

from __future__ import annotations

import inspect
import socket

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.keys import KeyParser, MalformedKey, ParsedKey, generate
from gateway.pipeline.credential import bearer_credential, common_bearer
from gateway.pipeline.outcomes import Denied, Outcome

PARSER = KeyParser(["kg_", "kga_"])
KEY = generate("kg_")


def headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    """Request headers as aiohttp hands them over: case-insensitive, repeatable."""
    return CIMultiDictProxy(CIMultiDict(pairs))


def typo(full: str) -> str:
    """``full`` with one secret character changed, so only the checksum can tell."""
    position = 20
    return full[:position] + ("A" if full[position] != "A" else "B") + full[position + 1:]


class CountingParser:
    """The real parser, counting what it is asked and what it answers.

    Around a KeyParser, not a subclass of it: the compiled build's KeyParser is a native class.
    """

    def __init__(self, prefixes: list[str]) -> None:
        self._parser = KeyParser(prefixes)
        self.calls: list[str] = []
        self.refused = 0

    def parse(self, text: str) -> ParsedKey:
        self.calls.append(text)
        try:
            return self._parser.parse(text)
        except MalformedKey:
            self.refused += 1
            raise


def denial_of(request_headers: CIMultiDictProxy[str], parser: KeyParser = PARSER) -> Denied:
    with pytest.raises(Denied) as caught:
        bearer_credential(request_headers, parser)
    return caught.value


def test_valid_bearer_key_is_parsed() -> None:
    """A well-formed Bearer key comes back split into prefix, id and secret."""
    assert bearer_credential(headers(("Authorization", f"Bearer {KEY.full}")), PARSER) == KEY


@pytest.mark.parametrize(
    "scheme", ["bearer", "BEARER", "bEaReR"], ids=["lower", "upper", "mixed"]
)
def test_scheme_is_case_insensitive(scheme: str) -> None:
    """Auth schemes are case-insensitive (RFC 9110 11.1), so any spelling of Bearer is accepted."""
    assert bearer_credential(headers(("Authorization", f"{scheme} {KEY.full}")), PARSER) == KEY


def test_header_name_is_case_insensitive() -> None:
    """A lowercase ``authorization`` header name is the same header."""
    assert bearer_credential(headers(("authorization", f"Bearer {KEY.full}")), PARSER) == KEY


def test_surrounding_whitespace_is_ignored() -> None:
    """Optional whitespace around a header value is not part of the credential."""
    assert bearer_credential(headers(("Authorization", f"  Bearer {KEY.full} ")), PARSER) == KEY


def test_plain_mapping_headers_are_accepted() -> None:
    """A plain mapping with one Authorization entry works like a multidict."""
    assert bearer_credential({"Authorization": f"Bearer {KEY.full}"}, PARSER) == KEY


@pytest.mark.parametrize(
    "pairs",
    [
        (),
        (("Authorization", ""),),
        (("Authorization", "   "),),
        (("Authorization", "Basic dXNlcjpwYXNz"),),
        (("Authorization", "Basic"),),
        (("Authorization", "Token abc"),),
        (("Authorization", f"Bearer{KEY.full}"),),
        (("X-Api-Key", KEY.full),),
    ],
    ids=["missing", "empty", "blank", "basic", "basic-bare", "other-scheme", "no-space", "other-header"],
)
def test_no_bearer_credentials_is_no_credentials(pairs: tuple[tuple[str, str], ...]) -> None:
    """Without a Bearer credential the answer is NO_CREDENTIALS (401 without an error code, RFC 6750 3.1)."""
    assert denial_of(headers(*pairs)).outcome is Outcome.NO_CREDENTIALS


@pytest.mark.parametrize(
    "pairs",
    [
        (("Authorization", f"Bearer {KEY.full}"), ("Authorization", f"Bearer {KEY.full}")),
        (("Authorization", f"Bearer {KEY.full}"), ("authorization", "Basic dXNlcjpwYXNz")),
        (("Authorization", f"Bearer {KEY.full}"), ("Authorization", "")),
    ],
    ids=["same-key-twice", "bearer-and-basic", "bearer-and-empty"],
)
def test_authorization_sent_twice_is_invalid_request(pairs: tuple[tuple[str, str], ...]) -> None:
    """Two Authorization headers are a malformed request (400), even when both hold the same valid key."""
    assert denial_of(headers(*pairs)).outcome is Outcome.INVALID_REQUEST


@pytest.mark.parametrize(
    "value",
    [
        "Bearer",
        "Bearer ",
        "bearer",
        f"Bearer {KEY.full} {KEY.full}",
        f"Bearer {KEY.full}, Bearer {KEY.full}",
        "Bearer kg_abc!def",
        "Bearer kg_abc=def",
        f"Bearer\t{KEY.full}",
        "Bearer kg_" + "é" * 50,
        f"Bearer {KEY.full[:20]}\u00e9{KEY.full[21:]}",
    ],
    ids=["no-token", "blank-token", "lower-no-token", "two-tokens", "two-credentials", "bang",
         "padding-inside", "tab", "non-ascii", "one-non-ascii-char"],
)
def test_malformed_bearer_is_invalid_request(value: str) -> None:
    """A Bearer credential that is not exactly one b64token (RFC 6750 2.1) is INVALID_REQUEST (400)."""
    assert denial_of(headers(("Authorization", value))).outcome is Outcome.INVALID_REQUEST


@pytest.mark.parametrize(
    "token",
    [
        "kg_" + "A" * 4000,
        KEY.full + "A",
        KEY.full[:-1],
        "xx_" + KEY.full[3:],
        KEY.full[:20] + "-" + KEY.full[21:],
        KEY.full[:20] + "~" + KEY.full[21:],
        KEY.full + "==",
        typo(KEY.full),
    ],
    ids=["over-long", "one-long", "one-short", "unknown-prefix", "dash", "tilde", "padding", "bad-checksum"],
)
def test_b64token_that_is_not_a_key_is_invalid_token(token: str) -> None:
    """A syntactically fine b64token with a wrong prefix, length, charset or checksum is INVALID_TOKEN (401)."""
    assert denial_of(headers(("Authorization", f"Bearer {token}"))).outcome is Outcome.INVALID_TOKEN


def test_stage_is_synchronous() -> None:
    """The stage is a plain function: it cannot await a cache, the store or argon2."""
    assert not inspect.iscoroutinefunction(bearer_credential)


def test_bad_checksum_stops_at_the_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad-checksum key is refused by one parser call, with no socket or file opened, and nothing after it runs."""
    def forbidden(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("I/O in the credential stage")

    monkeypatch.setattr(socket, "socket", forbidden)
    monkeypatch.setattr("builtins.open", forbidden)
    parser = CountingParser(["kg_"])
    later_stages: list[ParsedKey] = []

    def pipeline(request_headers: CIMultiDictProxy[str]) -> None:
        # What the proxy does: the lookup only ever sees what the stage returns.
        later_stages.append(bearer_credential(request_headers, parser))

    bad = typo(KEY.full)
    with pytest.raises(Denied) as caught:
        pipeline(headers(("Authorization", f"Bearer {bad}")))
    assert caught.value.outcome is Outcome.INVALID_TOKEN
    assert parser.calls == [bad]
    assert parser.refused == 1
    assert later_stages == []


def test_malformed_header_never_reaches_the_parser() -> None:
    """A request refused for its header shape costs not even a parser call."""
    parser = CountingParser(["kg_"])
    for value in ("Basic dXNlcjpwYXNz", "Bearer", "Bearer a b"):
        with pytest.raises(Denied):
            bearer_credential(headers(("Authorization", value)), parser)
    assert parser.calls == []


def test_refusal_reason_never_contains_the_key() -> None:
    """The reason kept for logs names what was wrong, never the presented secret."""
    bad = typo(KEY.full)
    denied = denial_of(headers(("Authorization", f"Bearer {bad}")))
    assert bad not in denied.reason and KEY.secret not in str(denied)


@pytest.mark.parametrize(("given", "token"), [
    ((("Authorization", f"Bearer {KEY.full}"),), KEY.full),
    ((("Authorization", "Bearer anything at all"),), "anything at all"),  # no syntax check: only a cache probe
    ((("Authorization", f"bearer {KEY.full}"),), None),
    ((("Authorization", f"Bearer  {KEY.full}"),), f" {KEY.full}"),  # a miss; bearer_credential decides
    ((("Authorization", f"Basic {KEY.full}"),), None),
    ((("Authorization", f"Bearer {KEY.full}é"),), None),
    ((("Authorization", f"Bearer {KEY.full}"), ("Authorization", f"Bearer {KEY.full}")), None),
    ((), None),
])
def test_common_bearer_gives_only_the_usual_spelling(given: tuple[tuple[str, str], ...], token: str | None) -> None:
    """The hot path's probe takes one header spelled ``Bearer <token>`` in ASCII; everything else is None."""
    assert common_bearer(headers(*given)) == token
