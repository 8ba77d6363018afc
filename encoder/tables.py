"""Tables from files: a Parquet, CSV or JSON-lines file's bytes as an Arrow table, and its columns read as the
catalog, the logs and the training pairs need them (times as UTC instants, ids and titles as text), a column of
the wrong kind refused by name. pyarrow is imported where it is used: a config's check does not pay for it."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from encoder.storage import arrow_input

__all__ = ["TABLE_FORMATS", "file_columns", "instants", "repeated", "table_from_bytes", "text_column",
           "with_file_columns"]  # fmt: skip

TABLE_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl",
                 ".json": "jsonl"}  # fmt: skip


def table_from_bytes(
    data: bytes, fmt: str, string_columns: tuple[str, ...] = (), columns: tuple[str, ...] | None = None
):
    """A Parquet, CSV or JSON-lines file's bytes as an Arrow table; `string_columns` stay text where the format
    would guess another type (a CSV's `007`). JSON lines whose values change kind from row to row (ids that are
    numbers in some rows and text in others), which Arrow's JSON reader refuses, are read line by line: such a
    column, and `string_columns`, as text.

    `columns`: only those of them the file has, in that order. A Parquet or CSV file's other columns are never
    decoded: an export of interaction logs carries many that evaluation does not read.

    Raises:
        Whatever the format's reader raises for bytes it cannot read.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    def wanted(names: list[str]) -> list[str] | None:
        return None if columns is None else [c for c in columns if c in names]

    if fmt == "parquet":
        names = None if columns is None else pq.read_schema(arrow_input(data)).names  # the footer, read for them only
        table = pq.read_table(arrow_input(data), columns=wanted(names))
    elif fmt == "csv":
        options = pacsv.ConvertOptions(column_types=dict.fromkeys(string_columns, pa.string()))
        if columns is not None:  # the header's names, from the first block only
            names = pacsv.open_csv(arrow_input(data), convert_options=options).schema.names
            options.include_columns = wanted(names)
        table = pacsv.read_csv(arrow_input(data), convert_options=options)
    else:
        table = _json_table(data, string_columns)
        names = table.column_names
        table = table if columns is None else table.select(wanted(names))
    if columns is None:
        return table
    return table.replace_schema_metadata({**(table.schema.metadata or {}), _NAMES_KEY: json.dumps(names).encode()})


_NAMES_KEY = b"lookalike.file_columns"


def with_file_columns(table, parts: list):
    """`table`, joined from `parts`, remembering every column their files have (`file_columns`)."""
    names = dict.fromkeys(name for part in parts for name in file_columns(part))
    return table.replace_schema_metadata({**(table.schema.metadata or {}), _NAMES_KEY: json.dumps([*names]).encode()})


def file_columns(table) -> list[str]:
    """The columns of the file a table was read from, those left unread included (`table_from_bytes`' `columns`):
    what an error about a missing column should list, so that `query_id` is seen beside the `query_item_id` wanted."""
    stored = (table.schema.metadata or {}).get(_NAMES_KEY)
    return json.loads(stored) if stored else table.column_names


def _json_table(data: bytes, string_columns: tuple[str, ...]):
    import pyarrow as pa
    import pyarrow.json as pajson

    try:
        return pajson.read_json(arrow_input(data))
    except pa.ArrowInvalid as err:
        try:
            rows = [json.loads(line) for line in data.splitlines() if line.strip()]
            names = dict.fromkeys(name for row in rows for name in row)  # every row's, in order of appearance
            return pa.table({name: _json_column([row.get(name) for row in rows], name in string_columns)
                             for name in names})  # fmt: skip
        except (ValueError, TypeError, AttributeError, pa.ArrowException):  # not that: Arrow's own reason
            raise err from None


def repeated(column):
    """The values a column holds more than once, in order of first appearance; found in Arrow, since a Python object
    per distinct value (`value_counts().to_pylist()`) cost a catalog of 5M ids 1.65 s more here, and its memory."""
    import pyarrow.compute as pc

    counts = pc.value_counts(column)
    return pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1)).drop_null()


def instants(column, what: str):
    """A column of timestamps, dates or ISO 8601 text as UTC instants (Arrow `timestamp[us, UTC]`); a time without a
    zone is UTC, as `--since`'s is, and a text value that is not a time becomes null.

    Raises:
        ValueError: a column of another kind (numbers: seconds or milliseconds since when?), named by `what`.
    """
    import pyarrow as pa

    utc = pa.timestamp("us", tz="UTC")
    kind = column.type
    if pa.types.is_timestamp(kind) or pa.types.is_date(kind):
        return column.cast(pa.timestamp("us", tz=getattr(kind, "tz", None) or "UTC")).cast(utc)
    if not pa.types.is_string(kind) and not pa.types.is_large_string(kind):
        raise ValueError(f"{what} must be timestamps, dates or ISO 8601 text, not {kind}")
    # Arrow's own parse where every value allows it (no zone anywhere: UTC; or a zone everywhere): 1M times in 0.017 s
    # against 1.29 s one by one in Python, which takes the rest (zones mixed, or some values not times at all).
    for parsed_as in (pa.timestamp("us"), utc):
        try:
            return column.cast(parsed_as).cast(utc)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            continue
    return pa.chunked_array([pa.array([_instant(v) for v in column.to_pylist()], utc)])


def _instant(text: str | None) -> datetime | None:
    try:
        when = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _json_column(values: list, as_text: bool):
    """A JSON-lines column Arrow's reader refused: as it is where Arrow can hold it, else (and for `as_text`) each
    value as its text (7 → "7", "7" → "7")."""
    import pyarrow as pa

    if not as_text:
        try:
            return pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            pass
    return pa.array([v if v is None or isinstance(v, str) else json.dumps(v) for v in values], pa.string())


def text_column(table, name: str, what: str):
    """Column `name` as text (numbers as their digits: ids that are numbers), or None where the table has none.

    Raises:
        ValueError: a column of lists, structs or other values that have no one text, named by `what`.
    """
    import pyarrow as pa

    if name not in table.column_names:
        return None
    column = table.column(name)
    try:
        return column.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise ValueError(f"{what}'s {name} must be text, not {column.type}") from err
