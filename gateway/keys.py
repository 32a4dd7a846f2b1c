"""The key format: generation, parsing, checksums, hashing and cache keys.

A key is ``<prefix><id12><secret32><checksum6>``: ``prefix + id12`` is its
public id, the secret is 32 base62 characters from :mod:`secrets` (about 190
bits), and the checksum is CRC32 over everything before it, in 6 base62
characters. Parsing is pure (no I/O) so garbage is refused before any cache,
store or argon2 work is spent on it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from urllib.parse import unquote
import secrets
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

BASE62: Final = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
ID_LENGTH: Final = 12
SECRET_LENGTH: Final = 32
CHECKSUM_LENGTH: Final = 6
BODY_LENGTH: Final = ID_LENGTH + SECRET_LENGTH + CHECKSUM_LENGTH
# Longest configurable prefix (16) plus the body: anything longer is refused
# before we even look at it.
MAX_KEY_LENGTH: Final = 16 + BODY_LENGTH

_BASE62_BODY: Final = re.compile(rf"[0-9A-Za-z]{{{BODY_LENGTH}}}")
# A key body standing alone (its prefix cut off), for redaction.
_BODY_IN_TEXT: Final = re.compile(rf"(?<![0-9A-Za-z])[0-9A-Za-z]{{{BODY_LENGTH}}}(?![0-9A-Za-z])")
# How much of a key past its id makes text key-shaped for redaction: most of the secret.
REDACT_TAIL: Final = 28
_KEY_ID: Final = re.compile(r"[a-z][a-z0-9_]{0,15}[0-9A-Za-z]{%d}" % ID_LENGTH)


class MalformedKey(ValueError):
    """The text cannot be a key: wrong prefix, length, charset or checksum."""


@dataclass(frozen=True, slots=True)
class ParsedKey:
    """A syntactically valid key, split into its parts."""

    prefix: str
    key_id: str
    # SECURITY: never in a repr, so never in a log line or a traceback.
    secret: str = field(repr=False)
    # The full text as presented, when parsed from it: spares recomputing the checksum.
    text: str = field(default="", repr=False, compare=False)

    @property
    def full(self) -> str:
        """The full key text, as shown once to its owner."""
        if self.text:
            return self.text
        body = self.key_id + self.secret
        return body + checksum(body)


# Every two-digit base62 number, so a checksum is three lookups rather than six divisions.
_BASE62_PAIRS: Final = tuple(a + b for a in BASE62 for b in BASE62)
_PAIR: Final = len(_BASE62_PAIRS)  # 62 ** 2


def random_base62(length: int) -> str:
    return "".join(secrets.choice(BASE62) for _ in range(length))


def checksum(text: str) -> str:
    """Six base62 characters of CRC32 over ``text`` (62**6 > 2**32, so nothing is lost)."""
    high, low = divmod(zlib.crc32(text.encode("ascii")), _PAIR * _PAIR)
    middle, low = divmod(low, _PAIR)
    return _BASE62_PAIRS[high] + _BASE62_PAIRS[middle] + _BASE62_PAIRS[low]


def generate(prefix: str) -> ParsedKey:
    """A fresh random key with ``prefix``."""
    return ParsedKey(
        prefix=prefix,
        key_id=prefix + random_base62(ID_LENGTH),
        secret=random_base62(SECRET_LENGTH),
    )


def looks_like_key_id(text: str) -> bool:
    """True when ``text`` has the shape of a key id (``prefix`` + 12 base62)."""
    return _KEY_ID.fullmatch(text) is not None


def _fully_unquoted(text: str) -> str:
    """``text`` percent-decoded until it stops changing (at most three rounds: "%2568" is "h" too)."""
    for _ in range(3):
        decoded = unquote(text, errors="replace")
        if decoded == text:
            break
        text = decoded
    return text


def _printable(text: str) -> str:
    """``text`` with control and other unprintable characters percent-escaped (UTF-8): safe to store and log."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escaped(c) for c in text)


def _escaped(char: str) -> str:
    try:
        data = char.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that stands for no byte
        data = b"?"
    return "".join(f"%{b:02X}" for b in data)


# Bounds of KeyParser's memo of texts that hold no key: characters per text, texts.
_UNCHANGED_TEXT: Final = 256
_UNCHANGED_TEXTS: Final = 4096


class KeyParser:
    """Parses presented keys against the configured prefixes, without I/O."""

    def __init__(self, prefixes: Iterable[str]) -> None:
        self._prefixes = frozenset(prefixes)
        # Longest prefix first, so that of two prefixes ending alike the longer one is shown whole.
        # A prefix, the id and at least REDACT_TAIL more characters: a key, or one with a few
        # characters missing (still all but those of a secret).
        alternatives = "|".join(re.escape(p) for p in sorted(self._prefixes, key=len, reverse=True))
        self._key_in_text = re.compile(rf"({alternatives})([0-9A-Za-z]{{{ID_LENGTH}}})[0-9A-Za-z]{{{REDACT_TAIL},}}")
        # Texts redact() left as they were: a request record's path is redacted per request, and most
        # requests repeat a few paths. Only such texts are kept (nothing here is, or holds, a key: each is
        # stored and logged as it is), short ones, and a full set starts over, so texts sent to fill it
        # cost memory for a moment, never more than this bounds.
        self._unchanged: set[str] = set()

    def redact(self, text: str) -> str:
        """``text`` with every key in it replaced by its id: for paths and queries that are stored or logged.

        Anything shaped like a key counts, checksum or not (a mistyped key is
        still most of a secret), percent-encoded too, and a whole key body whose
        checksum shows it is a key without its prefix.
        """
        unchanged = self._unchanged
        if text in unchanged:
            return text
        shown = self._redacted(text)
        if shown == text and len(text) <= _UNCHANGED_TEXT:
            if len(unchanged) >= _UNCHANGED_TEXTS:
                unchanged.clear()
            unchanged.add(text)
        return shown

    def _redacted(self, text: str) -> str:
        # Most texts hold no prefix, no escape and no 50-character word: a few substring
        # tests and no regex (this runs per request).
        if "%" in text:
            decoded = _fully_unquoted(text)
            if decoded != text:
                shown = self._redact(decoded)
                if shown != decoded:
                    # SECURITY: "kg_%68..." is a key too; the record shows the decoded text, redacted,
                    # with what decoding made unprintable escaped again (PostgreSQL refuses a NUL in text).
                    return _printable(shown)
        return _printable(self._redact(text))

    def redact_text(self, text: str) -> str:
        """Free text (a log message, a traceback) with every key in it replaced by its id, its lines kept.

        As :meth:`redact`, but what is not a key is left as it is (no escaping: a log line's
        format escapes what it must).
        """
        if "%" in text:
            decoded = _fully_unquoted(text)
            if decoded != text:
                shown = self._redact(decoded)
                if shown != decoded:
                    return shown  # SECURITY: "kg_%68..." is a key too
        return self._redact(text)

    def _redact(self, text: str) -> str:
        for prefix in self._prefixes:
            if prefix in text:
                text = self._key_in_text.sub(r"\1\2", text)
                break
        if len(text) >= BODY_LENGTH:
            text = _BODY_IN_TEXT.sub(self._bare_body, text)
        return text

    def _bare_body(self, match: re.Match[str]) -> str:
        body = match[0]
        if any(checksum(prefix + body[:-CHECKSUM_LENGTH]) == body[-CHECKSUM_LENGTH:] for prefix in self._prefixes):
            return body[:ID_LENGTH]
        return body

    def parse(self, text: str) -> ParsedKey:
        if len(text) > MAX_KEY_LENGTH or len(text) <= BODY_LENGTH or not text.isascii():
            raise MalformedKey("wrong length")
        # The body has a fixed length, so the prefix is whatever precedes it.
        split = len(text) - BODY_LENGTH
        prefix, body = text[:split], text[split:]
        if prefix not in self._prefixes:
            raise MalformedKey("unknown prefix")
        if _BASE62_BODY.fullmatch(body) is None:
            raise MalformedKey("bad characters")
        signed, given = text[:-CHECKSUM_LENGTH], text[-CHECKSUM_LENGTH:]
        # Not secret material: a plain comparison is fine here.
        if checksum(signed) != given:
            raise MalformedKey("bad checksum")
        return ParsedKey(
            prefix=prefix,
            key_id=text[: split + ID_LENGTH],
            secret=body[ID_LENGTH : ID_LENGTH + SECRET_LENGTH],
            text=text,
        )


class SecretHasher:
    """argon2id hashing of secrets; ``verify`` is constant-time and thread-safe."""

    def __init__(self, *, time_cost: int = 1, memory_cost: int = 8192, parallelism: int = 1) -> None:
        self._hasher = PasswordHasher(
            time_cost=time_cost, memory_cost=memory_cost, parallelism=parallelism
        )

    def hash(self, secret: str) -> str:
        return self._hasher.hash(secret)

    def verify(self, secret_hash: str, secret: str) -> bool:
        """True when ``secret`` matches; blocking, so run it in a thread on the hot path."""
        try:
            # SECURITY: libargon2 compares digests in constant time.
            return self._hasher.verify(secret_hash, secret)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False


def cache_key(pepper: bytes, full_key: str) -> str:
    """A MAC of the full key under the pepper, in hex: what caches are keyed by, never the key itself."""
    return CacheKeyer(pepper)(full_key)


class CacheKeyer:
    """:func:`cache_key` for one pepper: keyed BLAKE2b (RFC 7693's MAC mode), one C call per key.

    It runs on every request (the cache is looked up by it), where HMAC-SHA256
    cost two and a half times as much for the same guarantee: without the
    pepper, a digest can be neither computed nor reversed.
    """

    def __init__(self, pepper: bytes) -> None:
        # BLAKE2b takes a key of up to 64 bytes; a longer pepper is hashed down to one, as HMAC does.
        key = pepper if len(pepper) <= hashlib.blake2b.MAX_KEY_SIZE else hashlib.blake2b(pepper).digest()
        # The state after the key's block, made once: each call copies it and hashes only the text
        # (a fifth less than keying a new one; the digest is the same).
        self._keyed = hashlib.blake2b(key=key, digest_size=32)

    def __call__(self, full_key: str) -> str:
        return self._digest(full_key.encode("ascii"))

    def _digest(self, text: bytes) -> str:
        mac = self._keyed.copy()
        mac.update(text)
        return mac.hexdigest()

    def remembered(self, full_key: str, last: LastKey) -> str:
        """``self(full_key)``, not computed again when it is the text ``last`` holds (then holding it).

        A client sends the same key on every request of a keep-alive connection:
        with one LastKey per connection, the MAC (about 6,000 instructions, a
        twentieth of a request) is computed once per connection and key.
        """
        text = full_key.encode("ascii")
        # SECURITY: compared in constant time: a connection an ingress shares between clients
        # carries their keys one after another, and a guess must not learn how much of the last
        # one it matched. (A different pepper is another keyer: never this one's MAC.)
        if last.keyer is self and hmac.compare_digest(text, last.text):
            return last.mac
        digest = self._digest(text)
        last.text, last.mac, last.keyer = text, digest, self
        return digest


class LastKey:
    """The key text last presented on one connection, and its cache MAC (see CacheKeyer.remembered).

    SECURITY: it keeps that key's text in memory for as long as its connection
    stays open (its client presents it again with each request, so it is read
    into memory each time anyway), never longer: it goes with the connection.
    """

    def __init__(self) -> None:
        self.text = b""
        self.mac = ""
        self.keyer: CacheKeyer | None = None
