"""The embed pipeline's steps that run on its workers: fetch and decode (`FetchAndDecode`), encode on one model
per worker process (`EmbedBatch`), the coders their elements cross Beam with, and the worker's choices about
where images decode (`gpu_decoding`, `gpu_decoder_name`) and which processes read local files
(`file_reader_for`). The work itself is Beam-free (`pipelines.embed_steps`, `encoder.gpu_stream`); the wiring
is `pipelines.embed.build_pipeline`.
"""

from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import pickle
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING

import apache_beam as beam
import numpy as np
import pyarrow as pa
import torch
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows
from apache_beam.utils.shared import Shared

from encoder import DecodeLimits, ImageEncoder, load_encoder
from encoder.decode_journal import DecodeJournal, journal_dir
from encoder.devices import gpu_for_process
from encoder.failures import MemoryBackoff
from encoder.gpu_images import GpuImages, batches_progressive
from encoder.gpu_stream import BackgroundEmbedder
from encoder.nvimgcodec import library_problem as nvimgcodec_problem
from encoder.page_lock import host_copies, page_locker
from encoder.resize import gpu_resizes
from encoder.throttled import ProgressLog
from indexing.item_ids import ItemIds
from pipelines import storage
from pipelines.catalog import ItemChunk
from pipelines.dead_letters import DeadLetterWatch, quiet_worker_prints
from pipelines.embed_runs import read_shard
from pipelines.embed_steps import (
    READ_AHEAD,
    KnownDigests,
    PrepareAhead,
    Prepared,
    PreviousVectors,
    stream_outputs,
)
from pipelines.file_reader import ProcessReader, ReadLimits, object_read_stats
from pipelines.hedged_reads import HedgeStats
from pipelines.records import PreparedImage
from pipelines.worker_fork import FORKED_ENV

if TYPE_CHECKING:
    from pipelines.embed import EmbedConfig

__all__ = [
    "NAMESPACE",
    "PRELOADED",
    "ArrowTableCoder",
    "EmbedBatch",
    "FetchAndDecode",
    "InMemoryReuse",
    "ReembedIds",
    "ItemChunkCoder",
    "PreparedImageCoder",
    "close_file_readers",
    "drop_embed_images",
    "embed_images",
    "fetch_readers",
    "file_reader_for",
    "gpu_decoder_name",
    "gpu_decoding",
    "let_go_embed_images",
    "reader_processes",
    "start_embed_images",
    "start_fetch_readers",
    "take_embed_images",
    "windowed",
]

log = logging.getLogger(__name__)

NAMESPACE = "lookalike"  # the pipeline's metrics

PRELOADED: dict[str, ImageEncoder] = {}  # run id → the model its launcher loaded for workers in this process


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


class ArrowTableCoder(beam.coders.Coder):
    """An Arrow table as an Arrow IPC stream, with a size estimate from its buffers.

    Tables of vectors go from the embed step to the shard sink: one per batch, then merged up to
    16,384 rows (~50 MB for 768 floats). With the default coder Beam's size sampling pickled the
    first ten of each and a few after, in the runner's thread that feeds the GPU: ~10 µs per image.
    """

    def encode(self, value: pa.Table) -> bytes:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, value.schema) as writer:
            writer.write_table(value)
        return sink.getvalue().to_pybytes()

    def decode(self, encoded: bytes) -> pa.Table:
        return pa.ipc.open_stream(encoded).read_all()

    def estimate_size(self, value: pa.Table) -> int:
        # Whole buffers, each once (a slice counts its parent's): 0.2 µs, where `nbytes`, exact, took 0.5 ms
        # on a merged table.
        return 256 + value.get_total_buffer_size()

    def is_deterministic(self) -> bool:
        return False

    def to_type_hint(self):
        return pa.Table


beam.coders.registry.register_coder(pa.Table, ArrowTableCoder)


class FetchAndDecode(beam.DoFn):
    """Fetch, hash and decode a chunk of items (`embed_steps.prepare_items`); `fetch_threads` bounds the pool.

    On a GPU worker nothing is decoded here: the bytes go on to `EmbedBatch`, which routes each
    image to the GPU decoder or to CPU threads. With `previous` (an earlier run small enough for
    memory), items whose image bytes already have a vector leave as one Arrow table per chunk on
    the `reused` output; otherwise each leaves as a `reuse` request for the shuffle join. Chunks
    of object-store images are prepared in the background, two past the one handed on
    (`PrepareAhead`), so their outputs leave with later elements, or at the bundle's end; a
    chunk of local files leaves at once.
    """

    def __init__(self, cfg: EmbedConfig, preprocess, total_items: int, reembed: ReembedIds | None = None,
                 previous: InMemoryReuse | None = None, watches: Shared | None = None) -> None:  # fmt: skip
        self._cfg, self._preprocess, self._total, self._reembed_source = cfg, preprocess, total_items, reembed
        self._previous_source = previous
        # One dead-letter watch per worker process, whatever its threads (`shared_watch`); `EmbedBatch` given the
        # same `watches` adds what fails after the fetch.
        self._watches = watches or Shared()

    def setup(self) -> None:
        started = time.monotonic()
        storage.configure_storage()
        self._pool = ThreadPoolExecutor(self._cfg.fetch_threads, thread_name_prefix="fetch")
        self._defer_decode = gpu_decoding(self._cfg, self._preprocess)  # the GPU worker routes and decodes
        # A GPU worker reads local files and gs:// objects in reader processes, keeping the interpreter lock for the
        # GPU threads.
        self._reader = fetch_readers(self._cfg) if self._defer_decode else None
        self._progress = ProgressLog(log, "fetched", self._total)
        self._prepare = PrepareAhead()  # the next chunks' object-store reads out while this one is handed on
        self._previous = self._previous_source.acquire() if self._previous_source else None
        self._reembed = self._reembed_source.acquire() if self._reembed_source else None
        self._reused = Metrics.counter(NAMESPACE, "reused")
        self._watch = self._shared_watch()  # stops a run whose fetches mostly fail
        quiet_worker_prints()  # ...and a worker process does not print that stop's traceback to the terminal
        self._setup_ms = _ms_since(started)  # reported in a bundle, where metrics count

    def _shared_watch(self) -> DeadLetterWatch:
        return shared_watch(self._watches, self._cfg)

    def start_bundle(self) -> None:
        if self._setup_ms is not None:
            Metrics.distribution(NAMESPACE, "fetch_setup_ms").update(self._setup_ms)
            self._setup_ms = None
        self._prepare.forget()  # left by a bundle that failed

    def process(self, chunk: ItemChunk, known: KnownDigests | None = None):
        items = chunk.items()
        known = self._previous if self._previous is not None else known
        due = self._prepare.submit(items, self._pool, self._preprocess, self._cfg.limits, known, self._reembed,
                                 threads=self._cfg.fetch_threads, max_decode_s=self._cfg.max_decode_s,
                                 defer_decode=self._defer_decode, reader=self._reader,
                                 hedge=self._cfg.hedge_reads)  # fmt: skip
        for prepared in due:
            yield from self._outputs(prepared)

    def finish_bundle(self):
        for prepared in self._prepare.drain():
            yield from windowed(self._outputs(prepared))

    def _outputs(self, prepared: Prepared):
        items = len(prepared.decoded) + len(prepared.reuse) + len(prepared.failed)
        self._watch.add(items, ((f.stage, f.error) for f in prepared.failed))
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
        self._progress.add(items)
        _count_object_reads(self._reader)

    def teardown(self) -> None:
        if getattr(self, "_prepare", None):
            self._prepare.close()
        if getattr(self, "_pool", None):
            self._pool.shutdown(wait=False)


def _ms_since(started: float) -> int:
    return int(1000 * (time.monotonic() - started))


def shared_watch(watches: Shared, cfg: EmbedConfig) -> DeadLetterWatch:
    """The run's dead-letter watch in this process, one for all its steps: a runner that gives a worker process
    many threads (Dataflow: about one per core) has a step instance per thread, each seeing a share of the items,
    and on a GPU worker images fail to decode in the embed step, after their fetch."""
    return watches.acquire(lambda: DeadLetterWatch(cfg.max_dead_letters))


class ReembedIds:
    """The items `--since` re-encodes, as a file beside the run (`embed_runs.write_reembed`), loaded once per worker
    process and shared by its threads. A set of ids in the pipeline itself travelled inside its graph: a backfill's
    2M items past Dataflow's limit on a job's graph (10 MB)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._shared = Shared()

    def acquire(self) -> ItemIds:
        def load() -> ItemIds:
            held = ItemIds(read_shard(self.uri).column("item_id"))
            log.info("loaded %d item id(s) to re-encode", len(held))
            return held

        return self._shared.acquire(load)


class InMemoryReuse:
    """How a worker loads an earlier run's vectors once, shared by its threads (`PreviousVectors`)."""

    def __init__(self, shards: list[str], model_version: str, dim: int) -> None:
        self.shards, self.model_version, self.dim = shards, model_version, dim
        self._shared = Shared()

    def acquire(self) -> PreviousVectors:
        def load() -> PreviousVectors:
            previous = PreviousVectors.load((read_shard(s) for s in self.shards), self.model_version)
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

    def __init__(self, cfg: EmbedConfig, shared: Shared, watches: Shared | None = None) -> None:
        self._cfg, self._shared, self._watches = cfg, shared, watches

    def setup(self) -> None:
        storage.configure_storage()
        cfg = self._cfg
        if cfg.workers > 1:  # local worker processes share the cores: don't oversubscribe them
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg.workers))
        started = time.monotonic()
        load = partial(load_encoder, cfg.encoder, cfg.limits)
        self._encoder = self._shared.acquire(lambda: PRELOADED.pop(cfg.run_id, None) or load(), tag=cfg.model)
        self._load_ms = _ms_since(started)  # reported in a bundle, where metrics count
        decoder = gpu_decoder_name(cfg) if gpu_decoding(cfg, self._encoder.preprocess) else None
        if decoder:
            log.info("JPEGs decode on %s with %s", self._encoder.device, decoder)
        elif cfg.gpu_decode_threads > 1:
            log.warning("--gpu-decode-threads %d ignored: images decode on CPU threads here (--fetch-threads)",
                        cfg.gpu_decode_threads)  # fmt: skip
        # The process's, shared with its other threads' embed steps (`take_embed_images`): made and warming since
        # before the pipeline started where the launcher is the worker (`start_embed_images`), else made by the first
        # step here, warming beside the first reads.
        self._images = take_embed_images(cfg, self._encoder, decoder)
        self._warm_reported = False
        self._stream: BackgroundEmbedder | None = None
        self._waiting: list[PreparedImage] = []
        # Images waiting for a full batch leave the ring: into page-locked memory where the ring is page-locked.
        self._page_lock_waiting = bool(decoder) and self._encoder.device.type == "cuda" and cfg.page_lock_reads
        self._embedded = Metrics.counter(NAMESPACE, "embedded")
        self._on_gpu = Metrics.counter(NAMESPACE, "decoded_on_gpu")
        self._retried = Metrics.counter(NAMESPACE, "batches_retried")
        self._in_pieces = Metrics.counter(NAMESPACE, "batches_in_pieces")
        self._backoff = MemoryBackoff()  # kept from bundle to bundle: what ran out of memory (`BackgroundEmbedder`)
        # What is on the GPU decoder, and what an earlier worker on this machine died with (`encoder.decode_journal`).
        self._journal = (DecodeJournal(journal_dir(cfg.out), digest_of=lambda key: key.image_sha256)
                         if decoder else None)  # fmt: skip
        self._progress = ProgressLog(log, "embedded")
        # The fetch step's watch (`shared_watch`): images that fail here count against the items it fetched.
        self._watch = shared_watch(self._watches, cfg) if self._watches is not None else None
        self._setup_ms = _ms_since(started) - self._load_ms  # the decoders, their threads and journal

    def start_bundle(self) -> None:
        if self._load_ms is not None:
            Metrics.distribution(NAMESPACE, "model_load_ms").update(self._load_ms)
            Metrics.distribution(NAMESPACE, "embed_setup_ms").update(self._setup_ms)
            if self._encoder.compile_s is not None:  # a part of the load (`load_encoder` compiles the step)
                Metrics.distribution(NAMESPACE, "compile_ms").update(int(1000 * self._encoder.compile_s))
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
        fresh = min(len(chunk), len(self._waiting))  # those before came with earlier elements: copied already
        if fresh:
            self._waiting[-fresh:] = _off_the_ring(self._waiting[-fresh:], self._page_lock_waiting)
        if self._stream is not None:
            yield from self._outputs(self._stream.ready())

    def _submit(self, batch: list[PreparedImage]) -> None:
        if self._stream is None:
            self._stream = BackgroundEmbedder(self._encoder, self._images, backoff=self._backoff,
                                              journal=self._journal)  # fmt: skip
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
        if self._stream is not None:
            stream, self._stream = self._stream, None
            yield from windowed(self._outputs(stream.finish()))
        if not self._warm_reported and self._images.warm_s is not None:  # over by now, unless it failed to start
            Metrics.distribution(NAMESPACE, "decoder_warm_ms").update(int(1000 * self._images.warm_s))
            self._warm_reported = True

    def _outputs(self, finished):
        for done in finished:
            self._on_gpu.inc(done.on_gpu)
            self._retried.inc(int(done.retried))
            self._in_pieces.inc(int(done.in_pieces))
            table, failures = stream_outputs(done, self._encoder.model_version)
            if self._watch is not None and failures:  # no items of its own: the fetch step counted them
                self._watch.add(0, ((f.stage, f.error) for f in failures))
            if table.num_rows:
                self._embedded.inc(table.num_rows)
                _count_worker_process(self._cfg.run_id)
                self._progress.add(table.num_rows)
                yield table
            for failure in failures:
                yield beam.pvalue.TaggedOutput("failed", failure)

    def teardown(self) -> None:
        if getattr(self, "_stream", None) is not None:
            self._stream.close()
        if getattr(self, "_journal", None) is not None:
            self._journal.close()
        if getattr(self, "_images", None) is not None:  # the decoders freed with the last step holding them
            let_go_embed_images(self._cfg.run_id, self._images)
            self._images = None


def _off_the_ring(items: list[PreparedImage], page_locked: bool = False) -> list[PreparedImage]:
    """The items, those whose bytes were over the file readers' ring with them copied out, into one buffer:
    page-locked with `page_locked` (from torch's cache of such memory), so that the GPU decoder copies them by DMA
    as it does from a page-locked ring (`encoder.page_lock`). The buffer lives while a copy over it does.

    What waits in an embed step for the next element should not keep ring slots: a runner that gives a worker
    process several threads (Dataflow: about one per core) has an embed step per thread, and slots kept by
    every thread's waiting images leave the next reads none (before reads went without the ring when short
    of slots, a 4-slot ring under 8 threads stopped for good; now they would carry every byte through the
    reply, a copy more per image than this one). A batch handed to the background stream keeps its slots
    until the GPU has read it: that stream moves on by itself. Where elements lose an item or more (a dead letter, a reused
    vector), most images of a run wait for the next element, so their copies are what the GPU decoder reads.
    """
    over = [i for i, item in enumerate(items) if isinstance(item.data, np.ndarray) and item.data.base is not None]
    if not over:
        return items
    out = list(items)
    for i, copy in zip(over, host_copies([items[i].data for i in over], page_locked), strict=True):
        out[i] = items[i]._replace(data=copy)
    return out


def windowed(outputs):
    """Outputs of a `finish_bundle`, which Beam takes as windowed values only."""
    for out in outputs:
        if isinstance(out, beam.pvalue.TaggedOutput):
            yield beam.pvalue.TaggedOutput(out.tag, GlobalWindows.windowed_value(out.value))
        else:
            yield GlobalWindows.windowed_value(out)


_PROCESSES_COUNTED: set[tuple[int, str]] = set()  # (this process's id, a run) once counted: a fork starts uncounted


def _count_worker_process(run_id: str) -> None:
    """Count this process among the run's processes that embedded images, once; and among those forked warm
    (`pipelines.worker_fork`), if it was."""
    with _COUNTED_LOCK:
        if (os.getpid(), run_id) in _PROCESSES_COUNTED:
            return
        _PROCESSES_COUNTED.add((os.getpid(), run_id))
    Metrics.counter(NAMESPACE, "worker_processes").inc()
    if os.environ.get(FORKED_ENV):
        Metrics.counter(NAMESPACE, "worker_processes_forked").inc()


_OBJECT_READS_COUNTED = HedgeStats()  # what this process has added to the counters below so far
_COUNTED_LOCK = threading.Lock()


def _count_object_reads(reader: ProcessReader | None) -> None:
    """Add this process's object-store reads and second requests since the last call (any thread's) to the pipeline's
    counters: its own, and its reader processes' as of their last replies."""
    global _OBJECT_READS_COUNTED
    with _COUNTED_LOCK:
        now = object_read_stats() + (reader.object_read_stats() if reader is not None else HedgeStats())
        new, _OBJECT_READS_COUNTED = now - _OBJECT_READS_COUNTED, now
    for name, n in (("object_reads", new.reads), ("second_requests", new.hedged), ("second_requests_used", new.won)):
        if n > 0:  # never below 0: counts start again only where a process's reads were replaced (tests)
            Metrics.counter(NAMESPACE, name).inc(n)


_READERS: dict[tuple[ReadLimits, int], ProcessReader] = {}
_READERS_LOCK = threading.Lock()


def file_reader_for(limits: DecodeLimits, progressive: bool = True, batch_size: int = 256, workers: int = 1,
                    decode_threads: int = 1, hedge: bool = True,
                    gpu: torch.device | None = None) -> ProcessReader:  # fmt: skip
    """This process's reader processes for image files and gs:// objects, started on first use, stopped at exit: one set
    per worker process however many fetch steps its threads run (their reads run together).
    `progressive`: whether the GPU decoder batches progressive JPEGs (their route depends on it).
    `batch_size`: the embed step's; the ring holds four such batches and more (224 slots of 8 files at
    least), as three fetch elements of a batch or more are read at once (`PrepareAhead`) while the background
    stream decodes the batches before them, and one more per GPU decode thread past the first
    (`encoder.gpu_stream` takes a batch ahead per thread). Short of slots, reads go without (a copy more).
    `workers`: the local runner's worker processes, which share this machine's cores (at most 8 readers each).
    `hedge`: object-store reads in the latency tail get a second request (`pipelines.hedged_reads`).
    `gpu`: the GPU whose decoder reads the ring, page-locked for it (`encoder.page_lock`); None: left pageable."""
    chunk = 8  # a 256-item fetch element (`embed.fetch_chunk_size`) spreads over 32 slots
    per_batch = -(-batch_size // chunk)
    slots = max(224, (2 + READ_AHEAD) * per_batch + 16) + (decode_threads - 1) * per_batch
    key = (ReadLimits.of(limits, progressive=progressive, hedge=hedge), slots)
    with _READERS_LOCK:
        if key not in _READERS:
            processes = reader_processes(os.cpu_count() or 1, workers)
            _READERS[key] = ProcessReader(key[0], processes, chunk=chunk, slots=slots,
                                          page_lock=page_locker(gpu))  # fmt: skip
            atexit.register(_READERS[key].close, wait=True)  # reaped there: exit joins no thread after its hooks
        return _READERS[key]


def fetch_readers(cfg: EmbedConfig) -> ProcessReader:
    """The reader processes a GPU worker's fetch step reads in (`file_reader_for`, with `cfg`'s settings)."""
    return file_reader_for(cfg.limits, batches_progressive(gpu_decoder_name(cfg)), cfg.batch_size, cfg.workers,
                           cfg.gpu_decode_threads, cfg.hedge_reads, _this_gpu() if cfg.page_lock_reads else None)  # fmt: skip


def start_fetch_readers(cfg: EmbedConfig, preprocess) -> bool:
    """Start this process's reader processes now, where its fetch steps will read in them (a GPU worker): a run whose
    workers are this process (the local runner) does once its model is loaded, so the readers' start and their
    ring's page-lock run beside the rest of the launcher's preparation and Beam's construction instead of before the
    first reads. Whether it started them."""
    if not gpu_decoding(cfg, preprocess):
        return False
    fetch_readers(cfg)
    return True


def embed_images(cfg: EmbedConfig, encoder: ImageEncoder, decoder: str | None) -> GpuImages:
    """The embed step's decoders and resize for `encoder` (`GpuImages`): JPEGs on the GPU decoder named
    (`gpu_decoder_name`, where this worker decodes there: `gpu_decoding`), everything on CPU threads without one."""
    return GpuImages(encoder.preprocess, encoder.device, cfg.limits, decoder=decoder, cpu_threads=cfg.fetch_threads,
                     max_decode_s=cfg.max_decode_s, decode_threads=cfg.gpu_decode_threads if decoder else 1,
                     resize=cfg.gpu_resize if decoder else "products")  # fmt: skip


def _warming(cfg: EmbedConfig, encoder: ImageEncoder, decoder: str | None) -> GpuImages:
    """`embed_images`, their warm-up started on a batch the model's size (`GpuImages.start_warming`)."""
    images = embed_images(cfg, encoder, decoder)
    images.start_warming(encoder.batch_size)
    return images


# run id → the embed step's images in this process and how many of its steps hold them (`take_embed_images`)
_EMBED_IMAGES: dict[str, tuple[GpuImages, int]] = {}
_EMBED_IMAGES_LOCK = threading.Lock()


def take_embed_images(cfg: EmbedConfig, encoder: ImageEncoder, decoder: str | None) -> GpuImages:
    """This process's embed-step images for `cfg`'s run (`embed_images`), made and warming on first use
    (`GpuImages.start_warming`), shared by every embed step that takes them until the last lets go
    (`let_go_embed_images`). A runner that gives a worker process several threads (Dataflow: about one per core)
    has an embed step per thread: each made its own decoders before, each set warmed up with its made-up batch, and
    each nvImageCodec decoder with its memory pools and a library thread per core. `GpuImages.decode` takes its
    decoders one call at a time, so the threads' background streams share `decode_threads` of them as one stream's
    decode threads do."""
    with _EMBED_IMAGES_LOCK:
        images, holders = _EMBED_IMAGES.get(cfg.run_id) or (None, 0)
        if images is None:
            images = _warming(cfg, encoder, decoder)
        _EMBED_IMAGES[cfg.run_id] = (images, holders + 1)
        return images


def let_go_embed_images(run_id: str, images: GpuImages) -> None:
    """An embed step is done with its run's images (`take_embed_images`): the last one closes them, in a thread of its
    own (`GpuImages.close`), so the decoders go beside the run's end rather than holding it up."""
    with _EMBED_IMAGES_LOCK:
        held, holders = _EMBED_IMAGES.get(run_id, (None, 0))
        if held is not images:  # dropped with its run already (`drop_embed_images`)
            return
        if holders > 1:
            _EMBED_IMAGES[run_id] = (images, holders - 1)
            return
        del _EMBED_IMAGES[run_id]
    images.close(in_background=True)


def start_embed_images(cfg: EmbedConfig, encoder: ImageEncoder) -> bool:
    """Make the embed step's GPU decoders now and warm them up in the background (`GpuImages.start_warming`), where
    the workers are this process (the local runner) and decode on the GPU: their first use (nvImageCodec's decoders
    and memory pools, kernels loaded and compiled) runs beside the rest of the launcher's preparation, Beam's
    construction and the pipeline's first stages instead of holding up the first batch. The embed steps take them
    (`take_embed_images`). Whether it made them.

    Raises:
        NvImageCodecError: nvImageCodec cannot be used (here, rather than in the step's setup).
    """
    if not gpu_decoding(cfg, encoder.preprocess):
        return False
    with _EMBED_IMAGES_LOCK:
        _EMBED_IMAGES[cfg.run_id] = (_warming(cfg, encoder, gpu_decoder_name(cfg)), 0)
    return True


def drop_embed_images(run_id: str) -> None:
    """Free the decoders of a run that is over, where its workers were this process: those `start_embed_images` made
    for a run whose embed step never took them (a run that failed first, or had nothing to embed), or held by a step
    the runner never tore down."""
    with _EMBED_IMAGES_LOCK:
        images, _ = _EMBED_IMAGES.pop(run_id, (None, 0))
    if images is not None:
        images.close(in_background=True)


def close_file_readers() -> None:
    """Stop this process's reader processes (`file_reader_for`) and let their ring go, page-locked memory and all,
    once no batch points into it. A run on the local runner, whose workers are this process, does at its end, so a
    nightly run's later steps do not keep them, nor the next run's timing inherit them warm; the next fetch step
    starts new ones."""
    with _READERS_LOCK:
        readers = list(_READERS.values())
        _READERS.clear()
    for reader in readers:
        reader.close()
        atexit.unregister(reader.close)  # which held the reader, and so its ring, until exit


def _this_gpu() -> torch.device | None:
    """The GPU this worker process embeds on (`gpu_for_process`), whose decoder reads the file readers' ring."""
    return gpu_for_process() if torch.cuda.is_available() else None


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
