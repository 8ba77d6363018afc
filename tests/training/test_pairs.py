import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from encoder.preprocess import PreprocessConfig
from training.pairs import PairError, collect_pairs, read_pairs, split_of, write_pairs

CFG = PreprocessConfig(height=32, width=32)


def _collect(manifest, **kwargs):
    return collect_pairs(str(manifest), CFG, val_fraction=kwargs.pop("val_fraction", 0.2), max_val_items=100, **kwargs)


def test_broken_images_and_empty_titles_are_skipped_and_counted(tmp_path, demo_catalog):
    table = pq.read_table(demo_catalog.manifest)
    titles = table.column("title").to_pylist()
    titles[0], titles[1] = "", "   "
    table = table.set_column(table.schema.get_field_index("title"), "title", pa.array(titles))
    table = table.set_column(table.schema.get_field_index("image_uri"), "image_uri",
                             pa.array([str(demo_catalog.root / u) for u in table.column("image_uri").to_pylist()]))  # fmt: skip
    pq.write_table(table, tmp_path / "manifest.parquet")
    pairs = _collect(tmp_path / "manifest.parquet")
    broken = set(demo_catalog.broken_item_ids) - {table.column("item_id")[i].as_py() for i in (0, 1)}
    assert pairs.counts["skipped_empty_title"] == 2
    assert pairs.counts["skipped_broken_image"] == len(broken)
    assert pairs.counts["pairs"] == table.num_rows - 2 - len(broken) == pairs.table.num_rows
    assert pairs.counts["train"] + pairs.counts["val"] == pairs.counts["pairs"]
    assert not broken & set(pairs.table.column("item_id").to_pylist())
    assert {e["reason"].split(":")[0] for e in pairs.skipped_examples} >= {"empty title", "broken image"}
    write_pairs(pairs, str(tmp_path / "pairs.parquet"))
    again = read_pairs(str(tmp_path / "pairs.parquet"))
    assert again.digest == pairs.digest and again.counts == pairs.counts


def test_split_is_stable_per_item_and_close_to_the_fraction():
    ids = [f"item-{i}" for i in range(4000)]
    share = sum(split_of(i, 0.1) == "val" for i in ids) / len(ids)
    assert 0.08 < share < 0.12
    assert [split_of(i, 0.1) for i in ids[:50]] == [split_of(i, 0.1) for i in ids[:50]]


def test_val_items_are_capped(demo_catalog):
    pairs = collect_pairs(str(demo_catalog.manifest), CFG, val_fraction=0.5, max_val_items=7)
    assert pairs.counts["val"] == 7


@pytest.mark.parametrize(
    "rows, message",
    [
        (
            {"item_id": ["a"], "image_uri": ["a.jpg"], "name": ["t"]},
            r"lacks column\(s\) \['title'\] .*; found \['item_id', 'image_uri', 'name'\]",
        ),  # fmt: skip
        ({"item_id": ["a", "a"], "image_uri": ["x", "y"], "title": ["t", "u"]}, "duplicate item_id"),
        ({"item_id": [None, "b"], "image_uri": ["x", "y"], "title": ["t", "u"]}, "without an item_id"),
        (
            {"item_id": ["a", "b"], "image_uri": ["x", "y"], "title": [{"en": "t"}, {"en": "u"}]},
            "m.parquet's title must be text, not struct<en: string>",
        ),
    ],
)
def test_unusable_manifests_fail_with_the_reason(tmp_path, rows, message):
    pq.write_table(pa.table(rows), tmp_path / "m.parquet")
    with pytest.raises(PairError, match=message):
        _collect(tmp_path / "m.parquet")


def test_missing_manifest(tmp_path):
    with pytest.raises(PairError, match="does not exist"):
        _collect(tmp_path / "nope.parquet")
