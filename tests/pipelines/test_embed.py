"""The embed pipeline on the local Beam runner: counts, schema, dead letters, reuse, bad images."""

from __future__ import annotations

import dataclasses
import gc
import io
import json
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from encoder import DecodeLimits, ImageDecodeError, PreprocessConfig, decode_image
from encoder.jpeg import PROGRESSIVE_ON_CPU, cpu_reason
from pipelines import embed, embed_dofns
from pipelines.catalog import CatalogError, CatalogItem, ItemChunk
from pipelines.embed import EmbedConfig, FetchAndDecode, run_embed
from pipelines.records import PreparedImage, embedding_matrix
from pipelines.worker_plugin import STATE_SAMPLING_MS


def _read_dir(path) -> pa.Table:
    return pq.read_table([str(p) for p in sorted(path.glob("*.parquet"))])


def _vectors(table: pa.Table) -> dict[str, np.ndarray]:
    return dict(zip(table.column("item_id").to_pylist(), embedding_matrix(table), strict=True))


@pytest.fixture(scope="module")
def first_run(demo_catalog, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("embed")
    return run_embed(EmbedConfig(catalog=str(demo_catalog.manifest), model=str(tiny_model), out=str(out)))


def _dead_letters(run) -> dict[str, tuple[str, str]]:
    folder = Path(run.run_dir).parent.parent / "failures" / run.run_id
    return {row["item_id"]: (row["stage"], row["error"]) for row in _read_dir(folder).to_pylist()}


def test_images_at_http_urls_embed_as_the_same_files_do(first_run, demo_catalog, tiny_model, tmp_path):
    """A marketplace's catalog names its photos by CDN URL: before, each was dead-lettered ("no filesystem reads
    http://"). Read over libcurl now (`encoder.storage._read_web`), they give the files' vectors, and the broken
    and missing ones the files' dead letters."""
    from tests.support.http_stand_in import StandIn, send

    def answer(handler) -> None:
        name = handler.path.lstrip("/")
        path = tmp_path / name if name == "web.parquet" else demo_catalog.root / name
        send(handler, 200, path.read_bytes()) if path.is_file() else send(handler, 404, b"")

    server = StandIn(answer)
    try:
        table = pq.read_table(demo_catalog.manifest)
        urls = pa.array([f"{server.url}/{uri}" for uri in table.column("image_uri").to_pylist()])
        pq.write_table(table.set_column(table.schema.get_field_index("image_uri"), "image_uri", urls),
                       tmp_path / "web.parquet")  # fmt: skip
        web = run_embed(
            EmbedConfig(catalog=f"{server.url}/web.parquet", model=str(tiny_model), out=str(tmp_path / "out"))
        )  # fmt: skip  (the manifest on the web too)
    finally:
        server.close()
    assert web.counts == first_run.counts
    assert _dead_letters(web) == _dead_letters(first_run)
    ours, theirs = _vectors(_read_dir(Path(web.run_dir))), _vectors(_read_dir(Path(first_run.run_dir)))
    assert ours.keys() == theirs.keys()
    for item_id, vector in ours.items():
        np.testing.assert_allclose(vector, theirs[item_id], atol=1e-6)


def test_counts_add_up(first_run, demo_catalog):
    counts = first_run.counts
    assert counts == {"items_in": 100, "embedded": 95, "reused": 0, "dead_lettered": 5}
    assert first_run.manifest["batches"] == {"decoded_on_gpu": 0, "retried": 0, "in_pieces": 0}  # CPU, none failed


def test_a_run_id_already_used_is_refused_before_the_catalog_or_the_model_is_read(first_run, tmp_path):
    """Refused after the catalog's read and the model's load before (a GPU's compiled SigLIP: a minute)."""
    out = os.path.dirname(os.path.dirname(first_run.run_dir))
    with pytest.raises(FileExistsError, match=f"run {first_run.run_id} already exists under"):
        run_embed(EmbedConfig(catalog=str(tmp_path / "no-catalog.parquet"), model=str(tmp_path / "no-model"), out=out,
                              run_id=first_run.run_id))  # fmt: skip


def test_a_batch_the_model_cannot_take_whole_goes_through_in_halves_and_is_counted(demo_catalog, tiny_model,
                                                                                   tmp_path, monkeypatch):  # fmt: skip
    """As when the batch size no longer fits the GPU's memory: nothing is lost, the batches after the first that ran
    out of memory go straight to pieces that fit (`MemoryBackoff`), and the run says how many of each."""
    import io

    import torch
    from rich.console import Console

    from encoder.model import ImageEncoder
    from pipelines.summary import print_embed_summary

    launch = ImageEncoder.launch

    def cramped(self, batch, eager=False):
        if len(batch) > 8:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return launch(self, batch, eager)

    monkeypatch.setattr(ImageEncoder, "launch", cramped)
    cfg = EmbedConfig(catalog=str(demo_catalog.manifest), model=str(tiny_model), out=str(tmp_path), batch_size=32)
    result = run_embed(cfg)
    assert result.counts == {"items_in": 100, "embedded": 95, "reused": 0, "dead_lettered": 5}
    assert result.manifest["dead_letters_by_stage"] == {"decode": 4, "fetch": 1}  # as without the failures
    retried, in_pieces = result.manifest["batches"]["retried"], result.manifest["batches"]["in_pieces"]
    assert retried >= 1 and in_pieces >= 1 and retried + in_pieces >= 3  # 95 images in batches of at most 32
    out = io.StringIO()
    print_embed_summary(result, Console(file=out, width=160))
    assert re.search(rf"batches retried in halves\s*│\s*{retried} \(failed whole in the GPU decoder", out.getvalue())
    assert re.search(rf"batches run in pieces\s*│\s*{in_pieces} \(the model, GPU decoder or resize ran out of memory",
                     out.getvalue())  # fmt: skip


def test_shards_follow_the_contract(first_run, tiny_encoder):
    table = _read_dir(Path(first_run.run_dir))
    assert table.schema.names == ["item_id", "embedding", "image_sha256", "model_version", "embedded_at"]
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), tiny_encoder.dim)
    assert str(table.schema.field("embedded_at").type) == "timestamp[us, tz=UTC]"
    assert table.num_rows == 95 and len(set(table.column("item_id").to_pylist())) == 95
    assert set(table.column("model_version").to_pylist()) == {tiny_encoder.model_version}
    vectors = embedding_matrix(table)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    for shard in Path(first_run.run_dir).glob("*.parquet"):
        assert column_encodings(shard) == {"item_id": True, "embedding": False, "image_sha256": True,
                                           "model_version": True, "embedded_at": False}  # fmt: skip
    # every bundle's file renamed into place, nothing left being written (`pipelines.shard_sink`)
    for directory in (Path(first_run.run_dir), Path(first_run.failures_dir)):
        names = sorted(p.name for p in directory.iterdir() if p.name != "_manifest.json")
        assert names and all(re.fullmatch(rf"part-\d{{5}}-of-{len(names):05d}\.parquet", n) for n in names), names


def test_a_run_of_several_bundles_numbers_their_shards_as_one_set(demo_catalog, tiny_model, tmp_path, first_run,
                                                                   monkeypatch):  # fmt: skip
    monkeypatch.setattr(embed, "fetch_chunk_size", lambda cfg, total=None: 8)  # many elements: every thread gets some
    threads = ["--runner=FnApiRunner", "--direct_num_workers=4", "--direct_running_mode=multi_threading"]
    cfg = EmbedConfig(catalog=str(demo_catalog.manifest), model=str(tiny_model), out=str(tmp_path), batch_size=16)
    result = run_embed(cfg, threads)
    assert result.counts == first_run.counts
    for directory, rows in ((result.run_dir, 95), (result.failures_dir, 5)):
        names = sorted(p.name for p in Path(directory).glob("*.parquet"))
        assert len(names) > 1 and names == [f"part-{i:05d}-of-{len(names):05d}.parquet" for i in range(len(names))]
        assert _read_dir(Path(directory)).num_rows == rows and not (Path(directory) / ".writing").exists()
    assert sorted(_read_dir(Path(result.run_dir)).column("item_id").to_pylist()) == sorted(
        _read_dir(Path(first_run.run_dir)).column("item_id").to_pylist()
    )


def test_a_run_puts_no_more_than_its_rows_per_shard_in_a_shard(tmp_path, tiny_model):
    for i in range(5):
        Image.new("RGB", (48, 40), (40 * i, 90, 30)).save(tmp_path / f"item{i}.jpg", quality=90)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    cfg = EmbedConfig(catalog=str(tmp_path / "*.jpg"), model=str(tiny_model), out=str(tmp_path / "out"),
                      rows_per_shard=2)  # fmt: skip
    result = run_embed(cfg)
    assert result.counts == {"items_in": 6, "embedded": 5, "reused": 0, "dead_lettered": 1}
    listed = result.manifest["shards"]
    assert [s["path"] for s in listed] == [f"part-{i:05d}-of-00003.parquet" for i in range(3)]
    assert sorted(s["rows"] for s in listed) == [1, 2, 2]  # one bundle here: two files of 2, one of the rest
    assert sorted(_read_dir(Path(result.run_dir)).column("item_id").to_pylist()) == [f"item{i}" for i in range(5)]
    assert [s["rows"] for s in result.manifest["failure_shards"]] == [1]


@pytest.mark.parametrize("field", ["rows_per_shard", "batch_size", "fetch_threads", "workers"])
def test_counts_below_one_are_refused_before_any_work(field):
    with pytest.raises(ValueError, match=f"{field} must be >= 1, got 0"):
        EmbedConfig(catalog="-", model="-", out="-", **{field: 0})


def test_fetch_threads_that_would_hold_a_chunk_too_large_are_refused():
    """A fetch chunk holds 4 items per thread: a typo'd 16000 would read and decode 64,000 images at once."""
    assert EmbedConfig(catalog="-", model="-", out="-", fetch_threads=256).fetch_threads == 256
    with pytest.raises(ValueError, match="fetch_threads must be at most 256, got 16000: .* would hold 64,000 images"):
        EmbedConfig(catalog="-", model="-", out="-", fetch_threads=16000)


@pytest.mark.parametrize("run_id", ["LATEST", "../x", "a b", ".hidden", "nächtlich", ""])
def test_a_run_id_that_cannot_name_its_folders_is_refused_before_any_work(run_id):
    with pytest.raises(ValueError, match=f"run_id {re.escape(repr(run_id))}: use letters, digits"):
        EmbedConfig(catalog="-", model="-", out="-", run_id=run_id)
    assert EmbedConfig(catalog="-", model="-", out="-", run_id="nightly-2026.11.29_b").run_id == "nightly-2026.11.29_b"


def test_a_run_without_dead_letters_has_one_empty_shard_of_them(tmp_path, tiny_model):
    from pipelines.records import FAILURE_SCHEMA

    for i in range(3):
        Image.new("RGB", (48, 40), (60 * i, 90, 30)).save(tmp_path / f"item{i}.jpg", quality=90)
    result = run_embed(EmbedConfig(catalog=str(tmp_path / "*.jpg"), model=str(tiny_model), out=str(tmp_path / "out")))
    assert result.counts == {"items_in": 3, "embedded": 3, "reused": 0, "dead_lettered": 0}
    assert sorted(p.name for p in Path(result.failures_dir).iterdir()) == ["part-00000-of-00001.parquet"]
    failures = pq.read_table(Path(result.failures_dir) / "part-00000-of-00001.parquet")
    assert failures.num_rows == 0 and failures.schema.equals(FAILURE_SCHEMA)
    (listed,) = result.manifest["failure_shards"]
    assert (listed["path"], listed["rows"]) == ("part-00000-of-00001.parquet", 0) and listed["bytes"] > 0


def column_encodings(path) -> dict[str, bool]:
    """Column → whether its first row group has dictionary pages."""
    group = pq.ParquetFile(path).metadata.row_group(0)
    return {
        group.column(i).path_in_schema.split(".")[0]: group.column(i).dictionary_page_offset is not None
        for i in range(group.num_columns)
    }


def test_vectors_equal_embedding_the_image_directly(first_run, demo_catalog, tiny_encoder):
    got = _vectors(_read_dir(Path(first_run.run_dir)))
    manifest = {r["item_id"]: r for r in pq.read_table(demo_catalog.manifest).to_pylist()}
    for item_id in list(got)[:10]:
        data = (demo_catalog.root / manifest[item_id]["image_uri"]).read_bytes()
        direct = tiny_encoder.embed_prepared(decode_image(data, tiny_encoder.preprocess, DecodeLimits())[None])[0]
        assert np.abs(got[item_id] - direct).max() < 1e-5


def test_dead_letters_name_item_stage_and_reason(first_run, demo_catalog):
    failures = _read_dir(Path(first_run.failures_dir)).to_pylist()
    assert sorted(f["item_id"] for f in failures) == sorted(demo_catalog.broken_item_ids)
    assert {f["stage"] for f in failures} == {"fetch", "decode"}
    assert all(f["error"] and f["image_uri"] for f in failures)
    assert first_run.manifest["dead_letters_by_stage"] == {"fetch": 1, "decode": 4}


def test_a_run_whose_dead_letters_by_stage_do_not_add_up_is_not_marked_complete(demo_catalog, tiny_model, tmp_path,
                                                                                 monkeypatch):  # fmt: skip
    """The per-stage counters must account for every dead-letter row the shards hold."""
    import pipelines.embed as embed

    monkeypatch.setattr(embed, "_count_dead_letters", lambda: lambda failure: failure)  # counts nothing
    cfg = EmbedConfig(catalog=str(demo_catalog.manifest), model=str(tiny_model), out=str(tmp_path), device="cpu")
    with pytest.raises(RuntimeError, match=r"dead letters counted by stage \{\} != 5 rows written"):
        run_embed(cfg)
    assert not list(tmp_path.glob("embeddings/*/_manifest.json"))


def test_run_manifest_is_written_last_with_counts_and_shards(first_run):
    run_dir = Path(first_run.run_dir)
    manifest = json.loads((run_dir / "_manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["items_in"] == 100
    assert sum(s["rows"] for s in manifest["shards"]) == 95
    assert {s["path"] for s in manifest["shards"]} == {p.name for p in run_dir.glob("*.parquet")}
    assert not list(run_dir.glob(".temp*")), "Beam's temp files must be gone once the run is complete"
    assert manifest["options"]["model"] and manifest["model_version"].startswith("siglip-")


def test_the_manifest_says_where_the_wall_time_went(first_run):
    t = first_run.manifest["time_s"]
    assert set(t) == {"prepare", "pipeline", "build", "model_load", "compile", "fetch_setup", "embed_setup",
                      "decoder_warm", "accounting"}  # fmt: skip
    assert 0 < t["build"] < t["pipeline"]  # Beam's construction of the graph, a part of the pipeline's time
    assert 0 < t["model_load"] < t["prepare"] and t["pipeline"] > 0 and t["accounting"] > 0
    assert 0 <= t["fetch_setup"] < t["pipeline"] and 0 <= t["embed_setup"] < t["pipeline"]  # the workers' own
    assert t["compile"] is None  # not compiled
    assert t["decoder_warm"] is None  # no GPU decoder to warm up (the GPU wiring's test has one)
    assert t["prepare"] + t["pipeline"] + t["accounting"] == pytest.approx(first_run.manifest["wall_time_s"], abs=0.01)


def test_a_local_run_loads_its_model_once_and_its_workers_use_it(demo_catalog, tiny_model, tmp_path, monkeypatch):
    """The in-process workers take the launcher's model (before, the launcher loaded a CPU copy for the model
    version and each worker loaded the model again)."""
    import pipelines.embed as embed

    loads, real = [], embed.load_encoder

    def slow_load(*args, **kwargs):
        time.sleep(0.3)
        loads.append(real(*args, **kwargs))
        loads[-1].compile_s = 0.25  # as `load_encoder` records a compile (--compile), which the manifest reports
        return loads[-1]

    monkeypatch.setattr(embed, "load_encoder", slow_load)
    used = []
    real_start = embed_dofns.EmbedBatch.start_bundle
    monkeypatch.setattr(
        embed_dofns.EmbedBatch, "start_bundle", lambda self: (used.append(self._encoder), real_start(self))[1]
    )
    cfg = EmbedConfig(catalog=str(demo_catalog.manifest), model=str(tiny_model), out=str(tmp_path), device="cpu")
    result = run_embed(cfg)
    assert result.counts["embedded"] == 95 and len(loads) == 1
    assert used and all(encoder is loads[0] for encoder in used)
    t = result.manifest["time_s"]
    assert 0.3 <= t["model_load"] < t["prepare"] and t["compile"] == 0.25
    assert not embed_dofns.PRELOADED
    with pytest.raises(FileExistsError):  # refused before the load, and nothing left behind
        run_embed(dataclasses.replace(cfg, run_id=result.run_id))
    assert len(loads) == 1 and not embed_dofns.PRELOADED

    def fails(*_):
        raise OSError("the earlier run's manifest cannot be read")

    monkeypatch.setattr(embed, "previous_run_shards", fails)  # a failure after the load
    with pytest.raises(OSError, match="cannot be read"):
        run_embed(dataclasses.replace(cfg, run_id="after-the-load"))
    assert len(loads) == 2 and not embed_dofns.PRELOADED  # the model is not left behind


@pytest.mark.parametrize(
    ("args", "in_process"),
    [
        (["--runner=FnApiRunner"], True),
        (["--runner=FnApiRunner", "--direct_num_workers=2", "--direct_running_mode=multi_threading"], True),
        (["--runner=FnApiRunner", "--direct_num_workers=2", "--direct_running_mode=multi_processing"], False),
        (["--runner=DataflowRunner"], False),
        (["--runner=PrismRunner"], False),
    ],
)
def test_only_workers_in_this_process_share_the_launchers_model(args, in_process):
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.embed import _in_process

    assert _in_process(PipelineOptions(args)) is in_process


@pytest.mark.parametrize(
    ("workers", "fork_workers", "args", "forked"),
    [
        (2, True, [], True),  # the local runner's worker processes: forked warm
        (2, False, [], False),  # unless turned off
        (1, True, [], False),  # no processes of their own
        (1, True, ["--runner=FnApiRunner", "--direct_num_workers=2", "--direct_running_mode=multi_processing"], True),
        (1, True, ["--runner=FnApiRunner", "--direct_num_workers=2", "--direct_running_mode=multi_threading"], False),
        (2, True, ["--runner=DataflowRunner"], False),  # another runner's workers: its own
    ],
)
def test_the_local_runners_worker_processes_are_forked_warm(workers, fork_workers, args, forked):
    from pipelines.embed import _forks_workers, _pipeline_options

    cfg = EmbedConfig(catalog="c", model="m", out="o", workers=workers, fork_workers=fork_workers)
    assert _forks_workers(cfg, _pipeline_options(cfg, args)) is forked


def test_a_run_that_fails_early_ends_without_waiting_for_its_forkers_imports(tmp_path, monkeypatch):
    """A catalog that cannot be read fails the run at once, though its forker is still importing: it is killed."""
    import pipelines.embed
    from pipelines.worker_fork import Forker

    forkers = []
    monkeypatch.setattr(pipelines.embed, "_take_forker",
                        lambda: forkers.append(Forker(preload=["tests.support.slow_import"])) or forkers[-1])  # fmt: skip
    started = time.monotonic()
    with pytest.raises(CatalogError):
        run_embed(EmbedConfig(catalog=str(tmp_path / "missing.parquet"), model="m", out=str(tmp_path), workers=2))
    assert time.monotonic() - started < 4.0  # waiting 5 s for the forker's imports, as before, took 5.0 here
    assert not forkers[0].alive()


# Earlier vectors are joined in memory when they fit `reuse_memory_mb`, else by a shuffle: same rows either way.
REUSE_PATHS = pytest.mark.parametrize("reuse_memory_mb", [1024, 0], ids=["in-memory", "shuffle-join"])


@REUSE_PATHS
def test_rerun_reuses_every_vector(first_run, demo_catalog, tiny_model, reuse_memory_mb):
    out = str(Path(first_run.run_dir).parents[1])
    again = run_embed(EmbedConfig(catalog=str(demo_catalog.manifest), model=str(tiny_model), out=out,
                                  reuse_memory_mb=reuse_memory_mb))  # fmt: skip
    assert again.counts == {"items_in": 100, "embedded": 0, "reused": 95, "dead_lettered": 5}
    first, second = _read_dir(Path(first_run.run_dir)), _read_dir(Path(again.run_dir))
    before, after = _vectors(first), _vectors(second)
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    times = dict(zip(first.column("item_id").to_pylist(), first.column("embedded_at").to_pylist(), strict=True))
    assert (
        dict(zip(second.column("item_id").to_pylist(), second.column("embedded_at").to_pylist(), strict=True)) == times
    )


@REUSE_PATHS
def test_changed_and_removed_items(demo_catalog, tiny_model, tmp_path, reuse_memory_mb):
    catalog = tmp_path / "catalog"
    shutil.copytree(demo_catalog.root, catalog)
    out = str(tmp_path / "out")
    first = run_embed(EmbedConfig(catalog=str(catalog / "manifest.parquet"), model=str(tiny_model), out=out))

    manifest = pq.read_table(catalog / "manifest.parquet")
    broken = set(demo_catalog.broken_item_ids)
    good = [r for r in manifest.to_pylist() if r["item_id"] not in broken]
    changed, removed = good[0], good[1]
    Image.new("RGB", (400, 400), (250, 10, 10)).save(catalog / changed["image_uri"], "JPEG")
    kept = manifest.filter(pa.compute.not_equal(manifest.column("item_id"), removed["item_id"]))
    pq.write_table(kept, catalog / "manifest.parquet")

    second = run_embed(EmbedConfig(catalog=str(catalog / "manifest.parquet"), model=str(tiny_model), out=out,
                                   reuse_memory_mb=reuse_memory_mb))  # fmt: skip
    assert second.counts == {"items_in": 99, "embedded": 1, "reused": 93, "dead_lettered": 5}
    rows = _vectors(_read_dir(Path(second.run_dir)))
    assert removed["item_id"] not in rows
    assert not np.array_equal(rows[changed["item_id"]], _vectors(_read_dir(Path(first.run_dir)))[changed["item_id"]])


def test_a_previous_run_of_another_model_is_named_and_not_recorded_as_reused(first_run, demo_catalog, tmp_path,
                                                                             caplog):  # fmt: skip
    """`--previous` names a run to reuse from; one of another model gives nothing: a warning, and the summary's
    "reused from run" stays empty rather than naming a run nothing came from."""
    other = tmp_path / "other-model"
    shutil.copytree(Path(first_run.manifest["model"]), other)
    config = json.loads((other / "preprocessor_config.json").read_text())
    (other / "preprocessor_config.json").write_text(json.dumps({**config, "resample": 2}))  # another model_version
    with caplog.at_level("WARNING", logger="pipelines.embed_runs"):
        fresh = run_embed(EmbedConfig(catalog=str(demo_catalog.manifest), model=str(other), out=str(tmp_path / "o"),
                                      previous=first_run.run_dir))  # fmt: skip
    assert fresh.counts["embedded"] == 95 and fresh.manifest["previous_run"] is None
    assert f"--previous {first_run.run_dir} has model_version {first_run.manifest['model_version']}" in caplog.text


class _RemoteJob:
    """A runner's result whose job runs elsewhere: waits until cancelled, as Dataflow's does."""

    def __init__(self) -> None:
        self.cancelled = False

    def job_id(self) -> str:
        return "2026-11-29_04_00_00-123"

    def wait_until_finish(self) -> None:
        for _ in range(200):
            time.sleep(0.05)  # a poll, as Dataflow's result makes; a signal's handler runs between

    def cancel(self) -> None:
        self.cancelled = True


def test_a_launcher_stopped_while_a_remote_job_runs_cancels_it_first(caplog):
    """An orchestrator's time limit sends SIGTERM: the Dataflow job ran on without its launcher, and the task's retry
    started a second job on the same run. Now the job is cancelled, the stop goes on (exit 143), and the handler the
    process had is back."""
    import signal
    import threading

    from pipelines.embed import wait_or_cancel

    before = signal.getsignal(signal.SIGTERM)
    job = _RemoteJob()
    threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
    with caplog.at_level("WARNING", logger="pipelines.embed"), pytest.raises(SystemExit) as stopped:
        wait_or_cancel(job, remote=True)
    assert stopped.value.code == 143 and job.cancelled and signal.getsignal(signal.SIGTERM) is before
    assert "stopped while the job ran: cancelling it (2026-11-29_04_00_00-123)" in caplog.text


def test_no_incremental_embeds_everything_again(first_run, demo_catalog, tiny_model, tmp_path):
    out = str(Path(first_run.run_dir).parents[1])
    fresh = run_embed(
        EmbedConfig(catalog=str(demo_catalog.manifest), model=str(tiny_model), out=out, incremental=False)
    )
    assert fresh.counts["embedded"] == 95 and fresh.counts["reused"] == 0


def test_bad_manifest_fails_before_any_work(tmp_path, tiny_model):
    pq.write_table(pa.table({"item_id": ["a", "a"], "image_uri": ["x.jpg", "y.jpg"]}), tmp_path / "m.parquet")
    with pytest.raises(CatalogError, match="duplicate"):
        run_embed(EmbedConfig(catalog=str(tmp_path / "m.parquet"), model=str(tiny_model), out=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def _save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _awkward_images() -> tuple[dict[str, bytes | None], dict[str, str]]:
    """Files that must embed, and files that must be dead-lettered (with the expected reason)."""
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, size=(120, 160, 3), dtype=np.uint8))
    jpeg = _save(photo, "JPEG", quality=90)
    exif = photo.getexif()
    exif[0x0112] = 6
    rgba = photo.convert("RGBA")
    rgba.putalpha(128)
    gif = io.BytesIO()
    photo.save(gif, "GIF", save_all=True, append_images=[photo.rotate(90)], duration=40)
    good = {
        "cmyk.jpg": _save(photo.convert("CMYK"), "JPEG"),
        "sixteen.png": _save(
            Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16), "I;16"), "PNG"
        ),
        "alpha.png": _save(rgba, "PNG"),
        "palette.png": _save(photo.convert("P"), "PNG"),
        "gray.jpg": _save(photo.convert("L"), "JPEG"),
        "rotated.jpg": _save(photo, "JPEG", exif=exif),
        "animated.gif": gif.getvalue(),
        "photo.webp": _save(photo, "WEBP"),
        "photo.tiff": _save(photo, "TIFF"),
        "one.png": _save(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"),
        "strip.png": _save(Image.new("RGB", (10000, 10), (200, 100, 0)), "PNG"),
    }
    bad = {
        "missing.jpg": (None, "fetch", "not found"),
        "zero.jpg": (b"", "decode", "empty file"),
        "truncated.jpg": (jpeg[: len(jpeg) // 3], "decode", "truncated"),
        "text.jpg": (b"hello, I am not a picture\n", "decode", "not a recognised image format"),
        "header.jpg": (jpeg[:2] + bytes(30) + jpeg[32:], "decode", ""),
        "bomb.png": (_save(Image.new("L", (12000, 12000)), "PNG"), "decode", "decompression bomb"),
    }
    return good, bad


def test_awkward_and_broken_images(tmp_path, tiny_model):
    good, bad = _awkward_images()
    (tmp_path / "img").mkdir()
    for name, data in list(good.items()) + [(n, d) for n, (d, _, _) in bad.items()]:
        if data is not None:
            (tmp_path / "img" / name).write_bytes(data)
    names = list(good) + list(bad) + ["no-uri"]
    pq.write_table(
        pa.table({"item_id": names, "image_uri": [f"img/{n}" for n in names[:-1]] + [None]}), tmp_path / "m.parquet"
    )
    result = run_embed(
        EmbedConfig(catalog=str(tmp_path / "m.parquet"), model=str(tiny_model), out=str(tmp_path / "out"))
    )
    assert result.counts == {"items_in": len(names), "embedded": len(good), "reused": 0, "dead_lettered": len(bad) + 1}
    failures = {f["item_id"]: f for f in _read_dir(Path(result.failures_dir)).to_pylist()}
    for name, (_, stage, reason) in bad.items():
        assert failures[name]["stage"] == stage, failures[name]
        assert reason in failures[name]["error"], failures[name]
    assert failures["no-uri"]["error"] == "empty image_uri"
    assert set(_vectors(_read_dir(Path(result.run_dir)))) == set(good)


@pytest.mark.slow
@pytest.mark.parametrize("fork_workers", [True, False])
def test_several_worker_processes(demo_catalog, tiny_model, tmp_path, first_run, fork_workers):
    # 100 items, fewer than a fetch element of 32 threads (128): cut in two, one for each worker (`fetch_chunk_size`)
    result = run_embed(EmbedConfig(catalog=str(demo_catalog.manifest), model=str(tiny_model), out=str(tmp_path),
                                   workers=2, fork_workers=fork_workers, fetch_threads=32))  # fmt: skip
    assert result.counts == {"items_in": 100, "embedded": 95, "reused": 0, "dead_lettered": 5}
    # Two processes of their own embedded, forked warm (`pipelines.worker_fork`) or started by Beam.
    assert result.manifest["worker_processes"] == {"embedding": 2, "forked": 2 if fork_workers else 0}
    from rich.console import Console

    from pipelines.summary import print_embed_summary

    def summary(run) -> str:
        out = io.StringIO()
        print_embed_summary(run, Console(file=out, width=160))
        return out.getvalue()

    how = "all forked warm" if fork_workers else "started by Beam"
    assert re.search(rf"worker processes +│ +2 \({how}\)", summary(result))
    assert "worker processes" not in summary(first_run)  # one process: nothing to say
    assert first_run.manifest["worker_processes"] == {"embedding": 1, "forked": 0}  # the launcher itself
    single, multi = _vectors(_read_dir(Path(first_run.run_dir))), _vectors(_read_dir(Path(result.run_dir)))
    assert single.keys() == multi.keys()
    assert max(np.abs(single[k] - multi[k]).max() for k in single) < 1e-5


def test_item_chunks_cross_beam_as_two_columns():
    from pipelines.embed_dofns import ItemChunkCoder

    chunk = ItemChunk(["a", "é 中", ""], ["/x/a.jpg", "gs://b/é.jpg", ""])
    coder = beam.coders.registry.get_coder(ItemChunk)
    assert isinstance(coder, ItemChunkCoder)
    assert coder.decode(coder.encode(chunk)) == chunk


def test_tables_of_vectors_cross_beam_as_arrow_streams_sized_without_encoding(tmp_path, unrun_pipeline):
    """Beam samples every PCollection's element sizes; tables of vectors were pickled whole for it, in the thread
    that feeds the GPU. Every table on the way to the shards is typed and coded by `ArrowTableCoder`."""
    from apache_beam.pipeline import PipelineVisitor

    from pipelines.embed import _pipeline_options, build_pipeline
    from pipelines.embed_dofns import ArrowTableCoder
    from pipelines.records import fresh_embedding_table

    vectors = np.random.default_rng(0).random((300, 768), dtype=np.float32)
    table = fresh_embedding_table([f"i{k}" for k in range(300)], vectors, [f"{k:064x}" for k in range(300)], "m")
    coder = beam.coders.registry.get_coder(pa.Table)
    assert isinstance(coder, ArrowTableCoder)
    assert coder.decode(coder.encode(table)).equals(table)
    assert table.nbytes <= coder.estimate_size(table) <= table.nbytes + 4096
    merged = pa.concat_tables([table, table.slice(10, 50)])
    assert coder.decode(coder.encode(merged)).equals(merged)

    pq.write_table(pa.table({"item_id": ["a"], "image_uri": [str(tmp_path / "a.jpg")]}), tmp_path / "m.parquet")
    cfg = EmbedConfig(catalog=str(tmp_path / "m.parquet"), model="unused", out=str(tmp_path / "out"))
    pipeline = unrun_pipeline(_pipeline_options(cfg, []))
    build_pipeline(pipeline, cfg, model_version="m", preprocess=PreprocessConfig(64, 64), dim=768, total_items=1,
                   previous_shards=[str(tmp_path / "previous.parquet")], run_dir=str(tmp_path / "e"),
                   failures_dir=str(tmp_path / "f"))  # fmt: skip
    typed = {}

    class Tables(PipelineVisitor):
        def visit_value(self, value, producer_node):
            label = producer_node.full_label.split("/")[0]
            if label in ("Embed images", "Rows to Arrow", "All tables", "Merge tables") and value.tag in (
                None,
                "tables",
            ):
                typed[label] = value.element_type

    pipeline.visit(Tables())
    assert typed == dict.fromkeys(("Embed images", "Rows to Arrow", "All tables", "Merge tables"), pa.Table), typed


@pytest.mark.parametrize("previous_rows", [1, None], ids=["in-memory-reuse", "shuffle-join"])
def test_every_output_of_the_pipelines_steps_is_typed(tmp_path, previous_rows, unrun_pipeline):
    """Typed, Beam codes them with the project's coders (the catalog's chunks through the shuffle as one pickle of
    two columns, tables as Arrow streams) and reads no function's bytecode to infer a type as it builds the graph."""
    from apache_beam.pipeline import PipelineVisitor

    from pipelines.embed import _pipeline_options, build_pipeline
    from pipelines.embed_dofns import ItemChunkCoder
    from pipelines.records import Failure, ReuseRequest

    pq.write_table(pa.table({"item_id": ["a"], "image_uri": [str(tmp_path / "a.jpg")]}), tmp_path / "m.parquet")
    cfg = EmbedConfig(catalog=str(tmp_path / "m.parquet"), model="unused", out=str(tmp_path / "out"))
    pipeline = unrun_pipeline(_pipeline_options(cfg, []))
    build_pipeline(pipeline, cfg, model_version="m", preprocess=PreprocessConfig(64, 64), dim=8, total_items=1,
                   previous_shards=[str(tmp_path / "previous.parquet")], run_dir=str(tmp_path / "e"),
                   failures_dir=str(tmp_path / "f"), previous_rows=previous_rows)  # fmt: skip
    typed = {}

    class Outputs(PipelineVisitor):
        def visit_value(self, value, producer_node):
            typed[(producer_node.full_label, value.tag)] = value.element_type

    pipeline.visit(Outputs())
    expected = {
        ("Read manifest", None): ItemChunk,
        ("Count items", None): ItemChunk,
        ("Spread items/RemoveRandomKeys", None): ItemChunk,
        ("Fetch and decode images/ParDo(FetchAndDecode)", "failed"): Failure,
        ("Embed images/ParDo(EmbedBatch)", "failed"): Failure,
        ("Count dead letters", None): Failure,
    }
    if previous_rows:  # the earlier vectors joined in memory: the fetch step's tables of them
        expected[("Fetch and decode images/ParDo(FetchAndDecode)", "reused")] = pa.Table
    else:
        expected[("Fetch and decode images/ParDo(FetchAndDecode)", "reuse")] = ReuseRequest
    assert {k: typed.get(k) for k in expected} == expected
    assert isinstance(beam.coders.registry.get_coder(typed[("Spread items/RemoveRandomKeys", None)]), ItemChunkCoder)


def test_a_fetch_element_holds_at_least_one_batch_unless_a_worker_process_would_go_without():
    from pipelines.embed import fetch_chunk_size

    assert fetch_chunk_size(EmbedConfig(catalog="-", model="-", out="-", batch_size=32, fetch_threads=16)) == 64
    assert fetch_chunk_size(EmbedConfig(catalog="-", model="-", out="-", batch_size=256, fetch_threads=16)) == 256
    assert fetch_chunk_size(EmbedConfig(catalog="-", model="-", out="-", batch_size=256, fetch_threads=128)) == 512
    # Worker processes of their own: a catalog too small for a chunk each is cut into one per worker.
    two = EmbedConfig(catalog="-", model="-", out="-", batch_size=64, fetch_threads=16, workers=2)
    assert [fetch_chunk_size(two, n) for n in (64, 65, 128, 129, 10_000)] == [32, 33, 64, 64, 64]
    assert fetch_chunk_size(dataclasses.replace(two, workers=1), 64) == 64  # one worker: the chunk as ever


def test_fetch_and_decode_routes_every_item(demo_catalog, tiny_model, tiny_encoder):
    manifest = pq.read_table(demo_catalog.manifest).to_pylist()[:20]
    items = [CatalogItem(r["item_id"], str(demo_catalog.root / r["image_uri"])) for r in manifest]
    broken = set(demo_catalog.broken_item_ids)
    cfg = EmbedConfig(catalog="unused.parquet", model=str(tiny_model), out="unused", fetch_threads=4)
    with BeamTestPipeline(runner="FnApiRunner") as p:
        outputs = (
            p
            | beam.Create([ItemChunk([i.item_id for i in items], [i.image_uri for i in items])])
            | beam.ParDo(FetchAndDecode(cfg, tiny_encoder.preprocess, len(items))).with_outputs(
                "failed", "reuse", main="decoded"
            )
        )
        assert_that(outputs.decoded | "ok ids" >> beam.FlatMap(lambda chunk: [r.item_id for r in chunk]),
                    equal_to([i.item_id for i in items if i.item_id not in broken]), label="decoded")  # fmt: skip
        assert_that(outputs.failed | "bad ids" >> beam.Map(lambda f: f.item_id),
                    equal_to([i.item_id for i in items if i.item_id in broken]), label="failed")  # fmt: skip
        assert_that(outputs.reuse, equal_to([]), label="reuse")


@pytest.mark.parametrize("written", ["absolute", "relative", "bare"])
def test_glob_of_images_as_the_catalog(demo_catalog, tiny_model, tmp_path, monkeypatch, written):
    """As the user writes it: `/data/images/00001*`, `images/00001*` or `00001*` (relative ones were read relative
    to the run's listing file, and every image dead-lettered as not found; a bare one matched nothing)."""
    import pipelines.storage as storage

    globs: list[str] = []
    frozen: list[int] = []
    match = storage.match
    monkeypatch.setattr(storage, "match",
                        lambda pattern: globs.append(pattern) or frozen.append(gc.get_freeze_count()) or match(pattern))  # fmt: skip
    catalog = {"absolute": str(demo_catalog.root / "images" / "00001*"), "relative": "images/00001*",
               "bare": "00001*"}[written]  # fmt: skip
    monkeypatch.chdir(demo_catalog.root / "images" if written == "bare" else demo_catalog.root)
    result = run_embed(EmbedConfig(catalog=catalog, model=str(tiny_model), out=str(tmp_path)))
    assert globs.count(str(demo_catalog.root / "images" / "00001*")) == 1  # listed once, not per use
    assert min(frozen) > 0 and gc.get_freeze_count() == 0  # the run's heap frozen while it ran, and only then
    assert not (tmp_path / "tmp").exists()  # the listing the pipeline read is gone with the run
    expected = sorted(p.stem for p in (demo_catalog.root / "images").glob("00001*"))
    assert result.counts["items_in"] == len(expected) == 10
    rows = _read_dir(Path(result.run_dir)).column("item_id").to_pylist()
    failures = _read_dir(Path(result.failures_dir))
    assert sorted(rows + failures.column("item_id").to_pylist()) == expected
    assert "not found" not in failures.column("error").to_pylist()  # every listed file read where it lies


def test_an_image_globs_listing_lives_only_while_its_run_does(demo_catalog, tiny_model, tmp_path, monkeypatch):
    import pipelines.embed as embed

    glob = str(demo_catalog.root / "images" / "00001*")
    stale = tmp_path / "tmp" / "glob-1" / "catalog.parquet"  # left by a killed attempt at this run id
    stale.parent.mkdir(parents=True)
    pq.write_table(pa.table({"item_id": ["ghost"], "image_uri": ["/nowhere/ghost.jpg"]}), stale)
    result = run_embed(EmbedConfig(catalog=glob, model=str(tiny_model), out=str(tmp_path), run_id="glob-1"))
    assert (
        result.counts["items_in"] == 10
        and "ghost" not in _read_dir(Path(result.failures_dir)).column("item_id").to_pylist()
    )
    assert not (tmp_path / "tmp").exists()

    def broken(*args, **kwargs):
        assert (tmp_path / "tmp" / "glob-2" / "catalog.parquet").exists()  # written before the pipeline is built
        raise RuntimeError("the pipeline failed")

    monkeypatch.setattr(embed, "build_pipeline", broken)
    scratch = tmp_path / "system-tmp"  # where Beam's pipeline makes its own scratch folder
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with pytest.raises(RuntimeError, match="the pipeline failed"):
        run_embed(EmbedConfig(catalog=glob, model=str(tiny_model), out=str(tmp_path), run_id="glob-2"))
    assert not (tmp_path / "tmp").exists()  # removed on failure too
    assert not list(scratch.iterdir())  # and Beam's, which only its `run` removes


def test_gpu_decode_wiring_on_the_cpu_embeds_every_item_like_the_cpu_path(
    demo_catalog, tiny_model, first_run, tmp_path, monkeypatch
):
    """The GPU worker's Beam wiring (local files read, hashed and routed by reader processes; images cross Beam
    undecoded; the embed step's background stream decodes them, JPEGs on the GPU decoder, the rest on CPU
    threads) with Pillow standing in for nvJPEG."""
    import encoder.gpu_images as gpu_images
    from pipelines.file_reader import ProcessReader
    from tests.encoder.test_gpu_images import _pil_decoder

    calls: list[int] = []
    routed: list[bool] = []
    decode = gpu_images.GpuImages.decode

    def spy(self, inputs, reasons=None):
        routed.append(reasons is not None)
        return decode(self, inputs, reasons)

    warm, decoders_made, closed = [], [], []
    stand_in = _pil_decoder(calls)

    def decoder(device):  # counts the made-up photos of the warm-up apart, and when it is made and freed
        decoders_made.append((len(processes), len(readers_at_build)))  # readers started, builds begun by then

        def decode(datas, device):
            if datas[0] is gpu_images.sample_jpeg():
                warm.append(len(datas))
                return _pil_decoder()(datas, device)
            return stand_in(datas, device)

        return gpu_images.ClosingDecoder(decode, lambda: closed.append(1))

    monkeypatch.setattr(embed_dofns, "gpu_decoding", lambda cfg, preprocess: True)
    monkeypatch.setitem(gpu_images.DECODERS, "nvjpeg", decoder)
    monkeypatch.setattr(gpu_images.GpuImages, "decode", spy)
    monkeypatch.setattr(embed_dofns, "_READERS", {})
    processes = []  # each reader's processes

    def reader(*args, **kwargs):
        made = ProcessReader(*args, **kwargs)
        processes.append([worker.proc for worker in made._workers])
        return made

    monkeypatch.setattr(embed_dofns, "ProcessReader", reader)
    from apache_beam.runners.worker import statesampler

    periods, made = [], statesampler.StateSampler.__init__
    monkeypatch.setattr(statesampler.StateSampler, "__init__",
                        lambda self, *a, **k: periods.append(a[2] if len(a) > 2 else None) or made(self, *a, **k))  # fmt: skip
    readers_at_build = []
    build = embed.build_pipeline
    monkeypatch.setattr(
        embed, "build_pipeline", lambda *a, **k: readers_at_build.append(len(processes)) or build(*a, **k)
    )
    result = run_embed(EmbedConfig(catalog=str(demo_catalog.manifest), model=str(tiny_model), out=str(tmp_path),
                                   batch_size=16, gpu_decoder="nvjpeg"))  # fmt: skip
    assert result.counts == first_run.counts
    # started before Beam built the pipeline (the local runner's workers are this process), and the fetch step's
    assert readers_at_build == [1]
    # its decoder made after the readers, before the build, and the embed step's: one for the run, warmed up once on
    # a batch of made-up photos, and freed at the run's end (in a thread of its own)
    assert decoders_made == [(1, 0)] and warm == [16]
    assert not embed_dofns._EMBED_IMAGES
    for thread in threading.enumerate():
        if thread.name == "decoder-close":
            thread.join()
    assert closed == [1]
    assert result.manifest["time_s"]["decoder_warm"] > 0
    assert periods and set(periods) == {STATE_SAMPLING_MS}  # each bundle's end waits 20 ms at most
    # the run's reader processes stopped at its end: a nightly run's later steps do not keep them
    assert len(processes) == 1 and not embed_dofns._READERS
    assert all(proc.wait(5) is not None for proc in processes[0])  # told to stop, reaped in a thread of its own
    images = [p.read_bytes() for p in (demo_catalog.root / "images").iterdir()]
    limits = DecodeLimits()
    routes = [cpu_reason(data, limits.max_bytes, limits.max_pixels, progressive=False) for data in images]
    assert routes.count(PROGRESSIVE_ON_CPU) >= 10  # the catalog's progressive JPEGs: Pillow threads, not "nvjpeg"
    assert sum(calls) == routes.count(None)  # its other JPEGs went to the stand-in GPU decoder, each once
    assert routed and all(routed)  # every batch routed by the reader processes, not again here
    assert result.manifest["dead_letters_by_stage"] == first_run.manifest["dead_letters_by_stage"]
    got, cpu = _vectors(_read_dir(Path(result.run_dir))), _vectors(_read_dir(Path(first_run.run_dir)))
    assert got.keys() == cpu.keys()
    cosines = [float(got[k] @ cpu[k]) for k in got]
    # Full-size decode + the GPU path's resize (through draft mode's reduction) against the CPU path's draft decode +
    # PIL resize: 0.99984 at least here, 0.988 when the resize did not reduce as draft mode does.
    assert min(cosines) > 0.999, f"cosine as low as {min(cosines):.4f}"


def _decodes(data: bytes) -> bool:
    try:
        decode_image(data, PreprocessConfig(), DecodeLimits())
    except ImageDecodeError:
        return False
    return True


def test_a_cpu_worker_starts_no_reader_processes_nor_gpu_decoders(monkeypatch):
    """Its fetch step reads in its own threads, its embed step decodes on CPU threads: nothing to start ahead."""
    monkeypatch.setattr(embed_dofns, "_READERS", {})
    monkeypatch.setattr(embed_dofns, "gpu_decoding", lambda cfg, preprocess: False)
    cfg = EmbedConfig(catalog="unused", model="unused", out="unused")
    assert embed_dofns.start_fetch_readers(cfg, None) is False and not embed_dofns._READERS
    encoder = SimpleNamespace(preprocess=None, device=torch.device("cpu"), batch_size=4)
    assert embed_dofns.start_embed_images(cfg, encoder) is False and not embed_dofns._EMBED_IMAGES


def test_a_workers_readers_are_closed_at_exit_with_their_processes_reaped_there(monkeypatch):
    """Python joins its threads before it runs `atexit` hooks: a reaper thread started there would not be waited for."""
    hooks = []
    monkeypatch.setattr(embed_dofns, "_READERS", {})
    monkeypatch.setattr(embed_dofns.atexit, "register", lambda fn, *args, **kwargs: hooks.append((fn, kwargs)))
    reader = embed_dofns.file_reader_for(DecodeLimits(), workers=8)
    try:
        assert hooks == [(reader.close, {"wait": True})]
    finally:
        embed_dofns.close_file_readers()


def test_gpu_decoders_made_for_a_run_that_fails_before_its_embed_step_are_freed(tiny_model, tmp_path, monkeypatch):
    import encoder.gpu_images as gpu_images
    from tests.encoder.test_gpu_images import _pil_decoder

    closed = []
    monkeypatch.setattr(embed_dofns, "gpu_decoding", lambda cfg, preprocess: True)
    monkeypatch.setitem(gpu_images.DECODERS, "nvjpeg",
                        lambda device: gpu_images.ClosingDecoder(_pil_decoder(), lambda: closed.append(1)))  # fmt: skip
    monkeypatch.setattr(embed, "build_pipeline", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("it failed")))
    catalog = tmp_path / "catalog.parquet"
    pq.write_table(pa.table({"item_id": ["a"], "image_uri": [str(tmp_path / "a.jpg")]}), catalog)
    with pytest.raises(RuntimeError, match="it failed"):
        run_embed(EmbedConfig(catalog=str(catalog), model=str(tiny_model), out=str(tmp_path / "out"),
                              gpu_decoder="nvjpeg", batch_size=4))  # fmt: skip
    for thread in threading.enumerate():
        if thread.name == "decoder-close":
            thread.join()
    assert closed == [1] and not embed_dofns._EMBED_IMAGES


@pytest.mark.parametrize("decode_threads", [1, 2])
def test_a_gpu_batch_of_routed_local_files_and_unrouted_fetched_bytes_embeds_them_all(
    demo_catalog, tiny_model, monkeypatch, decode_threads
):
    """Local files arrive routed, as arrays over the readers' ring; object-store images as bytes, unrouted. One
    batch of both (a catalog of both kinds) is routed where it is missing and decoded; none is lost. With two
    decode threads, each has a decoder of its own."""
    from apache_beam.utils.shared import Shared

    import encoder.gpu_images as gpu_images
    from tests.encoder.test_gpu_images import _pil_decoder

    calls: list[int] = []
    monkeypatch.setattr(embed_dofns, "gpu_decoding", lambda cfg, preprocess: True)
    made: list[int] = []
    monkeypatch.setitem(gpu_images.DECODERS, "nvjpeg", lambda device: made.append(1) or _pil_decoder(calls))
    paths = [p for p in sorted((demo_catalog.root / "images").glob("*.jpg"))[:20] if _decodes(p.read_bytes())][:12]
    items = []
    for i, path in enumerate(paths):
        data = path.read_bytes()
        local = i % 2 == 0
        items.append(PreparedImage(f"item-{i}", str(path), f"sha-{i}", None,
                                   np.frombuffer(data, dtype=np.uint8) if local else data,
                                   cpu_reason(data, 50 << 20, 10**8, progressive=False) or "" if local else None))  # fmt: skip
    step = embed_dofns.EmbedBatch(EmbedConfig(catalog="-", model=str(tiny_model), out="-", batch_size=4,
                                              gpu_decoder="nvjpeg", gpu_decode_threads=decode_threads), Shared())  # fmt: skip
    step.setup()
    assert len(made) == decode_threads
    step.start_bundle()
    outputs = [*step.process(items), *(o.value for o in step.finish_bundle())]  # finish_bundle's are windowed
    step.teardown()
    tables = [o for o in outputs if isinstance(o, pa.Table)]
    failures = [o for o in outputs if not isinstance(o, pa.Table)]
    assert not failures, failures
    assert sorted(i for t in tables for i in t.column("item_id").to_pylist()) == sorted(x.item_id for x in items)
    assert not failures and sum(calls) > 0


def test_gpu_decode_threads_on_a_worker_that_decodes_on_the_cpu_are_ignored_with_a_warning(tiny_model, caplog):
    from apache_beam.utils.shared import Shared

    step = embed_dofns.EmbedBatch(EmbedConfig(catalog="-", model=str(tiny_model), out="-", device="cpu",
                                              gpu_decode_threads=3), Shared())  # fmt: skip
    with caplog.at_level("WARNING", logger="pipelines.embed_dofns"):
        step.setup()
    images = step._images
    step.teardown()
    assert images.decode_threads == 1
    assert "--gpu-decode-threads 3 ignored" in caplog.text


def test_the_readers_ring_holds_four_of_the_embed_steps_batches(monkeypatch):
    made: list[int] = []

    def reader(key, processes, chunk, slots, page_lock):
        made.append(slots)
        return SimpleNamespace(slots=slots, close=lambda wait=False: None, page_lock=page_lock)

    monkeypatch.setattr(embed_dofns, "_READERS", {})
    monkeypatch.setattr(embed_dofns, "ProcessReader", reader)
    assert embed_dofns.file_reader_for(DecodeLimits(), batch_size=256).slots == 224
    assert embed_dofns.file_reader_for(DecodeLimits(), batch_size=64).slots == 224  # the same set of readers
    assert embed_dofns.file_reader_for(DecodeLimits(), batch_size=2048).slots == 4 * 2048 // 8 + 16
    assert embed_dofns.file_reader_for(DecodeLimits(), batch_size=256, decode_threads=3).slots == 224 + 2 * 256 // 8
    assert embed_dofns.file_reader_for(DecodeLimits(), batch_size=256, hedge=False).slots == 224  # a set of its own
    assert made == [224, 1040, 288, 224]
    assert embed_dofns.file_reader_for(DecodeLimits(), batch_size=256).page_lock is None  # no GPU: left pageable


def test_a_gpu_workers_reader_ring_is_page_locked_for_its_gpu(monkeypatch):
    """The GPU decoder copies the JPEGs from the ring; page-locked, by DMA (`encoder.page_lock`)."""
    from types import SimpleNamespace

    import torch

    import encoder.page_lock as page_lock

    locked = []
    monkeypatch.setattr(embed_dofns, "_READERS", {})
    monkeypatch.setattr(embed_dofns, "ProcessReader", lambda *args, page_lock, **kwargs: SimpleNamespace(
        page_lock=page_lock, close=lambda wait=False: None))  # fmt: skip
    monkeypatch.setattr(page_lock, "page_lock", lambda *args: locked.append(args))
    reader = embed_dofns.file_reader_for(DecodeLimits(), gpu=torch.device("cuda", 1))
    reader.page_lock(0x1000, 4096)
    assert locked == [(0x1000, 4096, 1)]


def test_worker_processes_share_the_cores_among_their_readers(monkeypatch):
    from types import SimpleNamespace

    started: list[int] = []
    monkeypatch.setattr(embed_dofns, "_READERS", {})
    monkeypatch.setattr(embed_dofns, "ProcessReader",
                        lambda key, processes, chunk, slots, page_lock: started.append(processes) or SimpleNamespace(close=lambda wait=False: None))  # fmt: skip
    monkeypatch.setattr(embed_dofns.os, "cpu_count", lambda: 16)
    embed_dofns.file_reader_for(DecodeLimits(), workers=4)
    assert started == [4]  # 16 cores over 4 worker processes: not 8 readers each
    assert [embed_dofns.reader_processes(cores, workers) for cores, workers in [(64, 1), (2, 1), (16, 8), (4, 8)]] == [
        8,
        2,
        2,
        1,
    ]


def test_the_gpu_decoder_is_nvimgcodec_where_its_library_loads_and_nvjpeg_elsewhere(monkeypatch):
    cfg = EmbedConfig(catalog="c", model="m", out="o")
    assert cfg.gpu_decoder == "auto"
    assert embed_dofns.gpu_decoder_name(cfg) == "nvimgcodec"  # the dev install ships its library
    monkeypatch.setattr(embed_dofns, "nvimgcodec_problem", lambda: "nvImageCodec is not installed")
    assert embed_dofns.gpu_decoder_name(cfg) == "nvjpeg"
    for name in ("nvimgcodec", "nvjpeg"):  # a named one is taken as given (`gpu_decoding` refuses a missing one)
        assert embed_dofns.gpu_decoder_name(dataclasses.replace(cfg, gpu_decoder=name)) == name


@pytest.mark.parametrize(("problem", "decoder", "progressive"), [(None, "nvimgcodec", True), ("gone", "nvjpeg", False)])
def test_the_readers_route_for_the_decoder_that_auto_resolves_to(
    tiny_model, monkeypatch, problem, decoder, progressive
):
    """Progressive JPEGs stay in the GPU batches only for a decoder that batches them: the fetch step's readers and
    the embed step must agree on which decoder `auto` is."""
    from apache_beam.utils.shared import Shared

    seen: dict = {}
    monkeypatch.setattr(embed_dofns, "_EMBED_IMAGES", {})  # the step below is never torn down
    monkeypatch.setattr(embed_dofns, "nvimgcodec_problem", lambda: problem)
    monkeypatch.setattr(embed_dofns, "gpu_decoding", lambda cfg, preprocess: True)
    monkeypatch.setattr(
        embed_dofns, "file_reader_for", lambda limits, progressive, *rest: seen.update(progressive=progressive)
    )
    monkeypatch.setattr(embed_dofns, "GpuImages", lambda *args, decoder, **kwargs: seen.update(decoder=decoder)
                        or SimpleNamespace(start_warming=lambda count: None))  # fmt: skip
    cfg = EmbedConfig(catalog="-", model=str(tiny_model), out="-")
    fetch = FetchAndDecode(cfg, PreprocessConfig(), 0)
    fetch.setup()
    fetch.teardown()
    embed_dofns.EmbedBatch(cfg, Shared()).setup()
    assert seen == {"progressive": progressive, "decoder": decoder}


@pytest.mark.parametrize(("page_lock_reads", "locked_for"), [(True, "cuda:0"), (False, None)])
def test_the_fetch_steps_readers_ring_is_page_locked_for_the_workers_gpu_unless_turned_off(
    tiny_model, monkeypatch, page_lock_reads, locked_for
):
    """`--no-page-lock-reads` leaves the ring pageable (a worker short of memory: the lock makes all of it resident)."""
    import torch

    seen: dict = {}
    monkeypatch.setattr(embed_dofns, "gpu_decoding", lambda cfg, preprocess: True)
    monkeypatch.setattr(embed_dofns, "_this_gpu", lambda: torch.device("cuda", 0))
    monkeypatch.setattr(embed_dofns, "file_reader_for", lambda *args: seen.update(gpu=args[-1]))
    cfg = EmbedConfig(catalog="-", model=str(tiny_model), out="-", page_lock_reads=page_lock_reads)
    fetch = FetchAndDecode(cfg, PreprocessConfig(), 0)
    fetch.setup()
    fetch.teardown()
    assert seen == {"gpu": None if locked_for is None else torch.device(locked_for)}


@pytest.mark.parametrize(
    ("device", "gpus", "workers", "expected"),
    [
        ("cpu", 8, 1, None),
        ("cuda", 1, 1, None),
        ("cuda", 1, 2, "2 worker processes on 1 GPU: up to 2 model copies per GPU"),
        ("cuda", 4, 4, None),
        ("auto", 4, 1, "3 stay idle (--workers 4 uses them all)"),
        ("cuda", 2, 6, "up to 3 model copies per GPU"),
        ("cuda:1", 4, 1, None),
        ("cuda:1", 4, 3, "3 model copies on that GPU (--device cuda gives each worker process a GPU of its own)"),
    ],
)
def test_a_local_run_says_when_its_workers_and_the_gpus_do_not_pair_up(monkeypatch, device, gpus, workers, expected):
    import torch

    import pipelines.embed as embed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    note = embed._gpu_spread_note(EmbedConfig(catalog="c", model="m", out="o", device=device, workers=workers))
    assert note == expected if expected is None else expected in note


def _embed_on_a_small_ring(monkeypatch, slots: int, cfg: EmbedConfig, beam_args: list[str] | None = None,
                           decoder=None):  # fmt: skip
    """`run_embed(cfg)` through the GPU worker's wiring (Pillow standing in for nvJPEG, or `decoder`'s decoders) with
    reader processes whose ring has `slots` slots; a run still going after two minutes fails the test instead of
    hanging it."""
    import threading

    import encoder.gpu_images as gpu_images
    from pipelines.file_reader import ProcessReader
    from tests.encoder.test_gpu_images import _pil_decoder

    readers: dict = {}
    monkeypatch.setattr(embed_dofns, "_READERS", readers)
    monkeypatch.setattr(
        embed_dofns, "ProcessReader", lambda key, processes, chunk, **_: ProcessReader(key, 2, chunk, slots=slots)
    )
    monkeypatch.setattr(embed_dofns, "gpu_decoding", lambda cfg, preprocess: True)
    monkeypatch.setitem(gpu_images.DECODERS, "nvjpeg", decoder or (lambda device: _pil_decoder()))
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = run_embed(cfg, beam_args)
        except BaseException as err:  # noqa: BLE001 - reported below
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=120)
    for reader in readers.values():  # a stuck run's wait ends with an error
        reader.close()
    thread.join(timeout=30)
    assert "result" in outcome, f"the run never finished: {outcome.get('error')!r}"
    return outcome["result"]


def test_a_gpu_worker_slower_than_its_reads_never_waits_for_ever_on_the_readers_ring(
    demo_catalog, tiny_model, first_run, tmp_path, monkeypatch
):
    """The runner's thread fetches (waiting for a free slot of the readers' ring) and also takes the embed step's
    finished batches: were finished batches to hold their images' slots, a GPU side slower than the reads
    would fill the ring with them and stop the worker for good. A ring of 12 slots and a slow resize here."""
    import time

    import encoder.gpu_images as gpu_images

    finish = gpu_images.GpuImages.finish

    def slow_finish(self, batch):
        time.sleep(0.01)
        return finish(self, batch)

    monkeypatch.setattr(gpu_images.GpuImages, "finish", slow_finish)
    cfg = EmbedConfig(catalog=str(demo_catalog.manifest), model=str(tiny_model), out=str(tmp_path), batch_size=16,
                      gpu_decoder="nvjpeg")  # fmt: skip
    assert _embed_on_a_small_ring(monkeypatch, 12, cfg).counts == first_run.counts


def test_runner_threads_waiting_for_a_full_batch_do_not_starve_the_readers_ring(
    demo_catalog, tiny_model, first_run, tmp_path, monkeypatch
):
    """A runner that gives a worker process several threads (Dataflow: about one per core) runs an embed step per
    thread. When each step's images waiting for a full batch kept their ring slots and reads waited for slots,
    every thread's next read could wait for slots that only another thread's next batch frees: here 8 threads,
    elements of 4 images, batches of 48 and a ring of 4 slots stopped for good. Waiting images are copied off
    the ring, and a read short of slots goes without them."""
    # Elements smaller than a batch (elements hold a batch at least, but what reuse and dead letters leave
    # short of one waits all the same): many images waiting, soon.
    monkeypatch.setattr(embed, "fetch_chunk_size", lambda cfg, total=None: 4)
    fetching, most = [], [0]
    process = embed_dofns.FetchAndDecode.process

    def counted(self, *args):
        fetching.append(1)
        most[0] = max(most[0], len(fetching))
        try:
            yield from process(self, *args)
        finally:
            fetching.pop()

    monkeypatch.setattr(embed_dofns.FetchAndDecode, "process", counted)
    cfg = EmbedConfig(catalog=str(demo_catalog.manifest), model=str(tiny_model), out=str(tmp_path), batch_size=48,
                      gpu_decoder="nvjpeg")  # fmt: skip
    threads = ["--runner=FnApiRunner", "--direct_num_workers=8", "--direct_running_mode=multi_threading"]
    assert _embed_on_a_small_ring(monkeypatch, 4, cfg, threads).counts == first_run.counts
    assert most[0] > 1  # the fetch steps of several threads were under way together


def test_a_local_gpu_runs_readers_and_decoders_start_before_its_preparation_ends_and_go_if_it_fails(
    demo_catalog, tiny_model, tmp_path, monkeypatch
):
    """The workers' slow set-up starts as soon as the model is loaded, beside the rest of the launcher's preparation
    (an earlier run's manifests, a crashed attempt's files, the listing: requests each on gs://); a preparation that
    then fails (here `--previous` names no run) leaves no reader process or decoder behind."""
    import encoder.gpu_images as gpu_images
    from tests.encoder.test_gpu_images import _pil_decoder

    readers: dict = {}
    monkeypatch.setattr(embed_dofns, "_READERS", readers)
    monkeypatch.setattr(embed_dofns, "_EMBED_IMAGES", {})
    monkeypatch.setattr(embed_dofns, "gpu_decoding", lambda cfg, preprocess: True)
    monkeypatch.setitem(gpu_images.DECODERS, "nvjpeg", lambda device: _pil_decoder())
    seen = []
    previous = embed.previous_run_shards

    def looked_up(cfg, version):  # what had started when the launcher looked for an earlier run
        seen.append((len(readers), list(embed_dofns._EMBED_IMAGES)))
        return previous(cfg, version)

    monkeypatch.setattr(embed, "previous_run_shards", looked_up)
    cfg = EmbedConfig(catalog=str(demo_catalog.manifest), model=str(tiny_model), out=str(tmp_path), batch_size=16,
                      gpu_decoder="nvjpeg", previous=str(tmp_path / "no-such-run"), run_id="r1")  # fmt: skip
    with pytest.raises(FileNotFoundError, match="not a complete run"):
        run_embed(cfg)
    assert seen == [(1, ["r1"])]  # the readers and the decoders were under way already
    assert readers == {} and embed_dofns._EMBED_IMAGES == {}  # and went with the failed run


def test_a_worker_processs_embed_steps_share_one_set_of_decoders_warmed_once(
    demo_catalog, tiny_model, first_run, tmp_path, monkeypatch
):
    """A runner that gives a worker process several threads runs an embed step per thread: they share the process's
    decoders (`take_embed_images`), made and warmed up once and freed once, after the last step is done."""
    import encoder.gpu_images as gpu_images
    from tests.encoder.test_gpu_images import _pil_decoder

    made, warm, closed, steps = [], [], [], []

    def decoder(device):
        made.append(1)

        def decode(datas, device):
            if datas[0] is gpu_images.sample_jpeg():
                warm.append(len(datas))
            return _pil_decoder()(datas, device)

        return gpu_images.ClosingDecoder(decode, lambda: closed.append(1))

    monkeypatch.setattr(embed_dofns, "_EMBED_IMAGES", {})
    monkeypatch.setattr(embed, "fetch_chunk_size", lambda cfg, total=None: 4)  # many elements: every thread gets some
    setup = embed_dofns.EmbedBatch.setup
    monkeypatch.setattr(embed_dofns.EmbedBatch, "setup", lambda self: (steps.append(self), setup(self))[1])
    cfg = EmbedConfig(catalog=str(demo_catalog.manifest), model=str(tiny_model), out=str(tmp_path), batch_size=16,
                      gpu_decoder="nvjpeg")  # fmt: skip
    threads = ["--runner=FnApiRunner", "--direct_num_workers=4", "--direct_running_mode=multi_threading"]
    assert _embed_on_a_small_ring(monkeypatch, 64, cfg, threads, decoder).counts == first_run.counts
    for thread in threading.enumerate():
        if thread.name == "decoder-close":
            thread.join()
    assert len(steps) > 1 and made == [1] and warm == [16] and closed == [1] and not embed_dofns._EMBED_IMAGES


def test_embed_images_are_freed_by_the_last_step_to_let_go_or_with_their_run(monkeypatch):
    closed = []
    monkeypatch.setattr(embed_dofns, "_EMBED_IMAGES", {})
    monkeypatch.setattr(embed_dofns, "embed_images", lambda cfg, encoder, decoder: SimpleNamespace(
        start_warming=lambda count: None, close=lambda in_background=False: closed.append(in_background)))  # fmt: skip
    cfg = EmbedConfig(catalog="unused", model="unused", out="unused", run_id="r1")
    encoder = SimpleNamespace(batch_size=4)
    first, second = (embed_dofns.take_embed_images(cfg, encoder, "nvjpeg") for _ in range(2))
    assert first is second
    embed_dofns.let_go_embed_images("r1", first)
    assert closed == []  # the other step still decodes with them
    embed_dofns.let_go_embed_images("r1", second)
    assert closed == [True] and not embed_dofns._EMBED_IMAGES  # the last one: closed beside the run's end
    embed_dofns.let_go_embed_images("r1", second)  # a second teardown changes nothing
    held = embed_dofns.take_embed_images(cfg, encoder, "nvjpeg")
    assert held is not first  # made again for a step that comes after the last let go
    embed_dofns.drop_embed_images("r1")  # the run is over, a step still holding them (never torn down)
    embed_dofns.let_go_embed_images("r1", held)
    assert closed == [True, True] and not embed_dofns._EMBED_IMAGES


def _over_a_ring(count: int) -> tuple[np.ndarray, list[PreparedImage]]:
    ring = np.arange(10 * count, dtype=np.uint8)  # a stand-in for a slot: views of it have a base
    return ring, [PreparedImage(f"i{k}", f"u{k}", f"s{k}", None, ring[10 * k : 10 * k + 10], "") for k in range(count)]


@pytest.mark.parametrize("page_locked", [False, True])
def test_images_leave_the_ring_into_one_buffer_page_locked_where_the_ring_is(monkeypatch, page_locked):
    asked, copies = [], embed_dofns.host_copies

    def recorded(datas, locked):
        asked.append(([len(data) for data in datas], locked))
        return copies(datas, False)  # page-locked memory needs CUDA

    monkeypatch.setattr(embed_dofns, "host_copies", recorded)
    ring, items = _over_a_ring(3)
    items.insert(1, items[0]._replace(item_id="own", data=b"own bytes"))  # bytes of its own stay as they are
    out = embed_dofns._off_the_ring(items, page_locked)
    assert asked == [([10, 10, 10], page_locked)]  # one buffer for the three over the ring
    assert out[1] is items[1]
    copies = [out[i].data for i in (0, 2, 3)]
    assert [bytes(c) for c in copies] == [bytes(items[i].data) for i in (0, 2, 3)]
    assert all(not np.shares_memory(c, ring) for c in copies)
    assert copies[0].base is copies[1].base is copies[2].base
    assert embed_dofns._off_the_ring(items[1:2], page_locked) == items[1:2] and len(asked) == 1  # nothing to copy


@pytest.mark.gpu
def test_on_a_gpu_waiting_images_are_copied_into_page_locked_memory():
    import torch

    _, items = _over_a_ring(2)
    out = embed_dofns._off_the_ring(items, page_locked=True)
    assert all(torch.from_numpy(item.data).is_pinned() for item in out)
    assert not any(torch.from_numpy(item.data).is_pinned() for item in embed_dofns._off_the_ring(items))


def test_images_waiting_for_a_full_batch_are_copied_off_the_ring_once(tiny_model, monkeypatch):
    """Each element's leftovers leave the ring as they come; those that waited before are not copied again."""
    from apache_beam.utils.shared import Shared

    copied = []
    real = embed_dofns._off_the_ring
    monkeypatch.setattr(embed_dofns, "_off_the_ring", lambda items, locked: copied.append(
        [item.item_id for item in items]) or real(items, locked))  # fmt: skip
    step = embed_dofns.EmbedBatch(EmbedConfig(catalog="-", model=str(tiny_model), out="-", batch_size=4), Shared())
    step.setup()
    submitted = []
    monkeypatch.setattr(step, "_submit", lambda batch: submitted.append([item.item_id for item in batch]))
    ring, items = _over_a_ring(9)
    for start, stop in ((0, 1), (1, 2), (2, 6), (6, 9)):
        list(step.process(items[start:stop]))
    assert submitted == [["i0", "i1", "i2", "i3"], ["i4", "i5", "i6", "i7"]]
    assert copied == [["i0"], ["i1"], ["i4", "i5"], ["i8"]]
    assert [item.item_id for item in step._waiting] == ["i8"] and not np.shares_memory(step._waiting[0].data, ring)
    assert not step._page_lock_waiting  # on the CPU: nothing to page-lock for
    step.teardown()


@pytest.mark.gpu
@pytest.mark.parametrize("decoder", ["nvimgcodec", "nvjpeg"])
def test_gpu_decode_on_cuda_embeds_every_item_close_to_the_cpu_encoder(
    demo_catalog, tiny_model, tiny_encoder, tmp_path, decoder
):
    gpu = run_embed(EmbedConfig(catalog=str(demo_catalog.manifest), model=str(tiny_model), out=str(tmp_path),
                                device="cuda", gpu_decode="on", gpu_decoder=decoder, batch_size=32))  # fmt: skip
    assert gpu.counts == {"items_in": 100, "embedded": 95, "reused": 0, "dead_lettered": 5}
    assert 0 < gpu.manifest["batches"]["decoded_on_gpu"] <= 95 and gpu.manifest["batches"]["retried"] == 0
    got = _vectors(_read_dir(Path(gpu.run_dir)))
    manifest = {r["item_id"]: r for r in pq.read_table(demo_catalog.manifest).to_pylist()}
    cosines = []
    for item_id, vector in got.items():
        data = (demo_catalog.root / manifest[item_id]["image_uri"]).read_bytes()
        cpu = tiny_encoder.embed_prepared(decode_image(data, tiny_encoder.preprocess, DecodeLimits())[None])[0]
        cosines.append(float(vector @ cpu))
    # bf16 on the GPU, full-size decode + GPU resize through draft mode's reduction vs fp32 on the CPU, draft decode +
    # PIL resize.
    print("MINCOS", min(cosines), sorted(cosines)[:5])
    assert min(cosines) > 0.98, f"cosine as low as {min(cosines):.4f}"


@pytest.mark.parametrize(
    ("processes", "row"),
    [
        (None, []),  # a manifest from before the count
        ({"embedding": 1, "forked": 0}, []),
        ({"embedding": 3, "forked": 3}, [("worker processes", "3 (all forked warm)")]),
        ({"embedding": 2, "forked": 0}, [("worker processes", "2 (started by Beam)")]),
        ({"embedding": 3, "forked": 1}, [("worker processes", "3 (1 forked warm, 2 started by Beam: see the log)")]),
    ],
)
def test_the_summary_says_how_the_worker_processes_started(processes, row):
    from pipelines.summary import _process_rows

    assert _process_rows(processes) == row
