"""The embed pipeline: catalog images → Parquet embedding shards + dead letters, on Apache Beam.

    read manifest in chunks ─► fetch bytes + sha256 ─┬─► decode ─► batch ─► encode (one model per process) ─┐
                                                      └─► reuse: same bytes, same model_version, earlier run ─┴─► shards
    every failure ─► dead letters;  `_manifest.json` last, once every shard is final

On a GPU worker "decode" moves into the embed step, which batches, decodes and encodes in
a background stream (`encoder.gpu_stream`) while the runner's thread fetches the next chunk.

Output layout under `out`:
    embeddings/<run_id>/part-SSSSS-of-NNNNN.parquet, embeddings/<run_id>/_manifest.json
    failures/<run_id>/part-SSSSS-of-NNNNN.parquet
    tmp/<run_id>/catalog.parquet: an image glob's listing, while the run runs

Here: the run's config, the wiring and the launch. The steps that run on the workers are in
`pipelines.embed_dofns`, a run's manifest, shards and scratch in `pipelines.embed_runs`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime

import apache_beam as beam
import pyarrow as pa
import torch
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions
from apache_beam.portability import python_urns
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.utils.shared import Shared

from encoder import ImageEncoder, load_encoder
from encoder.devices import spread_note
from encoder.storage import check_folder
from encoder.tables import file_columns, instants
from pipelines import storage, worker_fork
from pipelines.beam_flags import check_beam_args
from pipelines.beam_memo import RememberedViews, remember_dofn_specs, remember_function_args
from pipelines.catalog import (
    CatalogError,
    ItemChunk,
    catalog_files,
    item_chunks,
    read_catalog,
    read_manifest_file,
)
from pipelines.dates import parse_when
from pipelines.dead_letters import (
    MAX_KINDS,
    OTHER_REASONS,
    TooManyDeadLetters,
    check_share,
    quiet_runner_logs,
    reason_kind,
    watch_stop,
)
from pipelines.embed_config import EMBED_OPTIONS, EmbedConfig
from pipelines.embed_dofns import (
    NAMESPACE,
    PRELOADED,
    EmbedBatch,
    FetchAndDecode,
    InMemoryReuse,
    ReembedIds,
    close_file_readers,
    drop_embed_images,
    gpu_decoding,
    start_embed_images,
    start_fetch_readers,
)
from pipelines.embed_runs import (
    MANIFEST_NAME,
    clear_crashed_attempt,
    previous_run_shards,
    read_shard,
    refuse_a_used_run_id,
    remove_scratch,
    shard_stats,
    write_listing,
    write_reembed,
)
from pipelines.embed_steps import KnownDigests, join_reused
from pipelines.heap import frozen_heap
from pipelines.records import (
    FAILURE_SCHEMA,
    EmbeddingRow,
    Failure,
    PreparedImage,
    ReuseRequest,
    embedding_matrix,
    embedding_schema,
    failures_to_table,
    rows_to_table,
)
from pipelines.shard_sink import PlaceShards, WriteShards, write_empty_shard
from pipelines.worker_plugin import WorkerPlugin, brief_state_sampling

__all__ = ["EmbedConfig", "EmbedResult", "build_pipeline", "fetch_chunk_size", "run_embed"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedResult:
    """What a run produced; `manifest` is the run's `_manifest.json`."""

    run_id: str
    run_dir: str
    failures_dir: str
    manifest: dict

    @property
    def counts(self) -> dict:
        return self.manifest["counts"]


# ---------------------------------------------------------------- the pipeline


def _previous_rows(path: str, model_version: str):
    """Rows of one earlier shard that the same model version made."""
    table = read_shard(path)
    vectors = embedding_matrix(table)
    columns = [table.column(c).to_pylist() for c in ("item_id", "image_sha256", "model_version", "embedded_at")]
    for i, (item_id, sha, version, at) in enumerate(zip(*columns, strict=True)):
        if version == model_version:
            yield EmbeddingRow(item_id, vectors[i], sha, version, at)


def _rows(table: pa.Table) -> int:
    return table.num_rows


def _count(name: str):
    counter = Metrics.counter(NAMESPACE, name)

    def count(element):
        counter.inc()
        return element

    return count


_STAGE_COUNTER = "dead_lettered_at:"
_REASON_COUNTER = "dead_letter_reason:"  # + stage + ":" + reason_kind(error)


def _count_dead_letters():
    """Count dead letters, in all, per stage and per kind of reason (`dead_letters.reason_kind`, at most `MAX_KINDS`
    kinds per worker, the rest as one), so the launcher never reads the failure shards for the counts."""
    total, stages, reasons = Metrics.counter(NAMESPACE, "dead_lettered"), {}, {}

    def count(failure):  # a Failure
        total.inc()
        if failure.stage not in stages:
            stages[failure.stage] = Metrics.counter(NAMESPACE, _STAGE_COUNTER + failure.stage)
        stages[failure.stage].inc()
        key = (failure.stage, reason_kind(failure.error))
        if key not in reasons and len(reasons) >= MAX_KINDS:
            key = (failure.stage, OTHER_REASONS)
        if key not in reasons:
            reasons[key] = Metrics.counter(NAMESPACE, f"{_REASON_COUNTER}{key[0]}:{key[1]}")
        reasons[key].inc()
        return failure

    return count


def fetch_chunk_size(cfg: EmbedConfig, total_items: int | None = None) -> int:
    """Items per fetch element: four per fetch thread, and at least one batch of the embed step. An element is
    read as a whole before the step takes the next, so a batch's worth has that many reads in flight; and
    images left over, short of a full batch, wait in the embed step for the next element (copied off a GPU
    worker's read ring, `embed_dofns._off_the_ring`).

    With worker processes of its own (`workers`), a catalog of `total_items` too small to give each worker a chunk
    is cut into one chunk per worker instead: each runs with its share of the cores (`EmbedBatch.setup`), so one
    worker given it all took the time of two (SigLIP base, 64 photos, 2 cores: 32.3 s against 18.3 s in-process).
    """
    size = max(4 * cfg.fetch_threads, cfg.batch_size)
    if cfg.workers > 1 and total_items:
        size = min(size, -(-total_items // cfg.workers))
    return size


def _read_item_chunks(p: beam.Pipeline, catalog: str, size: int,
                      listed: tuple[str, list[str]] | None = None) -> beam.PCollection:  # fmt: skip
    """The catalog as `ItemChunk`s of `size` items: one Beam element per chunk, not per item.

    A night that reuses almost every vector spends its time on per-element costs (the shuffle
    that spreads work, batching, metrics), so items cross Beam only in fetch-sized chunks, as
    two columns of strings (`ItemChunkCoder`). `listed`: `catalog_files(catalog)`, or an
    image glob's listing (`write_listing`).

    Raises:
        ValueError: a glob of images without its listing.
    """
    kind, files = listed or catalog_files(catalog)
    if kind != "manifest":
        raise ValueError(f"catalog {catalog}: a glob of images reaches the pipeline as its listing (write_listing)")
    counter = Metrics.counter(NAMESPACE, "items_in")

    def count(chunk: ItemChunk) -> ItemChunk:
        counter.inc(len(chunk))
        return chunk

    return (
        p
        | "List catalog files" >> beam.Create(files)
        # Typed: else Beam infers the type from the lambda's bytecode and that of the functions it calls, ~10 ms of
        # every run's graph construction here (BENCHMARKS.md, "Every step's output typed").
        | "Read manifest"
        >> beam.FlatMap(lambda f: item_chunks(read_manifest_file(f, columns=()), size)).with_output_types(ItemChunk)
        | "Count items" >> beam.Map(count).with_output_types(ItemChunk)  # its annotations are strings to Beam
        | "Spread items" >> beam.Reshuffle()
    )


def build_pipeline(p: beam.Pipeline, cfg: EmbedConfig, *, model_version: str, preprocess, dim: int,
                   total_items: int, previous_shards: list[str], run_dir: str, failures_dir: str,
                   reembed: ReembedIds | None = None, previous_rows: int | None = None,
                   listed: tuple[str, list[str]] | None = None) -> None:  # fmt: skip
    """Wire the embed steps into `p` (see the module docstring).

    `previous_rows` (the earlier run's row count) lets vectors that fit `cfg.reuse_memory_mb`
    be joined in memory; unknown or too many, they are joined by a shuffle.
    """
    chunks = _read_item_chunks(p, cfg.catalog, fetch_chunk_size(cfg, total_items), listed)
    known_side, previous, in_memory = None, None, None
    fits = previous_rows is not None and previous_rows * (4 * dim + 64) <= cfg.reuse_memory_mb * 2**20
    if previous_shards and fits:
        in_memory = InMemoryReuse(previous_shards, model_version, dim)
    elif previous_shards:
        previous = (
            p
            | "List previous shards" >> beam.Create(previous_shards)
            | "Read previous vectors" >> beam.FlatMap(_previous_rows, model_version)
        )
        known_side = beam.pvalue.AsSingleton(
            previous
            | "Digests" >> beam.Map(lambda r: r.image_sha256)
            | "Collect digests" >> beam.combiners.ToList()
            | "Index digests" >> beam.Map(KnownDigests)
        )
    watches = Shared()  # the run's dead-letter watch, one per worker process for both steps (`shared_watch`)
    prepared = chunks | "Fetch and decode images" >> beam.ParDo(
        FetchAndDecode(cfg, preprocess, total_items, reembed, in_memory, watches), known_side
    ).with_output_types(list[PreparedImage], failed=Failure, reuse=ReuseRequest, reused=pa.Table).with_outputs(
        "failed", "reuse", "reused", main="decoded"
    )
    encoded = prepared.decoded | "Embed images" >> beam.ParDo(EmbedBatch(cfg, Shared(), watches)).with_output_types(
        pa.Table, failed=Failure
    ).with_outputs("failed", main="tables")
    tables, failure_sets = [encoded.tables], [prepared.failed, encoded.failed]
    if previous is not None:
        joined = (
            {
                "requests": prepared.reuse | "Key requests" >> beam.Map(lambda r: (r.image_sha256, r)),
                "previous": previous | "Key previous" >> beam.Map(lambda r: (r.image_sha256, r)),
            }
            | "Join earlier vectors" >> beam.CoGroupByKey()
            | "Reuse vectors"
            >> beam.FlatMap(lambda kv: join_reused(kv[0], kv[1]["requests"], kv[1]["previous"])).with_outputs(
                "failed", main="rows"
            )
        )
        tables.append(
            joined.rows
            | "Count reused" >> beam.Map(_count("reused"))
            | "Group rows" >> beam.BatchElements(min_batch_size=256, max_batch_size=16384)
            | "Rows to Arrow" >> beam.Map(rows_to_table, dim).with_output_types(pa.Table)
        )
        failure_sets.append(joined.failed)
    if in_memory is not None:
        tables.append(prepared.reused)
    shard_files = (
        tables
        # Typed, so Beam codes them and samples their sizes with `ArrowTableCoder`, not pickle.
        | "All tables" >> beam.Flatten().with_output_types(pa.Table)
        # Tables of a batch or a fetch chunk each: merged so shards keep row groups of thousands of rows.
        | "Group tables" >> beam.BatchElements(min_batch_size=4096, max_batch_size=16384, element_size_fn=_rows)
        | "Merge tables" >> beam.Map(pa.concat_tables).with_output_types(pa.Table)
        | "Write embedding shards" >> WriteShards(run_dir, embedding_schema(dim), cfg.rows_per_shard)
    )
    failure_files = (
        failure_sets
        | "All failures" >> beam.Flatten()
        | "Count dead letters" >> beam.Map(_count_dead_letters()).with_output_types(Failure)  # typed: as above
        | "Group failures" >> beam.BatchElements(min_batch_size=64, max_batch_size=4096)
        | "Failures to Arrow" >> beam.Map(failures_to_table)
        | "Write dead letters" >> WriteShards(failures_dir, FAILURE_SCHEMA, cfg.rows_per_shard)
    )
    # Both sinks' files renamed into place in one stage (`pipelines.shard_sink`; Beam's `Write` took four each).
    (shard_files, failure_files) | "Place shards" >> PlaceShards()


# ---------------------------------------------------------------- launching a run


def _pipeline_options(cfg: EmbedConfig, beam_args: list[str]) -> PipelineOptions:
    check_beam_args(beam_args, EMBED_OPTIONS)
    # Each of the job's worker processes imports it as it starts, where the runner hands them the job's options
    # (Dataflow does): `pipelines.worker_plugin`.
    args = [*beam_args, f"--beam_plugins={WorkerPlugin.__module__}.{WorkerPlugin.__qualname__}"]
    if not any(a.startswith("--runner") for a in args):
        args.append("--runner=FnApiRunner")  # in-process; the plain DirectRunner wants to download Prism
        if cfg.workers > 1:
            args += [f"--direct_num_workers={cfg.workers}", "--direct_running_mode=multi_processing"]
    return RememberedViews(args)  # Beam asks for its views ~230 times a run: each made once


class _ForkedWorkersRunner(FnApiRunner):
    """The local runner, its worker processes forked warm (`pipelines.worker_fork`): Beam's command for them (its
    `multi_processing` mode) replaced by the forker's."""

    def __init__(self, command: str) -> None:
        super().__init__()
        self._command = command.encode()

    def run_via_runner_api(self, pipeline_proto, options):
        for environment in pipeline_proto.components.environments.values():
            if environment.urn == python_urns.SUBPROCESS_SDK:
                environment.payload = self._command
        return super().run_via_runner_api(pipeline_proto, options)


def _forks_workers(cfg: EmbedConfig, options: PipelineOptions) -> bool:
    """Whether the run's worker processes are forked warm: the local runner's, when it starts processes."""
    return (cfg.fork_workers and options.view_as(StandardOptions).runner == "FnApiRunner"
            and options.view_as(DirectOptions).direct_running_mode == "multi_processing")  # fmt: skip


def _take_forker() -> worker_fork.Forker | None:
    """The run's worker forker; None, with a warning, where none can start (its workers then start as Beam starts
    them)."""
    try:
        return worker_fork.take()
    except OSError as err:
        log.warning("worker processes start fresh, not forked: the forker could not start (%s)", err)
        return None


def _launcher_encoder(cfg: EmbedConfig, options: PipelineOptions) -> tuple[ImageEncoder, bool]:
    """The model the launcher needs for the run's facts (version, dim, preprocessing), and whether it is the
    workers' model too. Workers in this process (the local runner, in memory or in threads) take it from
    `PRELOADED`: a local run loads its model once, where it runs (before, the launcher loaded a CPU copy for
    the facts and the worker loaded the model again). Workers elsewhere load their own; the launcher loads a
    CPU copy, which never needs a GPU.

    Raises:
        FileNotFoundError, ValueError, RuntimeError: the model cannot be loaded (as `load_encoder`).
    """
    if _in_process(options):
        PRELOADED[cfg.run_id] = encoder = load_encoder(cfg.encoder, cfg.limits)
        return encoder, True
    facts = replace(cfg.encoder, device="cpu", dtype="float32", compile=False, compile_frozen=False, cuda_graph=False,
                    decode_sms=0)  # fmt: skip
    return load_encoder(facts, cfg.limits), False


def _in_process(options: PipelineOptions) -> bool:
    """Whether the pipeline's workers run in this process: the local runner, unless in worker processes."""
    return (options.view_as(StandardOptions).runner == "FnApiRunner"
            and options.view_as(DirectOptions).direct_running_mode != "multi_processing")  # fmt: skip


def _runs_here(options: PipelineOptions) -> bool:
    """Whether the workers run on this machine (the local runners), so this machine's GPU is theirs."""
    return options.view_as(StandardOptions).runner in ("FnApiRunner", "DirectRunner", "PrismRunner")


def _gpu_spread_note(cfg: EmbedConfig) -> str | None:
    """How a local run's worker processes will sit on this machine's GPUs, when it is not one model per GPU."""
    if cfg.device == "cpu" or not torch.cuda.is_available():
        return None
    if cfg.device.startswith("cuda:"):  # every worker process on the GPU it names
        return (f"--workers {cfg.workers} with --device {cfg.device}: {cfg.workers} model copies on that GPU "
                "(--device cuda gives each worker process a GPU of its own)") if cfg.workers > 1 else None  # fmt: skip
    return spread_note(torch.cuda.device_count(), cfg.workers)


def _stats_with_a_shard(directory: str, schema) -> list[dict]:
    """`shard_stats` of a run's directory; one with no rows first gets one empty shard, so it holds its schema
    (one listing where there are shards, as there mostly are)."""
    stats = shard_stats(directory)
    if not stats:
        write_empty_shard(directory, schema)
        stats = shard_stats(directory)
    return stats


def _metric_counts(result) -> dict[str, int]:
    """The pipeline's counters; and each distribution's largest value, as `<name>:max`."""
    queried = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    counts: dict[str, int] = {}
    for c in queried["counters"]:
        counts[c.key.metric.name] = counts.get(c.key.metric.name, 0) + int(c.committed or 0)
    for d in queried["distributions"]:
        if d.committed is not None and d.committed.count:
            name = d.key.metric.name + ":max"
            counts[name] = max(counts.get(name, 0), int(d.committed.max))
    return counts


def _dead_letters_by_stage(metrics: dict[str, int]) -> dict[str, int]:
    """Dead letters per stage, from the counters the pipeline kept (`_count_dead_letters`)."""
    return {name.removeprefix(_STAGE_COUNTER): n for name, n in sorted(metrics.items())
            if name.startswith(_STAGE_COUNTER) and n}  # fmt: skip


def _dead_letter_reasons(metrics: dict[str, int]) -> list[tuple[str, str, int]]:
    """`(stage, kind of reason, count)` of the run's dead letters, most first (`_count_dead_letters`)."""
    reasons = [(*name.removeprefix(_REASON_COUNTER).split(":", 1), n) for name, n in metrics.items()
               if name.startswith(_REASON_COUNTER) and n]  # fmt: skip
    return sorted(reasons, key=lambda r: (-r[2], r[0], r[1]))


def _updated_since(catalog, since: str) -> pa.Array:
    """Item ids whose `updated_at` is on or after `since` (ISO date or time, UTC unless it says otherwise). The
    column may hold timestamps, dates or ISO 8601 text; an item whose time is missing or unreadable is not known to be
    recent: it reuses its earlier vector, and the log counts such items.

    Raises:
        CatalogError: no updated_at column, or one of numbers (seconds or milliseconds since when?).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    when = parse_when(since)
    if "updated_at" not in catalog.column_names:
        raise CatalogError(f"--since needs an updated_at column in the catalog; found {file_columns(catalog)}")
    try:
        stamps = instants(catalog.column("updated_at"), "the catalog's updated_at")
    except ValueError as err:
        raise CatalogError(str(err)) from err
    recent = catalog.filter(pc.greater_equal(stamps, pa.scalar(when, type=stamps.type)))
    log.info("re-embedding %d item(s) updated since %s; the rest may reuse earlier vectors", recent.num_rows, since)
    if stamps.null_count:
        unread = catalog.filter(pc.is_null(stamps)).column("item_id").slice(0, 3).to_pylist()
        log.warning("%d item(s) have no updated_at that reads as a time (e.g. %s): not re-embedded where an earlier "
                    "vector exists", stamps.null_count, ", ".join(map(str, unread)))  # fmt: skip
    return recent.column("item_id").combine_chunks()


def wait_or_cancel(result, remote: bool) -> None:
    """Wait for the pipeline. Where its job runs elsewhere (Dataflow), a launcher stopped meanwhile (Ctrl-C, or the
    SIGTERM an orchestrator sends at its task's time limit; exit 143 for it) cancels the job first: it ran on without
    its launcher, and the task's retry started a second job on the same run."""
    if not remote:
        result.wait_until_finish()
        return
    here = threading.current_thread() is threading.main_thread()  # only the main thread may set a handler
    previous = signal.getsignal(signal.SIGTERM) if here else None

    def terminated(signum, frame):
        raise SystemExit(128 + signum)

    if here:
        signal.signal(signal.SIGTERM, terminated)
    try:
        result.wait_until_finish()
    except (KeyboardInterrupt, SystemExit):
        log.warning("stopped while the job ran: cancelling it (%s)", getattr(result, "job_id", lambda: "")())
        try:
            result.cancel()
        except Exception as err:  # noqa: BLE001 - say so; the stop goes on
            log.error("could not cancel the job: %s; cancel it by hand before a rerun", err)
        raise
    finally:
        if here:
            signal.signal(signal.SIGTERM, previous)


def run_embed(cfg: EmbedConfig, beam_args: list[str] | None = None) -> EmbedResult:
    """Embed every catalog image of `cfg.catalog` into a new run under `cfg.out`.

    Raises:
        CatalogError: the manifest is unusable (before any image is read).
        FileNotFoundError, ValueError: the model cannot be loaded.
        RuntimeError: the run's counts do not add up (nothing is marked complete).
    """
    with frozen_heap():  # the local runner's workers run in this process: no long stalls in full collections
        try:
            return _run_embed(cfg, beam_args)
        finally:
            PRELOADED.pop(cfg.run_id, None)  # not taken by a worker: the run failed before they started


def _run_embed(cfg: EmbedConfig, beam_args: list[str] | None) -> EmbedResult:
    started = time.monotonic()
    options = _pipeline_options(cfg, beam_args or [])
    # Started first, so its imports run beside the preparation (the command line started it before its own).
    forker = _take_forker() if _forks_workers(cfg, options) else None
    try:
        return _run(cfg, beam_args, options, forker, started)
    finally:
        if forker is not None:
            forker.close()


def _run(cfg: EmbedConfig, beam_args: list[str] | None, options: PipelineOptions,
         forker: worker_fork.Forker | None, started: float) -> EmbedResult:  # fmt: skip
    remember_dofn_specs()  # Beam asks ~8 times per step as it builds and runs the pipeline
    remember_function_args()  # and reads each function's signature ~2,000 times per run
    storage.configure_storage(options)
    check_folder(cfg.out, "output root")
    refuse_a_used_run_id(cfg.out, cfg.run_id)  # before the catalog's read and the model's load
    run_dir = storage.join(cfg.out, "embeddings", cfg.run_id)
    failures_dir = storage.join(cfg.out, "failures", cfg.run_id)
    listed = catalog_files(cfg.catalog)  # once: the validation and the pipeline's chunks share it
    catalog = read_catalog(cfg.catalog, listed, columns=("updated_at",))  # what the launcher reads of each item
    total = catalog.num_rows
    if _runs_here(options) and not (cfg.device != "cpu" and torch.cuda.is_available()):  # before any work
        for flag, asked in (("--cuda-graph", cfg.cuda_graph), ("--decode-sms", cfg.decode_sms)):
            if asked:
                raise ValueError(f"{flag}: no CUDA device")
    loading = time.monotonic()
    encoder, shared = _launcher_encoder(cfg, options)
    load_s = time.monotonic() - loading
    model_version, dim, preprocess = encoder.model_version, encoder.dim, encoder.preprocess
    del encoder  # the workers' copy, if shared, stays in `PRELOADED` until a worker takes it
    if _runs_here(options):  # refuse before any work, not in a worker's setup
        if cfg.gpu_decode == "on":
            gpu_decoding(cfg, preprocess)
        if note := _gpu_spread_note(cfg):
            log.warning(note)
    here = _in_process(options)  # the workers are this process
    listing = pipeline = None
    try:
        if here:  # the workers' readers and decoders start beside the rest of the preparation (an earlier run's
            # manifests, a crashed attempt's files, the listing: requests each on gs://) and Beam's construction
            start_fetch_readers(cfg, preprocess)
            start_embed_images(cfg, PRELOADED[cfg.run_id])
        previous_run, previous_shards, previous_rows = previous_run_shards(cfg, model_version)
        clear_crashed_attempt(cfg, run_dir, failures_dir)
        log.info("run %s: %d items, model %s (%s, dim %d)", cfg.run_id, total, cfg.model, model_version, dim)
        runner = _ForkedWorkersRunner(forker.command) if forker is not None else None
        pipeline = beam.Pipeline(runner=runner, options=options)
        recent = _updated_since(catalog, cfg.reembed_since) if previous_shards and cfg.reembed_since else None
        reembed = ReembedIds(write_reembed(cfg, recent)) if recent is not None and len(recent) else None
        listing = write_listing(cfg, catalog) if listed[0] == "images" else None
        prepared_at = time.monotonic()
        with quiet_runner_logs(), brief_state_sampling() if here else contextlib.nullcontext():
            building = time.monotonic()
            build_pipeline(pipeline, cfg, model_version=model_version, preprocess=preprocess, dim=dim,
                           total_items=total, previous_shards=previous_shards, run_dir=run_dir,
                           failures_dir=failures_dir, reembed=reembed, previous_rows=previous_rows,
                           listed=listing or listed)  # fmt: skip
            build_s = time.monotonic() - building
            result = pipeline.run()
            wait_or_cancel(result, remote=not _runs_here(options))
    except Exception as err:
        if stop := watch_stop(err):  # a worker stopped the run (`dead_letters.DeadLetterWatch`)
            raise TooManyDeadLetters(f"run {cfg.run_id} {stop}") from None
        raise
    finally:
        if pipeline is not None:  # Beam removes its scratch folder in `run`; a run that failed before it leaves one
            shutil.rmtree(pipeline.local_tempdir, ignore_errors=True)
        if listing:
            remove_scratch(cfg)
        if here:  # decoders made for the embed step that it never took
            drop_embed_images(cfg.run_id)
        if _runs_here(options):  # the workers were this process: their reader processes are done too
            close_file_readers()
    metrics = _metric_counts(result)
    ran_at = time.monotonic()

    shards = _stats_with_a_shard(run_dir, embedding_schema(dim))
    failure_shards = _stats_with_a_shard(failures_dir, FAILURE_SCHEMA)
    rows = sum(s["rows"] for s in shards)
    dead = sum(s["rows"] for s in failure_shards)
    counts = {"items_in": total, "embedded": metrics.get("embedded", 0), "reused": metrics.get("reused", 0),
              "dead_lettered": dead}  # fmt: skip
    problems = []
    if counts["embedded"] + counts["reused"] != rows:
        problems.append(f"embedded {counts['embedded']} + reused {counts['reused']} != {rows} rows written")
    if total != rows + dead:
        problems.append(f"items in {total} != {rows} rows + {dead} dead letters")
    by_stage = _dead_letters_by_stage(metrics)
    if sum(by_stage.values()) != dead:
        problems.append(f"dead letters counted by stage {by_stage} != {dead} rows written")
    if metrics.get("items_in", total) != total:
        problems.append(f"pipeline read {metrics.get('items_in')} items, manifest has {total}")
    if problems:
        raise RuntimeError(f"run {cfg.run_id} is inconsistent, not marked complete: " + "; ".join(problems))
    reasons = _dead_letter_reasons(metrics)
    check_share(cfg.run_id, dead, total, cfg.max_dead_letters, reasons, failures_dir)

    wall_s = time.monotonic() - started

    def slowest_s(name: str) -> float | None:  # the slowest worker's, from its `<name>_ms` distribution
        ms = metrics.get(f"{name}_ms:max")
        return None if ms is None else ms / 1000

    # Where the wall time went: the launcher's preparation (catalog, model, earlier run), the pipeline (Beam's
    # own start-up included; of it `build`, Beam's construction of the pipeline's graph), and the accounting after it.
    # The model loads in the preparation when the workers run in this process (they use the launcher's), else in the
    # pipeline (the slowest worker's load). With --compile the compile is a part of the load. The workers' own
    # set-up: the fetch step's (thread pool, reader processes) and the embed step's less its model load (the
    # decoders, their threads, the journal).
    if not shared:
        load_s = slowest_s("model_load")
    time_s = {"prepare": prepared_at - started, "pipeline": ran_at - prepared_at, "build": build_s, "model_load": load_s,
              "compile": slowest_s("compile"), "fetch_setup": slowest_s("fetch_setup"),
              "embed_setup": slowest_s("embed_setup"), "decoder_warm": slowest_s("decoder_warm"),
              "accounting": wall_s - (ran_at - started)}  # fmt: skip
    manifest = {
        "run_id": cfg.run_id,
        "status": "complete",
        "finished_at": datetime.now(UTC).isoformat(),
        "wall_time_s": round(wall_s, 3),
        "time_s": {k: None if v is None else round(v, 3) for k, v in time_s.items()},
        "catalog": cfg.catalog,
        "model": cfg.model,
        "model_version": model_version,
        "dim": dim,
        "counts": counts,
        "dead_letters_by_stage": by_stage,
        # The kinds of reason (`dead_letters.reason_kind`), most first; each dead letter has its own in the shards.
        "dead_letter_reasons": [{"stage": stage, "reason": kind, "count": n} for stage, kind, n in reasons],
        # How the workers' batches went: images the GPU decoder took (the rest, CPU threads), and batches that
        # failed whole in the GPU decoder, the resize or the model and were retried in halves (a few: JPEGs that
        # torchvision's nvJPEG rejects; many: memory that no longer fits a batch, see the log), and batches the
        # model, the GPU decoder or the resize took in pieces after an earlier one ran out of memory
        # (`encoder.failures.MemoryBackoff`).
        "batches": {
            "decoded_on_gpu": metrics.get("decoded_on_gpu", 0),
            "retried": metrics.get("batches_retried", 0),
            "in_pieces": metrics.get("batches_in_pieces", 0),
        },  # fmt: skip
        # Image reads from an object store, and the second requests sent for those in the latency tail
        # (`pipelines.hedged_reads`), with how many of them brought the bytes used.
        "object_store_reads": {
            "reads": metrics.get("object_reads", 0),
            "second_requests": metrics.get("second_requests", 0),
            "second_requests_used": metrics.get("second_requests_used", 0),
        },
        # The processes that embedded (the local runner's: this one, or `workers` of their own), and of them those
        # forked warm (`pipelines.worker_fork`; fewer: some started fresh, and the log says why).
        "worker_processes": {
            "embedding": metrics.get("worker_processes", 0),
            "forked": metrics.get("worker_processes_forked", 0),
        },  # fmt: skip
        "images_per_s": round(counts["embedded"] / wall_s, 2),
        "previous_run": previous_run,
        "shards": shards,
        "failure_shards": failure_shards,
        "options": asdict(cfg),
        "beam_args": list(beam_args or []),
    }
    storage.write_bytes_atomic(storage.join(run_dir, MANIFEST_NAME), json.dumps(manifest, indent=2).encode())
    log.info("run %s complete: %s", cfg.run_id, counts)
    return EmbedResult(cfg.run_id, run_dir, failures_dir, manifest)
