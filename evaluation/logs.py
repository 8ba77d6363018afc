"""Interaction logs → graded relevance per query item, with every dropped row counted.

Rows: `query_item_id`, `clicked_item_id`, optional `weight` (default 1), `timestamp`,
`session_id`. Parquet, CSV or JSON lines; local or gs://.

Documented handling:
- exact duplicate rows (all columns equal) count once (a logging retry, not two clicks);
- self-clicks (clicked == query) are dropped;
- rows with a missing or empty id, or a weight that is missing, not a number, non-positive or non-finite are dropped;
- `since`: only rows at or after it (needs `timestamp`: timestamps, dates or ISO 8601 text, UTC unless they name
  a zone); rows whose time is missing or unreadable are dropped and counted apart;
- relevance of (query, item) = the sum of its rows' weights;
- `max_queries`: the rows of at most that many query items, chosen by a hash of their ids, are kept before the
  rules above are applied (so their counts are of those rows), and the others are counted as not sampled.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from encoder import storage
from encoder.tables import TABLE_FORMATS, file_columns, instants, text_column, with_file_columns
from evaluation.catalog import read_table

__all__ = ["Judgments", "LogError", "read_judgments"]

REQUIRED = ("query_item_id", "clicked_item_id")
PAIR_COLUMNS = (*REQUIRED, "weight")  # `Judgments.pairs`
COLUMNS = (*REQUIRED, "weight", "timestamp", "session_id")  # what is read of each file; other columns never are
_DAY_KEY = re.compile(r"(?:^|/)[A-Za-z_][A-Za-z0-9_]*=(\d{4}-\d{2}-\d{2}|\d{8})(?=/)")
_DAY_PART = re.compile(r"(?:^|/)(year|month|day)=(\d{1,4})(?=/)")


class LogError(ValueError):
    """The interaction logs cannot be used at all; the message says why."""


@dataclass
class Judgments:
    """Relevance per query item, and what was dropped on the way.

    `pairs`: one row per (query, clicked item) pair, `query_item_id`, `clicked_item_id` and `weight` (its
    relevance, > 0), in no particular order: Arrow columns, not a Python object a pair, so a month of a
    marketplace's logs (millions of queries, tens of millions of pairs) costs its bytes and no more."""

    pairs: pa.Table
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:  # the ids as large strings once, as `items` and evaluation's lookups take them
        for name in REQUIRED:
            at = self.pairs.schema.get_field_index(name)
            self.pairs = self.pairs.set_column(at, name, self.pairs.column(name).cast(pa.large_string()))

    @classmethod
    def from_relevance(cls, relevance: Mapping[str, Mapping[str, float]], counts: dict[str, int] | None = None
                       ) -> Judgments:  # fmt: skip
        """Judgments from `{query: {clicked: relevance}}` (tests, hand-made judgments)."""
        rows = [(query, item, float(value)) for query, clicked in relevance.items() for item, value in clicked.items()]
        columns = list(zip(*rows, strict=True)) if rows else [[], [], []]
        return cls(pa.table({PAIR_COLUMNS[0]: pa.array(columns[0], pa.string()),
                             PAIR_COLUMNS[1]: pa.array(columns[1], pa.string()),
                             PAIR_COLUMNS[2]: pa.array(columns[2], pa.float64())}), dict(counts or {}))  # fmt: skip

    @property
    def relevance(self) -> dict[str, dict[str, float]]:
        """`{query: {clicked: relevance}}`, built on asking: a Python object a pair (small logs, tests)."""
        out: dict[str, dict[str, float]] = {}
        for query, clicked, value in zip(*(self.pairs.column(c).to_pylist() for c in PAIR_COLUMNS), strict=True):
            out.setdefault(query, {})[clicked] = value
        return out

    def items(self) -> pa.Array:
        """Every item judged, as a query or as clicked, once."""
        chunks = [chunk for c in REQUIRED for chunk in self.pairs.column(c).chunks]
        return pc.unique(pa.chunked_array(chunks, pa.large_string()))


def log_files(uri: str) -> list[str]:
    """The files of an interaction log: one file, a glob of them, or a folder of them (logs partitioned by day, as
    `clicks/dt=2026-11-29/part-0.parquet`: its Parquet, CSV and JSON-lines files, not its markers such as `_SUCCESS`).
    [] where there is none."""
    files = storage.files_under(uri)
    if len(files) == 1 and files[0] == uri:
        return files
    return [f for f in files if os.path.splitext(f)[1].lower() in TABLE_FORMATS
            and not os.path.basename(f).startswith((".", "_"))]  # fmt: skip


def _read_table(uri: str, since: datetime | None) -> tuple[pa.Table, dict[str, int]]:
    """The logs' files as one table of the columns evaluation reads (remembering all the files have, for an error
    that names a missing one: `file_columns`), and the counts of rows read and dropped. With
    `since`, each file's rows before it are dropped as the file is read (so memory holds the window, not the
    history), and the files of partitions whose day ended well before it are not read at all (`_partition_day`)."""
    files = log_files(uri)
    if not files:
        raise LogError(f"interaction log {uri} does not exist" + (
            " (no file matches it)" if any(c in uri for c in storage.GLOB_CHARS) else ""))  # fmt: skip
    counts = {"rows": 0}
    if since is not None:
        first_day = since.astimezone(UTC).date() - timedelta(days=1)  # a day's slack for partitions in local time
        kept = [f for f in files if (_partition_day(f) or first_day) >= first_day]
        counts |= {"files_before_since": len(files) - len(kept), "no_timestamp": 0, "before_since": 0}
        if not kept:
            raise LogError(f"interaction log {uri}: its {len(files)} file(s) are all in partitions of days before "
                           f"--since {since.isoformat()}")  # fmt: skip
        files = kept
    tables = []
    for file in files:
        try:
            table = read_table(file, string_columns=REQUIRED + ("session_id",), columns=COLUMNS)
        except FileNotFoundError as err:
            raise LogError(f"interaction log {uri} does not exist") from err
        except ValueError as err:
            raise LogError(f"interaction log: {err}") from err
        counts["rows"] += table.num_rows
        tables.append(table if since is None else _since(table, since, file, counts))
    try:
        return with_file_columns(pa.concat_tables(tables, promote_options="permissive"), tables), counts
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:  # a column of one kind in a file, of another in the next
        raise LogError(f"interaction log {uri}: its {len(files)} files do not agree on their columns ({err})") from err


def _since(table: pa.Table, since: datetime, file: str, counts: dict[str, int]) -> pa.Table:
    """The file's rows at or after `since`, their times as UTC instants; the rows dropped counted."""
    if "timestamp" not in table.column_names:
        raise LogError(f"--since needs a timestamp column; {file} has {file_columns(table)}")
    try:
        stamp = instants(table.column("timestamp"), f"{file}: timestamp")
    except ValueError as err:
        raise LogError(str(err)) from err
    keep = pc.greater_equal(stamp, pa.scalar(since, type=stamp.type))  # null where the time is: dropped
    counts["no_timestamp"] += stamp.null_count  # missing or not a time: not known to be after `since`
    counts["before_since"] += table.num_rows - _true(keep) - stamp.null_count
    table = table.set_column(table.schema.get_field_index("timestamp"), "timestamp", stamp)
    return table.filter(keep)


def _partition_day(path: str) -> date | None:
    """The day a file's partition names (`dt=2026-11-29`, `date=20261129`, or `year=2026/month=11/day=29`), if any.
    A warehouse partitions logs by the day their events happened or arrived; either way, no event in a partition
    comes after its day's end, which is what lets `since` skip it."""
    days = [m.group(1) for m in _DAY_KEY.finditer(path)]
    try:
        if len(days) == 1:
            return date.fromisoformat(days[0]) if "-" in days[0] else datetime.strptime(days[0], "%Y%m%d").date()
        parts = dict(_DAY_PART.findall(path))
        if {"year", "month", "day"} <= parts.keys():
            return date(int(parts["year"]), int(parts["month"]), int(parts["day"]))
    except ValueError:  # dt=2026-02-30: not a day, so not a reason to skip the file
        return None
    return None


def read_judgments(uri: str, since: datetime | None = None, max_queries: int | None = None) -> Judgments:
    """Read logs and aggregate them into graded relevance (see the module docstring).

    `max_queries`: at most this many query items, those whose ids hash lowest (`_sample_queries`).

    Raises:
        LogError: unreadable, missing columns, `since` without timestamps, or no usable rows.
    """
    if max_queries is not None and max_queries < 1:
        raise ValueError(f"max_queries must be >= 1, got {max_queries}")
    table, counts = _read_table(uri, since)
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise LogError(f"interaction log {uri} lacks column(s) {missing}; found {file_columns(table)}")
    if counts["rows"] == 0:
        raise LogError(f"interaction log {uri} has no rows")
    if since is not None and table.num_rows == 0:
        raise LogError(f"interaction log {uri}: no row at or after --since {since.isoformat()} ({counts})")
    try:  # ids, and sessions (exact duplicate rows are found by them), as text
        columns = {c: text_column(table, c, f"interaction log {uri}") for c in (*REQUIRED, "session_id")}
    except ValueError as err:
        raise LogError(str(err)) from err
    weight = (
        _numbers(table.column("weight"), f"{uri}: weight")
        if "weight" in table.column_names
        else pa.array([1.0] * table.num_rows)
    )
    extra = {"timestamp": table.column("timestamp")} if "timestamp" in table.column_names else {}
    if extra and pa.types.is_nested(extra["timestamp"].type):  # a key of exact duplicates, read as times by --since
        raise LogError(f"{uri}: timestamp must be timestamps, dates or ISO 8601 text, not {extra['timestamp'].type}")
    table = pa.table({**{c: v for c, v in columns.items() if v is not None}, "weight": weight, **extra})
    if max_queries is not None:
        table = _sample_queries(table, max_queries, counts)

    before = table.num_rows
    # Exact duplicate rows count once. Grouped in one thread: nearly every row is its own group, so each thread's
    # hash table held most of the rows, and merging them cost more than the threads saved (9M rows read whole:
    # 9.0 s and 3.1 GiB at peak against 10.8 s and 3.7 GiB, BENCHMARKS.md "Reading interaction logs").
    table = table.group_by(table.column_names, use_threads=False).aggregate([])
    counts["duplicate_rows"] = before - table.num_rows

    valid_ids = pc.and_(*(pc.fill_null(pc.not_equal(table.column(c), ""), False) for c in REQUIRED))  # (CSV: "")
    weights = table.column("weight")
    valid_weight = pc.and_(pc.is_finite(weights.fill_null(float("nan"))), pc.greater(weights.fill_null(0.0), 0.0))
    counts["bad_rows"] = table.num_rows - _true(pc.and_(valid_ids, valid_weight))
    table = table.filter(pc.and_(valid_ids, valid_weight))
    self_click = pc.equal(table.column("query_item_id"), table.column("clicked_item_id"))
    counts["self_clicks"] = _true(self_click)
    table = table.filter(pc.invert(self_click))
    if table.num_rows == 0:
        raise LogError(f"interaction log {uri}: no usable rows left ({counts})")

    pairs = table.group_by(list(REQUIRED), use_threads=False).aggregate([("weight", "sum")])
    pairs = pairs.rename_columns(list(PAIR_COLUMNS))
    counts["queries"] = len(pc.unique(pairs.column(REQUIRED[0])))
    counts["pairs"] = pairs.num_rows
    return Judgments(pairs, counts)


def _sample_queries(table: pa.Table, max_queries: int, counts: dict[str, int]) -> pa.Table:
    """The rows of at most `max_queries` query items: those whose ids' 64-bit FNV-1a hashes are lowest. A hash, not
    a draw, so each night samples the same items where it can (nights compare), the candidate and the baseline are
    judged on the same queries, and the relevance of millions of queries is never built to be thrown away."""
    from indexing.item_ids import fnv1a64

    queries = pc.unique(table.column("query_item_id")).drop_null()
    queries = queries.filter(pc.not_equal(queries, ""))  # an empty id's rows are bad rows: no query to sample
    counts["queries_not_sampled"] = max(0, len(queries) - max_queries)
    if len(queries) <= max_queries:
        return table
    hashes = fnv1a64(queries)
    chosen = np.argpartition(hashes, max_queries - 1)[:max_queries]
    return table.filter(pc.is_in(table.column("query_item_id"), value_set=queries.take(pa.array(chosen))))


def _true(mask: pa.ChunkedArray | pa.Array) -> int:
    """How many of a mask's values are true: 0 for an empty mask or one of nulls (Arrow's sum of those is null)."""
    return pc.sum(mask.cast(pa.int64()), min_count=0).as_py()


def _numbers(column: pa.ChunkedArray, what: str) -> pa.ChunkedArray:
    """A column of numbers as float64; in a text column, a value that is not a number becomes null (a bad row)."""
    try:
        return column.cast(pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
            raise LogError(f"{what} must be numbers, not {column.type}") from err
    return pa.chunked_array([pa.array([_number(v) for v in column.to_pylist()], pa.float64())])


def _number(text: str | None) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None
