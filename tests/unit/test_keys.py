"""The key format: generation, parsing, checksum, hashing and cache keys."""

from __future__ import annotations

import hashlib
import socket
import string

import pytest

from gateway import keys
from gateway.keys import BASE62, CacheKeyer, KeyParser, LastKey, MalformedKey, SecretHasher, cache_key, checksum, generate

PARSER = KeyParser(["kg_", "kga_", "rk_t_"])


def test_generated_key_has_the_documented_shape() -> None:
    """A key is prefix + 12 id chars + 32 secret chars + 6 checksum chars, all base62 after the prefix."""
    parsed = generate("kg_")
    full = parsed.full
    assert len(full) == 3 + 12 + 32 + 6
    assert full.startswith(parsed.key_id) and len(parsed.key_id) == 15
    assert set(full[3:]) <= set(BASE62)
    assert full[-6:] == checksum(full[:-6])


@pytest.mark.parametrize("prefix", ["kg_", "kga_", "rk_t_"])
def test_generated_keys_parse_back(prefix: str) -> None:
    """Parsing a generated key returns its prefix, id and secret."""
    parsed = generate(prefix)
    assert PARSER.parse(parsed.full) == parsed


def test_checksum_catches_every_single_character_change() -> None:
    """Replacing any one character of a key with any other character is detected."""
    full = generate("kg_").full
    alphabet = BASE62 + "_-"
    for position in range(len(full)):
        for char in alphabet:
            if char == full[position]:
                continue
            changed = full[:position] + char + full[position + 1:]
            with pytest.raises(MalformedKey):
                PARSER.parse(changed)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "kg_",
        "kg_short",
        "xx_" + "A" * 50,                      # unknown prefix
        "kg_" + "A" * 49,                      # one short
        "kg_" + "A" * 51,                      # one long
        "kg_" + "A" * 44 + "-" * 6,            # bad characters
        "kg_" + "é" * 50,                      # non-ASCII
        "kg_" + "A" * 5000,                    # absurdly long
        "Bearer kg_" + "A" * 50,
    ],
)
def test_malformed_keys_are_refused(text: str) -> None:
    """Wrong prefix, length, charset or checksum raise MalformedKey."""
    with pytest.raises(MalformedKey):
        PARSER.parse(text)


def test_parsing_does_no_io(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parsing never opens a file or a socket, valid key or not."""
    def forbidden(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("I/O during parsing")

    monkeypatch.setattr(socket, "socket", forbidden)
    monkeypatch.setattr("builtins.open", forbidden)
    full = generate("kg_").full
    PARSER.parse(full)
    with pytest.raises(MalformedKey):
        PARSER.parse(full[:-1] + ("A" if full[-1] != "A" else "B"))


def test_ids_do_not_repeat_in_100k_draws() -> None:
    """Two generated keys never share an id in 100,000 draws."""
    ids = {generate("kg_").key_id for _ in range(100_000)}
    assert len(ids) == 100_000


def test_secret_comes_from_the_full_alphabet() -> None:
    """Secrets use all 62 characters (about 190 bits in 32 characters)."""
    seen = set()
    for _ in range(200):
        seen |= set(generate("kg_").secret)
    assert seen == set(string.digits + string.ascii_letters)


def test_hash_verifies_only_the_right_secret() -> None:
    """argon2id verification accepts the secret and rejects any other, or a broken hash."""
    hasher = SecretHasher(time_cost=1, memory_cost=1024, parallelism=1)
    secret = generate("kg_").secret
    digest = hasher.hash(secret)
    assert digest.startswith("$argon2id$")
    assert secret not in digest
    assert hasher.verify(digest, secret)
    assert not hasher.verify(digest, secret[:-1] + ("a" if secret[-1] != "a" else "b"))
    assert not hasher.verify("not a hash", secret)


def test_cache_key_depends_on_pepper_and_hides_the_key() -> None:
    """The cache key is a MAC: stable per pepper, different across peppers, never the key."""
    full = generate("kg_").full
    long_pepper = b"q" * 65  # over BLAKE2b's 64-byte key limit: still accepted, still keyed
    assert cache_key(long_pepper, full) != cache_key(b"q" * 64, full) != cache_key(b"", full)
    assert cache_key(b"p1", full) == cache_key(b"p1", full)
    assert cache_key(b"p1", full) != cache_key(b"p2", full)
    assert full not in cache_key(b"p1", full) and len(cache_key(b"p1", full)) == 64


@pytest.mark.parametrize(("pepper", "key"), [
    (b"p" * 32, b"p" * 32),
    (b"", b""),
    (b"q" * 64, b"q" * 64),
    (b"q" * 65, hashlib.blake2b(b"q" * 65).digest()),  # over the 64-byte key limit: hashed down to one
], ids=["32 bytes", "empty", "64 bytes", "65 bytes"])
def test_cache_key_is_keyed_blake2b_whatever_came_before(pepper: bytes, key: bytes) -> None:
    """RFC 7693's MAC, a 32-byte digest in hex: what other replicas (and versions) find in a shared cache.

    One keyer makes many: each key's digest is its own, however many were made before it.
    """
    keyer = CacheKeyer(pepper)
    fulls = [generate("kg_").full for _ in range(3)]
    for full in [*fulls, *fulls]:
        assert keyer(full) == hashlib.blake2b(full.encode(), key=key, digest_size=32).hexdigest()


def test_a_connections_last_key_spares_its_mac_and_never_answers_for_another_key() -> None:
    """CacheKeyer.remembered: the MAC of the text given, whatever the connection presented before it:
    the same key again (kept), another key (its own, then kept), and another pepper's keyer (its own)."""
    keyer, other_pepper = CacheKeyer(b"p1"), CacheKeyer(b"p2")
    first, second = generate("kg_").full, generate("kg_").full
    last = LastKey()
    for keyer_, full in [(keyer, first), (keyer, first), (keyer, second), (keyer, first),
                         (other_pepper, first), (keyer, first), (keyer, first[:-1])]:
        assert keyer_.remembered(full, last) == keyer_(full)
    assert last.text == first[:-1].encode() and last.mac == keyer(first[:-1])


@pytest.mark.parametrize(("text", "ok"), [("kg_7Hq2ZrT9xLmP", True), ("kg_7Hq2ZrT9xLm", False),
                                          ("KG_7Hq2ZrT9xLmP", False), ("kg_7Hq2ZrT9xLm!", False)])
def test_looks_like_key_id(text: str, ok: bool) -> None:
    """Key ids are a lowercase prefix followed by 12 base62 characters."""
    assert keys.looks_like_key_id(text) is ok


# Redaction -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "shown"),
    [
        ("/x/{key}", "/x/{id}"),
        ("/x/{key}/y?token={key}&b=1", "/x/{id}/y?token={id}&b=1"),
        ("/x?k=abc{key}-def", "/x?k=abc{id}-def"),
        ("/x/{typo}", "/x/{id}"),
        ("/no/key/here?kg_=1", "/no/key/here?kg_=1"),
        ("/x/{id}", "/x/{id}"),
    ],
    ids=["path", "path-and-query", "inside-a-word", "bad-checksum", "prefix-only", "id-only"],
)
def test_redact_shows_keys_as_their_ids(template: str, shown: str) -> None:
    """Anything shaped like a key, in a path or query, becomes its id; the rest is left alone."""
    key = generate("kg_")
    full = key.full
    typo = full[:-1] + ("A" if full[-1] != "A" else "B")
    parser = KeyParser(["kg_", "kga_"])
    text = template.format(key=full, typo=typo, id=key.key_id)
    assert parser.redact(text) == shown.format(id=key.key_id)
    assert key.secret not in parser.redact(text)


@pytest.mark.parametrize(
    "template",
    ["/x/{key}", "/x?key={escaped}", "/x/{body}", "/x/{typo}", "/x?q=%00", "/x/plain", "/x/{long}"],
    ids=["key", "percent-encoded-key", "prefix-cut-off", "bad-checksum", "escaped-nul", "plain", "long-plain"],
)
def test_redact_answers_every_time_as_the_first(template: str) -> None:
    """Texts redaction left alone are remembered (a record's path is redacted per request); one it changed
    never is: the same text, asked for again, comes back exactly as the first time, keys redacted."""
    key = generate("kg_")
    full = key.full
    text = template.format(key=full, escaped="".join(f"%{ord(c):02X}" for c in full), body=full[3:],
                           typo=full[:-1] + ("A" if full[-1] != "A" else "B"), long="a/" * 200)
    parser = KeyParser(["kg_"])
    first = KeyParser(["kg_"]).redact(text)
    assert [parser.redact(text) for _ in range(3)] == [first] * 3
    assert key.secret not in first


def test_redact_remembers_a_bounded_number_of_texts() -> None:
    """Paths sent to fill the memo of key-free texts cost memory for a moment, never more than its bound."""
    parser = KeyParser(["kg_"])
    for i in range(3 * keys._UNCHANGED_TEXTS):
        assert parser.redact(f"/x/{i}") == f"/x/{i}"
        assert len(parser._unchanged) <= keys._UNCHANGED_TEXTS
    assert parser.redact("/" + "a" * keys._UNCHANGED_TEXT) not in parser._unchanged


def test_redact_keeps_the_longest_prefix() -> None:
    """Of two prefixes ending alike ("kga_" and "a_"), a key of the longer one is shown with all of it."""
    key = generate("kga_")
    assert KeyParser(["a_", "kga_"]).redact(f"/{key.full}") == f"/{key.key_id}"


@pytest.mark.parametrize(
    "template",
    ["/x?key={escaped}", "/x?key={double}", "/x/{missing}", "/x/{body}", "/x?key={escaped}#{key}"],
    ids=["percent-encoded", "double-encoded", "characters-missing", "prefix-cut-off", "fragment"],
)
def test_redact_finds_keys_however_written(template: str) -> None:
    """Escaped, double-escaped, shortened or prefix-less keys are redacted too: no secret survives."""
    key = generate("kg_")
    full = key.full
    escaped = "".join(f"%{ord(c):02X}" if i % 2 else c for i, c in enumerate(full))
    text = template.format(key=full, escaped=escaped, double=escaped.replace("%", "%25"), missing=full[:-3],
                           body=full[3:])
    shown = KeyParser(["kg_", "kga_"]).redact(text)
    assert key.secret[:16] not in shown and key.secret[16:] not in shown
    assert key.key_id[3:] in shown


def test_redact_leaves_other_long_words() -> None:
    """A 50-character word that is no key body (wrong checksum) and escapes without keys stay as they are."""
    parser = KeyParser(["kg_"])
    word = "a" * 50
    assert parser.redact(f"/x/{word}?q=%2F%20") == f"/x/{word}?q=%2F%20"


@pytest.mark.parametrize(
    "text",
    ["/x?q=%00{key}", "/x/%0a%0d{key}", "/admin/v1/roles/a\x00b", "/x?q=%2500{key}", "/x/\udcff{key}"],
    ids=["escaped-nul-beside-a-key", "escaped-newlines", "decoded-nul", "double-escaped-nul", "raw-byte"],
)
def test_redacted_text_is_always_printable(text: str) -> None:
    """What redaction returns holds no control character (PostgreSQL refuses NUL in text, logs break on CR/LF)."""
    key = generate("kg_")
    shown = KeyParser(["kg_"]).redact(text.format(key=key.full))
    assert shown.isprintable()
    assert key.secret not in shown
