"""The overlapped decode → encode loop and the standalone GPU worker, run on the CPU; batch sizing arithmetic."""

from __future__ import annotations

import gc
import hashlib
import threading
import time
import weakref

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from benchmarks.common import realistic_jpegs
from encoder import DecodeLimits
from encoder.gpu_images import GpuImages
from encoder.gpu_stream import BackgroundEmbedder, HeldInputs, embed_checked, embed_stream
from encoder.model import batch_for_memory
from pipelines.direct_embed import embed_files
from tests.encoder.test_gpu_images import _pil_decoder, _png
from tests.pipelines.test_embed import column_encodings
from tests.support.fake_cuda import FakeCuda


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[str]:
    return [str(p) for p in realistic_jpegs(tmp_path_factory.mktemp("stream"), 20, width=128)]


def _images(encoder) -> GpuImages:
    return GpuImages(encoder.preprocess, "cpu", DecodeLimits(draft=False), decoder=_pil_decoder())


def test_stream_gives_the_same_vectors_as_one_batch(tiny_encoder, files):
    datas = [open(f, "rb").read() for f in files]
    datas[5] = b"not an image"
    images = _images(tiny_encoder)
    batches = [(list(range(i, i + 6)), datas[i : i + 6]) for i in range(0, 20, 6)]
    out = list(embed_stream(tiny_encoder, images, batches, prefetch=1))
    keys = [k for b in out for k in b.keys]
    assert keys == [k for k in range(20) if k != 5]
    assert [(k, stage) for b in out for k, stage, _ in b.failed] == [(5, "decode")]
    whole = images.prepare(datas)
    expected = tiny_encoder.embed_prepared(whole.pixels)
    assert np.allclose(np.concatenate([b.vectors for b in out]), expected, atol=1e-5)


def test_the_stream_hands_the_model_inference_tensors(tiny_encoder, files, monkeypatch):
    """Batches resized in the stream are made in inference mode, like host batches, so a compiled step meets one
    kind of tensor and need not copy them (`ImageEncoder._step`)."""
    kinds, launch = [], tiny_encoder.launch

    def recording(pixels):
        kinds.append(pixels.is_inference())
        return launch(pixels)

    monkeypatch.setattr(tiny_encoder, "launch", recording)
    datas = [open(f, "rb").read() for f in files]
    batches = [(list(range(i, i + 6)), datas[i : i + 6]) for i in range(0, 18, 6)]
    assert len(list(embed_stream(tiny_encoder, _images(tiny_encoder), batches, prefetch=1))) == 3
    assert kinds == [True, True, True]


def _on_fake_gpu(cuda: FakeCuda, images: GpuImages):
    """`images` as the stream sees a GPU's: a CUDA device, each stage logged with the stream it runs on."""

    class OnGpu:
        device = torch.device("cuda", 0)
        decode_threads = images.decode_threads

        def decode(self, *args):
            cuda.note(cuda.current(), "decode")
            return images.decode(*args)

        def finish(self, batch):
            cuda.note(cuda.current(), "finish")
            return images.finish(batch)

    return OnGpu()


@pytest.mark.parametrize("own_resize_stream", [False, True])
def test_each_stage_runs_on_its_stream_after_the_stage_before(tiny_encoder, files, monkeypatch, own_resize_stream):
    """The stream logic, run on the CPU with logging stand-ins for CUDA's streams and events: decode on the side
    stream; resize there too (stream order), or on a stream of its own that waits for each batch's decode and
    holds its decoded pixels; the model on its stream, waiting for each batch's resize."""
    import encoder.gpu_stream as gpu_stream

    cuda = FakeCuda(monkeypatch)
    side, resize, model = cuda.Stream("side"), cuda.Stream("resize"), cuda.Stream("model")
    monkeypatch.setattr(gpu_stream, "side_stream", lambda device: side)
    monkeypatch.setattr(gpu_stream, "model_stream", lambda device: model)
    if own_resize_stream:
        monkeypatch.setattr(gpu_stream, "resize_stream", lambda device, decode: resize)
    datas = [open(f, "rb").read() for f in files]
    batches = [(list(range(i, i + 8)), datas[i : i + 8]) for i in range(0, 20, 8)]
    images = _images(tiny_encoder)
    got = list(embed_stream(tiny_encoder, _on_fake_gpu(cuda, images), batches))
    expected = tiny_encoder.embed_prepared(images.prepare(datas).pixels)
    assert np.allclose(np.concatenate([b.vectors for b in got]), expected, atol=1e-5)

    def steps(thread: str) -> list[tuple[str, ...]]:
        return [entry[1:] for entry in cuda.log if entry[0] == thread]

    # each batch's decode is followed by an event, which says when its encoded images may go (`HeldInputs`)
    assert steps("gpu-decode") == [("side", "decode"), ("side", "event")] * 3
    if own_resize_stream:
        # each batch's decoded images (of several sizes: packed in one buffer) are held by the resize stream
        per_batch = [("resize", "waits for", "side"), ("resize", "holds"), ("resize", "finish"), ("resize", "event")]
        assert steps("gpu-resize") == per_batch * 3
    else:
        assert steps("gpu-resize") == [("side", "finish"), ("side", "event")] * 3  # stream order is enough
    consumer = steps(threading.current_thread().name)
    assert consumer == [("model", "waits for", "resize" if own_resize_stream else "side"), ("model", "holds")] * 3


def test_a_model_with_a_share_of_the_sms_runs_each_batch_on_that_shares_stream(tiny_encoder, files, monkeypatch):
    """`ImageEncoder.sm_share` (a green context's stream): the model's launches and the vectors' copies go there,
    after each batch's resize, whatever `model_stream` would give; decode and resize stay on their streams."""
    import encoder.gpu_stream as gpu_stream
    from encoder.sm_share import SmShare

    cuda = FakeCuda(monkeypatch)
    monkeypatch.setattr(gpu_stream, "side_stream", lambda device: cuda.Stream("side"))
    monkeypatch.setattr(gpu_stream, "model_stream", lambda device: cuda.Stream("model"))
    monkeypatch.setattr(tiny_encoder, "sm_share", SmShare(cuda.Stream("the model's SMs"), 120, 132, None))
    datas = [open(f, "rb").read() for f in files]
    images = _images(tiny_encoder)
    expected = tiny_encoder.embed_prepared(images.prepare(datas).pixels)
    launch = tiny_encoder.launch

    def launched(pixels, **kwargs):
        cuda.note(cuda.current(), "launch")
        return launch(pixels, **kwargs)

    monkeypatch.setattr(tiny_encoder, "launch", launched)
    batches = [(list(range(i, i + 8)), datas[i : i + 8]) for i in range(0, 20, 8)]
    got = list(embed_stream(tiny_encoder, _on_fake_gpu(cuda, images), batches))
    assert np.allclose(np.concatenate([b.vectors for b in got]), expected, atol=1e-5)
    consumer = [entry[1:] for entry in cuda.log if entry[0] == threading.current_thread().name]
    share = "the model's SMs"
    assert consumer == [(share, "waits for", "side"), (share, "holds"), (share, "launch")] * 3
    assert {entry[1] for entry in cuda.log if entry[0].startswith("gpu-")} == {"side"}


def test_each_decode_thread_decodes_on_a_stream_of_its_own(tiny_encoder, files, monkeypatch):
    """With two decode threads, each decodes on a side stream of its own; the resize runs on the first's, so a
    batch the second decoded is waited for on an event and its pixels held there."""
    import encoder.gpu_stream as gpu_stream

    cuda = FakeCuda(monkeypatch)
    names = iter(["side 0", "side 1"])
    monkeypatch.setattr(gpu_stream, "side_stream", lambda device: cuda.Stream(next(names)))
    monkeypatch.setattr(gpu_stream, "model_stream", lambda device: cuda.Stream("model"))
    batches = _numbered(files, 6, size=3)
    images = _threaded(tiny_encoder, 2, slow={0})
    got = list(embed_stream(tiny_encoder, _on_fake_gpu(cuda, images), batches))
    assert [b.keys for b in got] == [keys for keys, _ in batches]

    def steps(thread: str) -> list[tuple[str, ...]]:
        return [entry[1:] for entry in cuda.log if entry[0] == thread]

    first, second = steps("gpu-decode-0"), steps("gpu-decode-1")
    # stream order puts the resize after the first's batches; its events only say when their inputs may go
    assert first and first == [("side 0", "decode"), ("side 0", "event")] * (len(first) // 2)
    assert second and second == [("side 1", "decode"), ("side 1", "event")] * (len(second) // 2)
    per_batch, batch = [], []  # the resize's steps, batch by batch (each ends with its event)
    for step in steps("gpu-resize"):
        batch.append(step)
        if step == ("side 0", "event"):
            per_batch, batch = [*per_batch, tuple(batch)], []
    by_first, by_second = (
        (("side 0", "finish"), ("side 0", "event")),
        (("side 0", "waits for", "side 1"), ("side 0", "holds"), ("side 0", "finish"), ("side 0", "event")),
    )
    assert not batch and sorted(per_batch) == sorted([by_first] * (len(first) // 2) + [by_second] * (len(second) // 2))


def test_a_producer_error_reaches_the_consumer(tiny_encoder, files):
    def batches():
        yield [0], [open(files[0], "rb").read()]
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(embed_stream(tiny_encoder, _images(tiny_encoder), batches()))


def test_stopping_early_stops_the_producer(tiny_encoder, files):
    data = open(files[0], "rb").read()
    endless = (([i], [data]) for i in range(10**9))
    stream = embed_stream(tiny_encoder, _images(tiny_encoder), endless, prefetch=2)
    next(stream)
    stream.close()
    assert not [t for t in threading.enumerate() if t.name in ("gpu-decode", "gpu-resize") and t.is_alive()]


class _Staged:
    """Wraps `GpuImages`: finishing batch 0 waits until batch 1 is being decoded; finishing batch `fail_at` fails."""

    def __init__(self, images: GpuImages, fail_at: int | None = None) -> None:
        self._images, self.device, self.decode_threads, self.fail_at = images, images.device, 1, fail_at
        self.second_decode, self.decoded, self.overlapped = threading.Event(), 0, None

    def decode(self, datas):
        self.decoded += 1
        if self.decoded == 2:
            self.second_decode.set()
        return self._images.decode(datas)

    def finish(self, batch):
        if self.overlapped is None:
            self.overlapped = self.second_decode.wait(timeout=5)
        elif self.fail_at is not None:
            raise RuntimeError("resize failed")
        return self._images.finish(batch)


def test_the_next_batch_decodes_while_this_one_is_resized(tiny_encoder, files):
    datas = [open(f, "rb").read() for f in files]
    staged = _Staged(_images(tiny_encoder))
    out = list(embed_stream(tiny_encoder, staged, [([i], [d]) for i, d in enumerate(datas[:4])]))
    assert staged.overlapped and [b.keys for b in out] == [[0], [1], [2], [3]]


def test_a_resize_stage_error_reaches_the_consumer(tiny_encoder, files):
    data = open(files[0], "rb").read()
    with pytest.raises(RuntimeError, match="resize failed"):
        list(embed_stream(tiny_encoder, _Staged(_images(tiny_encoder), fail_at=1), [([i], [data]) for i in range(4)]))


def _threaded(encoder, threads: int, slow: set[int] = frozenset(), fail: int | None = None) -> GpuImages:
    """GpuImages on `threads` decode threads, logging how many decode at once and which batches (numbered by their
    first key) enter the resize; decoding the batches in `slow` takes 0.2 s, decoding batch `fail` fails."""
    images = GpuImages(encoder.preprocess, "cpu", DecodeLimits(draft=False), decoder=_pil_decoder(),
                       decode_threads=threads)  # fmt: skip
    decode, finish, lock = images.decode, images.finish, threading.Lock()
    images.active, images.most, images.finished = 0, 0, []

    def decoding(datas, *reasons):
        with lock:
            images.active += 1
            images.most = max(images.most, images.active)
        try:
            first = int.from_bytes(datas[0][-1:], "big")  # the batch's number, hidden after the JPEG's end
            if first == fail:
                raise RuntimeError("decoder failed")
            time.sleep(0.2 if first in slow else 0.01)
            return decode(datas, *reasons)
        finally:
            with lock:
                images.active -= 1

    def finishing(batch):
        images.finished.append(batch)
        return finish(batch)

    images.decode, images.finish = decoding, finishing
    return images


def _numbered(files, count: int, size: int = 2) -> list[tuple[list[int], list[bytes]]]:
    """`count` batches of `size` JPEGs; each batch's first image carries the batch's number as a byte after its end
    (decoders ignore what follows the end-of-image marker)."""
    datas = [open(f, "rb").read() for f in files]
    return [([i * size + j for j in range(size)],
             [datas[(i * size + j) % len(datas)] + (bytes([i]) if j == 0 else b"") for j in range(size)])
            for i in range(count)]  # fmt: skip


@pytest.mark.parametrize("threads", [2, 3])
def test_several_decode_threads_decode_at_once_and_keep_the_input_order(tiny_encoder, files, threads):
    """Batch 0 decodes slowest, so the threads finish the later ones first: they still reach the resize, the model
    and the caller in input order, with the vectors one thread gives."""
    batches = _numbered(files, 7)
    images = _threaded(tiny_encoder, threads, slow={0, 3})
    got = list(embed_stream(tiny_encoder, images, batches))
    assert [b.keys for b in got] == [keys for keys, _ in batches]
    assert images.most == threads  # they did decode at once
    one = list(embed_stream(tiny_encoder, _threaded(tiny_encoder, 1), batches))
    assert np.allclose(np.concatenate([b.vectors for b in got]), np.concatenate([b.vectors for b in one]), atol=1e-6)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_decode_threads_run_at_most_one_batch_ahead_of_themselves(tiny_encoder, files, threads):
    """Batches taken from the source and not yet resized: one per decode thread and one more, however slow the
    resize, so a file reader's ring is not held by batches waiting in between."""
    batches, pulled = _numbered(files, 8), []

    def source():
        for batch in batches:
            pulled.append(batch[0])
            yield batch

    images = _threaded(tiny_encoder, threads)
    finish, ahead = images.finish, []

    def slow_finish(batch):
        ahead.append(len(pulled) - len(images.finished))  # counted as this one enters the resize
        time.sleep(0.05)
        return finish(batch)

    images.finish = slow_finish
    assert len(list(embed_stream(tiny_encoder, images, source()))) == len(batches)
    assert max(ahead) == threads + 1


def test_each_decode_thread_has_a_gpu_decoder_of_its_own(files, monkeypatch):
    """A decoder named is made once per decode thread, and no two threads decode with one at the same time."""
    import encoder.gpu_images as gpu_images
    from encoder.preprocess import PreprocessConfig

    made, busy, clashes = [], set(), []

    def factory(device):
        def decode(datas, device):
            if decode in busy:
                clashes.append(decode)
            busy.add(decode)
            time.sleep(0.02)
            busy.discard(decode)
            return [torch.zeros((3, 8, 8), dtype=torch.uint8) for _ in datas]

        made.append(decode)
        return decode

    monkeypatch.setitem(gpu_images.DECODERS, "counted", factory)
    images = GpuImages(PreprocessConfig(height=4, width=4), "cpu", decoder="counted", decode_threads=3)
    jpeg = open(files[0], "rb").read()
    threads = [threading.Thread(target=lambda: [images.decode([jpeg]) for _ in range(5)]) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(made) == 3 and not clashes
    with pytest.raises(ValueError, match="decode_threads"):
        GpuImages(PreprocessConfig(height=4, width=4), "cpu", decoder="counted", decode_threads=0)


def test_a_decode_threads_error_reaches_the_consumer_after_the_batches_before(tiny_encoder, files):
    batches = _numbered(files, 6)
    images = _threaded(tiny_encoder, 2, slow={1}, fail=2)  # batch 2 fails while batch 1 still decodes
    got = []
    with pytest.raises(RuntimeError, match="decoder failed"):
        for batch in embed_stream(tiny_encoder, images, batches, in_flight=1):  # (2: batch 1 is still launched)
            got.append(batch.keys)
    assert got == [[0, 1], [2, 3]]


def test_a_source_error_reaches_the_consumer_after_the_batches_before_with_several_decode_threads(tiny_encoder,
                                                                                                  files):  # fmt: skip
    batches = _numbered(files, 3)

    def source():
        yield from batches
        raise OSError("disk gone")

    got = []
    with pytest.raises(OSError, match="disk gone"):
        for batch in embed_stream(tiny_encoder, _threaded(tiny_encoder, 2, slow={2}), source(), in_flight=1):
            got.append(batch.keys)
    assert got == [keys for keys, _ in batches]


def test_stopping_early_stops_every_decode_thread(tiny_encoder, files):
    data = open(files[0], "rb").read()
    endless = (([i], [data]) for i in range(10**9))
    stream = embed_stream(tiny_encoder, _threaded(tiny_encoder, 3), endless, prefetch=2)
    next(stream)
    stream.close()
    assert not [t for t in threading.enumerate() if t.name.startswith(("gpu-decode", "gpu-resize")) and t.is_alive()]


class _Poisoned:
    """An encoder whose model fails at launch on any batch holding a 255-valued image, fails when the vectors are
    taken for a 9-valued one (as a GPU reports a kernel's error late), and returns NaN for a 7-valued one."""

    def __init__(self, encoder) -> None:
        self._encoder, self.dim = encoder, encoder.dim

    def launch(self, pixels, eager=False):
        lows, highs = pixels.flatten(1).amin(1), pixels.flatten(1).amax(1)
        if (lows == 255).any():
            raise RuntimeError("kernel failed")
        pending = self._encoder.launch(pixels, eager)
        pending.vectors.numpy()[(highs == 7).numpy()] = np.nan
        return _Late(pending) if (highs == 9).any() else pending


class _Late:
    def __init__(self, pending) -> None:
        self.pending = pending

    def result(self):
        raise RuntimeError("device-side error")


def _pixels(encoder, values: list[int | None], seed: int = 0):
    """(n, h, w, 3) uint8: random below 200 where `values` has None, else that value everywhere."""
    import torch

    size = (encoder.preprocess.height, encoder.preprocess.width, 3)
    pixels = torch.randint(
        0, 200, (len(values), *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )
    for row, value in enumerate(values):
        if value is not None:
            pixels[row] = value
    return pixels


def test_a_failing_batch_is_retried_in_halves_and_only_the_culprits_fail(tiny_encoder):
    pixels = _pixels(tiny_encoder, [None, None, 255, None, 7, None, 9])
    rows, vectors, failed, retried = embed_checked(_Poisoned(tiny_encoder), pixels)
    assert rows == [0, 1, 3, 5] and vectors.shape == (4, tiny_encoder.dim) and retried
    expected = [(2, "RuntimeError: kernel failed"), (4, "non-finite embedding"), (6, "RuntimeError: device-side error")]
    assert failed == expected
    assert np.allclose(vectors, tiny_encoder.embed_prepared(pixels[[0, 1, 3, 5]]), atol=1e-5)


def test_a_batch_whose_vectors_fail_late_is_retried_in_halves(tiny_encoder):
    pixels = _pixels(tiny_encoder, [None, 9, None])
    rows, _, failed, retried = embed_checked(_Poisoned(tiny_encoder), pixels)
    assert rows == [0, 2] and failed == [(1, "RuntimeError: device-side error")] and retried


def test_a_failed_batch_is_retried_in_halves_at_their_own_size_without_the_compiled_step(tiny_encoder, monkeypatch):
    """Padded back to the compiled batch size, each piece would cost a whole batch, and fail again where the batch
    ran out of memory; unpadded, the compiled step would compile again for each new size."""
    from encoder.model import ImageEncoder

    compiled, eager, forward = [], [], ImageEncoder._forward

    def recorded(sizes):
        return lambda self, pixels, *stats: sizes.append(len(pixels)) or forward(self, pixels, *stats)

    monkeypatch.setattr(ImageEncoder, "_forward", recorded(eager))
    monkeypatch.setattr(tiny_encoder, "_compiled_forward", recorded(compiled))
    monkeypatch.setattr(tiny_encoder, "static_batch", True)
    monkeypatch.setattr(tiny_encoder, "batch_size", 8)
    clean, poisoned = (
        _pixels(tiny_encoder, [None] * 7),
        _pixels(tiny_encoder, [None, None, None, 255, None, None, None]),
    )
    checked = embed_checked(_Poisoned(tiny_encoder), clean)
    assert checked.rows == list(range(7)) and not checked.retried and compiled == [8]  # padded to 8
    rows, vectors, failed, _ = embed_checked(_Poisoned(tiny_encoder), poisoned)
    assert rows == [0, 1, 2, 4, 5, 6] and failed == [(3, "RuntimeError: kernel failed")]
    assert compiled == [8] and eager == [3, 2, 1]  # one by one, padded: 6 compiled batches of 8
    assert np.allclose(vectors, tiny_encoder.embed_prepared(poisoned[rows]), atol=1e-5)


class _Cramped:
    """An encoder whose GPU memory holds `fits` images at once (a test may change it, as another process's use of
    the GPU comes and goes); logs each launch's size and whether it ran the eager step."""

    def __init__(self, encoder, fits: int) -> None:
        self._encoder, self.dim, self.fits, self.launches = encoder, encoder.dim, fits, []

    def launch(self, pixels, eager=False):
        self.launches.append((len(pixels), eager))
        if len(pixels) > self.fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self._encoder.launch(pixels, eager)


def test_a_batch_too_large_for_the_memory_left_goes_through_in_pieces_that_fit(tiny_encoder):
    cramped, pixels = _Cramped(tiny_encoder, fits=2), _pixels(tiny_encoder, [None] * 8)
    rows, vectors, failed, retried = embed_checked(cramped, pixels)
    assert rows == list(range(8)) and not failed and retried
    assert cramped.launches == [(8, False), (4, True), (4, True), *[(2, True)] * 4]  # image by image: 8 after the first
    assert np.allclose(vectors, tiny_encoder.embed_prepared(pixels), atol=1e-5)


def test_once_a_batch_runs_out_of_memory_the_next_go_in_pieces_until_a_whole_one_fits_again(tiny_encoder):
    """Each batch would otherwise fail whole first (an exception and the allocator emptying its cache, every batch).
    Batches 0-1 fit, memory shrinks to 4 images at batch 2 and comes back at batch 7; a whole batch is tried every
    3rd batch in pieces, then every 6th once such a probe fails."""
    from encoder.failures import MemoryBackoff
    from encoder.gpu_stream import _launch

    cramped, backoff = _Cramped(tiny_encoder, fits=8), MemoryBackoff(probe_every=3)
    whole, halves = [(8, False)], [(4, True), (4, True)]
    expected = [  # (launches, retried, in pieces) per batch
        (whole, False, False), (whole, False, False),
        (whole + halves, True, False),  # runs out of memory: in halves, and the backoff starts
        (halves, False, True), (halves, False, True),
        (whole + halves, True, False),  # the probe fails: the next in 6
        (halves, False, True), *[(halves, False, True)] * 4,  # memory back at batch 7, not yet probed
        (whole, False, False),  # the probe fits: whole batches again
        (whole, False, False),
    ]  # fmt: skip
    for number, (launches, retried, in_pieces) in enumerate(expected):
        cramped.fits = 4 if 2 <= number < 7 else 8
        pixels, cramped.launches = _pixels(tiny_encoder, [None] * 8, seed=number), []
        launched = _launch(cramped, pixels, backoff)
        checked = embed_checked(cramped, pixels, launched, backoff)
        assert (cramped.launches, checked.retried, launched.in_pieces) == (launches, retried, in_pieces), number
        assert checked.rows == list(range(8)) and not checked.failed
        np.testing.assert_allclose(checked.vectors, tiny_encoder.embed_prepared(pixels), atol=1e-5)


def test_a_batch_the_gpu_decoder_takes_in_pieces_is_counted_as_one_in_pieces(tiny_encoder, files):
    """With the model's (`batches.in_pieces` in the manifest, the summary's "batches run in pieces")."""
    from tests.encoder.test_gpu_images import _short_of_memory

    datas, calls = [open(f, "rb").read() for f in files[:8]], []
    images = GpuImages(tiny_encoder.preprocess, "cpu", DecodeLimits(draft=False),
                       decoder=_short_of_memory(_pil_decoder(), [4], calls))  # fmt: skip
    out = list(embed_stream(tiny_encoder, images, [(list(range(8)), datas)] * 3, prefetch=1))
    assert [(batch.retried, batch.in_pieces) for batch in out] == [(True, False), (False, True), (False, True)]
    assert calls == [8, 4, 4, 4, 4, 4, 4] and all(len(batch.keys) == 8 for batch in out)


def test_a_batch_launched_whole_before_memory_ran_out_does_not_end_the_backoff(tiny_encoder):
    """With two batches in flight, the one launched before the other ran out of memory finishes after: that it fitted
    says nothing about the memory now. Only a whole batch launched while backing off (a probe) ends it."""
    from encoder.failures import MemoryBackoff
    from encoder.gpu_stream import _launch

    cramped, backoff = _Cramped(tiny_encoder, fits=8), MemoryBackoff()
    first, second, third = (_pixels(tiny_encoder, [None] * 8, seed=k) for k in range(3))
    launched_first = _launch(cramped, first, backoff)
    cramped.fits = 4
    launched_second = _launch(cramped, second, backoff)  # runs out of memory at launch
    assert embed_checked(cramped, first, launched_first, backoff).rows == list(range(8))
    assert embed_checked(cramped, second, launched_second, backoff).retried
    cramped.launches = []
    assert _launch(cramped, third, backoff).in_pieces and cramped.launches == [(4, True), (4, True)]


def test_pieces_that_run_out_of_memory_too_are_halved_again_and_a_short_batch_runs_at_its_own_size(tiny_encoder):
    from encoder.failures import MemoryBackoff
    from encoder.gpu_stream import _launch

    cramped, backoff = _Cramped(tiny_encoder, fits=2), MemoryBackoff()
    for size, launches in ((8, [(8, False), (4, True), (4, True), (2, True), (2, True), (2, True), (2, True)]),
                           (8, [(2, True)] * 4), (3, [(2, True), (1, True)]), (1, [(1, True)])):  # fmt: skip
        pixels, cramped.launches = _pixels(tiny_encoder, [None] * size), []
        checked = embed_checked(cramped, pixels, _launch(cramped, pixels, backoff), backoff)
        assert cramped.launches == launches and checked.rows == list(range(size))


def test_a_culprit_image_does_not_start_the_backoff(tiny_encoder):
    """Only running out of memory says the batch size no longer fits; one image's failure is that image's."""
    from encoder.failures import MemoryBackoff

    backoff = MemoryBackoff()
    rows, _, failed, retried = embed_checked(_Poisoned(tiny_encoder), _pixels(tiny_encoder, [None, 255, None]),
                                             backoff=backoff)  # fmt: skip
    assert rows == [0, 2] and failed == [(1, "RuntimeError: kernel failed")] and retried
    assert not backoff.backing_off


class _Hoarder:
    """An encoder whose model, on a batch of more than one image, holds a large buffer in its frame and fails (as
    on running out of GPU memory); each image alone then records whether that buffer was freed before it."""

    class Buffer:
        pass

    def __init__(self, encoder) -> None:
        self._encoder, self.dim, self.freed = encoder, encoder.dim, []

    def launch(self, pixels, eager=False):
        if len(pixels) > 1:
            activations = self.Buffer()
            self.buffer = weakref.ref(activations)
            raise RuntimeError("CUDA out of memory")
        self.freed.append(self.buffer() is None)
        return self._encoder.launch(pixels, eager)


@pytest.mark.parametrize("launched_earlier", [False, True])
def test_the_failed_attempts_memory_is_freed_before_the_images_are_retried(tiny_encoder, launched_earlier):
    from encoder.gpu_stream import _launch

    hoarder, pixels = _Hoarder(tiny_encoder), _pixels(tiny_encoder, [None, None, None])
    gc.disable()  # freed by reference counting alone, as soon as the failure is handled, not by a later collection
    try:
        launched = _launch(hoarder, pixels) if launched_earlier else None
        rows, _, failed, _ = embed_checked(hoarder, pixels, launched)
    finally:
        gc.enable()
    assert rows == [0, 1, 2] and not failed and hoarder.freed == [True, True, True]


class _DeviceLost:
    """An encoder whose GPU hits an illegal address on the `fail_at`-th launch (counting from 0)."""

    def __init__(self, encoder, fail_at: int) -> None:
        self._encoder, self.dim, self.fail_at, self.launches = encoder, encoder.dim, fail_at, 0

    def launch(self, pixels, eager=False):
        self.launches += 1
        if self.launches > self.fail_at:
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
        return self._encoder.launch(pixels, eager)


def test_a_device_error_stops_the_stream_instead_of_dead_lettering_every_image(tiny_encoder):
    """Every later call fails too once the device is lost: the run must fail (and be retried), not finish with
    the rest of its images dead-lettered piece by piece."""
    with pytest.raises(torch.AcceleratorError):
        embed_checked(_DeviceLost(tiny_encoder, 0), _pixels(tiny_encoder, [None, None]))
    host = [[p.numpy() for p in _pixels(tiny_encoder, [None, None], seed=i)] for i in range(4)]
    batches = [([f"{i}.{j}" for j in range(2)], images) for i, images in enumerate(host)]
    encoder = _DeviceLost(tiny_encoder, 2)
    stream = embed_stream(encoder, _images(tiny_encoder), batches, in_flight=2)
    assert next(stream).keys == ["0.0", "0.1"]
    with pytest.raises(torch.AcceleratorError):
        list(stream)
    assert encoder.launches == 3  # no retries in halves


class _Recording:
    """Wraps an encoder: logs when each batch is launched and when its vectors are taken."""

    def __init__(self, encoder) -> None:
        self._encoder, self.dim, self.log = encoder, encoder.dim, []

    def launch(self, pixels, eager=False):
        batch, pending, log = (
            sum(event == "launch" for event, _ in self.log),
            self._encoder.launch(pixels, eager),
            self.log,
        )
        log.append(("launch", batch))

        class Taken:
            def result(self):
                log.append(("result", batch))
                return pending.result()

        return Taken()


@pytest.mark.parametrize(
    "in_flight, expected",
    [
        (1, ["launch 0", "result 0", "launch 1", "result 1", "launch 2", "result 2"]),
        (2, ["launch 0", "launch 1", "result 0", "launch 2", "result 1", "result 2"]),
        (3, ["launch 0", "launch 1", "launch 2", "result 0", "result 1", "result 2"]),
    ],
)
def test_the_next_batch_is_launched_before_this_ones_vectors_are_taken(tiny_encoder, files, in_flight, expected):
    datas = [open(f, "rb").read() for f in files]
    recording = _Recording(tiny_encoder)
    batches = [([i], [d]) for i, d in enumerate(datas[:3])]
    out = list(embed_stream(recording, _images(tiny_encoder), batches, in_flight=in_flight))
    assert [f"{event} {batch}" for event, batch in recording.log] == expected
    assert [b.keys for b in out] == [[0], [1], [2]]
    expected = tiny_encoder.embed_prepared(_images(tiny_encoder).prepare(datas[:3]).pixels)
    assert np.allclose(np.concatenate([b.vectors for b in out]), expected, atol=1e-5)


def test_batches_in_flight_keep_their_order_when_some_fail(tiny_encoder):
    """Batch 1 fails at launch, batch 2 when its vectors are taken: each is retried in halves, in place."""
    values = [[None, None], [None, 255], [9, None], [None, 7], [None, None]]
    host = [[p.numpy() for p in _pixels(tiny_encoder, v, seed=i)] for i, v in enumerate(values)]
    batches = [([f"{i}.{j}" for j in range(2)], images) for i, images in enumerate(host)]
    out = list(embed_stream(_Poisoned(tiny_encoder), _images(tiny_encoder), batches, in_flight=2))
    assert [b.keys for b in out] == [["0.0", "0.1"], ["1.0"], ["2.1"], ["3.0"], ["4.0", "4.1"]]
    assert [b.retried for b in out] == [False, True, True, False, False]  # a non-finite vector is no retry
    assert [f for b in out for f in b.failed] == [
        ("1.1", "encode", "RuntimeError: kernel failed"),
        ("2.0", "encode", "RuntimeError: device-side error"),
        ("3.1", "encode", "non-finite embedding"),
    ]


def test_in_flight_must_be_positive(tiny_encoder, files):
    with pytest.raises(ValueError, match="in_flight"):
        next(embed_stream(tiny_encoder, _images(tiny_encoder), [], in_flight=0))


def test_background_embedder_returns_every_batch_in_order_with_pre_decoded_images(tiny_encoder, files):
    from encoder import decode_image

    datas = [open(f, "rb").read() for f in files]
    inputs = [decode_image(d, tiny_encoder.preprocess, DecodeLimits(draft=False)) if i % 3 == 0 else d
              for i, d in enumerate(datas)]  # fmt: skip
    inputs[4] = b"junk"
    stream, out = BackgroundEmbedder(tiny_encoder, _images(tiny_encoder)), []
    for i in range(0, 20, 5):
        stream.submit(list(range(i, i + 5)), inputs[i : i + 5])
        out += stream.ready()
    out += stream.finish()
    assert [k for b in out for k in b.keys] == [k for k in range(20) if k != 4]
    assert [(k, stage) for b in out for k, stage, _ in b.failed] == [(4, "decode")]
    assert sum(b.on_gpu for b in out) == 20 - 7 - 1  # 7 arrived decoded, the junk fell back to the CPU


def test_a_decoded_batch_s_encoded_images_are_let_go_before_the_caller_takes_its_vectors(tiny_encoder, files):
    """Encoded images may be views of a file reader's ring, whose slots come back only when no view is left: in
    Beam the thread that takes finished batches is the one that waits for a slot, so a finished (or merely
    decoded) batch that still held its images could stop the worker for good."""
    stream = BackgroundEmbedder(tiny_encoder, _images(tiny_encoder))
    freed: list[int] = []
    for i in range(3):
        datas = [np.frombuffer(open(f, "rb").read(), dtype=np.uint8) for f in files[5 * i : 5 * i + 5]]
        for data in datas:
            weakref.finalize(data, freed.append, i)
        stream.submit(list(range(5 * i, 5 * i + 5)), datas)
        del datas, data
    deadline = time.monotonic() + 20
    while (stream._outbox.qsize() < 2 or len(freed) < 15) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stream._outbox.qsize() == 2  # none taken: two finished, the third launched behind them
    assert sorted(freed) == [0] * 5 + [1] * 5 + [2] * 5
    assert [k for b in stream.finish() for k in b.keys] == list(range(15))


class _Event:
    """An event the test completes by hand (`done`), or that a wait on the host completes."""

    def __init__(self) -> None:
        self.done, self.waited = False, False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.done = self.waited = True


def test_held_inputs_go_once_their_gpu_work_is_done_oldest_first_and_at_most_two_wait():
    held, gone = HeldInputs(most=2), []
    events, inputs = [_Event() for _ in range(4)], [np.zeros(3) for _ in range(4)]
    for k, data in enumerate(inputs):
        weakref.finalize(data, gone.append, k)
    held.add(None, inputs[0])  # no event (the CPU path): not held at all
    held.add(events[1], inputs[1])
    held.add(events[2], inputs[2])
    del inputs[:]
    gc.collect()
    assert gone == [0] and len(held) == 2
    events[2].done = True  # done, but behind one that is not: events on a stream complete in order
    held.release()
    assert gone == [0] and len(held) == 2
    held.add(events[3], np.zeros(3))  # a third: the oldest is waited for, then everything done goes
    assert events[1].waited and not events[2].waited and gone == [0, 1, 2] and len(held) == 1
    held.release(everything=True)
    assert events[3].waited and len(held) == 0


def test_on_a_gpu_a_batch_s_encoded_images_are_held_until_the_gpu_has_read_them(tiny_encoder, files, monkeypatch):
    """Page-locked, a file reader's ring is copied by the GPU after the decoder's call returns: the decode thread
    keeps each batch's views until an event queued after its decode completes, at most two batches, the oldest
    waited for past that, and all of them by the time the stream ends (run on the CPU with stand-ins for CUDA's
    events that complete only when waited for)."""
    import encoder.gpu_stream as gpu_stream

    cuda = FakeCuda(monkeypatch, events_done=False)
    monkeypatch.setattr(gpu_stream, "side_stream", lambda device: cuda.Stream("side"))
    monkeypatch.setattr(gpu_stream, "model_stream", lambda device: cuda.Stream("model"))
    monkeypatch.setattr(gpu_stream, "resize_stream", lambda device, decode: cuda.Stream("resize"))
    gone: list[int] = []
    batches = []
    for i in range(4):
        datas = [np.frombuffer(open(f, "rb").read(), dtype=np.uint8) for f in files[5 * i : 5 * i + 5]]
        for data in datas:
            weakref.finalize(data, gone.append, i)
        batches.append((list(range(5 * i, 5 * i + 5)), datas))
    del datas, data

    def source():
        while batches:
            yield batches.pop(0)

    got = list(embed_stream(tiny_encoder, _on_fake_gpu(cuda, _images(tiny_encoder)), source()))
    assert [k for b in got for k in b.keys] == list(range(20))
    waits = [entry for entry in cuda.log if entry[0] == "gpu-decode" and entry[2] == "host waits for event"]
    assert len(waits) == 4  # none completed on its own: two past the cap, two at the end
    gc.collect()
    assert sorted(gone) == [0] * 5 + [1] * 5 + [2] * 5 + [3] * 5


def test_background_embedder_raises_the_streams_error_in_the_caller(tiny_encoder, files):
    stream = BackgroundEmbedder(tiny_encoder, _images(tiny_encoder))

    class Broken:
        def __iter__(self):
            raise OSError("device lost")

    stream.submit([0], Broken())
    with pytest.raises(OSError, match="device lost"):
        stream.finish()


@pytest.mark.parametrize("reader", ["processes", "threads"])
def test_embed_files_writes_every_file_once_or_dead_letters_it(tiny_encoder, files, tmp_path, reader):
    broken, png = tmp_path / "broken.png", tmp_path / "fine.png"
    broken.write_bytes(_png(3)[:40])
    png.write_bytes(_png(4))  # decoded on the CPU, from a copy of the reader's bytes
    missing = [str(tmp_path / f"missing-{i}.jpg") for i in range(8)]  # a whole batch with nothing to embed
    paths = missing + files + [str(broken), str(png)]
    result = embed_files(paths, tiny_encoder, _images(tiny_encoder), tmp_path / "out", batch_size=8,
                         rows_per_shard=10, reader=reader)  # fmt: skip
    table = pq.read_table(result.shards)
    assert sorted(table.column("item_id").to_pylist()) == sorted(files + [str(png)]) and table.num_rows == 21
    assert result.embedded == 21 and result.on_gpu == 20 and len(result.shards) == 3  # 10 rows, 10, then 1
    failed = pq.read_table(tmp_path / "out" / "failures.parquet").to_pylist()
    assert {(f["item_id"], f["stage"]) for f in failed} == {(str(broken), "decode"),
                                                             *((m, "fetch") for m in missing)}  # fmt: skip
    digests = dict(zip(table.column("item_id").to_pylist(), table.column("image_sha256").to_pylist(), strict=True))
    assert digests[str(png)] == hashlib.sha256(png.read_bytes()).hexdigest()
    assert set(table.column("model_version").to_pylist()) == {tiny_encoder.model_version}
    assert [pq.read_table(s).num_rows for s in result.shards] == [10, 10, 1]  # in order, by the writer thread
    assert not column_encodings(result.shards[0])["embedding"]  # vectors never dictionary-encoded
    assert gc.get_freeze_count() == 0  # the heap frozen for the run only (pipelines.heap)
    # what the run's end waited for: the reader processes' close (no ring locked on a CPU), the shards'
    assert result.shards_close_s >= 0 and result.ring_page_unlock_s is None
    assert (result.reader_close_s > 0) if reader == "processes" else result.reader_close_s is None


def test_embed_files_counts_the_batches_retried_in_halves_and_those_run_in_pieces(tiny_encoder, files, tmp_path,
                                                                                   monkeypatch):  # fmt: skip
    launch = tiny_encoder.launch

    def cramped(pixels, eager=False):  # as a GPU whose memory no longer fits a batch of 8
        if len(pixels) > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return launch(pixels, eager)

    monkeypatch.setattr(tiny_encoder, "launch", cramped)
    result = embed_files(files, tiny_encoder, _images(tiny_encoder), tmp_path / "out", batch_size=8, reader="threads")
    assert result.embedded == 20 and result.dead_lettered == 0
    assert result.batches_retried == 1 and result.batches_in_pieces == 2  # batches of 8, 8 and 4: the first failed


def test_embed_files_counts_a_batch_the_gpu_decoder_failed_whole_as_retried(tiny_encoder, files, tmp_path):
    """torchvision's nvJPEG raises for a whole batch with one JPEG it cannot decode: the batch goes through in halves,
    every image embedded, and is counted with the model's retries (`StreamBatch.retried`)."""
    rejected = tmp_path / "rejected.jpg"
    data = open(files[3], "rb").read()
    rejected.write_bytes(data[:2] + b"\xff\xfe\x00\x08REJECT" + data[2:])  # the stand-in decoder raises for it
    paths = [*files[:8], str(rejected), *files[8:15]]
    result = embed_files(paths, tiny_encoder, _images(tiny_encoder), tmp_path / "out", batch_size=8, reader="threads")
    assert result.embedded == 16 and result.dead_lettered == 0 and result.batches_retried == 1  # the second of two


def test_embed_files_page_locks_the_reader_processes_ring_only_for_a_gpu_decoder(monkeypatch):
    from types import SimpleNamespace

    import encoder.page_lock as page_lock
    import pipelines.direct_embed as direct_embed

    locked = []
    monkeypatch.setattr(page_lock, "page_lock", lambda *args: locked.append(args))
    monkeypatch.setattr(direct_embed, "ProcessReader", lambda limits, readers, page_lock: page_lock)
    gpu = SimpleNamespace(device=torch.device("cuda", 2), decodes_on_gpu=True)
    direct_embed._reader("processes", None, 8, gpu)(0x1000, 4096)
    assert locked == [(0x1000, 4096, 2)]
    cpu_decoding = SimpleNamespace(device=torch.device("cuda", 2), decodes_on_gpu=False)  # the bytes stay on the host
    assert direct_embed._reader("processes", None, 8, cpu_decoding) is None
    assert (
        direct_embed._reader("processes", None, 8, SimpleNamespace(device=torch.device("cpu"), decodes_on_gpu=True))
        is None
    )
    assert direct_embed._reader("processes", None, 8, None) is None  # embed_files(page_lock=False)


def test_a_shard_write_error_stops_embed_files(tiny_encoder, files, tmp_path, monkeypatch):
    def full_disk(self, table):
        raise OSError("No space left on device")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", full_disk)
    with pytest.raises(OSError, match="No space left"):
        embed_files(files, tiny_encoder, _images(tiny_encoder), tmp_path / "out", batch_size=4)


@pytest.mark.parametrize(
    ("free", "per_image", "cap", "expected"),
    [
        (80 << 30, 20 << 20, 1024, 1024),  # plenty: the cap
        (10 << 30, 20 << 20, 1024, 352),  # 70% of 10 GiB / 20 MiB = 358 → a multiple of 8
        (100 << 20, 20 << 20, 1024, 3),  # tiny: what fits, unrounded
        (1 << 20, 20 << 20, 1024, 1),  # never zero
    ],
)
def test_batch_size_follows_free_gpu_memory(free, per_image, cap, expected):
    assert batch_for_memory(free, per_image, cap) == expected


@pytest.mark.gpu
def test_the_batch_is_capped_by_what_fits_on_the_gpu(tiny_model):
    from encoder import EncoderConfig, load_encoder

    encoder = load_encoder(EncoderConfig(model=str(tiny_model), device="cuda", batch_size=0))
    assert 8 <= encoder.batch_size <= 1024
    assert load_encoder(EncoderConfig(model=str(tiny_model), device="cuda", batch_size=48)).batch_size == 48


@pytest.mark.gpu
@pytest.mark.parametrize(("factory", "decoder"),
                         [("resize_stream", "nvjpeg"), ("resize_stream", "nvimgcodec"), ("model_stream", "nvjpeg")])  # fmt: skip
def test_a_stage_can_run_on_a_stream_of_its_own(tiny_model, files, monkeypatch, factory, decoder):
    """`resize_stream` and `model_stream` (what the `streams` benchmark path tries): the resize waits for each
    batch's decode on an event instead of stream order, the model for each resize on its own stream; the same
    vectors, every resize (or launch) on that stream."""
    import encoder.gpu_stream as gpu_stream
    from encoder import EncoderConfig, load_encoder

    encoder = load_encoder(EncoderConfig(model=str(tiny_model), device="cuda", batch_size=8))
    images = GpuImages(encoder.preprocess, "cuda", DecodeLimits(draft=False), decoder=decoder)
    datas = [open(f, "rb").read() for f in files]
    batches = [(list(range(i, i + 8)), datas[i : i + 8]) for i in range(0, 20, 8)]
    default = np.concatenate([b.vectors for b in embed_stream(encoder, images, batches)])
    owner, step = (images, "finish") if factory == "resize_stream" else (encoder, "launch")
    own, seen, original = torch.cuda.Stream(), [], getattr(owner, step)
    monkeypatch.setattr(owner, step, lambda batch: seen.append(torch.cuda.current_stream()) or original(batch))
    monkeypatch.setattr(gpu_stream, factory, lambda device, *_: own)
    got = np.concatenate([b.vectors for b in embed_stream(encoder, images, batches)])
    assert len(seen) == len(batches) and all(stream == own for stream in seen)
    assert np.allclose(got, default, atol=1e-6)


@pytest.mark.gpu
def test_a_model_on_a_share_of_the_sms_gives_the_vectors_of_the_whole_gpu(tiny_model, files, monkeypatch):
    """`--decode-sms`: the model on a green context's stream, waiting there on events of the primary context's
    decode stream; each launch on that stream, the vectors those of the model on every SM."""
    from encoder import EncoderConfig, load_encoder

    whole = load_encoder(EncoderConfig(model=str(tiny_model), device="cuda", batch_size=8))
    shared = load_encoder(EncoderConfig(model=str(tiny_model), device="cuda", batch_size=8, decode_sms=16))
    assert shared.sm_share is not None, "no share of the SMs on this GPU (see the warning above)"
    images = GpuImages(whole.preprocess, "cuda", DecodeLimits(draft=False), decoder="nvimgcodec")
    datas = [open(f, "rb").read() for f in files]
    batches = [(list(range(i, i + 8)), datas[i : i + 8]) for i in range(0, 20, 8)]
    expected = np.concatenate([b.vectors for b in embed_stream(whole, images, batches)])
    seen, launch = [], shared.launch
    monkeypatch.setattr(
        shared, "launch", lambda batch, **kw: seen.append(torch.cuda.current_stream()) or launch(batch, **kw)
    )
    got = np.concatenate([b.vectors for b in embed_stream(shared, images, batches)])
    assert len(seen) == len(batches) and all(stream == shared.sm_share.stream for stream in seen)
    cosine = (got * expected).sum(axis=1)
    assert cosine.min() > 0.999, f"on a share of the SMs vs all of them: cosine as low as {cosine.min()}"


@pytest.mark.gpu
@pytest.mark.parametrize("decoder", ["nvjpeg", "nvimgcodec"])
def test_several_decode_threads_give_the_vectors_one_gives(tiny_model, files, decoder):
    """Two decode threads, each with a decoder and a side stream of its own, the second's batches handed to the
    resize on the first's stream by event: the vectors of one thread, in order."""
    from encoder import EncoderConfig, load_encoder

    encoder = load_encoder(EncoderConfig(model=str(tiny_model), device="cuda", batch_size=4))
    datas = [open(f, "rb").read() for f in files]
    batches = [(list(range(i, i + 4)), datas[i : i + 4]) for i in range(0, 20, 4)]

    def run(threads: int):
        images = GpuImages(encoder.preprocess, "cuda", DecodeLimits(draft=False), decoder=decoder,
                           decode_threads=threads)  # fmt: skip
        out = list(embed_stream(encoder, images, batches))
        return [k for b in out for k in b.keys], np.concatenate([b.vectors for b in out])

    (keys_one, one), (keys_two, two) = run(1), run(2)
    assert keys_two == keys_one == list(range(20))
    assert np.allclose(two, one, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("decoder", ["nvjpeg", "nvimgcodec"])
def test_batches_read_into_a_page_locked_ring_embed_as_their_bytes_do(tiny_model, files, decoder):
    """The GPU decoders copy from a page-locked ring after their call returns: with a ring of two batches, its
    slots written again batch after batch, each file's vector is the one its own bytes give."""
    from encoder import EncoderConfig, load_encoder
    from encoder.page_lock import page_locker
    from pipelines.file_reader import ProcessReader, ReadLimits

    encoder = load_encoder(EncoderConfig(model=str(tiny_model), device="cuda", batch_size=4))
    images = GpuImages(encoder.preprocess, "cuda", DecodeLimits(draft=True), decoder=decoder)
    paths = files * 3
    limits = ReadLimits.of(images.limits, progressive=images.progressive_on_gpu)
    with ProcessReader(limits, 2, chunk=2, slots=4, page_lock=page_locker(images.device)) as reader:
        assert reader.page_locked, reader.page_lock_problem
        read = ((batch.keys, batch.datas, batch.reasons) for batch in reader.read(paths, 4))
        got = list(embed_stream(encoder, images, read))
    datas = [open(p, "rb").read() for p in paths]
    expected = list(embed_stream(encoder, images, [(paths[i : i + 4], datas[i : i + 4]) for i in range(0, 60, 4)]))
    assert [path for b in got for path, _ in b.keys] == [k for b in expected for k in b.keys] == paths
    assert np.allclose(np.concatenate([b.vectors for b in got]), np.concatenate([b.vectors for b in expected]),
                       atol=1e-6)  # fmt: skip
