"""The embed pipeline reading and writing gs:// against the GCS emulator."""

from __future__ import annotations

import io
import json
import os
import re
from collections import Counter
from datetime import UTC, datetime
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from encoder import storage
from pipelines.embed import EmbedConfig, run_embed
from pipelines.embed_runs import shard_stats
from pipelines.records import FAILURE_SCHEMA, embedding_table
from pipelines.summary import print_embed_summary
from tests.conftest import upload_dir
from tests.support.fault_proxy import FaultProxy, through

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

    # Every image was read from gs:// once per run (the manifest's relative URIs resolve beside it there, a missing
    # one included); second requests within their budget.
    on_gcs = 100
    for run in (first, second):
        reads = run.manifest["object_store_reads"]
        assert reads["reads"] == on_gcs
        assert (
            reads["second_requests_used"] <= reads["second_requests"] <= 8 + 0.1 * (on_gcs + reads["second_requests"])
        )
    out = io.StringIO()
    print_embed_summary(first, Console(file=out, width=160))
    assert re.search(rf"object-store reads\s*│\s*{on_gcs} \(second requests \d+, [\d.]+%; \d+ used\)", out.getvalue())


def test_a_glob_of_images_on_gcs(gcs_emulator, gcs_bucket, demo_catalog, tiny_model):
    catalog = upload_dir(gcs_emulator, demo_catalog.root, gcs_bucket, "glob-catalog")
    model = upload_dir(gcs_emulator, tiny_model, gcs_bucket, "models/tiny-glob")
    out = f"gs://{gcs_bucket}/glob-out"
    result = run_embed(EmbedConfig(catalog=f"{catalog}/images/00001*", model=model, out=out))
    expected = sorted(p.stem for p in (demo_catalog.root / "images").glob("00001*"))
    assert result.counts["items_in"] == len(expected) == 10
    assert result.counts["embedded"] + result.counts["dead_lettered"] == 10
    assert not list(gcs_emulator.list_blobs(gcs_bucket, prefix="glob-out/tmp/"))  # the listing went with the run


def _parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


@pytest.mark.parametrize("faults", [0.0, 0.3])
def test_a_finished_run_counts_its_shards_from_their_footers_not_their_vectors(gcs_emulator, gcs_bucket, faults):
    """The launcher's accounting after a run fetches each shard's footer, not the shard: a night's vectors are
    not downloaded again to count them. Transient faults are retried."""
    rng = np.random.default_rng(0)
    n, dim = 4000, 768
    shard = _parquet(embedding_table([f"item-{i}" for i in range(n)], rng.standard_normal((n, dim), np.float32),
                                     ["0" * 64] * n, ["siglip-test"] * n,
                                     pa.array([datetime(2026, 11, 26, tzinfo=UTC)] * n)))  # fmt: skip
    failures = _parquet(pa.table({"item_id": ["a", "b", "c"], "image_uri": ["x"] * 3,
                                  "stage": ["fetch", "decode", "decode"], "error": [rng.bytes(300_000).hex() for _ in range(3)]},
                                 schema=FAILURE_SCHEMA))  # fmt: skip
    run, dead = f"gs://{gcs_bucket}/embeddings/r1", f"gs://{gcs_bucket}/failures/r1"
    kinds = ("429", "500", "503", "reset", "truncated")
    with FaultProxy(urlparse(os.environ["STORAGE_EMULATOR_HOST"]).port, rate=faults, kinds=kinds, seed=1) as proxy:
        with through(proxy):  # written through the proxy too: the emulator's download links name the writer's host
            storage.write_bytes(f"{run}/part-00000-of-00001.parquet", shard)
            storage.write_bytes(f"{dead}/part-00000-of-00001.parquet", failures)
            proxy.bytes_served, proxy.counts = 0, Counter()
            stats, failure_stats = shard_stats(run), shard_stats(dead)
    assert stats == [{"path": "part-00000-of-00001.parquet", "rows": n, "bytes": len(shard)}]
    assert failure_stats == [{"path": "part-00000-of-00001.parquet", "rows": 3, "bytes": len(failures)}]
    assert faults == 0 or proxy.injected > 0
    assert proxy.bytes_served < (len(shard) + len(failures)) / 100, proxy.bytes_served
