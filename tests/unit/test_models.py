"""Records: the proxy's RequestRow stays field for field what RequestRecord stores."""

from __future__ import annotations

from dataclasses import fields

from gateway.models import RequestRecord, RequestRow


def test_request_row_has_the_fields_of_request_record_but_the_id() -> None:
    """RequestRow names RequestRecord's fields, in the same order, without the store-assigned id."""
    assert RequestRow._fields == tuple(f.name for f in fields(RequestRecord) if f.name != "id")
