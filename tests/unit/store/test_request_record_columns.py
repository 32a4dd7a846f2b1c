"""Request records are written as they are laid out: RequestRecord's fields in the INSERT's column order."""

from __future__ import annotations

import re

from gateway.models import RequestRecord
from gateway.store.rows import REQUEST_RECORD_COLUMNS as _REQUEST_RECORD_COLUMNS
from gateway.store.sql import _INSERT_REQUEST_RECORDS


def test_the_insert_names_the_record_fields_in_their_order() -> None:
    columns = re.search(r"\(([^)]*)\)", _INSERT_REQUEST_RECORDS)[1].replace(" ", "").split(",")  # type: ignore[index]
    assert columns == list(RequestRecord._fields[:_REQUEST_RECORD_COLUMNS])
    assert RequestRecord._fields[_REQUEST_RECORD_COLUMNS:] == ("id",)  # the store's to assign
