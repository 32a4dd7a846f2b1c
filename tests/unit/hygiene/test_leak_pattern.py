"""The token patterns README gives for GitHub's partner programme match the key format exactly."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.config.schema import Settings
from gateway.keys import BODY_LENGTH, generate

README = Path(__file__).resolve().parents[3] / "README.md"
ROW = re.compile(r"^\| `(\w+)` \| `\w+` \| `([^`]+)` \|$", re.M)


def documented() -> dict[str, str]:
    return dict(ROW.findall(README.read_text()))


def test_every_built_in_kind_has_its_pattern() -> None:
    kinds = Settings().keys.kinds
    assert documented() == {kind: f"{re.escape(k.prefix)}[0-9A-Za-z]{{{BODY_LENGTH}}}" for kind, k in kinds.items()}


@pytest.mark.parametrize("kind", sorted(Settings().keys.kinds))
def test_the_pattern_finds_every_key_of_its_kind_and_nothing_shorter(kind: str) -> None:
    pattern = re.compile(documented()[kind])
    prefix = Settings().keys.kinds[kind].prefix
    for _ in range(200):
        key = generate(prefix).full
        assert pattern.fullmatch(key)
        assert not pattern.fullmatch(key[:-1]) and not pattern.fullmatch(key + "A")
