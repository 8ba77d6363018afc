"""Manifest reading: formats, URI resolution, and a clear error for every unusable manifest."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

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
        ({"item_id": ["a"]}, r"lacks column\(s\) \['image_uri'\]"),
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
