"""Hostile input files: catalog manifests, interaction logs and nightly configs of any shape either load or
fail with the reader's own error (a ValueError subclass naming the problem), never anything else.

Property-based and derandomised, so CI sees the same inputs every run.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evaluation.logs import read_judgments
from pipelines.catalog import CatalogError, read_catalog
from pipelines.nightly_config import ConfigError, NightlyConfig, load_nightly_config

FUZZ = settings(max_examples=150, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))

COLUMNS = ["item_id", "image_uri", "title", "category", "updated_at", "query_item_id", "clicked_item_id", "weight",
           "timestamp", "session_id", "junk"]  # fmt: skip
VALUES = st.one_of(
    st.none(),
    st.text(max_size=6),
    st.sampled_from(["", " ", "a", "a", "../x.jpg", "/etc/passwd", "gs://b/x.jpg", "2026-11-25", "NaN"]),
    st.integers(-3, 3),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.lists(st.integers(0, 3), max_size=2),  # Parquet and JSON lines hold lists and structs too
    st.dictionaries(st.sampled_from(["a", "b"]), st.integers(0, 3), min_size=1, max_size=2),
)


@st.composite
def tables(draw) -> list[dict]:
    """Rows as dicts: any subset of column names, values of mixed types (JSON lines keep them mixed)."""
    names = draw(st.lists(st.sampled_from(COLUMNS), unique=True, max_size=6))
    return draw(st.lists(st.fixed_dictionaries({n: VALUES for n in names}), max_size=6))


def _as_arrow(rows: list[dict]) -> pa.Table | None:
    """The rows as one Arrow table, each column cast to strings when its types are mixed; None if impossible."""
    names = list(rows[0]) if rows else []
    columns = {}
    for name in names:
        values = [r[name] for r in rows]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            columns[name] = pa.array([None if v is None else str(v) for v in values], pa.string())
    return pa.table(columns) if columns else None


def _write(folder: Path, rows: list[dict], fmt: str, garbage: bytes) -> str:
    path = folder / f"file.{fmt}"
    table = _as_arrow(rows)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif table is None or fmt == "bin":
        path = folder / f"file.{'parquet' if fmt == 'bin' else fmt}"
        path.write_bytes(garbage)
    elif fmt == "parquet":
        pq.write_table(table, path)
    else:  # CSV holds no lists or structs: those as their JSON
        pacsv.write_csv(pa.table({name: _as_text(column) if pa.types.is_nested(column.type) else column
                                  for name, column in zip(table.column_names, table.columns, strict=True)}), path)  # fmt: skip
    return str(path)


def _as_text(column: pa.ChunkedArray) -> pa.Array:
    return pa.array([None if v is None else json.dumps(v) for v in column.to_pylist()], pa.string())


FILES = (tables(), st.sampled_from(["parquet", "csv", "jsonl", "bin"]), st.binary(max_size=64))


def _read_written(rows: list[dict], fmt: str, garbage: bytes, reader, error: type[Exception]):
    """`reader` on the rows written as `fmt`: its result, or None when it refused them with `error`."""
    with tempfile.TemporaryDirectory() as folder:
        try:
            return reader(_write(Path(folder), rows, fmt, garbage))
        except error as err:
            assert str(err)
            return None


@FUZZ
@given(*FILES)
def test_any_manifest_loads_valid_or_fails_with_a_catalog_error(rows, fmt, garbage):
    table = _read_written(rows, fmt, garbage, read_catalog, CatalogError)
    if table is not None:
        ids = table.column("item_id").to_pylist()
        assert ids and all(isinstance(i, str) and i.strip() for i in ids) and len(set(ids)) == len(ids)
        assert all(u is None or isinstance(u, str) for u in table.column("image_uri").to_pylist())


@FUZZ
@given(*FILES)
def test_any_interaction_log_loads_or_fails_with_a_value_error(rows, fmt, garbage):
    judgments = _read_written(rows, fmt, garbage, read_judgments, ValueError)
    for query, graded in (judgments.relevance if judgments else {}).items():
        assert isinstance(query, str)
        assert all(isinstance(i, str) and i != query and math.isfinite(w) and w > 0 for i, w in graded.items())


CONFIG_KEYS = ["catalog", "model", "out", "interactions", "keep", "lock_ttl_h", "embed", "index", "evaluate",
               "batch_size", "workers", "beam_args", "gates", "since_days", "k", "backend", "min_recall", "typo"]  # fmt: skip
CONFIG_VALUES = st.recursive(
    VALUES | st.sampled_from(["gs://b/x", "ndcg@5>=baseline-0.01", "faiss", "auto"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(CONFIG_KEYS), inner, max_size=4),
    max_leaves=8,
)


@FUZZ
@given(st.one_of(st.dictionaries(st.sampled_from(CONFIG_KEYS), CONFIG_VALUES, max_size=8), CONFIG_VALUES))
def test_any_nightly_config_loads_typed_or_fails_with_a_config_error(document):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "nightly.yaml"
        path.write_text(yaml.safe_dump(document))
        try:
            config = load_nightly_config(str(path))
        except ConfigError as err:
            assert str(path) in str(err)
            return
    assert isinstance(config, NightlyConfig)
    assert all(isinstance(getattr(config, n), str) for n in ("catalog", "model", "out", "interactions"))
    assert isinstance(config.keep, int) and isinstance(config.embed.batch_size, int)


@FUZZ
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_config_files_of_random_bytes_fail_with_a_config_error(data):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "nightly.yaml"
        path.write_bytes(data)
        try:
            load_nightly_config(str(path))
        except ConfigError:
            pass
