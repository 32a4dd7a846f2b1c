"""Request ids: the proxy's fresh ids, read from the OS in batches."""

from __future__ import annotations

import re

import pytest

from gateway.keys import generate
from gateway.pipeline.request_ids import RequestIds, request_id_of

KEY = generate("kg_").full


@pytest.mark.parametrize(("given", "kept"), [
    ("5f0c6d4e-2b1a-49c8-a7e3-d2f1b0c9a8e7", True),  # a uuid
    ("0af7651916cd43dd8448eb211c80319c", True),  # a W3C trace id
    ("a" * 49, True),  # shorter than a key's body
    ("ci.run-42:step_3", True),
    ("a" * 128, False),  # key-sized: may be a key
    (KEY, False),  # a key sent as the id by mistake: logged, sent upstream and answered if kept
    (KEY.removeprefix("kg_"), False),  # its body without the prefix
    ("id-" + KEY, False),
    ("a" * 129, False),  # too long
    ("two words", False),
    ("", False),
    ("caf\u00e9", False),
])
def test_the_clients_request_id_is_kept_only_when_sane_and_not_key_sized(given: str, kept: bool) -> None:
    assert request_id_of({"X-Request-Id": given}, lambda: "fresh") == (given if kept else "fresh")


def test_without_a_request_id_a_fresh_one() -> None:
    assert request_id_of({}, lambda: "fresh") == "fresh"


def test_fresh_request_ids_are_distinct_32_hex_digits_across_batches() -> None:
    """Three batches' worth of ids are all 32 lowercase hex digits and no two are equal."""
    ids = RequestIds()
    made = [ids() for _ in range(3 * RequestIds.BATCH)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in made)
    assert len(set(made)) == len(made)
