"""Manifest reading: formats, URI resolution, and a clear error for every unusable manifest."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.catalog import CatalogError, catalog_files, item_chunks, iter_items, read_catalog


def _write_parquet(path, **columns):
    pq.write_table(pa.table(columns), path)
    return str(path)


def test_parquet_manifest_resolves_relative_uris(tmp_path):
    path = _write_parquet(tmp_path / "m.parquet", item_id=["a", "b"], image_uri=["images/a.jpg", "/abs/b.jpg"])
    items = list(iter_items(read_catalog(path)))
    assert items[0].image_uri == str(tmp_path / "images" / "a.jpg")
    assert items[1].image_uri == "/abs/b.jpg"


def test_json_lines_with_ids_that_are_numbers_in_some_rows_keep_them_as_text(tmp_path):
    rows = [{"item_id": 7, "image_uri": "a.jpg"}, {"item_id": "sku-8", "image_uri": "b.jpg", "title": "a mug"},
            {"item_id": 9.5, "image_uri": "c.jpg"}]  # fmt: skip
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    table = read_catalog(str(tmp_path / "m.jsonl"))
    assert table.column("item_id").to_pylist() == ["7", "sku-8", "9.5"]
    assert table.column("title").to_pylist() == [None, "a mug", None]
    (tmp_path / "bad.jsonl").write_text('{"item_id": 1, "image_uri": "a.jpg"}\n{"item_id": "x", "image_uri": \n')
    with pytest.raises(CatalogError, match="cannot read manifest .*bad.jsonl: ArrowInvalid"):  # Arrow's reason
        read_catalog(str(tmp_path / "bad.jsonl"))


def test_file_uris_of_this_machine_are_its_paths(tmp_path):
    uris = ["file:///data/a%20b.jpg", "file://localhost/data/c.jpg", "file://elsewhere/d.jpg", " file:///e.jpg "]
    path = _write_parquet(tmp_path / "m.parquet", item_id=["a", "c", "d", "e"], image_uri=uris)
    assert [i.image_uri for i in iter_items(read_catalog(path))] == [
        "/data/a b.jpg",
        "/data/c.jpg",
        "file://elsewhere/d.jpg",  # another machine's: dead-lettered by the fetch, not read from here
        "/e.jpg",
    ]


def test_csv_keeps_numeric_looking_ids_as_strings(tmp_path):
    (tmp_path / "m.csv").write_text("item_id,image_uri,title\n007,x.jpg,a mug\n8,y.jpg,a vase\n")
    table = read_catalog(str(tmp_path / "m.csv"))
    assert table.column("item_id").to_pylist() == ["007", "8"]


def test_jsonl_manifest(tmp_path):
    rows = [{"item_id": "a", "image_uri": "gs://b/a.jpg"}, {"item_id": "b", "image_uri": "gs://b/b.jpg"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert [i.image_uri for i in iter_items(read_catalog(str(tmp_path / "m.jsonl")))] == [
        "gs://b/a.jpg",
        "gs://b/b.jpg",
    ]


def test_glob_of_manifest_shards(tmp_path):
    _write_parquet(tmp_path / "p1.parquet", item_id=["a"], image_uri=["a.jpg"])
    _write_parquet(tmp_path / "p2.parquet", item_id=["b"], image_uri=["b.jpg"])
    assert read_catalog(str(tmp_path / "p*.parquet")).column("item_id").to_pylist() == ["a", "b"]


def test_glob_of_images_uses_file_stems(tmp_path):
    for name in ("x.jpg", "y.png"):
        (tmp_path / name).write_bytes(b"")
    kind, files = catalog_files(str(tmp_path / "*"))
    assert kind == "images" and len(files) == 2
    assert sorted(read_catalog(str(tmp_path / "*")).column("item_id").to_pylist()) == ["x", "y"]


def test_item_chunks_cover_the_catalog_in_order(tmp_path):
    ids = [f"id-{i}" for i in range(10)]
    path = _write_parquet(tmp_path / "m.parquet", item_id=ids, image_uri=[f"/i/{i}.jpg" for i in ids])
    chunks = list(item_chunks(read_catalog(path), 4))
    assert [len(c) for c in chunks] == [4, 4, 2]
    assert [item for c in chunks for item in c.items()] == list(iter_items(read_catalog(path)))


def test_item_ids_that_look_like_paths_are_just_data(tmp_path):
    ids = ["../../etc/passwd", "a/b", "é 中"]
    path = _write_parquet(tmp_path / "m.parquet", item_id=ids, image_uri=["a.jpg"] * 3)
    assert read_catalog(path).column("item_id").to_pylist() == ids


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"item_id": ["a"], "image": ["a.jpg"]}, r"lacks column\(s\) \['image_uri'\]; found \['item_id', 'image'\]"),
        ({"item_id": pa.array([], pa.string()), "image_uri": pa.array([], pa.string())}, "no rows"),
        ({"item_id": ["a", "b", "a"], "image_uri": ["1", "2", "3"]}, r"1 duplicate item_id\(s\), e.g. \['a'\]"),
        ({"item_id": ["a", None, " "], "image_uri": ["1", "2", "3"]}, r"2 row\(s\) with an empty item_id"),
        ({"item_id": [1, 2], "image_uri": [["1"], ["2"]]}, r"m.parquet's image_uri must be text, not list<element"),
    ],
    ids=["missing-column", "empty", "duplicates", "blank-ids", "list-uris"],
)
def test_unusable_manifests_fail_with_the_reason(tmp_path, columns, message):
    path = _write_parquet(tmp_path / "m.parquet", **columns)
    with pytest.raises(CatalogError, match=message):
        read_catalog(path)


def test_unreadable_manifest(tmp_path):
    (tmp_path / "m.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(CatalogError, match="cannot read manifest"):
        read_catalog(str(tmp_path / "m.parquet"))


def test_missing_manifest(tmp_path):
    with pytest.raises(CatalogError, match="does not exist"):
        read_catalog(str(tmp_path / "nope.parquet"))


def test_unknown_format(tmp_path):
    (tmp_path / "m.xlsx").write_bytes(b"")
    with pytest.raises(CatalogError, match="unknown manifest format"):
        read_catalog(str(tmp_path / "m.xlsx"))


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(CatalogError, match="matches no files"):
        read_catalog(str(tmp_path / "*.parquet"))


def test_empty_image_uri_is_kept_for_the_pipeline_to_dead_letter(tmp_path):
    path = _write_parquet(tmp_path / "m.parquet", item_id=["a", "b"], image_uri=["a.jpg", None])
    assert [i.image_uri for i in iter_items(read_catalog(path))][1] == ""


_URI_PARTS = ["gs://b/", "http://h/", "file://", "file://localhost/", "/", "a", "é", "://", " ", "\t", "\x1c", "x.jpg",
              "../", "foo/bar://", "S3://", "\u00a0"]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.none(), st.lists(st.sampled_from(_URI_PARTS), max_size=4).map("".join)), max_size=20))
def test_image_uris_made_absolute_at_once_are_those_resolve_gives_one_by_one(uris):
    """Only the URIs `storage.resolve` would change go through it (a 30M-item catalog's were all absolute, and took
    the launcher ~17 s one by one); the column is what resolving each would give, whatever the URIs hold."""
    from encoder import storage

    for base in ("/data/catalog", "gs://bucket/catalog"):
        expected = [storage.resolve(base, uri) for uri in uris]
        assert storage.resolve_all(base, pa.chunked_array([pa.array(uris, pa.string())])).to_pylist() == expected


def test_a_catalog_read_for_some_columns_never_reads_the_others(tmp_path):
    """The embed launcher keeps `updated_at` of a catalog's columns (for `--since`); a description, a price or a
    column whose kind differs from file to file was read, held, and could fail the concatenation."""
    for n, price in enumerate(([1, 2], ["1.00", "2.00"])):
        pq.write_table(pa.table({"item_id": [f"a{n}", f"b{n}"], "image_uri": ["/x.jpg", "y.jpg"], "price": price,
                                 "updated_at": ["2026-11-29", None]}), tmp_path / f"part-{n}.parquet")  # fmt: skip
    with pytest.raises(CatalogError, match="incompatible schemas"):
        read_catalog(str(tmp_path / "part-*.parquet"))  # every column: the prices do not agree
    table = read_catalog(str(tmp_path / "part-*.parquet"), columns=("updated_at", "missing"))
    assert table.column_names == ["item_id", "image_uri", "updated_at"] and table.num_rows == 4
    assert table.column("image_uri").to_pylist() == ["/x.jpg", str(tmp_path / "y.jpg")] * 2


def test_duplicate_ids_are_found_in_arrow_and_named(tmp_path):
    from encoder.tables import repeated

    assert repeated(pa.chunked_array([["a", "b", None, "a", None, "c", "b", "a"]])).to_pylist() == ["a", "b"]
    path = _write_parquet(tmp_path / "m.parquet", item_id=["a", "b", "a"], image_uri=["1.jpg", "2.jpg", "3.jpg"])
    with pytest.raises(CatalogError, match=r"has 1 duplicate item_id\(s\), e.g. \['a'\]"):
        read_catalog(path)


def test_a_catalog_read_for_some_columns_names_all_of_its_columns_when_one_is_missing(tmp_path):
    """The launcher reads three columns; a manifest without `image_uri` still names its `image` column in the error,
    as when every column was read. Likewise `--since` without `updated_at`."""
    for n in range(2):
        _write_parquet(tmp_path / f"part-{n}.parquet", item_id=[f"a{n}"], image=["a.jpg"], modified=["2026-11-29"])
    with pytest.raises(CatalogError, match=r"lacks column\(s\) \['image_uri'\]; found \['item_id', 'image', 'modif"):
        read_catalog(str(tmp_path / "part-*.parquet"), columns=("updated_at",))
    from encoder.tables import file_columns

    _write_parquet(tmp_path / "m.parquet", item_id=["a"], image_uri=["a.jpg"], modified=["2026-11-29"])
    table = read_catalog(str(tmp_path / "m.parquet"), columns=("updated_at",))
    assert table.column_names == ["item_id", "image_uri"] and file_columns(table) == [
        "item_id",
        "image_uri",
        "modified",
    ]
    from pipelines.embed import _updated_since

    with pytest.raises(
        CatalogError, match=r"needs an updated_at column .*; found \['item_id', 'image_uri', 'modified'\]"
    ):
        _updated_since(table, "2026-01-01")
