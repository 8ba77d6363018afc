"""Overlap decode and encode on one GPU: batches of encoded images in, vectors out.

Threads prepare batches on a side CUDA stream (`GpuImages`): one decodes batch i+2
(the decoders release the GIL) while another resizes batch i+1, and the model encodes
batch i on the default stream (`side_stream`, `resize_stream` and `model_stream` choose the
streams; a model with a share of the SMs runs on that share's stream, `encoder.sm_share`).
With `GpuImages.decode_threads` > 1, that many threads decode, each with a decoder and side
stream of its own, and the resize takes their batches in input order. At most one
batch per decode thread and one more wait between the source and the resize, and `prefetch`
resized ones after it, so memory stays bounded. The model's thread launches batch i before
it waits for batch i-1's vectors, so the GPU has work queued while the host takes them (and
the caller writes them) instead of idling until the next launch. Events order each batch's
encode (and its resize, where that has a stream of its own) after the stages before, and
`record_stream` keeps the allocator from reusing a batch's memory while a later stage still
reads it. A batch the model fails whole is retried in halves (`embed_checked`); once one runs out
of memory, the next go straight to pieces that fit (`encoder.failures.MemoryBackoff`; the GPU decoder
and the resize keep backoffs of their own, `GpuImages`). On the CPU
the same code runs without streams (tests/encoder/test_gpu_stream.py).

`embed_stream` pulls batches from an iterable (the standalone worker reads files);
`BackgroundEmbedder` runs it in its own thread for callers that push batches as they
come (the Beam step), so fetching the next batch overlaps all of this.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import threading
from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from encoder.decode_journal import DecodeJournal
from encoder.failures import MemoryBackoff, Throttled, attempt, device_failed, in_halves, learning
from encoder.gpu_images import GpuImages
from encoder.model import ImageEncoder, PendingVectors

__all__ = ["BackgroundEmbedder", "Checked", "HeldInputs", "StreamBatch", "embed_checked", "embed_stream"]

log = logging.getLogger(__name__)

_DONE = object()
_RETRIES = Throttled(log)  # batches that failed to embed whole


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream the decode stage runs on (and the resize stage, unless `resize_stream` gives it another)."""
    return torch.cuda.Stream(device)


def resize_stream(device: torch.device, decode: torch.cuda.Stream) -> torch.cuda.Stream:
    """The stream the resize stage runs on: the decode stage's, so stream order puts each batch's resize after its
    decode. Another stream waits for each batch's decode on an event instead, and then a decoder that orders its
    work after what is queued on its stream (nvImageCodec) no longer waits for the resize of the batch before;
    `benchmarks/gpu_embed.py` (its `streams` path) measures that against this."""
    return decode


def model_stream(device: torch.device) -> torch.cuda.Stream | None:
    """The stream the model's batches run on; None: the consuming thread's current one (the default stream).
    `benchmarks/gpu_embed.py` (its `streams` path) measures a stream of their own against it."""
    return None


def _compute_stream(encoder: ImageEncoder, device: torch.device) -> torch.cuda.Stream | None:
    """The model's stream: on its share of the SMs where it has one (`ImageEncoder.sm_share`), else `model_stream`."""
    return encoder.sm_share.stream if encoder.sm_share is not None else model_stream(device)


@dataclass
class StreamBatch:
    """One input batch's outcome: vectors for `keys` (input order), failures with stage and reason."""

    keys: list[Hashable]
    vectors: np.ndarray  # (len(keys), dim) float32, L2-normalised
    failed: list[tuple[Hashable, str, str]]  # (key, "decode" | "encode", reason)
    on_gpu: int  # images decoded by the GPU decoder (the rest by the CPU fallback)
    retried: bool = False  # failed whole in the GPU decoder, the resize or the model, and went through in halves
    in_pieces: bool = False  # the model, the GPU decoder or the resize took it in pieces: an earlier batch ran out of
    # memory (`MemoryBackoff`)


class Checked(NamedTuple):
    """`embed_checked`'s outcome."""

    rows: list[int]  # the rows embedded
    vectors: np.ndarray  # their vectors
    failed: list[tuple[int, str]]  # (row, reason) for the rest
    retried: bool  # the batch, or a piece of it, failed whole and was retried in halves


@dataclass
class Launched:
    """A batch's launch (`_launch`): whole, or in pieces of `size` while the batch size does not fit the memory left
    (`MemoryBackoff`); each piece's `PendingVectors`, or why its launch failed."""

    size: int  # images per piece (the last may have fewer)
    pieces: list[tuple[int, PendingVectors | str]]  # (first row, its launch), in order
    in_pieces: bool = False  # through the eager step in pieces, not whole (an earlier batch ran out of memory)
    probe: bool = False  # whole while backing off: whether the batch size fits again


def embed_checked(encoder: ImageEncoder, pixels: torch.Tensor, launched: Launched | None = None,
                  backoff: MemoryBackoff | None = None) -> Checked:  # fmt: skip
    """Embed a batch; if it fails, in halves (`in_halves`), so only the culprits fail. Non-finite vectors fail too.

    `launched`: the batch's `_launch`, started earlier. The pieces run the model's eager step at
    their own size (`ImageEncoder.launch`), and start once the failure's traceback is gone: its
    frames hold the failed attempt's tensors, whose GPU memory the pieces may need. A CUDA error
    that leaves the device unusable (`device_failed`) is raised, not dead-lettered piece by piece.
    The warning says so once a minute at most (`_RETRIES`): a batch size that no longer fits could
    otherwise log every batch. `backoff` learns from what runs out of memory, and from a whole
    batch that fits (`MemoryBackoff`).
    """
    launched = launched or _launch(encoder, pixels, backoff)
    done, failed, retried = [], {}, False
    for start, pending in launched.pieces:
        piece = pixels[start : start + launched.size]
        reason = pending if isinstance(pending, str) else None
        if reason is None:
            vectors, reason = attempt(pending.result)
            if reason is None:
                done.append((start, vectors))
                continue
            _learn(backoff, len(piece), reason)
        retried = True
        _RETRIES.warning("batch of %d failed to embed (%s); retrying it in halves", len(piece), reason)
        # The pieces through the eager step, at their own size; `backoff` learns from those that run out of memory.
        pieces, culprits = in_halves(learning(backoff, lambda part: encoder.launch(part, eager=True).result()), piece,
                                     reason)  # fmt: skip
        done += [(start + first, vectors) for first, vectors in pieces]
        failed.update({start + row: why for row, why in culprits.items()})
    if backoff is not None and launched.probe and not retried:
        backoff.fitted()
    vectors = np.concatenate([v for _, v in done]) if done else np.zeros((0, encoder.dim), np.float32)
    rows = [start + k for start, v in done for k in range(len(v))]
    return Checked(*_finite(rows, vectors, sorted(failed.items())), retried=retried)


def _launch(encoder: ImageEncoder, pixels: torch.Tensor, backoff: MemoryBackoff | None = None) -> Launched:
    """`encoder.launch` of the batch, or of its pieces through the eager step while `backoff` says the batch size
    does not fit; for each, why it failed (`attempt`), which `embed_checked` then retries in halves."""
    probe = backoff is not None and backoff.backing_off
    size = backoff.piece_for(len(pixels)) if backoff is not None else None
    if size is None:
        return Launched(len(pixels), [(0, _attempted(encoder, pixels, False, backoff))], probe=probe)
    return Launched(size, [(start, _attempted(encoder, pixels[start : start + size], True, backoff))
                           for start in range(0, len(pixels), size)], in_pieces=True)  # fmt: skip


def _attempted(encoder: ImageEncoder, pixels: torch.Tensor, eager: bool,
               backoff: MemoryBackoff | None) -> PendingVectors | str:  # fmt: skip
    pending, reason = attempt(lambda: encoder.launch(pixels, eager=True) if eager else encoder.launch(pixels))
    if reason is None:
        return pending
    _learn(backoff, len(pixels), reason)
    return reason


def _learn(backoff: MemoryBackoff | None, size: int, reason: str) -> None:
    if backoff is not None:
        backoff.failed(size, reason)


def _finite(done: list[int], vectors: np.ndarray, failed: list[tuple[int, str]]):
    finite = np.isfinite(vectors).all(axis=1)
    if finite.all():
        return done, vectors, failed
    failed = sorted(failed + [(row, "non-finite embedding") for row, ok in zip(done, finite, strict=True) if not ok])
    return [row for row, ok in zip(done, finite, strict=True) if ok], vectors[finite], failed


def embed_stream(encoder: ImageEncoder, images: GpuImages, batches: Iterable[tuple], prefetch: int = 2,
                 in_flight: int = 2, backoff: MemoryBackoff | None = None,
                 journal: DecodeJournal | None = None) -> Iterator[StreamBatch]:  # fmt: skip
    """Embed (keys, images) or (keys, images, cpu_reasons) batches in order, decoding ahead of the model.

    Each image is encoded (bytes, or a 1-D uint8 array over a file reader's ring) or pixels
    already decoded on the CPU (`GpuImages.prepare`); `cpu_reasons` routes them as
    `GpuImages.route` does. One `StreamBatch` per input batch, in order. A batch is handed
    over once `in_flight - 1` batches are launched behind it, so the GPU computes those while
    the caller takes this one's vectors (1: each batch is done before the next is launched).
    `images.decode_threads` threads decode, each on a stream of its own; the resize takes their
    batches in input order. `backoff`: what earlier batches taught about the memory left (a caller
    that runs several streams over one model keeps one); None: a new one, for this stream. `journal`:
    where the images on the GPU decoder are listed from their decode until their vectors are taken, and
    which sends the images an earlier process died with to the CPU decoder (`encoder.decode_journal`).
    """
    if in_flight < 1:
        raise ValueError(f"in_flight must be at least 1, got {in_flight}")
    threads, backoff = images.decode_threads, backoff or MemoryBackoff()
    decoded: queue.Queue = queue.Queue()  # (batch number, batch); `pulls` bounds what waits here
    ready: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()
    # Batches taken from `batches` and not yet taken by the resize: one being decoded per thread and one more.
    # With one thread, as many as a queue of one between the stages allowed.
    pulls = threading.Semaphore(threads + 1)
    source, pulling, pulled = iter(batches), threading.Lock(), {"count": 0, "over": False}
    stream = object()  # this stream's batches in `journal`: (stream, number)
    cuda = images.device.type == "cuda"
    sides = [side_stream(images.device) if cuda else None for _ in range(threads)]
    resize = resize_stream(images.device, sides[0]) if cuda else None
    compute = _compute_stream(encoder, images.device) if cuda else None

    def on(stream: torch.cuda.Stream | None):
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def put(into: queue.Queue, item) -> bool:
        while not stop.is_set():
            try:
                into.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def pull() -> tuple[int, object] | None:
        """(its number, the next batch), or the end of `batches` or its error; None once another thread met those."""
        with pulling:
            number = pulled["count"]
            if pulled["over"]:
                return None
            try:
                batch = next(source)
            except StopIteration:
                pulled["over"] = True
                return number, _DONE
            except BaseException as err:  # noqa: BLE001 - handed on, raised in the consumer
                pulled["over"] = True
                return number, err
            pulled["count"] += 1
            return number, batch

    def decode_stage(side: torch.cuda.Stream | None) -> None:
        number, held = None, HeldInputs()
        try:
            while not stop.is_set():
                held.release()
                if not pulls.acquire(timeout=0.1):
                    continue
                got = pull()
                if got is None:
                    return
                number, item = got
                if item is _DONE or isinstance(item, BaseException):
                    decoded.put(got)
                    return
                keys, datas, *reasons = item  # reasons: routes found by the file readers, when they did
                if journal is not None:
                    reasons = _journaled(journal, images, keys, datas, reasons, (stream, number))
                with on(side):
                    batch = images.decode(datas, *reasons)
                    done = _event_on(side) if side is not None else None
                decoded.put((number, (list(keys), batch, done if resize is not side else None)))
                # Decoded: let the encoded images go before waiting for the next batch, or once the GPU has copied
                # them. They may be views of a file reader's ring, whose slots the thread that feeds this stream may
                # be waiting for; page-locked, a decoder's copies from them run after its call returns.
                held.add(done, datas)
                del got, item, keys, datas, reasons, batch, done
        except BaseException as err:  # noqa: BLE001 - handed on, raised in the consumer
            with pulling:
                pulled["over"] = True
            decoded.put((number, err))
        finally:
            with contextlib.suppress(Exception):  # a device that failed copies nothing more; its error is on its way
                held.release(everything=True)

    def finish_stage() -> None:
        waiting, expected = {}, 0  # batch number → its item, decoded ahead of those before it
        while not stop.is_set():
            try:
                number, item = decoded.get(timeout=0.1)
            except queue.Empty:
                continue
            waiting[number] = item
            while expected in waiting:
                item = waiting.pop(expected)
                expected += 1
                pulls.release()
                if item is _DONE or isinstance(item, BaseException):
                    put(ready, item)
                    return
                keys, batch, done = item
                try:
                    # In inference mode, so the batch meets the model's step as host batches do: a compiled step
                    # guards on that, and would otherwise copy each batch (`ImageEncoder._step`).
                    with on(resize), torch.inference_mode():
                        if done is not None:  # decoded on another stream: wait for it, and keep its memory from
                            resize.wait_event(done)  # the decoder's next batches until this stream is done with it
                            for tensor in batch.device_tensors():
                                tensor.record_stream(resize)
                        prepared = images.finish(batch)
                        event = _event_on(resize) if resize is not None else None
                except BaseException as err:  # noqa: BLE001 - handed on, raised in the consumer
                    put(ready, err)
                    return
                if not put(ready, (number, keys, prepared, event)):
                    return
                del item, batch

    names = ["gpu-decode"] if threads == 1 else [f"gpu-decode-{k}" for k in range(threads)]
    stages = [threading.Thread(target=decode_stage, args=(side,), name=name, daemon=True)
              for side, name in zip(sides, names, strict=True)]  # fmt: skip
    stages.append(threading.Thread(target=finish_stage, name="gpu-resize", daemon=True))
    for stage in stages:
        stage.start()
    launched: collections.deque = collections.deque()  # (number, keys, prepared, its launch), oldest first
    device_down = False
    try:
        while True:
            item = ready.get()
            if isinstance(item, BaseException):
                raise item
            if item is not _DONE:
                number, keys, prepared, event = item
                with on(compute):  # not across the yield below: the caller's own work stays on its stream
                    if event is not None:
                        main = torch.cuda.current_stream(images.device)
                        main.wait_event(event)
                        prepared.pixels.record_stream(main)
                    launched.append((number, keys, prepared, _launch(encoder, prepared.pixels, backoff)))
            while launched and (item is _DONE or len(launched) >= in_flight):
                number, *rest = launched.popleft()
                with on(compute):
                    outcome = _outcome(encoder, *rest, backoff)
                if journal is not None:
                    journal.end((stream, number))
                yield outcome
            if item is _DONE:
                return
    except BaseException as err:
        device_down = device_failed(err)
        raise
    finally:
        stop.set()
        for stage in stages:
            stage.join(timeout=5)
        if journal is not None and not device_down:  # an ordinary error: no image on the GPU caused it
            journal.forget([(stream, n) for n in range(pulled["count"])])


class HeldInputs:
    """Encoded inputs kept until the GPU work queued after their decode is done, then let go (oldest first).

    A GPU decoder given page-locked memory (`encoder.page_lock`) copies from it after the call returns, so a file
    reader's ring slot must not be written again before then. At most `most` batches wait here; past that, the
    oldest is waited for. An input without an event (the CPU path) is let go at once.
    """

    def __init__(self, most: int = 2) -> None:
        self._held: collections.deque = collections.deque()  # (event, inputs), in the order queued on one stream
        self._most = most

    def add(self, event: torch.cuda.Event | None, inputs: object) -> None:
        if event is not None:
            self._held.append((event, inputs))
        self.release()

    def release(self, everything: bool = False) -> None:
        """Let go of the inputs whose GPU work is done, waiting for the oldest while more than `most` (or any, with
        `everything`) are held."""
        while self._held:
            event, _ = self._held[0]
            if not event.query():
                if len(self._held) <= (0 if everything else self._most):
                    return
                event.synchronize()
            self._held.popleft()

    def __len__(self) -> int:
        return len(self._held)


def _journaled(journal: DecodeJournal, images: GpuImages, keys, datas, reasons: list, batch: Hashable) -> list:
    """The batch's routes, with the images an earlier process died with sent to the CPU decoder; the batch is in the
    journal from now on, as `batch` (the stream's and its own number) until its vectors are taken."""
    digests = [journal.digest_of(key) for key in keys]
    journal.begin(batch, digests)
    if not journal.suspects:
        return reasons
    routed = journal.reasons(digests, reasons[0] if reasons else images.cpu_reasons(datas))
    return [routed] if routed is not None else reasons


def _event_on(stream: torch.cuda.Stream) -> torch.cuda.Event:
    """An event that completes once the work queued on `stream` so far is done."""
    event = torch.cuda.Event()
    event.record(stream)
    return event


def _outcome(encoder: ImageEncoder, keys: list[Hashable], prepared, launched: Launched,
             backoff: MemoryBackoff) -> StreamBatch:  # fmt: skip
    rows, vectors, unembedded, retried = embed_checked(encoder, prepared.pixels, launched, backoff)
    failed = [(keys[i], "decode", reason) for i, reason in prepared.failed]
    failed += [(keys[prepared.kept[row]], "encode", reason) for row, reason in unembedded]
    return StreamBatch([keys[prepared.kept[row]] for row in rows], vectors, failed, prepared.on_gpu,
                       retried or prepared.retried, launched.in_pieces or prepared.in_pieces)  # fmt: skip


class BackgroundEmbedder:
    """`embed_stream` in a thread of its own: `submit` queues a batch and returns, `ready` hands over the
    batches finished so far, `finish` waits for the rest. At most `prefetch` submitted batches wait, so a
    caller faster than the GPU waits in `submit`. An error in the stream is raised by the next call.
    `backoff` and `journal`: as `embed_stream`'s, kept by a caller that starts one embedder after another."""

    def __init__(self, encoder: ImageEncoder, images: GpuImages, prefetch: int = 2,
                 backoff: MemoryBackoff | None = None, journal: DecodeJournal | None = None) -> None:  # fmt: skip
        self._inbox: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._outbox: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(encoder, images, prefetch, backoff, journal),
                                        name="gpu-embed", daemon=True)  # fmt: skip
        self._thread.start()

    def _batches(self) -> Iterator:
        while not self._stop.is_set():
            try:
                item = self._inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is _DONE:
                return
            yield item
            del item  # not held while waiting for the next: its images may hold a file reader's ring slots

    def _run(self, encoder: ImageEncoder, images: GpuImages, prefetch: int, backoff: MemoryBackoff | None,
             journal: DecodeJournal | None) -> None:  # fmt: skip
        try:
            for batch in embed_stream(encoder, images, self._batches(), prefetch, backoff=backoff, journal=journal):
                self._outbox.put(batch)
        except BaseException as err:  # noqa: BLE001 - raised in the caller's thread
            self._outbox.put(err)
        self._outbox.put(_DONE)

    def submit(self, keys: Sequence[Hashable], images: Sequence[bytes | np.ndarray],
               reasons: Sequence[str | None] | None = None) -> None:  # fmt: skip
        """Queue a batch; `reasons`, when known, route its images as `GpuImages.route` would."""
        self._put((keys, images) if reasons is None else (keys, images, reasons))

    def _put(self, item) -> None:
        while True:
            try:
                self._inbox.put(item, timeout=0.1)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    self.ready()  # raises the stream's error
                    raise RuntimeError("the embedding thread stopped") from None

    def ready(self) -> list[StreamBatch]:
        """Batches finished so far, in submission order; does not wait."""
        out = []
        while True:
            try:
                item = self._outbox.get_nowait()
            except queue.Empty:
                return out
            if isinstance(item, BaseException):
                raise item
            if item is not _DONE:
                out.append(item)

    def finish(self) -> list[StreamBatch]:
        """Wait for every submitted batch; the rest of them, in order. The embedder is done after this."""
        self._put(_DONE)
        self._thread.join()
        return self.ready()

    def close(self) -> None:
        """Stop without waiting for what is queued (a failed bundle, teardown)."""
        self._stop.set()
        self._thread.join(timeout=5)
