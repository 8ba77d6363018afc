"""The synthetic catalog: deterministic, realistic enough, and learnable from pixels only."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.demo_catalog import BROKEN_KINDS, make_demo_catalog


def _digest(root) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_whatever_the_process_count(tmp_path):
    one = make_demo_catalog(tmp_path / "a", items=30, seed=3, workers=1)
    two = make_demo_catalog(tmp_path / "b", items=30, seed=3, workers=2)
    assert _digest(one.root) == _digest(two.root)
    other = make_demo_catalog(tmp_path / "c", items=30, seed=4, workers=1)
    assert _digest(other.root) != _digest(one.root)


def test_manifest_contract(demo_catalog):
    manifest = pq.read_table(demo_catalog.manifest)
    assert manifest.column_names == ["item_id", "image_uri", "title", "category", "updated_at"]
    assert manifest.num_rows == demo_catalog.items
    assert len(set(manifest.column("item_id").to_pylist())) == demo_catalog.items
    assert all(not u.startswith("/") for u in manifest.column("image_uri").to_pylist())
    assert all(t.strip() for t in manifest.column("title").to_pylist())


def test_images_are_product_photos_of_the_promised_sizes(demo_catalog):
    broken = set(demo_catalog.broken_item_ids)
    manifest = pq.read_table(demo_catalog.manifest).to_pylist()
    sizes, formats = [], set()
    for row in manifest:
        if row["item_id"] in broken:
            continue
        with Image.open(demo_catalog.root / row["image_uri"]) as image:
            sizes.append(image.size)
            formats.add(image.format)
    assert all(320 <= w <= 800 and 320 <= h <= 800 for w, h in sizes)
    assert len(set(sizes)) > len(sizes) // 2  # varied, not one fixed size
    assert formats == {"JPEG", "PNG", "WEBP"}


def test_every_broken_kind_is_present_and_really_broken(demo_catalog):
    assert len(demo_catalog.broken_item_ids) == len(BROKEN_KINDS)
    manifest = {r["item_id"]: r for r in pq.read_table(demo_catalog.manifest).to_pylist()}
    missing = 0
    for item_id in demo_catalog.broken_item_ids:
        path = demo_catalog.root / manifest[item_id]["image_uri"]
        if not path.exists():
            missing += 1
            continue
        with pytest.raises(Exception):  # noqa: B017 - any decoder error is the point
            with Image.open(path) as image:
                image.load()
    assert missing == 1


def test_interactions_reference_real_items_and_follow_latent_similarity(demo_catalog):
    ids = set(pq.read_table(demo_catalog.manifest).column("item_id").to_pylist())
    logs = pq.read_table(demo_catalog.interactions).to_pylist()
    attrs = {r["item_id"]: r for r in pq.read_table(demo_catalog.attributes).to_pylist()}
    assert logs and all(r["query_item_id"] in ids and r["clicked_item_id"] in ids for r in logs)
    assert all(r["query_item_id"] != r["clicked_item_id"] for r in logs)
    assert {r["weight"] for r in logs} <= {1.0, 2.0, 3.0}
    same_category = np.mean(
        [attrs[r["query_item_id"]]["category"] == attrs[r["clicked_item_id"]]["category"] for r in logs]
    )
    assert same_category > 0.5, f"clicks share the category only {same_category:.0%} of the time (chance 12.5%)"


def test_mean_colour_does_not_reveal_the_category(demo_catalog):
    attrs = {r["item_id"]: r["category"] for r in pq.read_table(demo_catalog.attributes).to_pylist()}
    broken = set(demo_catalog.broken_item_ids)
    rows = [r for r in pq.read_table(demo_catalog.manifest).to_pylist() if r["item_id"] not in broken]
    means = np.array(
        [
            np.asarray(Image.open(demo_catalog.root / r["image_uri"]).convert("RGB"), dtype=np.float32).mean((0, 1))
            for r in rows
        ]
    )
    labels = [attrs[r["item_id"]] for r in rows]
    dist = np.linalg.norm(means[:, None] - means[None], axis=-1)
    np.fill_diagonal(dist, np.inf)
    nearest = dist.argmin(axis=1)
    agreement = np.mean([labels[i] == labels[j] for i, j in enumerate(nearest)])
    assert agreement < 0.3, f"mean-colour nearest neighbour shares the category {agreement:.0%} of the time"


def test_too_small_a_catalog_is_refused(tmp_path):
    with pytest.raises(ValueError, match="items must be >= 10"):
        make_demo_catalog(tmp_path, items=3)


def test_a_day_of_changes_reshoots_and_delists(tmp_path):
    import pyarrow.parquet as pq

    from pipelines.demo_catalog import change_demo_catalog, make_demo_catalog

    catalog = make_demo_catalog(tmp_path / "c", items=200, seed=4, workers=1)
    before = pq.read_table(catalog.manifest).to_pydict()
    photos = {i: (catalog.root / u).read_bytes() for i, u in zip(before["item_id"], before["image_uri"], strict=True)
              if (catalog.root / u).exists()}  # fmt: skip
    change = change_demo_catalog(catalog.root, fraction=0.05, seed=1)
    after = pq.read_table(catalog.manifest).to_pydict()
    assert len(change.new_photos) == 10 and len(change.removed) == 2
    assert set(before["item_id"]) - set(after["item_id"]) == set(change.removed)
    rows = dict(zip(after["item_id"], after["image_uri"], strict=True))
    changed = {i for i in rows if i in photos and (catalog.root / rows[i]).read_bytes() != photos[i]}
    assert changed == set(change.new_photos)
