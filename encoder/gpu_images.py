"""Encoded images → model-sized uint8 batches on the GPU, with a CPU fallback per image.

JPEGs that the GPU decoder takes (`encoder.jpeg.cpu_reason`) are decoded in one batched call
(nvJPEG through `torchvision.io.decode_jpeg(device="cuda")`, whose images are then packed into one
buffer in one call, or nvImageCodec's C library through `encoder.nvimgcodec`, which decodes a batch
into one buffer), resized on the GPU with the same
antialiased filter PIL uses, and rounded to uint8 as PIL does (`encoder.resize`); where the CPU path would decode
a JPEG in draft mode, the filter also makes the reduction libjpeg's draft decode would. Everything else, any
JPEG the GPU decoder rejects, and the largest photos past what one call may decode (`decode_max_bytes`), is
decoded by `decode_image` on CPU threads, each within a time limit: same output, same dead-letter reasons.
Images already decoded on the CPU join the batch as they are. Results keep the input order; nothing is
dropped silently.

torchvision is imported only here and only when a GPU path is built: on CPU-only
installs it is absent (it breaks transformers' SigLIP import there).
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import numpy as np
import torch

from encoder import resize_kernel
from encoder.configs import RESIZES, DecodeLimits
from encoder.failures import MemoryBackoff, Throttled, attempt, device_failed, in_halves, learning, out_of_memory
from encoder.jpeg import cpu_reason, decoded_within, read_jpeg_header
from encoder.preprocess import ImageDecodeError, PreprocessConfig, decode_image
from encoder.resize import PackedImages, gpu_resizes, pack_images, resize_like_pil
from encoder.storage import describe_error

__all__ = [
    "DECODERS",
    "DECODE_MAX_BYTES",
    "DECODE_MEMORY_SHARE",
    "DECODE_MIN_BYTES",
    "ClosingDecoder",
    "DecodedBatch",
    "GpuImages",
    "PreparedBatch",
    "RESIZES",
    "batches_progressive",
    "byte_tensors",
    "collect_decodes",
    "decode_max_bytes",
    "decode_on_cpu",
    "nvimgcodec_decoder",
    "nvimgcodec_python_decoder",
    "nvjpeg_decoder",
    "outputs_held",
    "sample_jpeg",
    "within_budget",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

# A batch of encoded JPEGs (bytes, or 1-D uint8 arrays over a file reader's ring) → decoded (3, h, w) uint8
# tensors on the device, None for one it could not decode; or the images it decoded packed in one buffer and
# their positions (`encoder.nvimgcodec`). If it raises, the batch is tried in halves (`in_halves`).
BatchDecoder = Callable[[list[bytes | np.ndarray], torch.device],
                        list[torch.Tensor | None] | tuple[PackedImages, list[int]]]  # fmt: skip


def nvjpeg_decoder(device: torch.device) -> BatchDecoder:
    """nvJPEG through torchvision. Its `decode_jpegs_cuda` sends the batch's baseline JPEGs to the GPU's hardware
    JPEG engines in one call where the GPU has them (A100, H100); progressive JPEGs, and every JPEG on a GPU
    without those engines, it decodes one at a time (Huffman on the calling thread, two stream synchronisations
    each), all under one process-wide lock. So progressive JPEGs are routed to the CPU threads instead
    (`batches_progressive`), where several decode at once and none holds up the batch's GPU decode."""
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(datas: list[bytes], device: torch.device) -> list[torch.Tensor]:
        return decode_jpeg(byte_tensors(datas), mode=ImageReadMode.RGB, device=device)

    return outputs_held(within_budget(decode), device)


# One GPU decode call's decoded pixels at most (`decode_max_bytes`); None: a share of the GPU's memory.
DECODE_MAX_BYTES: int | None = None
DECODE_MIN_BYTES = 1 << 30  # a batch of 256 photos of up to 1.4 MP each decodes whole on any GPU
DECODE_MEMORY_SHARE = 16  # a sixteenth of the GPU's memory: 5 GiB on an 80 GB H100, 8.8 GiB on an H200


def decode_max_bytes(device: torch.device) -> int:
    """Decoded pixels one GPU decode call takes at most on `device`: a sixteenth of its memory, and no less than
    1 GiB (`DECODE_MAX_BYTES`, when set, instead). Of larger photos the GPU decoder takes what fits, the smallest
    first, and the CPU threads decode the rest in draft mode (`decoded_within`). The limit grows with the memory:
    on an H200 a batch of 256 phone photos of 12 MP (9.2 GB decoded) went 1.77× as fast all on its decoder as
    with 1 GiB (82 of them there, the rest on 16 cores' Pillow threads; run D, BENCHMARKS.md), and a batch still
    held (one decoding per decode thread, one resizing) leaves most of the memory to the model; a GPU that runs
    out goes on in pieces (`MemoryBackoff`)."""
    if DECODE_MAX_BYTES is not None:
        return DECODE_MAX_BYTES
    if torch.device(device).type != "cuda":
        return DECODE_MIN_BYTES
    return max(DECODE_MIN_BYTES, torch.cuda.get_device_properties(device).total_memory // DECODE_MEMORY_SHARE)


def within_budget(decode: BatchDecoder) -> BatchDecoder:
    """`decode` of the images that fit in `decode_max_bytes` decoded, sized from their headers (~3 µs each),
    and None for the rest, which go to the CPU threads: for a decoder that does not size its batch itself
    (torchvision's nvJPEG; nvImageCodec's own probe sizes its batch, `NvImageCodec.decode_packed`)."""

    def decode_within(datas: list[bytes | np.ndarray], device: torch.device) -> list[torch.Tensor | None]:
        taken = decoded_within([_decoded_size(data) for data in datas], decode_max_bytes(device))
        if all(taken):
            return decode(datas, device)
        images = iter(decode([data for data, take in zip(datas, taken, strict=True) if take], device)
                      if any(taken) else [])  # fmt: skip
        return [next(images) if take else None for take in taken]

    return decode_within


def _decoded_size(data: bytes | np.ndarray) -> int | None:
    """Bytes of RGB pixels this JPEG decodes to, from its header; None when the header cannot be read."""
    header = read_jpeg_header(data)
    return None if header is None else header.width * header.height * 3


def outputs_held(decode: BatchDecoder, device: torch.device) -> BatchDecoder:
    """`decode` for a GPU decoder whose writes may not wait for the work queued on the caller's stream.

    torchvision's nvJPEG allocates its outputs on the caller's stream but writes them from a stream of its own,
    after waiting for nothing queued there: once a batch's images are freed, with a resize or a packing copy of
    them still queued on that stream, the allocator may hand their memory to the next batch's outputs, which the
    decoder then overwrites while they are read. nvImageCodec's hardware decoder failed the same test on an H200
    (run D, BENCHMARKS.md), although its header promises to order its work after the stream it is given. So the
    decoder runs with a stream of its own as the current one (its outputs are allocated there, and that memory is
    reused only there), the caller's stream waits for its work, and each output (a packed batch's one buffer) is
    held for the caller's stream (`record_stream`): the allocator reuses it only once the work queued there
    meanwhile is done. On the CPU, `decode` as it is."""
    if torch.device(device).type != "cuda":
        return decode
    own = torch.cuda.Stream(device)

    def held(datas: list[bytes], device: torch.device) -> list[torch.Tensor | None] | tuple[PackedImages, list[int]]:
        caller = torch.cuda.current_stream(device)
        with torch.cuda.stream(own):
            result = decode(datas, device)
        caller.wait_stream(own)
        outputs = [result[0].buffer] if isinstance(result, tuple) else result
        for output in outputs:
            if output is not None:
                output.record_stream(caller)
        return result

    return held


# torch warns once that a tensor over immutable bytes could be written through; the decoders only read them.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


def byte_tensors(datas: Sequence[bytes | np.ndarray]) -> list[torch.Tensor]:
    """Each encoded image as a 1-D uint8 tensor over its own bytes, not a copy: copying through a
    `bytearray` cost 10–45 µs of interpreter time per 70 KB photo, against ~1 µs for the view."""
    return [torch.frombuffer(d, dtype=torch.uint8) for d in datas]


def nvimgcodec_decoder(device: torch.device, options: str | None = None,
                       backends: Sequence[str] | None = None) -> BatchDecoder:  # fmt: skip
    """nvImageCodec through its C library (`encoder.nvimgcodec`): the GPU's hardware JPEG engines where it has
    them (A100, H100), else CUDA. The interpreter lock is released once per batch; the images come packed in one
    buffer, which the resize gathers from without a tensor op per image; one it cannot decode, or past
    `decode_max_bytes`, goes to the CPU threads while the rest of the batch stays on the GPU. `options`: the
    library's decoder options (None: ours); `backends`: the kinds of its decoders it may use (None: all; for
    benchmarks and tests, `encoder.nvimgcodec.BACKENDS`)."""
    from encoder.nvimgcodec import NvImageCodec

    # Made here, so a missing or mismatched library fails the setup, not every batch.
    codec = NvImageCodec(device, options=options, backends=backends)

    def decode(datas: list[bytes | np.ndarray], device: torch.device) -> tuple[PackedImages, list[int]]:
        return codec.decode_packed(datas, decode_max_bytes(device))  # on the current stream (`outputs_held`'s own)

    return ClosingDecoder(outputs_held(decode, device), codec.close)


class ClosingDecoder:
    """A `BatchDecoder` holding library handles of its own, which `close` frees at once (`GpuImages.close`). Without
    it they go when the decoder is collected: a run's embed step sits in a reference cycle of Beam's, so a local
    run's decoders went at some later collection, whenever that was, maybe in the middle of the next run."""

    def __init__(self, decode: BatchDecoder, close: Callable[[], None]) -> None:
        self._decode, self.close = decode, close

    def __call__(self, datas: list[bytes | np.ndarray], device: torch.device):
        return self._decode(datas, device)


def nvimgcodec_python_decoder(device: torch.device) -> BatchDecoder:
    """nvImageCodec through its package's own Python binding, which releases and retakes the interpreter lock
    for every image of a batch: kept to measure `nvimgcodec_decoder` against (benchmarks/gpu_embed.py)."""
    from nvidia import nvimgcodec

    from encoder.nvimgcodec import DEVICE_CPU_ONLY

    on_cpu = torch.device(device).type == "cpu"  # its CPU backend: how benchmarks/decode_gil.py runs on a CPU
    decoder = (nvimgcodec.Decoder(device_id=DEVICE_CPU_ONLY, backends=[nvimgcodec.Backend(nvimgcodec.CPU_ONLY)])
               if on_cpu else nvimgcodec.Decoder())  # fmt: skip
    params = nvimgcodec.DecodeParams(apply_exif_orientation=False, color_spec=nvimgcodec.ColorSpec.SRGB)

    def decode(datas: list[bytes | np.ndarray], device: torch.device) -> list[torch.Tensor]:
        streams = [d if isinstance(d, bytes | np.ndarray) else np.frombuffer(d, dtype=np.uint8) for d in datas]
        stream = 0 if on_cpu else torch.cuda.current_stream(device).cuda_stream
        images = decoder.decode(streams, params=params, cuda_stream=stream)
        if any(image is None for image in images):
            raise RuntimeError("nvImageCodec could not decode an image of the batch")
        if on_cpu:
            return [torch.from_numpy(np.asarray(image)).permute(2, 0, 1) for image in images]
        return [torch.as_tensor(image, device=device).permute(2, 0, 1) for image in images]  # HWC → CHW views

    return decode


def sample_jpeg(width: int = 640, height: int = 480) -> bytes:
    """A made-up photo as catalogs hold them (baseline JPEG, quality 90, chroma halved both ways): smooth colour
    ramps under fine grain, so it compresses as a photo does, not as a flat image or noise would. Made once per
    size."""
    return _sample_jpeg(width, height)


@functools.cache
def _sample_jpeg(width: int, height: int) -> bytes:
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    grain = np.random.default_rng(0).normal(0, 6, (height, width, 3)).astype(np.float32)
    ramps = np.stack(
        [255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1), 128 + 96 * np.sin(x / 23 + y / 31)], -1
    )
    pixels = np.clip(ramps + grain, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, "JPEG", quality=90, subsampling="4:2:0")
    return buffer.getvalue()


def pil_decoder(device: torch.device | None = None) -> BatchDecoder:
    """Pillow at full size, then onto the device: the GPU path's logic on a machine without one."""
    from PIL import Image

    def decode(datas: list[bytes], device: torch.device) -> list[torch.Tensor]:
        images = [np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for d in datas]
        return [torch.from_numpy(i.copy()).permute(2, 0, 1).to(device) for i in images]

    return within_budget(decode)


PACK_MAX_BYTES = 1 << 30  # decoded batches up to this are packed for the resize (`_packed`)

_DECODE_RETRIES = Throttled(log)  # batches the GPU decoder failed whole
_RESIZE_RETRIES = Throttled(log)  # batches that failed to resize whole

# name → factory(device) of a `BatchDecoder`; "nvimgcodec-python" and "pil" are for benchmarks and tests.
DECODERS = {"nvjpeg": nvjpeg_decoder, "nvimgcodec": nvimgcodec_decoder, "nvimgcodec-python": nvimgcodec_python_decoder,
            "pil": pil_decoder}  # fmt: skip
_PROGRESSIVE_ONE_AT_A_TIME = frozenset({"nvjpeg"})


def batches_progressive(decoder: str | BatchDecoder | None) -> bool:
    """Whether this GPU decoder takes progressive JPEGs in its batches; where it does not, the routing
    (`encoder.jpeg.cpu_reason`) sends them to the CPU threads."""
    return decoder not in _PROGRESSIVE_ONE_AT_A_TIME


@dataclass
class DecodedBatch:
    """A batch between `GpuImages.decode` and `GpuImages.finish`."""

    count: int  # inputs
    gpu: list[int]  # input positions the GPU decoded, in order
    images: list[torch.Tensor] | PackedImages  # their (3, h, w) uint8 images
    cpu: list[int]  # input positions being decoded on the CPU
    cpu_jobs: list[Future]  # their `decode_on_cpu` results
    host: dict[int, np.ndarray]  # input position → pixels decoded before this batch
    retried: bool = False  # the GPU decoder failed the batch whole and took it in halves
    in_pieces: bool = False  # the GPU decoder took it in pieces: an earlier batch ran out of memory (`MemoryBackoff`)

    def device_tensors(self) -> list[torch.Tensor]:
        """The tensors holding what the GPU decoded (for `record_stream` where another stream reads them)."""
        return [self.images.buffer] if isinstance(self.images, PackedImages) else list(self.images)


@dataclass
class PreparedBatch:
    """Model-sized images in input order, and what became of each input."""

    pixels: torch.Tensor  # (n_ok, height, width, 3) uint8 on the device
    kept: list[int]  # input positions of the rows of `pixels`
    failed: list[tuple[int, str]]  # (input position, dead-letter reason)
    on_gpu: int  # how many were decoded on the GPU (the rest on the CPU)
    retried: bool = False  # the GPU decode or the resize failed the batch whole and took it in halves
    in_pieces: bool = False  # the GPU decoder or the resize took it in pieces (`MemoryBackoff`)


class GpuImages:
    """Decode and resize batches of images on `device`, falling back to the CPU per image.

    `decoder=None` decodes everything on the CPU threads: the same batches, order and
    reasons on a worker without a GPU decoder. `decode_threads`: how many threads may call
    `decode` at once (`encoder.gpu_stream` runs that many), each with a GPU decoder of its
    own when `decoder` is a name (a `BatchDecoder` given is shared by them).
    """

    def __init__(self, preprocess: PreprocessConfig, device: torch.device | str, limits: DecodeLimits = DecodeLimits(),
                 cpu_pool: Executor | None = None, decoder: str | BatchDecoder | None = "nvjpeg", *,
                 cpu_threads: int = 8, max_decode_s: float = 30.0, decode_threads: int = 1,
                 resize: str = "products") -> None:  # fmt: skip
        if decoder is not None and not gpu_resizes(preprocess):
            raise ValueError(f"GPU resize supports bilinear and bicubic, not PIL filter {preprocess.resample}")
        if decode_threads < 1:
            raise ValueError(f"decode_threads must be at least 1, got {decode_threads}")
        if resize not in RESIZES:
            raise ValueError(f"resize must be one of {', '.join(RESIZES)}, got {resize!r}")
        if resize == "kernel" and not resize_kernel.available():
            raise ValueError("the GPU resize's kernels need Triton (torch's CUDA builds bring it): pip install triton")
        self.resize = resize
        self.preprocess, self.limits, self.max_decode_s = preprocess, limits, max_decode_s
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # torch.cuda stream calls need the index
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._threads, self.decode_threads = cpu_threads, decode_threads
        self._pool = cpu_pool or ThreadPoolExecutor(cpu_threads, thread_name_prefix="cpu-decode")
        self._decoders: queue.SimpleQueue[BatchDecoder] | None = None  # each taken by one `decode` at a time
        if decoder is not None:
            self._decoders = queue.SimpleQueue()
            for _ in range(decode_threads):
                self._decoders.put(DECODERS[decoder](self.device) if isinstance(decoder, str) else decoder)
        self.progressive_on_gpu = batches_progressive(decoder)
        # What running out of memory taught, shared by the decode threads: pieces of a batch while it does not fit.
        self._decode_backoff = MemoryBackoff(stage="the GPU decoder")
        self._resize_backoff = MemoryBackoff(stage="the resize")
        self._own_pool = cpu_pool is None  # shut down by `close`; a pool given is the giver's
        self._closed = False
        self._warming: threading.Thread | None = None
        self.warm_s: float | None = None  # how long `start_warming`'s warm-up took, once it is over
        self.warm_problem: str | None = None  # why it failed, if it did

    def warm(self, count: int, width: int = 640, height: int = 480) -> None:
        """Decode and resize a made-up batch of `count` photos (`sample_jpeg`) once on each GPU decoder, so that what
        the decoders and the resize set up at first use is done before the first real batch: nvImageCodec makes its
        decoders, their state per library thread and the hardware decoder's memory pool (sized by the batch) at its
        first decode, CUDA loads a library's kernels as they are first launched, Triton compiles the resize's
        kernels. Nothing without a GPU decoder. A real batch decoded meanwhile waits for no more than the decoder it
        takes (each `decode` takes the one least recently used, so `decode_threads` warm-ups warm each once).

        Raises:
            Whatever the decoders or the resize raise for the made-up batch.
        """
        if self._decoders is None or count < 1:
            return
        batch = [sample_jpeg(width, height)] * count
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for _ in range(self.decode_threads):
                prepared = self.finish(self.decode(batch, [None] * count))
                if prepared.on_gpu != count:
                    raise RuntimeError(f"the GPU decoder decoded {prepared.on_gpu} of {count} made-up photos")
        if stream is not None:
            stream.synchronize()

    def start_warming(self, count: int) -> None:
        """`warm` in a thread of its own, beside whatever the caller does next (a run's start, its first reads):
        `warm_s` says how long it took once it is over. A failure is logged and kept (`warm_problem`), not raised:
        the real batches meet it again, where it counts, or do not."""
        if self._decoders is None or self._warming is not None:
            return

        def run() -> None:
            started = time.monotonic()
            try:
                self.warm(count)
            except Exception as err:  # noqa: BLE001 - the run goes on without a warm start
                self.warm_problem = describe_error(err)
                log.warning("warming the GPU decoders up failed (%s); the first batches will do it",
                            self.warm_problem)  # fmt: skip
            self.warm_s = time.monotonic() - started

        self._warming = threading.Thread(target=run, name="decoder-warm", daemon=True)
        self._warming.start()

    def close(self, in_background: bool = False) -> threading.Thread | None:
        """Free the GPU decoders' library handles (`ClosingDecoder`) and stop the CPU threads this made, after the
        warm-up if one runs; decoding after this fails. A decoder still in a `decode` call is left to be collected.
        `in_background`: in a thread of its own, which is returned: destroying nvImageCodec's decoders (a CUDA
        stream, state and memory pools per decoder) would hold up whatever ends, a run's last step. Not a daemon
        thread: the interpreter's exit waits for it rather than tearing the library down under it."""
        if in_background:
            thread = threading.Thread(target=self.close, name="decoder-close")
            thread.start()
            return thread
        if self._warming is not None:
            self._warming.join()
        self._closed = True
        while self._decoders is not None:
            try:
                decoder = self._decoders.get_nowait()
            except queue.Empty:
                break
            if callable(close := getattr(decoder, "close", None)):
                close()
        if self._own_pool:
            self._pool.shutdown(wait=False)
        return None

    @property
    def decodes_on_gpu(self) -> bool:
        """Whether any input may go to the GPU decoder (False: everything is decoded on the CPU threads)."""
        return self._decoders is not None

    def cpu_reason(self, data: bytes | np.ndarray) -> str | None:
        """Why this encoded image goes to the CPU decoder under these limits (None: the GPU decoder takes it)."""
        return cpu_reason(data, self.limits.max_bytes, self.limits.max_pixels, self.progressive_on_gpu)

    def cpu_reasons(self, inputs: Sequence[bytes | np.ndarray]) -> list[str | None]:
        """`cpu_reason` of each encoded input; None for pixels already decoded on the CPU (`decode` keeps them)."""
        return [None if _is_pixels(x) else self.cpu_reason(x) for x in inputs]

    def route(self, datas: Sequence[bytes], reasons: Sequence[str | None] | None = None) -> tuple[list[int], list[int]]:
        """Input positions for the GPU decoder and for the CPU decoder. `reasons`: each input's
        `encoder.jpeg.cpu_reason`, found already (by the file readers) under these limits."""
        if self._decoders is None:
            return [], list(range(len(datas)))
        if reasons is None:
            reasons = [self.cpu_reason(data) for data in datas]
        gpu, cpu = [], []
        for i, reason in enumerate(reasons):
            (cpu if reason else gpu).append(i)
        return gpu, cpu

    def prepare(self, inputs: Sequence[bytes | np.ndarray]) -> PreparedBatch:
        """Every input, encoded (bytes or a 1-D uint8 array) or (height, width, 3) uint8 pixels from
        `decode_image`, becomes a row of `pixels` or a (position, reason) failure. The same as
        `finish(decode(inputs))`."""
        return self.finish(self.decode(inputs))

    def decode(self, inputs: Sequence[bytes | np.ndarray],
               reasons: Sequence[str | None] | None = None) -> DecodedBatch:  # fmt: skip
        """The first stage: route each input, decode on the GPU, start the CPU decodes. Mostly time in the
        decoders, which release the GIL, so another thread can `finish` the previous batch meanwhile.
        `reasons`, when given, routes the encoded inputs as `route` does (one per input)."""
        if self._closed:
            raise RuntimeError("these GpuImages are closed: their decoders are gone")
        encoded = [i for i, x in enumerate(inputs) if not _is_pixels(x)]
        known = None if reasons is None else [reasons[i] for i in encoded]
        gpu, cpu = (  # positions in `inputs`
            [[encoded[j] for j in side] for side in self.route([inputs[i] for i in encoded], known)]
            if encoded
            else ([], [])
        )
        decoded, images, rejected, retried, in_pieces = self._decode_on_gpu([inputs[i] for i in gpu])
        cpu = sorted(cpu + [gpu[j] for j in rejected])
        # The CPU decodes get bytes of their own: a decode that overruns its time limit may outlive the batch.
        jobs = [self._pool.submit(decode_on_cpu, _own(inputs[i]), self.preprocess, self.limits) for i in cpu]
        host = {i: x for i, x in enumerate(inputs) if _is_pixels(x)}
        return DecodedBatch(len(inputs), [gpu[j] for j in decoded], images, cpu, jobs, host, retried, in_pieces)

    def finish(self, batch: DecodedBatch) -> PreparedBatch:
        """The second stage: resize what the GPU decoded, wait for the CPU decodes, assemble in input order."""
        parts: dict[int, torch.Tensor] = {}
        failed, host, retried, in_pieces = [], dict(batch.host), batch.retried, batch.in_pieces
        if batch.gpu:
            resized, unresized, resize_retried, resized_in_pieces = self._resize_checked(batch.images)
            retried, in_pieces = retried or resize_retried, in_pieces or resized_in_pieces
            if len(batch.gpu) == batch.count and not unresized:  # the usual batch: all decoded here, in order
                return PreparedBatch(resized, list(range(batch.count)), [], batch.count, retried, in_pieces)
            done = [i for j, i in enumerate(batch.gpu) if j not in unresized]
            parts.update(zip(done, resized, strict=True))
            failed += [(batch.gpu[j], reason) for j, reason in unresized.items()]
        for i, result in zip(batch.cpu, collect_decodes(batch.cpu_jobs, self.max_decode_s, self._threads), strict=True):
            if isinstance(result, str):
                failed.append((i, result))
            else:
                host[i] = result
        if host:
            order = sorted(host)  # input order, so an all-host batch needs no regathering
            stacked = torch.from_numpy(np.stack([host[i] for i in order]))
            if self.device.type == "cuda":
                stacked = stacked.pin_memory()
            uploaded = stacked.to(self.device, non_blocking=True)
            parts.update(dict(zip(order, uploaded, strict=True)))
        kept = sorted(parts)
        if host and len(host) == batch.count:  # nothing decoded here: the host batch is already in order
            return PreparedBatch(uploaded, kept, [], 0, retried, in_pieces)
        pixels = torch.stack([parts[i] for i in kept]) if kept else self._no_pixels()
        return PreparedBatch(pixels, kept, sorted(failed), len(batch.gpu), retried, in_pieces)

    def _resize_checked(self, images: list[torch.Tensor] | PackedImages,
                        ) -> tuple[torch.Tensor, dict[int, str], bool, bool]:  # fmt: skip
        """`resize_like_pil` of the batch, or of pieces of it while its size does not fit the memory left
        (`_resize_backoff`); what fails (out of GPU memory), in halves (`in_halves`), so only the culprits fail: the
        images resized, in order, position → dead-letter reason for the rest, whether something was taken in
        halves, and whether the batch went in pieces."""
        resize = learning(self._resize_backoff, self._resize)
        done, failed, retried = [], {}, False
        pieces = list(_in_pieces(resize, images, self._resize_backoff))
        for piece in pieces:
            if piece.reason is None:
                done.append((piece.start, piece.result))
                continue
            _RESIZE_RETRIES.warning("resizing a batch of %d failed (%s); resizing it in halves", len(piece.items),
                                    piece.reason)  # fmt: skip
            halves, culprits = in_halves(resize, piece.items, piece.reason)
            done += [(piece.start + first, rows) for first, rows in halves]
            failed.update({piece.start + j: f"resize failed: {why}" for j, why in culprits.items()})
            retried = True
        resized = torch.cat([rows for _, rows in sorted(done, key=lambda d: d[0])]) if done else self._no_pixels()
        return resized, failed, retried, len(pieces) > 1

    def _resize(self, images: list[torch.Tensor] | PackedImages) -> torch.Tensor:
        """`resize_like_pil` as asked (`resize`); in draft mode where the CPU path decodes JPEGs so. Kernels that fail
        otherwise than for memory or a failed device (Triton unable to build them for this GPU, say) are given up for
        the products, with one warning, rather than failing every batch of the run."""
        draft = self.limits.draft
        if self.resize == "kernel":
            try:
                return resize_like_pil(images, self.preprocess, draft=draft, kernel=True)
            except Exception as err:
                if device_failed(err) or out_of_memory(describe_error(err)):
                    raise  # the device is gone, or the memory backoff's to learn from
                log.warning("the GPU resize's kernels failed (%s): resizing with the products from now on",
                            describe_error(err))  # fmt: skip
                self.resize = "products"
        return resize_like_pil(images, self.preprocess, draft=draft)

    def _no_pixels(self) -> torch.Tensor:
        return torch.empty((0, self.preprocess.height, self.preprocess.width, 3), dtype=torch.uint8, device=self.device)

    def _decode_on_gpu(self, datas: list[bytes],
                       ) -> tuple[list[int], list[torch.Tensor] | PackedImages, list[int], bool, bool]:  # fmt: skip
        """The positions the GPU decoded, their images, the positions it rejected (the CPU decoder will decode
        those or say why not), whether the decoder failed the batch (or a piece) whole and took it in halves
        (torchvision's nvJPEG raises for a batch with one JPEG it cannot decode; any decoder, for a batch it has no
        memory for), and whether it went in pieces: while a batch's size does not fit the memory left
        (`_decode_backoff`)."""
        if not datas:
            return [], [], [], False, False
        decode = self._decoders.get()  # one free: there are as many as threads that may call this
        try:
            decoder = learning(self._decode_backoff, lambda part: decode(part, self.device))
            pieces = list(_in_pieces(decoder, datas, self._decode_backoff))
            if len(pieces) == 1 and pieces[0].reason is None and isinstance(pieces[0].result, tuple):  # packed
                packed, decoded = pieces[0].result
                return decoded, packed, sorted(set(range(len(datas))) - set(decoded)), False, False
            pairs, failed, retried = [], [], False
            for piece in pieces:
                if piece.reason is None:
                    found = [(0, _per_input(piece.result, len(piece.items)))]
                else:
                    _DECODE_RETRIES.warning("the GPU decoder failed a batch of %d (%s); decoding it in halves",
                                            len(piece.items), piece.reason)  # fmt: skip
                    found, culprits = in_halves(lambda part: _per_input(decoder(part), len(part)), piece.items,
                                                piece.reason)  # fmt: skip
                    failed += [piece.start + j for j in culprits]
                    retried = True
                pairs += [(piece.start + first + k, image) for first, images in found for k, image in enumerate(images)]
        finally:
            self._decoders.put(decode)
        decoded = [(j, image) for j, image in pairs if image is not None]
        rejected = sorted([*failed, *(j for j, image in pairs if image is None)])
        return [j for j, _ in decoded], _packed([image for _, image in decoded]), rejected, retried, len(pieces) > 1


class _Piece(NamedTuple):
    start: int  # its first item's position in the batch
    items: Sequence
    result: object  # fn(items); None where it failed
    reason: str | None  # why fn(items) failed (`attempt`); None: it did not


def _in_pieces(fn: Callable[[Sequence], T], items: Sequence, backoff: MemoryBackoff) -> Iterator[_Piece]:
    """`fn` of `items` whole, or of pieces of them while `backoff` says their size does not fit the memory left
    (`MemoryBackoff.piece_for`). A whole batch that goes through while backing off (a probe) ends the backoff."""
    backing_off, size = backoff.backing_off, backoff.piece_for(len(items))
    probe, size = backing_off and size is None, size or len(items)
    for start in range(0, len(items), size):
        piece = items[start : start + size]
        result, reason = attempt(fn, piece)
        if reason is None and probe:
            backoff.fitted()
        yield _Piece(start, piece, result, reason)


def _packed(images: list[torch.Tensor]) -> list[torch.Tensor] | PackedImages:
    """Images of several sizes packed in one call, so the resize gathers them instead of copying them into its
    canvas one call each; images of one size it stacks a chunk at a time anyway. Packing copies the batch, so a
    batch of very large photos (bound by its pixels, not its calls), or one that packing fails for (out of
    memory), stays as it is."""
    shapes = {tuple(image.shape) for image in images}
    if len(shapes) < 2 or sum(math.prod(image.shape) for image in images) > PACK_MAX_BYTES:
        return images
    packed, reason = attempt(pack_images, images)
    if reason is not None:
        log.warning("could not pack a batch of %d decoded images (%s); resizing them as they are", len(images),
                    reason)  # fmt: skip
        return images
    return packed


def _per_input(result: list[torch.Tensor | None] | tuple[PackedImages, list[int]], count: int,
               ) -> list[torch.Tensor | None]:  # fmt: skip
    """A decoder's result for `count` inputs as one image, or None, per input."""
    if isinstance(result, tuple):
        packed, decoded = result
        images = {j: packed[k] for k, j in enumerate(decoded)}
        return [images.get(j) for j in range(count)]
    return list(result)


def _is_pixels(x) -> bool:
    """Pixels decoded on the CPU are (height, width, 3) arrays; encoded images are bytes or 1-D uint8 arrays."""
    return isinstance(x, np.ndarray) and x.ndim == 3


def _own(data: bytes | memoryview | np.ndarray) -> bytes:
    return data if isinstance(data, bytes) else bytes(data)


def decode_on_cpu(data: bytes, cfg: PreprocessConfig, limits: DecodeLimits) -> np.ndarray | str:
    """`decode_image`, with the dead-letter reason returned instead of raised."""
    try:
        return decode_image(data, cfg, limits)
    except ImageDecodeError as err:
        return str(err)
    except Exception as err:  # noqa: BLE001 - a decoder bug on one image must not stop the batch
        return f"unexpected {describe_error(err)}"


def collect_decodes(futures: Sequence[Future], max_decode_s: float, threads: int) -> list[np.ndarray | str]:
    """The results of `decode_on_cpu` futures, in order. A decode cannot be interrupted, so an image not
    decoded within `max_decode_s` (per image, `threads` at a time) gets a reason instead and its thread is
    left to finish on its own: the batch goes on without it."""
    deadline = time.monotonic() + max_decode_s * math.ceil(len(futures) / max(threads, 1))
    results: list[np.ndarray | str] = []
    for future in futures:
        try:
            results.append(future.result(timeout=max(0.0, deadline - time.monotonic())))
        except FutureTimeout:
            future.cancel()
            results.append(f"not decoded within {max_decode_s:g} s")
    return results
