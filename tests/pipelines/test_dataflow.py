"""The Dataflow deployment, offline: the documented options parse as intended and the job graph builds (nothing
is submitted). The same graph runs locally in the other embed tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from apache_beam.options.pipeline_options import DebugOptions, GoogleCloudOptions, StandardOptions, WorkerOptions

from encoder.preprocess import PreprocessConfig
from pipelines.embed import EmbedConfig, _pipeline_options, build_pipeline
from pipelines.nightly_config import load_nightly_config
from pipelines.storage import configure_storage

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.gcs
def test_example_config_gives_a_gpu_dataflow_job(demo_catalog, tiny_model, tmp_path, gcs_emulator, unrun_pipeline):
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

    pipeline = unrun_pipeline(options)  # constructing submits nothing
    build_pipeline(pipeline, embed, model_version="siglip-test", preprocess=PreprocessConfig(64, 64), dim=128,
                   total_items=demo_catalog.items, previous_shards=[str(tmp_path / "previous" / "part.parquet")],
                   run_dir=str(tmp_path / "embeddings"), failures_dir=str(tmp_path / "failures"))  # fmt: skip
    # (local output paths: building a gs:// sink would make Beam look for Google credentials)
    names = {t.unique_name for t in pipeline.to_runner_api().components.transforms.values()}
    for step in ("Read manifest", "Fetch and decode images", "Embed images", "Join earlier vectors",
                 "Write embedding shards", "Write dead letters"):  # fmt: skip
        assert step in names, sorted(n for n in names if "/" not in n)


def test_an_image_globs_job_graph_does_not_grow_with_its_files(tmp_path, unrun_pipeline):
    """Dataflow refuses job graphs over 10 MB: an image glob's paths reach the workers in a listing file, not
    inside the graph."""
    import pyarrow as pa

    from pipelines.embed_runs import write_listing

    def graph_bytes(files: int) -> int:
        embed = EmbedConfig(catalog=str(tmp_path / "*.jpg"), model="unused", out=str(tmp_path / f"out{files}"))
        paths = [f"{tmp_path}/{'x' * 60}-{i:07d}.jpg" for i in range(files)]
        listed = write_listing(embed, pa.table({"item_id": [str(i) for i in range(files)], "image_uri": paths}))
        pipeline = unrun_pipeline(_pipeline_options(embed, []))
        build_pipeline(pipeline, embed, model_version="m", preprocess=PreprocessConfig(64, 64), dim=8,
                       total_items=files, previous_shards=[], run_dir=str(tmp_path / "e"),
                       failures_dir=str(tmp_path / "f"), listed=listed)  # fmt: skip
        return len(pipeline.to_runner_api().SerializeToString())

    small, large = graph_bytes(10), graph_bytes(20_000)  # ~1.4 MB of paths
    assert abs(large - small) < 1024, (small, large)
    with pytest.raises(ValueError, match="listing"):
        embed = EmbedConfig(catalog=str(tmp_path / "*.jpg"), model="unused", out=str(tmp_path / "o"))
        build_pipeline(unrun_pipeline(_pipeline_options(embed, [])), embed, model_version="m",
                       preprocess=PreprocessConfig(64, 64), dim=8, total_items=1, previous_shards=[],
                       run_dir=str(tmp_path / "e"), failures_dir=str(tmp_path / "f"),
                       listed=("images", ["/a.jpg"]))  # fmt: skip
