"""Tables read from storage (`encoder/tables.py`): times read as UTC instants by Arrow where every value allows it,
else one by one, with the same result; columns of the wrong kind refused by name."""

from __future__ import annotations

from datetime import UTC, datetime

import pyarrow as pa
import pytest

from encoder.tables import _instant, instants, text_column


@pytest.mark.parametrize(
    "values",
    [
        ["2026-01-05", "2026-01-05T12:00:00", "2026-01-05 12:00:00", "2026-01-05T12:00:00.123456", None],
        ["2026-01-05T12:00:00+02:00", "2026-01-05T12:00:00Z", "2026-01-05 23:59:59-05:30", None],
        ["2026-01-05T12:00:00+02:00", "2026-01-05"],  # zones mixed: one by one
        ["2026-01-05", "never", ""],  # not all times: one by one, those as null
    ],
    ids=["no-zones", "zones", "mixed", "some-not-times"],
)
def test_text_times_read_as_python_reads_them_one_by_one(values):
    column = pa.chunked_array([pa.array(values, pa.string())])
    read = instants(column, "t")
    assert read.type == pa.timestamp("us", tz="UTC")
    assert read.to_pylist() == [_instant(v) for v in values]
    assert read.to_pylist()[0] in (datetime(2026, 1, 5, tzinfo=UTC), datetime(2026, 1, 5, 10, tzinfo=UTC))


def test_numbers_for_times_and_lists_for_text_are_refused_by_name():
    with pytest.raises(ValueError, match="the log's t must be timestamps, dates or ISO 8601 text, not int64"):
        instants(pa.chunked_array([pa.array([1, 2])]), "the log's t")
    table = pa.table({"id": [[1], [2]], "n": [7, 8]})
    assert text_column(table, "n", "m").to_pylist() == ["7", "8"] and text_column(table, "x", "m") is None
    with pytest.raises(ValueError, match="m's id must be text, not list<item: int64>"):
        text_column(table, "id", "m")
