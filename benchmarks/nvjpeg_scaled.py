"""nvJPEG's hardware decoder at 1/2 scale against the full-size decode the GPU image path makes today.

On the CPU, JPEGs decode in draft mode by default: for a 224-px model input from 640-px photos libjpeg scales by
1/2 inside its inverse DCT and never makes the full-size pixels (README, "Preprocessing"). The GPU path decodes at
full size and resizes from there: on an H200 the resize took ~18 µs of GPU time per image and the decoder's own
kernels ~11 µs, and that time adds to the model's instead of hiding under it (run D, BENCHMARKS.md). The JPEG
engines of an A100, H100 or H200 can scale as libjpeg does (`nvjpegDecodeParamsSetScaleFactor`, hardware backend
only), which nvImageCodec 0.9 does not expose. This probe measures, on one GPU, whether that is worth building in:

- decode rate at full size and at each photo's draft scale (`nvjpegDecodeBatchedEx`, one thread, batches of
  `--batch-size`), and the product's nvImageCodec decoder at full size beside them (its per-image host work,
  ~65 µs on run D's H200, against nvJPEG's one batched call);
- GPU time per image of each, decode and then the resize to the model's input (`resize_like_pil`), from a profile
  (the engines' own work is not a kernel; the colour conversion and the resize are);
- pixels: the 1/2 decode against Pillow's draft decode (what the CPU path embeds), and the model input made from
  each decode against the CPU path's, in the normalised units of README's draft table (range 2).

    python benchmarks/nvjpeg_scaled.py [--images 2048] [--batch-size 256] [--json F]

Needs CUDA, a GPU with JPEG engines and the `nvidia-nvjpeg` wheel (`libnvjpeg.so.13`); on anything else it says
why and exits 0 with that reason in its JSON, so a leased machine's other steps go on. `--smoke` runs every step
on the CPU with Pillow's draft decode standing in for the engines (it checks the script, not the GPU).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import io
import json
import math
import sys
import tempfile
import time
from ctypes import POINTER, byref, c_char_p, c_int, c_size_t, c_uint, c_void_p
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import level_diff, packed_interleaved, realistic_jpegs  # noqa: E402
from benchmarks.cuda_timeline import record  # noqa: E402
from encoder.preprocess import DecodeLimits, PreprocessConfig, decode_image, draft_scale, draft_size  # noqa: E402
from encoder.resize import PackedImages, resize_like_pil  # noqa: E402

BACKEND_HARDWARE = 3
OUTPUT_RGBI = 5
SCALES = {1: 0, 2: 1, 4: 2, 8: 3}  # divisor → nvjpegScaleFactor_t
MAX_COMPONENT = 4
STATUS = {1: "NOT_INITIALIZED", 2: "INVALID_PARAMETER", 3: "BAD_JPEG", 4: "JPEG_NOT_SUPPORTED",
          5: "ALLOCATOR_FAILURE", 6: "EXECUTION_FAILED", 7: "ARCH_MISMATCH", 8: "INTERNAL_ERROR",
          9: "IMPLEMENTATION_NOT_SUPPORTED", 10: "INCOMPLETE_BITSTREAM"}  # fmt: skip


class NvjpegImage(ctypes.Structure):  # nvjpegImage_t
    _fields_ = [("channel", c_void_p * MAX_COMPONENT), ("pitch", c_size_t * MAX_COMPONENT)]


class NvjpegError(RuntimeError):
    pass


def library() -> Path:
    """`libnvjpeg.so.13` of the `nvidia-nvjpeg` wheel (nvImageCodec's nvJPEG extension loads the same)."""
    spec = importlib.util.find_spec("nvidia")
    for root in spec.submodule_search_locations if spec else []:
        found = sorted(Path(root).glob("cu*/lib/libnvjpeg.so*")) + sorted(Path(root).glob("nvjpeg/lib/libnvjpeg.so*"))
        if found:
            return found[-1]
    raise NvjpegError("libnvjpeg not found: install the nvidia-nvjpeg wheel")


class HardwareJpeg:
    """A batch of JPEGs through nvJPEG's hardware backend into one device buffer, interleaved RGB, at a scale."""

    def __init__(self, device: torch.device, path: Path | None = None) -> None:
        self.device = device
        lib = self.lib = ctypes.CDLL(str(path or library()))
        for name, args in {
            "nvjpegCreateEx": [c_int, c_void_p, c_void_p, c_uint, POINTER(c_void_p)],
            "nvjpegGetHardwareDecoderInfo": [c_void_p, POINTER(c_uint), POINTER(c_uint)],
            "nvjpegJpegStateCreate": [c_void_p, POINTER(c_void_p)],
            "nvjpegJpegStreamCreate": [c_void_p, POINTER(c_void_p)],
            "nvjpegJpegStreamParseHeader": [c_void_p, c_char_p, c_size_t, c_void_p],
            "nvjpegDecodeBatchedSupportedEx": [c_void_p, c_void_p, c_void_p, POINTER(c_int)],
            "nvjpegDecodeParamsCreate": [c_void_p, POINTER(c_void_p)],
            "nvjpegDecodeParamsSetOutputFormat": [c_void_p, c_int],
            "nvjpegDecodeParamsSetScaleFactor": [c_void_p, c_int],
            "nvjpegDecodeParamsSetROI": [c_void_p, c_int, c_int, c_int, c_int],
            "nvjpegGetImageInfo": [c_void_p, c_char_p, c_size_t, POINTER(c_int), POINTER(c_int), POINTER(c_int),
                                   POINTER(c_int)],
            "nvjpegDecodeBatchedInitialize": [c_void_p, c_void_p, c_int, c_int, c_int],
            "nvjpegDecodeBatchedEx": [c_void_p, c_void_p, POINTER(c_char_p), POINTER(c_size_t),
                                      POINTER(NvjpegImage), POINTER(c_void_p), c_void_p],
        }.items():  # fmt: skip
            getattr(lib, name).argtypes, getattr(lib, name).restype = args, c_int
        torch.cuda.init()  # the library takes the current CUDA context
        self.handle, self.state, self.stream = c_void_p(), c_void_p(), c_void_p()
        self._check("nvjpegCreateEx", BACKEND_HARDWARE, None, None, 0, byref(self.handle))
        engines, cores = c_uint(), c_uint()
        self._check("nvjpegGetHardwareDecoderInfo", self.handle, byref(engines), byref(cores))
        self.engines, self.cores = engines.value, cores.value
        self._check("nvjpegJpegStateCreate", self.handle, byref(self.state))
        self._check("nvjpegJpegStreamCreate", self.handle, byref(self.stream))
        self.params: list[c_void_p] = []
        self._batch, self._scale = None, {}

    def _check(self, name: str, *args) -> None:
        status = getattr(self.lib, name)(*args)
        if status:
            raise NvjpegError(f"{name}: NVJPEG_STATUS_{STATUS.get(status, status)}")

    def _params(self, divisors: list[int]) -> list[c_void_p]:
        """One decode-parameters handle per image of the batch (made once, kept), each at its image's scale."""
        while len(self.params) < len(divisors):
            params = c_void_p()
            self._check("nvjpegDecodeParamsCreate", self.handle, byref(params))
            self._check("nvjpegDecodeParamsSetOutputFormat", params, OUTPUT_RGBI)
            self._check("nvjpegDecodeParamsSetROI", params, 0, 0, -1, -1)  # the whole image, as nvImageCodec sets it
            self.params.append(params)
        for params, divisor in zip(self.params, divisors, strict=False):  # more handles than images: kept
            if self._scale.get(params.value) != divisor:
                self._check("nvjpegDecodeParamsSetScaleFactor", params, SCALES[divisor])
                self._scale[params.value] = divisor
        return self.params[: len(divisors)]

    def supported(self, data: bytes, divisor: int) -> bool:
        """Whether the engines take this JPEG at this scale (baseline, one scan, not 4:1:1 or 4:1:0)."""
        self._check("nvjpegJpegStreamParseHeader", self.handle, data, len(data), self.stream)
        answer = c_int()
        self._check("nvjpegDecodeBatchedSupportedEx", self.handle, self.stream, self._params([divisor])[0],
                    byref(answer))  # fmt: skip
        return answer.value == 0  # 0: supported, as nvjpeg.h has it

    def shape(self, data: bytes) -> tuple[int, int]:
        components, subsampling = c_int(), c_int()
        widths, heights = (c_int * MAX_COMPONENT)(), (c_int * MAX_COMPONENT)()
        self._check("nvjpegGetImageInfo", self.handle, data, len(data), byref(components), byref(subsampling),
                    widths, heights)  # fmt: skip
        return heights[0], widths[0]

    def decode(self, datas: list[bytes], divisors: list[int]) -> PackedImages:
        """Image k at 1/`divisors[k]`, side by side in one buffer with a widest row's room after the last (so the
        resize gathers them as it does nvImageCodec's batches), decoded on the current stream."""
        n = len(datas)
        shapes = [draft_size(*self.shape(d), k) for d, k in zip(datas, divisors, strict=True)]
        offsets, total = [], 0
        for h, w in shapes:
            offsets.append(total)
            total += h * w * 3
        buffer = torch.empty(total + 3 * max(w for _, w in shapes), dtype=torch.uint8, device=self.device)
        images = (NvjpegImage * n)()
        for image, offset, (_, w) in zip(images, offsets, shapes, strict=True):
            image.channel[0] = buffer.data_ptr() + offset
            image.pitch[0] = 3 * w
        if self._batch != n:
            self._check("nvjpegDecodeBatchedInitialize", self.handle, self.state, n, 1, OUTPUT_RGBI)
            self._batch = n
        params = self._params(divisors)
        try:
            self._check("nvjpegDecodeBatchedEx", self.handle, self.state, (c_char_p * n)(*datas),
                        (c_size_t * n)(*map(len, datas)), images, (c_void_p * n)(*params),
                        c_void_p(torch.cuda.current_stream(self.device).cuda_stream))  # fmt: skip
        except NvjpegError as err:  # run E: every batch failed so; which images, alone, say what to look at next
            if n == 1:
                raise
            raise NvjpegError(f"{err} ({self._alone(datas, divisors)})") from None
        return PackedImages(buffer, tuple(offsets), tuple(shapes))

    def _alone(self, datas: list[bytes], divisors: list[int]) -> str:
        """The batch's images decoded one by one: how many fail, and the first that does."""
        failed = []
        for k, (data, divisor) in enumerate(zip(datas, divisors, strict=True)):
            self._batch = None  # a batch of one: initialised anew, and again for the next batch
            try:
                self.decode([data], [divisor])
            except NvjpegError as err:
                failed.append((k, len(data), divisor, str(err)))
        torch.cuda.synchronize(self.device)
        if not failed:
            return f"each of its {len(datas)} images decodes alone"
        k, size, divisor, why = failed[0]
        return f"{len(failed)} of its {len(datas)} images fail alone, the first image {k} ({size:,} B at 1/{divisor}): {why}"


class PillowStandIn:
    """`HardwareJpeg`'s interface on the CPU: Pillow decodes at 1/2^k in draft mode (libjpeg's scaled inverse
    DCT), into the same packed layout. What `--smoke` decodes with."""

    engines = cores = 0

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def supported(self, data: bytes, divisor: int) -> bool:
        return True

    def shape(self, data: bytes) -> tuple[int, int]:
        from PIL import Image

        width, height = Image.open(io.BytesIO(data)).size
        return height, width

    def decode(self, datas: list[bytes], divisors: list[int]) -> PackedImages:
        from PIL import Image

        arrays = []
        for data, divisor in zip(datas, divisors, strict=True):
            image = Image.open(io.BytesIO(data))
            if divisor > 1:
                image.draft("RGB", (image.width // divisor, image.height // divisor))  # Pillow picks `divisor`
            arrays.append(np.asarray(image.convert("RGB")))
        return packed_interleaved(arrays, self.device)


class ProductDecoder:
    """The product's decoder today, nvImageCodec (`encoder.nvimgcodec`), full size: the baseline in the same run."""

    def __init__(self, device: torch.device) -> None:
        from encoder.nvimgcodec import NvImageCodec

        self.codec = NvImageCodec(device)

    def decode(self, datas: list[bytes], divisors: list[int]) -> PackedImages:
        assert set(divisors) == {1}, "nvImageCodec 0.9 decodes at full size only"
        packed, done = self.codec.decode_packed(datas)
        if len(done) != len(datas):
            raise NvjpegError(f"nvImageCodec decoded {len(done)} of {len(datas)}")
        return packed


def draft_decode(data: bytes, cfg: PreprocessConfig) -> np.ndarray:
    """Pillow's draft decode before any resize: what libjpeg's scaled inverse DCT makes on the CPU."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.draft("RGB", (cfg.width, cfg.height))
    return np.asarray(image.convert("RGB"))


def squared(data: bytes) -> bytes:
    """The photo cropped to a centred square and saved again at quality 90."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    buffer = io.BytesIO()
    image.crop((left, top, left + side, top + side)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_rate(fn, device: torch.device, images: int, rounds: int) -> float:
    fn()  # warm: the engines' buffers, the resize's kernels
    sync(device)
    start = time.perf_counter()
    for _ in range(rounds):
        fn()
    sync(device)
    return rounds * images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--unique", type=int, default=512, help="different photos among --images (made on one core)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compare", type=int, default=64, help="images whose pixels are compared")
    parser.add_argument("--width", type=int, default=640, help="the photos' width (square products: --square)")
    parser.add_argument("--square", action="store_true", help="square photos, as product shots often are")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--smoke", action="store_true", help="CPU, Pillow standing in for the engines, few images")
    args = parser.parse_args()
    if args.smoke:
        args.images, args.batch_size, args.rounds, args.compare = 24, 8, 1, 24
    results: dict = {}

    def done(**more) -> None:
        results.update(more)
        print(json.dumps(results, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))

    if args.smoke:
        device = torch.device("cpu")
        decoder = PillowStandIn(device)
    elif not torch.cuda.is_available():
        return done(skipped="needs CUDA (or pass --smoke)")
    else:
        device = torch.device("cuda", torch.cuda.current_device())
        try:
            decoder = HardwareJpeg(device)
        except (NvjpegError, OSError) as err:
            return done(skipped=f"no hardware JPEG decoder here: {err}")
        results.update(gpu=torch.cuda.get_device_name(device), engines=decoder.engines, cores_per_engine=decoder.cores)
    cfg = PreprocessConfig()
    with tempfile.TemporaryDirectory() as tmp:
        unique = [p.read_bytes() for p in realistic_jpegs(Path(tmp), min(args.unique, args.images), args.width)]
    if args.square:
        unique = [squared(x) for x in unique]
    datas = (unique * math.ceil(args.images / len(unique)))[: args.images]  # made once: the rates repeat them
    results["photos"] = (f"{args.images} JPEGs ({len(unique)} different), {args.width} px wide"
                         f"{', square' if args.square else ''}, quality 90")  # fmt: skip
    try:  # the library's header calls: one that fails says so in the results, not as a traceback
        results["unsupported_of_compared"] = {f"1/{d}": sum(not decoder.supported(x, d) for x in datas[: args.compare])
                                              for d in (1, 2)}  # fmt: skip
        draft = [draft_scale(*decoder.shape(x), cfg) for x in datas]  # as Pillow's draft mode would scale each
    except NvjpegError as err:
        return done(error=str(err))
    at = list(range(0, len(datas), args.batch_size))
    batches = [datas[i : i + args.batch_size] for i in at]
    results["draft_scales"] = {f"1/{d}": draft.count(d) for d in sorted(set(draft))}
    some = datas[: args.compare]
    try:
        product = ProductDecoder(device)
    except Exception as err:  # noqa: BLE001 - no nvImageCodec here: the probe's own rows still say what it asks
        product, results["nvimgcodec"] = None, {"error": f"{type(err).__name__}: {err}"}
    # A full-size decode is resized as the product does it, through the draft decode's reduction (`draft_taps`); one
    # at draft scale is reduced already.
    modes = [("nvimgcodec", product, [1] * len(datas), True)] if product else []
    for mode, using, divisors, drafted in [*modes, ("full", decoder, [1] * len(datas), True),
                                           ("draft", decoder, draft, False)]:  # fmt: skip
        row = results[mode] = {}
        per_batch = [divisors[i : i + args.batch_size] for i in at]
        decode = lambda d=per_batch, u=using: [u.decode(b, k) for b, k in zip(batches, d, strict=True)]  # noqa: E731
        both = lambda d=per_batch, u=using, f=drafted: [resize_like_pil(u.decode(b, k), cfg, draft=f)  # noqa: E731
                                                        for b, k in zip(batches, d, strict=True)]  # fmt: skip
        try:
            row["decode_images_per_s"] = round(timed_rate(decode, device, len(datas), args.rounds))
            row["decode_resize_images_per_s"] = round(timed_rate(both, device, len(datas), args.rounds))
            with tempfile.TemporaryDirectory() as tmp:
                timeline = record(both, Path(tmp) / "t.json.gz", cuda=device.type == "cuda")
            streams = timeline.get("streams", {}).values()
            row["gpu_us_per_image"] = round(1e3 * sum(s["busy_ms"] for s in streams) / len(datas), 1)
            row["costliest_ms"] = {k: v for s in streams for k, v in s["costliest"].items()}
            packed = using.decode(some, divisors[: len(some)])
            model_input = resize_like_pil(packed, cfg, draft=drafted).cpu().numpy()
            if mode == "draft":  # the decode itself against libjpeg's scaled inverse DCT, image by image
                drafts = [draft_decode(x, cfg) for x in some]
                same = [k for k, x in enumerate(drafts) if x.shape[:2] == packed.shapes[k]]
                row["shapes_as_pillow_draft"] = f"{len(same)}/{len(some)}"
                row["decode_vs_pillow_draft"] = level_diff(
                    np.concatenate([packed[k].permute(1, 2, 0).cpu().numpy().ravel() for k in same]),
                    np.concatenate([drafts[k].ravel() for k in same]))  # fmt: skip
            for name, cpu_draft in (("cpu_path_draft", True), ("cpu_path_no_draft", False)):
                cpu = np.stack([decode_image(x, cfg, DecodeLimits(draft=cpu_draft)) for x in some])
                row[f"model_input_vs_{name}"] = level_diff(model_input, cpu)
        except NvjpegError as err:
            row["error"] = str(err)
        if args.json:  # as each mode lands: a run cut off keeps what it measured
            Path(args.json).write_text(json.dumps(results, indent=2))
    done()


if __name__ == "__main__":
    main()
