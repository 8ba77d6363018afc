"""The embed pipeline reading and writing gs:// against the GCS emulator."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from encoder import storage
from pipelines.embed import EmbedConfig, run_embed
from tests.conftest import upload_dir

pytestmark = pytest.mark.gcs


def test_embed_from_and_to_gcs(gcs_emulator, gcs_bucket, demo_catalog, tiny_model):
    catalog = upload_dir(gcs_emulator, demo_catalog.root, gcs_bucket, "catalog")
    model = upload_dir(gcs_emulator, tiny_model, gcs_bucket, "models/tiny")
    out = f"gs://{gcs_bucket}/out"

    first = run_embed(EmbedConfig(catalog=f"{catalog}/manifest.parquet", model=model, out=out))
    assert first.counts == {"items_in": 100, "embedded": 95, "reused": 0, "dead_lettered": 5}
    assert first.run_dir == f"{out}/embeddings/{first.run_id}"

    bucket = gcs_emulator.bucket(gcs_bucket)
    manifest = json.loads(bucket.blob(f"out/embeddings/{first.run_id}/_manifest.json").download_as_bytes())
    rows = 0
    for shard in manifest["shards"]:
        data = bucket.blob(f"out/embeddings/{first.run_id}/{shard['path']}").download_as_bytes()
        rows += pq.read_table(storage.arrow_input(data)).num_rows
    assert rows == 95
    failure_names = [b.name for b in gcs_emulator.list_blobs(gcs_bucket, prefix=f"out/failures/{first.run_id}/")]
    assert failure_names and all(n.endswith(".parquet") for n in failure_names)

    second = run_embed(EmbedConfig(catalog=f"{catalog}/manifest.parquet", model=model, out=out))
    assert second.counts == {"items_in": 100, "embedded": 0, "reused": 95, "dead_lettered": 5}
    assert second.manifest["previous_run"] == first.run_id


def test_a_glob_of_images_on_gcs(gcs_emulator, gcs_bucket, demo_catalog, tiny_model):
    catalog = upload_dir(gcs_emulator, demo_catalog.root, gcs_bucket, "glob-catalog")
    model = upload_dir(gcs_emulator, tiny_model, gcs_bucket, "models/tiny-glob")
    out = f"gs://{gcs_bucket}/glob-out"
    result = run_embed(EmbedConfig(catalog=f"{catalog}/images/00001*", model=model, out=out))
    expected = sorted(p.stem for p in (demo_catalog.root / "images").glob("00001*"))
    assert result.counts["items_in"] == len(expected) == 10
    assert result.counts["embedded"] + result.counts["dead_lettered"] == 10
    assert not list(gcs_emulator.list_blobs(gcs_bucket, prefix="glob-out/tmp/"))  # the listing went with the run
