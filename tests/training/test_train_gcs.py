"""Training from a gs:// manifest, gs:// images and a gs:// model, against the GCS emulator."""

import pytest

from encoder import EncoderConfig, load_encoder
from tests.conftest import upload_dir
from training import train

pytestmark = pytest.mark.gcs


def test_train_from_gcs(gcs_emulator, gcs_bucket, demo_catalog, tiny_model, train_config, tmp_path):
    catalog = upload_dir(gcs_emulator, demo_catalog.root, gcs_bucket, "catalog")
    model = upload_dir(gcs_emulator, tiny_model, gcs_bucket, "models/tiny")
    cfg = train_config(catalog=f"{catalog}/manifest.parquet", model=model, epochs=1, workers=1,
                       cache_dir=str(tmp_path / "cache"))  # fmt: skip
    result = train(cfg)
    assert result.counts["skipped_broken_image"] == len(demo_catalog.broken_item_ids)
    assert result.counts["pairs"] == 100 - len(demo_catalog.broken_item_ids)
    assert result.steps > 0
    assert load_encoder(EncoderConfig(model=result.encoder)).model_version == result.model_version
