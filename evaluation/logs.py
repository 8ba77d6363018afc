"""Interaction logs → graded relevance per query item, with every dropped row counted.

Rows: `query_item_id`, `clicked_item_id`, optional `weight` (default 1), `timestamp`,
`session_id`. Parquet, CSV or JSON lines; local or gs://.

Documented handling:
- exact duplicate rows (all columns equal) count once (a logging retry, not two clicks);
- self-clicks (clicked == query) are dropped;
- rows with a missing id or a non-positive or non-finite weight are dropped;
- `since`: only rows at or after it (needs `timestamp`);
- relevance of (query, item) = the sum of its rows' weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import pyarrow as pa
import pyarrow.compute as pc

from evaluation.catalog import read_table

__all__ = ["Judgments", "LogError", "read_judgments"]

REQUIRED = ("query_item_id", "clicked_item_id")


class LogError(ValueError):
    """The interaction logs cannot be used at all; the message says why."""


@dataclass
class Judgments:
    """Relevance per query item, and what was dropped on the way."""

    relevance: dict[str, dict[str, float]]
    counts: dict[str, int] = field(default_factory=dict)


def _read_table(uri: str) -> pa.Table:
    try:
        return read_table(uri, string_columns=REQUIRED + ("session_id",))
    except FileNotFoundError as err:
        raise LogError(f"interaction log {uri} does not exist") from err
    except ValueError as err:
        raise LogError(f"interaction log: {err}") from err


def read_judgments(uri: str, since: datetime | None = None) -> Judgments:
    """Read logs and aggregate them into graded relevance (see the module docstring).

    Raises:
        LogError: unreadable, missing columns, `since` without timestamps, or no usable rows.
    """
    table = _read_table(uri)
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise LogError(f"interaction log {uri} lacks column(s) {missing}; found {table.column_names}")
    counts = {"rows": table.num_rows}
    if table.num_rows == 0:
        raise LogError(f"interaction log {uri} has no rows")
    columns = {c: table.column(c).cast(pa.string()) for c in REQUIRED}
    weight = (
        table.column("weight").cast(pa.float64())
        if "weight" in table.column_names
        else pa.array([1.0] * table.num_rows)
    )
    extra = {c: table.column(c) for c in ("timestamp", "session_id") if c in table.column_names}
    table = pa.table({**columns, "weight": weight, **extra})

    if since is not None:
        if "timestamp" not in table.column_names:
            raise LogError(f"--since needs a timestamp column; {uri} has {table.column_names}")
        stamp = table.column("timestamp")
        threshold = pa.scalar(since, type=stamp.type) if pa.types.is_timestamp(stamp.type) else pa.scalar(since)
        keep = pc.greater_equal(stamp, threshold)
        counts["before_since"] = table.num_rows - pc.sum(keep.cast(pa.int64())).as_py()
        table = table.filter(keep)

    before = table.num_rows
    table = table.group_by(table.column_names).aggregate([])  # exact duplicate rows count once
    counts["duplicate_rows"] = before - table.num_rows

    valid_ids = pc.and_(pc.is_valid(table.column("query_item_id")), pc.is_valid(table.column("clicked_item_id")))
    weights = table.column("weight")
    valid_weight = pc.and_(pc.is_finite(weights.fill_null(float("nan"))), pc.greater(weights.fill_null(0.0), 0.0))
    counts["bad_rows"] = table.num_rows - pc.sum(pc.and_(valid_ids, valid_weight).cast(pa.int64())).as_py()
    table = table.filter(pc.and_(valid_ids, valid_weight))
    self_click = pc.equal(table.column("query_item_id"), table.column("clicked_item_id"))
    counts["self_clicks"] = pc.sum(self_click.cast(pa.int64())).as_py() or 0
    table = table.filter(pc.invert(self_click))
    if table.num_rows == 0:
        raise LogError(f"interaction log {uri}: no usable rows left ({counts})")

    grouped = table.group_by(["query_item_id", "clicked_item_id"]).aggregate([("weight", "sum")])
    relevance: dict[str, dict[str, float]] = {}
    for query, clicked, value in zip(grouped.column("query_item_id").to_pylist(),
                                     grouped.column("clicked_item_id").to_pylist(),
                                     grouped.column("weight_sum").to_pylist(), strict=True):  # fmt: skip
        relevance.setdefault(query, {})[clicked] = float(value)
    counts["queries"] = len(relevance)
    counts["pairs"] = grouped.num_rows
    return Judgments(relevance, counts)
