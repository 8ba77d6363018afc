"""The Dataflow deployment, offline: the documented options parse as intended and the job graph builds (nothing
is submitted). The same graph runs locally in the other embed tests."""

from __future__ import annotations

from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import DebugOptions, GoogleCloudOptions, StandardOptions, WorkerOptions

from encoder.preprocess import PreprocessConfig
from pipelines.embed import EmbedConfig, _pipeline_options, build_pipeline
from pipelines.nightly_config import load_nightly_config
from pipelines.storage import configure_storage

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.gcs
def test_example_config_gives_a_gpu_dataflow_job(demo_catalog, tiny_model, tmp_path, gcs_emulator):
    # Validating Dataflow options looks up the temp_location bucket: the emulator answers, offline.
    if not gcs_emulator.lookup_bucket("my-bucket"):
        gcs_emulator.create_bucket("my-bucket")
    configure_storage()
    cfg = load_nightly_config(str(ROOT / "examples" / "nightly.yaml"))  # the example itself is valid
    embed = EmbedConfig(catalog=str(demo_catalog.manifest), model=str(tiny_model), out="gs://my-bucket/lookalike",
                        batch_size=cfg.embed.batch_size, run_id="nightly-20261125")  # fmt: skip
    options = _pipeline_options(embed, list(cfg.embed.beam_args))

    assert options.view_as(StandardOptions).runner == "DataflowRunner"
    cloud = options.view_as(GoogleCloudOptions)
    assert (cloud.project, cloud.region, cloud.temp_location) == ("my-project", "us-central1", "gs://my-bucket/tmp")
    assert any(o.startswith("worker_accelerator=type:nvidia-l4;count:1") for o in cloud.dataflow_service_options)
    worker = options.view_as(WorkerOptions)
    assert worker.sdk_container_image.endswith("/lookalike/worker-gpu:latest")
    assert worker.machine_type == "g2-standard-8"
    experiments = options.view_as(DebugOptions).experiments
    assert {"use_runner_v2", "no_use_multiple_sdk_containers"} <= set(experiments)  # one model per GPU

    pipeline = beam.Pipeline(options=options)  # constructing submits nothing
    build_pipeline(pipeline, embed, model_version="siglip-test", preprocess=PreprocessConfig(64, 64), dim=128,
                   total_items=demo_catalog.items, previous_shards=[str(tmp_path / "previous" / "part.parquet")],
                   run_dir=str(tmp_path / "embeddings"), failures_dir=str(tmp_path / "failures"))  # fmt: skip
    # (local output paths: building a gs:// sink would make Beam look for Google credentials)
    names = {t.unique_name for t in pipeline.to_runner_api().components.transforms.values()}
    for step in ("Read manifest", "Fetch and decode images", "Embed images", "Join earlier vectors",
                 "Write embedding shards", "Write dead letters"):  # fmt: skip
        assert step in names, sorted(n for n in names if "/" not in n)
