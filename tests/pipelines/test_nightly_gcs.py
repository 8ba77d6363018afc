"""The nightly chain with everything on gs:// (GCS emulator): ledger, lock, runs, snapshots, LATEST."""

from __future__ import annotations

import json

import pytest

from encoder.run_lock import LockHeld, run_lock
from indexing.publish import read_latest
from pipelines.nightly import read_ledger, run_nightly
from pipelines.nightly_config import EvaluateSettings, NightlyConfig
from tests.conftest import upload_dir

pytestmark = [pytest.mark.gcs, pytest.mark.slow]


def test_nightly_on_gcs(gcs_emulator, gcs_bucket, demo_catalog, tiny_model, tmp_path):
    catalog = upload_dir(gcs_emulator, demo_catalog.root, gcs_bucket, "catalog")
    model = upload_dir(gcs_emulator, tiny_model, gcs_bucket, "models/tiny")
    out = f"gs://{gcs_bucket}/lookalike"
    cfg = NightlyConfig(catalog=f"{catalog}/manifest.parquet", model=model, out=out,
                        interactions=f"{catalog}/interactions.parquet",
                        evaluate=EvaluateSettings(gates=("ndcg@5>=baseline-1",), since_days=None, min_queries=10))  # fmt: skip
    with run_lock(out, "someone-else", ttl_h=1), pytest.raises(LockHeld, match="locked by run someone-else"):
        run_nightly(cfg, "nightly-1")
    result = run_nightly(cfg, "nightly-1")
    assert result.published == "nightly-1" == read_latest(f"{out}/snapshots").snapshot_id
    assert result.steps[0]["counts"]["embedded"] == 95
    assert read_ledger(out, "nightly-1")[-1] == {**read_ledger(out, "nightly-1")[-1], "step": "run", "status": "done"}
    names = {b.name for b in gcs_emulator.list_blobs(gcs_bucket, prefix="lookalike/runs/")}
    assert "lookalike/runs/nightly-1/ledger.jsonl" in names and "lookalike/runs/LOCK" not in names
    report = json.loads(gcs_emulator.bucket(gcs_bucket).blob("lookalike/runs/nightly-1/evaluation/metrics.json")
                        .download_as_bytes())  # fmt: skip
    assert report["baseline"] == "builtin:pixels"
