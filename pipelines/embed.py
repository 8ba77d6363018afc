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
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import logging
import os
import pickle
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from functools import partial

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from apache_beam.io.filebasedsink import FileBasedSink
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions
from apache_beam.transforms.window import GlobalWindows
from apache_beam.utils.shared import Shared

from encoder import DecodeLimits, EncoderConfig, ImageEncoder, load_encoder
from encoder import storage as object_store
from encoder.devices import spread_note
from encoder.gpu_images import GpuImages, batches_progressive
from encoder.gpu_stream import BackgroundEmbedder
from encoder.nvimgcodec import library_problem as nvimgcodec_problem
from encoder.resize import gpu_resizes
from encoder.storage import arrow_input, contained
from pipelines import storage
from pipelines.catalog import (
    CatalogError,
    ItemChunk,
    catalog_files,
    item_chunks,
    parse_when,
    read_catalog,
    read_manifest_file,
)
from pipelines.embed_steps import KnownDigests, PreviousVectors, ProgressLog, join_reused, prepare_items, stream_outputs
from pipelines.file_reader import ProcessReader, ReadLimits
from pipelines.heap import frozen_heap
from pipelines.records import (
    FAILURE_SCHEMA,
    EmbeddingRow,
    PreparedImage,
    embedding_matrix,
    embedding_schema,
    failures_to_table,
    rows_to_table,
    shard_writer_options,
)

__all__ = ["EmbedConfig", "EmbedResult", "find_previous_run", "run_embed"]

log = logging.getLogger(__name__)

_NAMESPACE = "lookalike"
MANIFEST_NAME = "_manifest.json"


@dataclass(frozen=True)
class EmbedConfig:
    """How catalog images become vectors."""

    catalog: str  # manifest (Parquet/CSV/JSONL), a glob of them, or a glob of images; local or gs://
    model: str  # Hub id, local directory or gs:// directory
    out: str  # output root; runs land in out/embeddings/<run_id>/
    batch_size: int = 64  # images per forward pass (CPU); use ~256 on a GPU
    fetch_threads: int = 16  # concurrent object-store reads + decodes per worker process
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    compile_frozen: bool = False  # with compile: weights as constants, Q, K, V in one GEMM (EncoderConfig)
    cuda_graph: bool = False  # replay the model's device step as one CUDA graph (encoder.cuda_graph)
    gpu_decode: str = "auto"  # auto | on | off: JPEGs decoded and resized on the GPU (encoder.gpu_images)
    gpu_decoder: str = "auto"  # auto | nvimgcodec (NVIDIA nvImageCodec) | nvjpeg (torchvision): gpu_decoder_name
    gpu_decode_threads: int = 1  # threads decoding batches at once on the GPU, a decoder and stream each
    draft: bool = True  # JPEG draft-mode decoding (see README, "Preprocessing")
    max_image_bytes: int = 50 * 1024 * 1024
    max_image_pixels: int = 100_000_000
    max_decode_s: float = 30.0  # an image still decoding after this is dead-lettered and its thread abandoned
    incremental: bool = True  # reuse vectors of unchanged images from an earlier run
    previous: str | None = None  # that earlier run's directory; default: the latest complete one under `out`
    workers: int = 1  # local runner: >1 runs that many worker processes
    reembed_since: str | None = None  # ISO date: items with updated_at on or after it are never reused
    reuse_memory_mb: int = 1024  # earlier vectors up to this size are joined in memory per worker; beyond, by a shuffle
    run_id: str = field(default_factory=lambda: f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}")

    def __post_init__(self) -> None:
        if self.reuse_memory_mb < 0:
            raise ValueError(f"reuse_memory_mb must be >= 0, got {self.reuse_memory_mb}")
        for name in ("batch_size", "fetch_threads", "gpu_decode_threads", "max_image_bytes", "max_image_pixels",
                     "workers"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.gpu_decode not in ("auto", "on", "off"):
            raise ValueError(f"gpu_decode must be auto, on or off, got {self.gpu_decode!r}")
        if self.gpu_decoder not in ("auto", "nvimgcodec", "nvjpeg"):
            raise ValueError(f"gpu_decoder must be auto, nvimgcodec or nvjpeg, got {self.gpu_decoder!r}")
        if not self.max_decode_s > 0:
            raise ValueError(f"max_decode_s must be > 0, got {self.max_decode_s}")
        if self.reembed_since is not None:
            parse_when(self.reembed_since)
        if not self.run_id or not all(c.isalnum() or c in "-_" for c in self.run_id):
            raise ValueError(f"run_id must be letters, digits, '-' or '_', got {self.run_id!r}")
        self.encoder  # noqa: B018 - checks the encoder's fields (dtype, device, compile_frozen) before any work

    @property
    def encoder(self) -> EncoderConfig:
        return EncoderConfig(model=self.model, device=self.device, dtype=self.dtype, batch_size=self.batch_size,
                             compile=self.compile, compile_frozen=self.compile_frozen,
                             cuda_graph=self.cuda_graph)  # fmt: skip

    @property
    def limits(self) -> DecodeLimits:
        return DecodeLimits(max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels, draft=self.draft)


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


# ---------------------------------------------------------------- Beam steps


class PreparedImageCoder(beam.coders.Coder):
    """Pickle, with a size estimate from the lengths of the bytes and pixels inside.

    Beam samples the size of elements for its metrics; with the default pickle coder that meant
    pickling whole chunks of encoded photos (every chunk of the first ten, then fewer) just to
    learn their size.
    """

    def encode(self, value: PreparedImage) -> bytes:
        return pickle.dumps(value, pickle.HIGHEST_PROTOCOL)

    def decode(self, encoded: bytes) -> PreparedImage:
        return pickle.loads(encoded)

    def estimate_size(self, value: PreparedImage) -> int:
        pixels = 0 if value.pixels is None else value.pixels.nbytes
        data = 0 if value.data is None else len(value.data)
        return 128 + len(value.item_id) + len(value.image_uri) + data + pixels

    def is_deterministic(self) -> bool:
        return False

    def to_type_hint(self):
        return PreparedImage


beam.coders.registry.register_coder(PreparedImage, PreparedImageCoder)


class ItemChunkCoder(beam.coders.Coder):
    """An `ItemChunk` as one pickle of its two lists of strings."""

    def encode(self, value: ItemChunk) -> bytes:
        return pickle.dumps((value.item_ids, value.image_uris), pickle.HIGHEST_PROTOCOL)

    def decode(self, encoded: bytes) -> ItemChunk:
        return ItemChunk(*pickle.loads(encoded))

    def is_deterministic(self) -> bool:
        return True

    def to_type_hint(self):
        return ItemChunk


beam.coders.registry.register_coder(ItemChunk, ItemChunkCoder)


class FetchAndDecode(beam.DoFn):
    """Fetch, hash and decode a chunk of items (`embed_steps.prepare_items`); `fetch_threads` bounds the pool.

    On a GPU worker nothing is decoded here: the bytes go on to `EmbedBatch`, which routes each
    image to the GPU decoder or to CPU threads. With `previous` (an earlier run small enough for
    memory), items whose image bytes already have a vector leave as one Arrow table per chunk on
    the `reused` output; otherwise each leaves as a `reuse` request for the shuffle join.
    """

    def __init__(self, cfg: EmbedConfig, preprocess, total_items: int, reembed: frozenset[str] = frozenset(),
                 previous: _InMemoryReuse | None = None) -> None:  # fmt: skip
        self._cfg, self._preprocess, self._total, self._reembed = cfg, preprocess, total_items, reembed
        self._previous_source = previous

    def setup(self) -> None:
        storage.configure_storage()
        self._pool = ThreadPoolExecutor(self._cfg.fetch_threads, thread_name_prefix="fetch")
        self._defer_decode = gpu_decoding(self._cfg, self._preprocess)  # the GPU worker routes and decodes
        # A GPU worker reads local files in reader processes, keeping the interpreter lock for the GPU threads.
        self._reader = (file_reader_for(self._cfg.limits, batches_progressive(gpu_decoder_name(self._cfg)),
                                        self._cfg.batch_size, self._cfg.workers, self._cfg.gpu_decode_threads)
                        if self._defer_decode else None)  # fmt: skip
        self._progress = ProgressLog("fetched", self._total)
        self._previous = self._previous_source.acquire() if self._previous_source else None
        self._reused = Metrics.counter(_NAMESPACE, "reused")

    def process(self, chunk: ItemChunk, known: KnownDigests | None = None):
        items = chunk.items()
        known = self._previous if self._previous is not None else known
        prepared = prepare_items(items, self._pool, self._preprocess, self._cfg.limits, known, self._reembed,
                                 threads=self._cfg.fetch_threads, max_decode_s=self._cfg.max_decode_s,
                                 defer_decode=self._defer_decode, reader=self._reader)  # fmt: skip
        if prepared.decoded:  # one element per chunk: per-element costs stay off the fast path
            yield prepared.decoded
        for failure in prepared.failed:
            yield beam.pvalue.TaggedOutput("failed", failure)
        if self._previous is None:
            for request in prepared.reuse:
                yield beam.pvalue.TaggedOutput("reuse", request)
        elif prepared.reuse:
            self._reused.inc(len(prepared.reuse))
            yield beam.pvalue.TaggedOutput("reused", self._previous.table(prepared.reuse))
        self._progress.add(len(items))

    def teardown(self) -> None:
        if getattr(self, "_pool", None):
            self._pool.shutdown(wait=False)


class _InMemoryReuse:
    """How a worker loads an earlier run's vectors once, shared by its threads (`PreviousVectors`)."""

    def __init__(self, shards: list[str], model_version: str, dim: int) -> None:
        self.shards, self.model_version, self.dim = shards, model_version, dim
        self._shared = Shared()

    def acquire(self) -> PreviousVectors:
        def load() -> PreviousVectors:
            previous = PreviousVectors.load((_read_shard(s) for s in self.shards), self.model_version)
            log.info("loaded %d earlier vectors for reuse in memory", len(previous))
            return previous

        return self._shared.acquire(load)


class EmbedBatch(beam.DoFn):
    """Encode chunks of prepared images in batches of `batch_size`, with one model per worker process (shared by
    its threads), in the background.

    `process` hands full batches to a `BackgroundEmbedder` and returns at once with whatever earlier
    batches have finished, so this thread goes back to fetching while the GPU decodes and encodes;
    `finish_bundle` sends the last, partial batch and waits for the rest. Items still encoded
    (`PreparedImage.data`) are decoded there: JPEGs on the GPU, the rest on CPU threads.
    """

    def __init__(self, cfg: EmbedConfig, shared: Shared) -> None:
        self._cfg, self._shared = cfg, shared

    def setup(self) -> None:
        storage.configure_storage()
        cfg = self._cfg
        if cfg.workers > 1:  # local worker processes share the cores: don't oversubscribe them
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg.workers))
        started = time.monotonic()
        load = partial(load_encoder, cfg.encoder, cfg.limits)
        self._encoder = self._shared.acquire(lambda: _PRELOADED.pop(cfg.run_id, None) or load(), tag=cfg.model)
        self._load_ms = int(1000 * (time.monotonic() - started))  # reported in a bundle, where metrics count
        preprocess = self._encoder.preprocess
        decoder = gpu_decoder_name(cfg) if gpu_decoding(cfg, preprocess) else None
        if decoder:
            log.info("JPEGs decode on %s with %s", self._encoder.device, decoder)
        elif cfg.gpu_decode_threads > 1:
            log.warning("--gpu-decode-threads %d ignored: images decode on CPU threads here (--fetch-threads)",
                        cfg.gpu_decode_threads)  # fmt: skip
        self._images = GpuImages(preprocess, self._encoder.device, cfg.limits, decoder=decoder,
                                 cpu_threads=cfg.fetch_threads, max_decode_s=cfg.max_decode_s,
                                 decode_threads=cfg.gpu_decode_threads if decoder else 1)  # fmt: skip
        self._stream: BackgroundEmbedder | None = None
        self._waiting: list[PreparedImage] = []
        self._embedded = Metrics.counter(_NAMESPACE, "embedded")
        self._on_gpu = Metrics.counter(_NAMESPACE, "decoded_on_gpu")
        self._retried = Metrics.counter(_NAMESPACE, "batches_retried")
        self._progress = ProgressLog("embedded")

    def start_bundle(self) -> None:
        if self._load_ms is not None:
            Metrics.distribution(_NAMESPACE, "model_load_ms").update(self._load_ms)
            if self._encoder.compile_s is not None:  # a part of the load (`load_encoder` compiles the step)
                Metrics.distribution(_NAMESPACE, "compile_ms").update(int(1000 * self._encoder.compile_s))
            self._load_ms = None
        if self._stream is not None:  # left by a bundle that failed
            self._stream.close()
        self._stream, self._waiting = None, []

    def process(self, chunk: list[PreparedImage]):
        self._waiting.extend(chunk)
        size = self._encoder.batch_size
        while len(self._waiting) >= size:
            self._submit(self._waiting[:size])
            self._waiting = self._waiting[size:]
        if self._stream is not None:
            yield from self._outputs(self._stream.ready())

    def _submit(self, batch: list[PreparedImage]) -> None:
        if self._stream is None:
            self._stream = BackgroundEmbedder(self._encoder, self._images)
        datas = [item.pixels if item.data is None else item.data for item in batch]
        # Keys without the images: finished batches wait for this thread to take them, and this thread may be
        # waiting for a file reader's ring slot meanwhile, which a batch holding its images would never free.
        keys = [PreparedImage(item.item_id, item.image_uri, item.image_sha256, None) for item in batch]
        self._stream.submit(keys, datas, [self._route(item) for item in batch])

    def _route(self, item: PreparedImage) -> str | None:
        """Why the item goes to the CPU decoder (None: the GPU decoder takes it), as the file readers found, or
        found here for bytes fetched from an object store."""
        if item.route is None and item.data is not None:
            return self._images.cpu_reason(item.data)
        return item.route or None

    def finish_bundle(self):
        if self._waiting:
            self._submit(self._waiting)
            self._waiting = []
        if self._stream is None:
            return
        stream, self._stream = self._stream, None
        yield from _windowed(self._outputs(stream.finish()))

    def _outputs(self, finished):
        for done in finished:
            self._on_gpu.inc(done.on_gpu)
            self._retried.inc(int(done.retried))
            table, failures = stream_outputs(done, self._encoder.model_version)
            if table.num_rows:
                self._embedded.inc(table.num_rows)
                self._progress.add(table.num_rows)
                yield table
            for failure in failures:
                yield beam.pvalue.TaggedOutput("failed", failure)

    def teardown(self) -> None:
        if getattr(self, "_stream", None) is not None:
            self._stream.close()


def _windowed(outputs):
    """Outputs of a `finish_bundle`, which Beam takes as windowed values only."""
    for out in outputs:
        if isinstance(out, beam.pvalue.TaggedOutput):
            yield beam.pvalue.TaggedOutput(out.tag, GlobalWindows.windowed_value(out.value))
        else:
            yield GlobalWindows.windowed_value(out)


_READERS: dict[tuple[ReadLimits, int], ProcessReader] = {}
_READERS_LOCK = threading.Lock()


def file_reader_for(limits: DecodeLimits, progressive: bool = True, batch_size: int = 256,
                    workers: int = 1, decode_threads: int = 1) -> ProcessReader:  # fmt: skip
    """This process's reader processes for local image files, started on first use, stopped at exit: one set
    per worker process however many fetch steps its threads run (`ProcessReader.read` takes turns).
    `progressive`: whether the GPU decoder batches progressive JPEGs (their route depends on it).
    `batch_size`: the embed step's; the ring holds two such batches and more, as the step keeps a batch
    filling while the one before it is decoded (160 slots of 8 files at least), and one more per GPU decode
    thread past the first (`encoder.gpu_stream` takes a batch ahead per thread).
    `workers`: the local runner's worker processes, which share this machine's cores (at most 8 readers each)."""
    chunk = 8  # a 64-item fetch chunk spreads over 8 slots
    per_batch = -(-batch_size // chunk)
    slots = max(160, 2 * per_batch + 16) + (decode_threads - 1) * per_batch
    key = (ReadLimits.of(limits, progressive=progressive), slots)
    with _READERS_LOCK:
        if key not in _READERS:
            processes = reader_processes(os.cpu_count() or 1, workers)
            _READERS[key] = ProcessReader(key[0], processes, chunk=chunk, slots=slots)
            atexit.register(_READERS[key].close)
        return _READERS[key]


def reader_processes(cores: int, workers: int) -> int:
    """Reader processes per worker process: up to 8, the machine's cores shared among the worker processes."""
    return max(1, min(8, cores // max(1, workers)))


def gpu_decoding(cfg: EmbedConfig, preprocess) -> bool:
    """Whether this worker decodes JPEGs on its GPU (`--gpu-decode`: auto uses it where it can).

    Raises:
        ValueError: `on` without CUDA, torchvision, or a resize filter the GPU path has.
    """
    if cfg.gpu_decode == "off":
        return False
    problem = None
    if not (cfg.device.startswith("cuda") or cfg.device == "auto") or not torch.cuda.is_available():
        problem = "no CUDA device"
    elif not _installed("torchvision"):
        problem = "torchvision is not installed (pip install 'lookalike[gpu]')"
    elif cfg.gpu_decoder == "nvimgcodec" and (reason := nvimgcodec_problem()):
        problem = reason
    elif not gpu_resizes(preprocess):
        problem = f"the model's resize filter {preprocess.resample} is not bilinear or bicubic"
    if problem and cfg.gpu_decode == "on":
        raise ValueError(f"--gpu-decode on: {problem}")
    return problem is None


def gpu_decoder_name(cfg: EmbedConfig) -> str:
    """The GPU decoder `--gpu-decoder` names. auto: nvImageCodec wherever its library loads (the `[gpu]` extra
    installs it), else torchvision's nvJPEG. On one H100 nvImageCodec decoded 2.4× as fast alone and kept
    progressive JPEGs on the GPU; end to end it was as fast or faster (BENCHMARKS.md, "GPU embedding")."""
    if cfg.gpu_decoder != "auto":
        return cfg.gpu_decoder
    return "nvjpeg" if nvimgcodec_problem() else "nvimgcodec"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def _read_shard(path: str) -> pa.Table:
    return pq.read_table(arrow_input(storage.read_bytes(path)))


def _previous_rows(path: str, model_version: str):
    """Rows of one earlier shard that the same model version made."""
    table = _read_shard(path)
    vectors = embedding_matrix(table)
    columns = [table.column(c).to_pylist() for c in ("item_id", "image_sha256", "model_version", "embedded_at")]
    for i, (item_id, sha, version, at) in enumerate(zip(*columns, strict=True)):
        if version == model_version:
            yield EmbeddingRow(item_id, vectors[i], sha, version, at)


def _rows(table: pa.Table) -> int:
    return table.num_rows


def _count(name: str):
    counter = Metrics.counter(_NAMESPACE, name)

    def count(element):
        counter.inc()
        return element

    return count


_STAGE_COUNTER = "dead_lettered_at:"


def _count_dead_letters():
    """Count dead letters, in all and per stage, so the launcher never reads the failure shards for the counts."""
    total, stages = Metrics.counter(_NAMESPACE, "dead_lettered"), {}

    def count(failure):  # a Failure
        total.inc()
        if failure.stage not in stages:
            stages[failure.stage] = Metrics.counter(_NAMESPACE, _STAGE_COUNTER + failure.stage)
        stages[failure.stage].inc()
        return failure

    return count


def _read_item_chunks(p: beam.Pipeline, catalog: str, size: int,
                      listed: tuple[str, list[str]] | None = None) -> beam.PCollection:  # fmt: skip
    """The catalog as `ItemChunk`s of `size` items: one Beam element per chunk, not per item.

    A night that reuses almost every vector spends its time on per-element costs (the shuffle
    that spreads work, batching, metrics), so items cross Beam only in fetch-sized chunks, as
    two columns of strings (`ItemChunkCoder`). `listed`: `catalog_files(catalog)`, or an
    image glob's listing (`_write_listing`).

    Raises:
        ValueError: a glob of images without its listing.
    """
    kind, files = listed or catalog_files(catalog)
    if kind != "manifest":
        raise ValueError(f"catalog {catalog}: a glob of images reaches the pipeline as its listing (_write_listing)")
    counter = Metrics.counter(_NAMESPACE, "items_in")

    def count(chunk: ItemChunk) -> ItemChunk:
        counter.inc(len(chunk))
        return chunk

    return (
        p
        | "List catalog files" >> beam.Create(files)
        | "Read manifest" >> beam.FlatMap(lambda f: item_chunks(read_manifest_file(f), size))
        | "Count items" >> beam.Map(count)
        | "Spread items" >> beam.Reshuffle()
    )


def build_pipeline(p: beam.Pipeline, cfg: EmbedConfig, *, model_version: str, preprocess, dim: int,
                   total_items: int, previous_shards: list[str], run_dir: str, failures_dir: str,
                   reembed: frozenset[str] = frozenset(), previous_rows: int | None = None,
                   listed: tuple[str, list[str]] | None = None) -> None:  # fmt: skip
    """Wire the embed steps into `p` (see the module docstring).

    `previous_rows` (the earlier run's row count) lets vectors that fit `cfg.reuse_memory_mb`
    be joined in memory; unknown or too many, they are joined by a shuffle.
    """
    chunks = _read_item_chunks(p, cfg.catalog, 4 * cfg.fetch_threads, listed)
    known_side, previous, in_memory = None, None, None
    fits = previous_rows is not None and previous_rows * (4 * dim + 64) <= cfg.reuse_memory_mb * 2**20
    if previous_shards and fits:
        in_memory = _InMemoryReuse(previous_shards, model_version, dim)
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
    prepared = chunks | "Fetch and decode images" >> beam.ParDo(
        FetchAndDecode(cfg, preprocess, total_items, reembed, in_memory), known_side
    ).with_output_types(list[PreparedImage]).with_outputs("failed", "reuse", "reused", main="decoded")
    encoded = prepared.decoded | "Embed images" >> beam.ParDo(EmbedBatch(cfg, Shared())).with_outputs(
        "failed", main="tables"
    )
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
            | "Rows to Arrow" >> beam.Map(rows_to_table, dim)
        )
        failure_sets.append(joined.failed)
    if in_memory is not None:
        tables.append(prepared.reused)
    (
        tables
        | "All tables" >> beam.Flatten()
        # Tables of a batch or a fetch chunk each: merged so shards keep row groups of thousands of rows.
        | "Group tables" >> beam.BatchElements(min_batch_size=4096, max_batch_size=16384, element_size_fn=_rows)
        | "Merge tables" >> beam.Map(pa.concat_tables)
        | "Write embedding shards" >> beam.io.Write(ParquetShards(storage.join(run_dir, "part"), embedding_schema(dim)))
    )
    (
        failure_sets
        | "All failures" >> beam.Flatten()
        | "Count dead letters" >> beam.Map(_count_dead_letters())
        | "Group failures" >> beam.BatchElements(min_batch_size=64, max_batch_size=4096)
        | "Failures to Arrow" >> beam.Map(failures_to_table)
        | "Write dead letters" >> beam.io.Write(ParquetShards(storage.join(failures_dir, "part"), FAILURE_SCHEMA))
    )


class ParquetShards(FileBasedSink):
    """Arrow tables → Parquet shards `PREFIX-SSSSS-of-NNNNN.parquet`, written and renamed into place the way
    Beam's `WriteToParquetBatched` does, with our writer options (`shard_writer_options`: no dictionary
    pages for the vectors, which made writing 4× slower)."""

    def __init__(self, prefix: str, schema: pa.Schema) -> None:
        super().__init__(prefix, coder=None, file_name_suffix=".parquet", mime_type="application/x-parquet",
                         compression_type=CompressionTypes.UNCOMPRESSED)  # fmt: skip
        self._schema = schema

    def open(self, temp_path: str):
        handle = super().open(temp_path)
        return handle, pq.ParquetWriter(handle, self._schema, **shard_writer_options(self._schema))

    def write_record(self, opened, table: pa.Table) -> None:
        opened[1].write_table(table)

    def close(self, opened) -> None:
        handle, writer = opened
        writer.close()
        handle.close()


# ---------------------------------------------------------------- launching a run


def _pipeline_options(cfg: EmbedConfig, beam_args: list[str]) -> PipelineOptions:
    args = list(beam_args)
    if not any(a.startswith("--runner") for a in args):
        args.append("--runner=FnApiRunner")  # in-process; the plain DirectRunner wants to download Prism
        if cfg.workers > 1:
            args += [f"--direct_num_workers={cfg.workers}", "--direct_running_mode=multi_processing"]
    return PipelineOptions(args)


_PRELOADED: dict[str, ImageEncoder] = {}  # run id → the model its launcher loaded for workers in this process


def _launcher_encoder(cfg: EmbedConfig, options: PipelineOptions) -> tuple[ImageEncoder, bool]:
    """The model the launcher needs for the run's facts (version, dim, preprocessing), and whether it is the
    workers' model too. Workers in this process (the local runner, in memory or in threads) take it from
    `_PRELOADED`: a local run loads its model once, where it runs (before, the launcher loaded a CPU copy for
    the facts and the worker loaded the model again). Workers elsewhere load their own; the launcher loads a
    CPU copy, which never needs a GPU.

    Raises:
        FileNotFoundError, ValueError, RuntimeError: the model cannot be loaded (as `load_encoder`).
    """
    if _in_process(options):
        _PRELOADED[cfg.run_id] = encoder = load_encoder(cfg.encoder, cfg.limits)
        return encoder, True
    facts = replace(cfg.encoder, device="cpu", dtype="float32", compile=False, compile_frozen=False, cuda_graph=False)
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


def _load_run_manifest(run_dir: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(storage.join(run_dir, MANIFEST_NAME)))
    except storage.NotFound:
        return None


def find_previous_run(out: str, model_version: str, exclude: str | None = None) -> dict | None:
    """The latest complete run under `out` made by `model_version`, or None."""
    runs = []
    for path in storage.match(storage.join(out, "embeddings", "*", MANIFEST_NAME)):
        manifest = json.loads(storage.read_bytes(path))
        if manifest.get("model_version") == model_version and manifest.get("run_id") != exclude:
            runs.append(dict(manifest, run_dir=path.rsplit("/", 1)[0]))
    # Completion time, not the id: ids given with --run-id need not sort by time.
    return max(runs, key=lambda m: m["finished_at"], default=None)


def _previous_shards(cfg: EmbedConfig, model_version: str) -> tuple[str | None, list[str], int]:
    """The earlier run to reuse from: its id, shard paths and row count (None, [], 0 when none)."""
    if not cfg.incremental:
        return None, [], 0
    if cfg.previous:
        run_dir = cfg.previous.removesuffix("/" + MANIFEST_NAME).rstrip("/")
        manifest = _load_run_manifest(run_dir)
        if manifest is None:
            raise FileNotFoundError(f"--previous {cfg.previous}: no {MANIFEST_NAME} there (not a complete run)")
        if manifest.get("model_version") != model_version:
            log.info("previous run %s has model_version %s, not %s: nothing to reuse",
                     manifest.get("run_id"), manifest.get("model_version"), model_version)  # fmt: skip
            return manifest.get("run_id"), [], 0
        manifest = dict(manifest, run_dir=run_dir)
    else:
        manifest = find_previous_run(cfg.out, model_version, exclude=cfg.run_id)
        if manifest is None:
            return None, [], 0
    shards = [storage.join(manifest["run_dir"], contained(s["path"])) for s in manifest["shards"]]
    rows = manifest["counts"]["embedded"] + manifest["counts"]["reused"]
    log.info("reusing vectors of run %s (%d rows)", manifest["run_id"], rows)
    return manifest["run_id"], shards, rows


def _shard_stats(directory: str) -> list[dict]:
    """Each shard's name, rows and bytes, from its listing and Parquet footer: the vectors stay where they are
    (reading the shards whole to count their rows downloaded a night's every vector back into the launcher)."""
    stats = []
    for path, size in storage.match_sized(storage.join(directory, "*.parquet")):
        rows = storage.with_retries(lambda path=path: _parquet_rows(path), f"read the footer of {path}")
        stats.append({"path": path.rsplit("/", 1)[-1], "rows": rows, "bytes": size})
    return stats


def _parquet_rows(uri: str) -> int:
    with storage.open_seekable(uri) as f:  # ranged reads: the footer only
        return pq.read_metadata(pa.PythonFile(f, mode="r")).num_rows


def _metric_counts(result) -> dict[str, int]:
    """The pipeline's counters; and each distribution's largest value, as `<name>:max`."""
    queried = result.metrics().query(MetricsFilter().with_namespace(_NAMESPACE))
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


def _updated_since(catalog, since: str) -> frozenset[str]:
    """Item ids whose `updated_at` is on or after `since` (ISO date or time, UTC unless it says otherwise).

    Raises:
        CatalogError: no updated_at column.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    when = parse_when(since)
    if "updated_at" not in catalog.column_names:
        raise CatalogError(f"--since needs an updated_at column in the catalog; found {catalog.column_names}")
    stamps = catalog.column("updated_at")
    if not pa.types.is_timestamp(stamps.type):
        stamps = pc.cast(stamps, pa.timestamp("us", tz="UTC"))
    if stamps.type.tz is None:
        stamps = pc.assume_timezone(stamps, "UTC")
    recent = catalog.filter(pc.greater_equal(stamps, pa.scalar(when, type=pa.timestamp("us", tz="UTC"))))
    log.info("re-embedding %d item(s) updated since %s; the rest may reuse earlier vectors", recent.num_rows, since)
    return frozenset(recent.column("item_id").to_pylist())


def _scratch_dir(cfg: EmbedConfig) -> str:
    """What a run keeps only while it runs (an image glob's listing), removed at its end."""
    return storage.join(cfg.out, "tmp", cfg.run_id)


def _remove_scratch(cfg: EmbedConfig) -> None:
    object_store.delete_tree(_scratch_dir(cfg))
    if not object_store.is_gcs(cfg.out):
        with contextlib.suppress(OSError):  # not empty: another run's scratch is there
            os.rmdir(storage.join(cfg.out, "tmp"))


def _write_listing(cfg: EmbedConfig, catalog: pa.Table) -> tuple[str, list[str]]:
    """An image glob's files as a Parquet manifest under the run's scratch directory, for the pipeline to read
    like any manifest. In the pipeline itself (`beam.Create`) every path would travel inside its graph: pickled
    and bz2-compressed at launch (~0.1 s per 12,000 paths) and, for a large catalog, past Dataflow's limit on a
    job's graph (10 MB; 20 M paths are ~1 GB)."""
    sink = pa.BufferOutputStream()
    pq.write_table(catalog.select(["item_id", "image_uri"]), sink)
    uri = storage.join(_scratch_dir(cfg), "catalog.parquet")
    storage.write_bytes_atomic(uri, sink.getvalue().to_pybytes())
    return "manifest", [uri]


def _clear_crashed_attempt(run_dir: str, failures_dir: str, scratch_dir: str) -> None:
    """Shards of an earlier, killed attempt at this run id would be counted twice: remove them first."""
    for directory in (run_dir, failures_dir, scratch_dir):
        if object_store.list_children(directory):
            log.warning("removing the partial output of an interrupted attempt at this run: %s", directory)
            object_store.delete_tree(directory)


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
            _PRELOADED.pop(cfg.run_id, None)  # not taken by a worker: the run failed before they started


def _run_embed(cfg: EmbedConfig, beam_args: list[str] | None) -> EmbedResult:
    started = time.monotonic()
    options = _pipeline_options(cfg, beam_args or [])
    storage.configure_storage(options)
    listed = catalog_files(cfg.catalog)  # once: the validation and the pipeline's chunks share it
    catalog = read_catalog(cfg.catalog, listed)
    total = catalog.num_rows
    if _runs_here(options) and cfg.cuda_graph and not (cfg.device != "cpu" and torch.cuda.is_available()):
        raise ValueError("--cuda-graph: no CUDA device")  # before any work, not in a worker's setup
    loading = time.monotonic()
    encoder, shared = _launcher_encoder(cfg, options)
    load_s = time.monotonic() - loading
    model_version, dim, preprocess = encoder.model_version, encoder.dim, encoder.preprocess
    del encoder  # the workers' copy, if shared, stays in `_PRELOADED` until a worker takes it
    if _runs_here(options):  # refuse before any work, not in a worker's setup
        if cfg.gpu_decode == "on":
            gpu_decoding(cfg, preprocess)
        if note := _gpu_spread_note(cfg):
            log.warning(note)
    previous_run, previous_shards, previous_rows = _previous_shards(cfg, model_version)
    run_dir = storage.join(cfg.out, "embeddings", cfg.run_id)
    failures_dir = storage.join(cfg.out, "failures", cfg.run_id)
    if storage.exists(storage.join(run_dir, MANIFEST_NAME)):
        raise FileExistsError(f"run {cfg.run_id} already exists under {cfg.out}")
    _clear_crashed_attempt(run_dir, failures_dir, _scratch_dir(cfg))
    log.info("run %s: %d items, model %s (%s, dim %d)", cfg.run_id, total, cfg.model, model_version, dim)

    pipeline = beam.Pipeline(options=options)
    reembed = _updated_since(catalog, cfg.reembed_since) if previous_shards and cfg.reembed_since else frozenset()
    listing = _write_listing(cfg, catalog) if listed[0] == "images" else None
    prepared_at = time.monotonic()
    try:
        build_pipeline(pipeline, cfg, model_version=model_version, preprocess=preprocess, dim=dim,
                       total_items=total, previous_shards=previous_shards, run_dir=run_dir,
                       failures_dir=failures_dir, reembed=reembed, previous_rows=previous_rows,
                       listed=listing or listed)  # fmt: skip
        result = pipeline.run()
        result.wait_until_finish()
    finally:
        if listing:
            _remove_scratch(cfg)
    metrics = _metric_counts(result)
    ran_at = time.monotonic()

    shards, failure_shards = _shard_stats(run_dir), _shard_stats(failures_dir)
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

    wall_s = time.monotonic() - started
    load_ms = metrics.get("model_load_ms:max")
    # Where the wall time went: the launcher's preparation (catalog, model, earlier run), the pipeline (Beam's
    # own start-up included), and the accounting after it. The model loads in the preparation when the workers
    # run in this process (they use the launcher's), else in the pipeline (the slowest worker's load).
    if not shared:
        load_s = None if load_ms is None else load_ms / 1000
    compile_ms = metrics.get("compile_ms:max")  # with --compile: a part of the load (the slowest worker's)
    time_s = {"prepare": prepared_at - started, "pipeline": ran_at - prepared_at, "model_load": load_s,
              "compile": None if compile_ms is None else compile_ms / 1000,
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
        # How the workers' batches went: images the GPU decoder took (the rest, CPU threads), and batches that
        # failed in the model and were retried in halves (many: a batch size that no longer fits).
        "batches": {
            "decoded_on_gpu": metrics.get("decoded_on_gpu", 0),
            "retried": metrics.get("batches_retried", 0),
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
