"""JPEG files → vectors on one GPU: the usual ways against lookalike's, measured in one run.

    python benchmarks/gpu_embed.py [--images 20000] [--so400m-images 5000] [--json OUT.json]
    python benchmarks/gpu_embed.py --smoke     # tiny model, 64 small files, CPU: checks the script itself

On a generated set of realistic JPEGs (scikit-image photos, random crops, 640 px wide,
quality 90) and SigLIP base/16-224 with random weights (same FLOPs as the real one):
(a) naive: transformers' image processor + fp32 eager model, one process;
(b) usual practice: torch DataLoader, one worker per core doing PIL decode (JPEG draft) +
    resize, bf16 + SDPA model;
(c) lookalike's encoder alone on pre-decoded uint8 batches already on the GPU (bf16, SDPA,
    torch.compile; compile time reported apart), with MFU: launching each batch before taking
    the vectors of the one before, as (d) does, and one batch at a time;
(d) lookalike end to end, files → Parquet, standalone (`pipelines.direct_embed`): files
    read in reader processes, GPU decode (nvJPEG, and nvImageCodec when installed)
    overlapped with the model; and once with the files read in threads, once with the model
    taking one batch at a time (before: no batch in flight while the host takes the vectors);
(e) the same through the Beam embed pipeline on the local runner (`lookalike embed`,
    whole run: model load and compile included, as (d, cold) beside it).
Then (c) and (d) for SigLIP so400m/14-384. GPU utilisation is sampled with NVML during
each path; (d) also reports how busy each of its threads was. (d) and (e) also report the model's launches, wall
ms per batch (`launch_ms`: its host calls and its waits for the interpreter lock), and the CPU µs per image of
the thread that runs the standalone loop or Beam's runner, whole run and steady state (the worker's serial part):
where (e) falls behind (d), which of the two moved says whether the lock or the runner held it; and where each
run's fixed cost lies (`edges`, and in (e)'s `time_s`: from its start, (e)'s from its pipeline's, to its first
launch, and from its last launch to its end; (e)'s also each stage's seconds as the local runner ran them,
`stages_s`), for the whole run and the small one; (d) also how long
locking the file readers' ring took (`ring_page_lock_s`, till the run's end if that came first) and its longest
call into the driver (`ring_page_lock_longest_call_s`), and what the run's end waited for (`end_s`: the readers' close,
of it the ring's unlock, and the shards' close). `timeline` reruns (c) and (d)
(4,096 files) under torch's profiler: (c)'s costliest kernels; each CUDA stream's busy time,
how much of it overlaps the model's, and each thread's longest CUDA calls
(`benchmarks/cuda_timeline.py`; `--trace-dir` keeps the traces), with the product's streams
and with `streams`' variants. `streams` reruns (d) with other CUDA streams than the
product's; `decode-threads` with 2 and 3 decode threads (`--gpu-decode-threads`); `prealloc`
with nvImageCodec's decoder memory set aside up front; `nomodel` with the tower stood in by
a constant; `freezing` reruns (c) compiled with the weights as constants (`--compile-frozen`); `patch-conv` reruns
(c) and (d) with the tower's patch embedding as the checkpoint's convolution, as it ran before it became one matrix
product (`encoder.patch_embedding`); `gelu-separate` reruns (c) and (d) with the MLPs' GELU as a kernel of its
own, as it ran before it moved into the first product's epilogue (`encoder.gelu_epilogue`); `hf-tower` reruns (c) and
(d) with transformers' `SiglipVisionModel` as the tower, as it ran before the project computed it (`encoder.siglip_tower`);
`resize-channels` reruns (d) with nvImageCodec's batches resized channel by channel, as before they were resized as they lie
(`resize_like_pil(interleaved=...)`); `resize-kernel` reruns (d) with `--gpu-resize kernel`: two Triton kernels that gather
each output's taps from the decoder's buffer (`encoder.resize_kernel`), for nvJPEG's planes and nvImageCodec's
interleaved pixels; `unpinned` reruns (d) with the file readers' ring left pageable, as before it
was page-locked for the GPU (`encoder.page_lock`); `d-again` reruns the product's (d) after such variants (how
far the run drifted: run E's first rows ran up to 14% below their later twins); `decoder-life` times a fresh
`GpuImages` (as each (e) run's embed step makes one, where (d)'s runs share one warmed before them): making it, its
first batch cold against its second, closing it, and the warm-up the embed step now starts against the first batch
after it; `damaged` reruns (d) with one file in 500 damaged past the
route (what a damaged JPEG costs its batch: nvImageCodec's hardware decoder fails a batch whole); `backends` decodes
the files with nvImageCodec alone, with all its decoders and with each kind alone (the hardware engines, the CUDA
decoder), clean and with damaged files, then reruns (d) with each kind alone, and once under the profiler (its
streams and kernels, as `timeline` records the product's): which decoder the product's decodes go to and what each
costs the model; `decode-sms` reruns (c) and (d) with the model kept off 8, 16 and 32 of the GPU's SMs (a CUDA green
context, `--decode-sms`), so the decoders' and the resize's kernels need not wait for its GEMMs, and (d) with 16
once more under the profiler;
`e-missing` reruns (e) on a manifest with one item in 101 whose image is missing (dead letters in the fetch step, so
most images wait in the embed step for a full batch, copied off the ring); `e-before` reruns (e) with its tables
of vectors encoded into shards in the runner's thread and pickled for Beam's size sampling, as before
`pipelines.write_behind` and `ArrowTableCoder` (`benchmarks/beam_before.py`), and `e-reads-before` with each chunk
of files read while the runner's thread waits for it, as before the fetch step sent its reads to the reader
processes ahead (`ProcessReader.start`);
`all-extensions` makes nvImageCodec's decoder with every extension the library ships, as before it loaded the
JPEG decoders only (the time to make it, then (d) clean and with damaged files). `profile` reruns (d) and (e)
sampling every thread's stack (where the time goes on a host without py-spy); `graph` reruns (c), (d) and (e) with the
model's step replayed as one CUDA graph per batch (`--cuda-graph`: three host calls per
batch instead of one per op or kernel, each of which hands the interpreter lock over);
`switch` reruns (d) and (e) with a 0.5 ms interpreter switch interval; `mfu` reruns (c) at twice the
batch, under torch.compile's autotuning modes (minutes of compile each) and with cuDNN's
attention. `large` reruns (d) on phone photos of 12 MP (4000 px wide, with a sensor's grain): with one GPU
decode call's limit (`decode_max_bytes`: a sixteenth of the GPU's memory; the rest decoded on the CPU threads),
with the 1 GiB it was before, without one, and all on the CPU threads. Results go in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    StackSampler,
    bundles_timed,
    images_per_s,
    machine,
    realistic_jpegs,
    stage_label,
)
from encoder import (  # noqa: E402
    DecodeLimits,
    EncoderConfig,
    decode_image,
    gpu_images,
    gpu_stream,
    load_encoder,
)
from encoder import model as model_module  # noqa: E402
from encoder.resize import resize_like_pil  # noqa: E402

SHAPES = {
    "base16-224": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=224, patch_size=16),
    "so400m14-384": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                         image_size=384, patch_size=14),
    "smoke": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=16),
}  # fmt: skip
ENCODER_ALONE = "(c) encoder alone, pre-decoded uint8 on the GPU"  # the rows other (c) rows are measured against
END_TO_END = "(d) end to end, files → Parquet, standalone, {decoder}"  # and other (d) and (e) rows
# Paths that rerun (c) and (d) with one of the tower's changes off (`encoder.model`'s switch), as it ran before.
BEFORE_MODEL_CHANGES = {
    "patch-conv": ("PATCHES_AS_MATMUL", "the patch embedding as a convolution"),  # encoder.patch_embedding
    "gelu-separate": ("GELU_IN_EPILOGUE", "the GELU as a kernel of its own"),  # encoder.gelu_epilogue
    "hf-tower": ("OWN_TOWER", "transformers' SiglipVisionModel as the tower"),  # encoder.siglip_tower
}
PEAK_BF16 = 989e12  # H100 / H200 SXM dense bf16 spec; MFU is against this


def vit_flops(shape: dict) -> float:
    """Matmul FLOPs of one image through the SigLIP tower (patch embed, layers, attention-pooling head)."""
    d, m, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    n = (shape["image_size"] // shape["patch_size"]) ** 2
    patch = 2 * n * 3 * shape["patch_size"] ** 2 * d
    layer = 2 * n * (4 * d * d + 2 * d * m) + 4 * n * n * d
    head = 2 * n * 2 * d * d + 2 * (2 * d * d + 2 * d * m) + 4 * n * d
    return patch + layers * layer + head


class GpuMonitor:
    """Mean GPU utilisation (NVML, every 50 ms) while a path runs; None without NVML."""

    def __init__(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle, self._nvml = pynvml.nvmlDeviceGetHandleByIndex(0), pynvml
        except Exception:  # noqa: BLE001 - no NVML (CPU smoke run): no utilisation column
            self._nvml = None

    def __enter__(self) -> GpuMonitor:
        self.samples, self._stop = [], threading.Event()
        if self._nvml:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)

    def __exit__(self, *exc) -> None:
        self._stop.set()

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


DAMAGED_EVERY = 500  # the `damaged` path: one file in this many damaged past the route
DECODE_SMS = (8, 16, 32)  # the `decode-sms` path's `--decode-sms` values


def codec_setup(device: torch.device, rounds: int = 3) -> dict:
    """Seconds to make nvImageCodec's decoder (`NvImageCodec`): the JPEG decoders only (the product's) and every
    extension the library ships (before), alternated; the fastest of `rounds` each."""
    from encoder.nvimgcodec import ALL_EXTENSIONS, NvImageCodec

    seconds: dict[str, list[float]] = {"jpeg_only_s": [], "every_extension_s": []}
    for _ in range(rounds):
        for name, extensions in (("jpeg_only_s", None), ("every_extension_s", ALL_EXTENSIONS)):
            start = time.perf_counter()
            NvImageCodec(device, extensions=extensions).close()
            seconds[name].append(time.perf_counter() - start)
    return {name: round(min(values), 3) for name, values in seconds.items()} | {"images_per_s": None}


# nvImageCodec's decoders by kind (`encoder.nvimgcodec.BACKENDS`): all of them as the product makes it, each kind alone
DECODER_KINDS = {"all (the product)": None, "hardware engines": ("hardware",), "CUDA decoder": ("hybrid", "gpu")}


def decode_kinds(clean: list[Path], damaged: list[Path], device: torch.device, batch: int,
                 kinds: dict[str, tuple[str, ...] | None]) -> dict:  # fmt: skip
    """nvImageCodec's decode alone (batch by batch from page-locked memory, as the file readers' ring is; no resize or
    model) with all its decoders and with each kind alone: images/s and how many it decoded, over `clean` files and
    over `damaged` (a few damaged past the route). Which kind the product's decodes go to, what each costs, and what
    a damaged file's failed batch costs."""
    from encoder.nvimgcodec import NvImageCodec, NvImageCodecError

    sets = {which: _page_locked([[f.read_bytes() for f in files[i : i + batch]] for i in range(0, len(files), batch)],
                                device)
            for which, files in (("clean", clean), ("damaged", damaged))}  # fmt: skip
    result: dict = {"images": len(clean), "images_per_s": None}
    for name, backends in kinds.items():
        try:
            codec = NvImageCodec(device, backends=backends)
        except NvImageCodecError as err:
            result[name] = str(err)
            continue
        try:
            codec.decode_packed(sets["clean"][0])  # warm-up
            for which, batches in sets.items():
                start, decoded = time.perf_counter(), 0
                for datas in batches:
                    decoded += len(codec.decode_packed(datas)[1])
                if device.type == "cuda":
                    torch.cuda.synchronize()
                result[f"{name}: {which}_per_s"] = round(sum(map(len, batches)) / (time.perf_counter() - start))
                result[f"{name}: {which}_decoded"] = decoded
        finally:
            codec.close()
    return result


def decoder_life(files: list[Path], encoder, device: torch.device, decoder: str, out: Path, batch: int,
                 rounds: int = 3) -> dict:  # fmt: skip
    """What a fresh `GpuImages` costs a run: each (e) run's embed step makes its own, where (d)'s runs share one
    warmed before them. Cold, as before the warm-up: making it, its first batch against its second (a batch of
    files through `embed_files` each, read in threads: the same reads both times) and closing it (its decoders
    destroyed; the embed step does it in a thread of its own). Warmed, as the embed step now starts it: the
    warm-up on a batch of made-up photos (`GpuImages.warm`), then the first batch. Medians of `rounds`, a fresh
    one each time."""
    from encoder.gpu_images import GpuImages
    from pipelines.direct_embed import embed_files

    paths = [str(f) for f in files[:batch]]
    seen: dict[str, list[float]] = {name: [] for name in ("make_s", "first_batch_s", "second_batch_s", "close_s",
                                                          "warm_s", "first_batch_after_warm_s")}  # fmt: skip

    def timed(name: str, fn, *args) -> None:
        start = time.perf_counter()
        fn(*args)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seen[name].append(time.perf_counter() - start)

    def make() -> GpuImages:
        start = time.perf_counter()
        images = GpuImages(encoder.preprocess, device, DecodeLimits(draft=True), decoder=decoder)
        seen["make_s"].append(time.perf_counter() - start)
        return images

    def embed(images: GpuImages, name: str) -> None:
        embed_files(paths, encoder, images, out / name, batch_size=batch, reader="threads")

    for k in range(rounds):
        cold = make()
        timed("first_batch_s", embed, cold, f"{k}-first")
        timed("second_batch_s", embed, cold, f"{k}-second")
        timed("close_s", cold.close)
        warmed = make()
        timed("warm_s", warmed.warm, batch)
        timed("first_batch_after_warm_s", embed, warmed, f"{k}-warmed")
        warmed.close()
    shutil.rmtree(out, ignore_errors=True)
    medians = {name: round(float(np.median(values)), 3) for name, values in seen.items()}
    return medians | {"images": len(paths), "images_per_s": None}


def _damaged(files: list[Path], folder: Path, every: int) -> tuple[list[Path], int]:
    """`files` with one in `every` replaced by a damaged copy that the route still sends to the GPU decoder (its
    scan cut short and the end marker kept, or 32 bytes of its scan overwritten, in turn), and how many."""
    from encoder.jpeg import cpu_reason

    folder.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(0)
    out, damaged = list(files), 0
    for k in range(every // 2, len(files), every):
        data = bytearray(files[k].read_bytes())
        at = len(data) // 2  # past the headers, in the scan
        if damaged % 2:
            data[at : at + 32] = noise.integers(0, 256, 32, dtype=np.uint8).tobytes()
        else:
            data[at:] = b"\xff\xd9"
        if cpu_reason(bytes(data), 1 << 30, 1 << 30) is None:
            out[k] = folder / files[k].name
            out[k].write_bytes(data)
            damaged += 1
    return out, damaged


def _make_images(folder: Path, count: int, width: int, per_process: int = 500, grain: float = 0.0) -> list[Path]:
    chunks = max(1, min(os.cpu_count() or 1, count // per_process))
    sizes = [len(a) for a in np.array_split(np.arange(count), chunks)]
    with ProcessPoolExecutor(chunks) as pool:
        firsts = np.cumsum([0, *sizes[:-1]]).tolist()  # unique names: the file stem is the item id
        done = list(pool.map(realistic_jpegs, [folder / f"c{i:02d}" for i in range(chunks)], sizes,
                             [width] * chunks, [90] * chunks, range(chunks), firsts, [grain] * chunks))  # fmt: skip
    return [p for paths in done for p in paths]


def _checkpoint(folder: Path, shape: dict) -> Path:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    try:
        from transformers import SiglipImageProcessorPil as Processor
    except ImportError:
        from transformers import SiglipImageProcessor as Processor
    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(**shape)).save_pretrained(folder)
    Processor(size={"height": shape["image_size"], "width": shape["image_size"]}).save_pretrained(folder)
    return folder


class Run:
    """Each path's result, printed as it lands and kept in a JSON file; a path that fails is recorded, not fatal."""

    def __init__(self, json_path: str | None) -> None:
        self.results: dict[str, dict] = {}
        self.json_path = json_path

    def path(self, name: str, fn, *args):
        """Run `fn(*args)`; it returns its result dict, or (result, something to hand back)."""
        start, handed = time.perf_counter(), None
        try:
            with GpuMonitor() as gpu:
                result = fn(*args)
            if isinstance(result, tuple):
                result, handed = result
            result["gpu_util_pct"] = gpu.mean
        except Exception as err:  # noqa: BLE001 - keep the other paths' numbers
            traceback.print_exc()
            result = {"error": f"{type(err).__name__}: {err}"}
        result["wall_s"] = round(time.perf_counter() - start, 1)
        self.results[name] = result
        print(f"{name}: {json.dumps(result)}", flush=True)
        if self.json_path:
            Path(self.json_path).write_text(json.dumps(self.results, indent=2))
        return handed


def naive(files: list[Path], ckpt: Path, device: torch.device) -> dict:
    from PIL import Image
    from transformers import AutoImageProcessor, SiglipVisionModel

    processor = AutoImageProcessor.from_pretrained(ckpt, use_fast=False)  # the PIL one a first script gets
    model = SiglipVisionModel.from_pretrained(ckpt, attn_implementation="eager").to(device).eval()
    start, done = time.perf_counter(), 0
    with torch.inference_mode():
        for i in range(0, len(files), 64):
            images = [Image.open(f).convert("RGB") for f in files[i : i + 64]]
            pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(device)
            model(pixel_values=pixels).pooler_output.cpu()
            done += len(images)
    return {"images": done, "images_per_s": done / (time.perf_counter() - start)}


class _Decoded(torch.utils.data.Dataset):
    def __init__(self, files: list[Path], preprocess) -> None:
        self.files, self.preprocess = files, preprocess

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(decode_image(self.files[i].read_bytes(), self.preprocess, DecodeLimits(draft=True)))


def dataloader(files: list[Path], ckpt: Path, device: torch.device, batch: int, workers: int) -> dict:
    encoder = load_encoder(EncoderConfig(model=str(ckpt), device=device.type, batch_size=batch))
    loader = torch.utils.data.DataLoader(_Decoded(files, encoder.preprocess), batch_size=batch,
                                         num_workers=workers, pin_memory=device.type == "cuda")  # fmt: skip
    start, done = time.perf_counter(), 0
    for pixels in loader:
        encoder.embed_prepared(pixels)
        done += len(pixels)
    return {"images": done, "images_per_s": done / (time.perf_counter() - start), "workers": workers}


def encoder_alone(ckpt: Path, shape: dict, device: torch.device, batch: int, seconds: float, compile_: bool,
                  mode: str | None = None, graph: bool = False, frozen: bool = False) -> dict:  # fmt: skip
    """(c): the encoder on uint8 batches already on the device. `mode`: a `torch.compile` mode other than the
    default one `EncoderConfig(compile=True)` uses (the `mfu` path tries them before they become options);
    `graph`: the model's step replayed as one CUDA graph (`EncoderConfig.cuda_graph`); `frozen`: compiled with
    the weights as constants (`EncoderConfig.compile_frozen`)."""
    start = time.perf_counter()
    cfg = EncoderConfig(model=str(ckpt), device=device.type, batch_size=batch, compile=compile_ and mode is None,
                        cuda_graph=graph, compile_frozen=frozen and compile_ and mode is None)  # fmt: skip
    encoder = load_encoder(cfg)
    if mode is not None:
        encoder.compile(mode)
    size = shape["image_size"]
    with torch.inference_mode():  # as the product's batches are made (a batch made outside would be copied)
        pixels = torch.randint(0, 256, (encoder.batch_size, size, size, 3), dtype=torch.uint8, device=device)
    encoder.embed_prepared(pixels)  # compiles here with a `mode` (load_encoder compiled the default one); warms
    if device.type == "cuda":
        torch.cuda.synchronize()
    warm_s = time.perf_counter() - start
    one_at_a_time = images_per_s(lambda: encoder.embed_prepared(pixels), encoder.batch_size, seconds / 2, device)
    out = {
        **_in_flight_rate(encoder, pixels, shape, device, seconds),
        "one_batch_at_a_time_images_per_s": round(one_at_a_time),
        "batch": encoder.batch_size,
        "load_and_compile_s": round(warm_s, 1),
        "compile_mode": mode or ("default" if compile_ else "none"),
        "compile_frozen": cfg.compile_frozen,
        "cuda_graph": encoder.graph is not None,
    }
    return out, encoder


def _in_flight_rate(encoder, pixels: torch.Tensor, shape: dict, device: torch.device, seconds: float) -> dict:
    """(c)'s images/s with a batch launched before the one before is taken, as (d) launches them; on CUDA also its
    TFLOP/s and MFU."""
    rate = images_per_s(_two_in_flight(encoder, pixels), encoder.batch_size, seconds, device)
    out = {"images_per_s": rate}
    if device.type == "cuda":
        out["tflops"] = rate * vit_flops(shape) / 1e12
        out["mfu_pct"] = 100 * rate * vit_flops(shape) / PEAK_BF16
    return out


def pixel_normalisation(ckpt: Path, shape: dict, device: torch.device, batch: int, seconds: float) -> dict:
    """The first part of (c)'s step alone: uint8 pixels → normalised `pixel_values` in the model's dtype, eager (six
    passes over the batch in float32) against compiled into one kernel, as `--compile` now does within the step.
    Its images/s are the compiled one's; the eager one and each one's milliseconds per batch beside them."""
    from encoder.model import read_preprocess
    from encoder.preprocess import channel_stats, normalize_pixels, to_pixel_values

    preprocess, size = read_preprocess(ckpt), shape["image_size"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.inference_mode():
        pixels = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=device)
        mean, std = channel_stats(preprocess, device)
        fused = torch.compile(lambda p: normalize_pixels(p, preprocess, mean, std).to(dtype), dynamic=False)
        eager = images_per_s(lambda: to_pixel_values(pixels, preprocess).to(dtype), batch, seconds, device)
        compiled = images_per_s(lambda: fused(pixels), batch, seconds, device, warmup=2)
    return {"images_per_s": compiled, "eager_images_per_s": round(eager), "batch": batch,
            "ms_per_batch": {"eager": round(1000 * batch / eager, 3), "compiled": round(1000 * batch / compiled, 3)}}  # fmt: skip


def encoder_timeline(encoder, shape: dict, device: torch.device, batches: int, trace: Path) -> dict:
    """(c) for `batches` batches under torch's profiler: the model's costliest kernels (what bounds its MFU)."""
    from benchmarks.cuda_timeline import record

    size = shape["image_size"]
    pixels = torch.randint(0, 256, (encoder.batch_size, size, size, 3), dtype=torch.uint8, device=device)
    step = _two_in_flight(encoder, pixels)
    step()  # warm: the first launch after another path's may still compile or allocate
    start = time.perf_counter()
    summary = record(lambda: [step() for _ in range(batches)], trace, device.type == "cuda", top=12)
    seconds = time.perf_counter() - start
    return {"images_per_s": batches * encoder.batch_size / seconds, "timeline": summary}


def on_sm_share(decode_sms: int, encoder, fn, *args) -> dict:
    """`fn(*args)` with `encoder`'s model on a share of the GPU's SMs that leaves `decode_sms` free, as `--decode-sms`
    gives it (`ImageEncoder.sm_share`), and the SMs it got. On the CPU (`--smoke`) a share with no stream of its own
    stands in: the path runs as the product would without green contexts."""
    from encoder.sm_share import SmShare, share_sms

    cuda = encoder.device.type == "cuda"
    share = share_sms(encoder.device, decode_sms) if cuda else SmShare(None, None, None, None)

    def cache_given_back() -> None:  # torch caches freed memory per stream: one stream's cache serves no other
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    encoder.sm_share = share
    cache_given_back()  # what earlier paths left, for the share's
    try:
        result = fn(*args)
    finally:
        encoder.sm_share = None
        cache_given_back()  # the share's, for later paths
    return {**result, "model_sms": share.model_sms, "total_sms": share.total_sms}


def encoder_steps(encoder, shape: dict, device: torch.device, seconds: float) -> dict:
    """(c) with an encoder already loaded, on its share of the SMs where it has one: batches launched as (d) launches
    them, on the stream (d) would use."""
    size = shape["image_size"]
    with torch.inference_mode():
        pixels = torch.randint(0, 256, (encoder.batch_size, size, size, 3), dtype=torch.uint8, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()  # made on the default stream; the share's does not wait for it
    stream = encoder.sm_share.stream if encoder.sm_share is not None else None
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        return {**_in_flight_rate(encoder, pixels, shape, device, seconds), "batch": encoder.batch_size}


def _two_in_flight(encoder, pixels: torch.Tensor):
    """One step of the model as `embed_stream` drives it: launch a batch, then take the vectors of the one before."""
    pending = [encoder.launch(pixels)]

    def step() -> None:
        pending.append(encoder.launch(pixels))
        pending.pop(0).result()

    return step


def end_to_end(files: list[Path], encoder, device: torch.device, decoder: str, out: Path, batch: int,
               sample: bool = False, reader: str = "processes", in_flight: int = 2, timeline: Path | None = None,
               decode_threads: int = 1, steady: bool = False, resize: str = "products") -> dict:  # fmt: skip
    """(d) over `files`. `sample`: sample the threads' stacks (`StackSampler`); `timeline`: record the GPU's
    timeline and the CUDA calls there (`benchmarks.cuda_timeline`), its summary in the result; `decode_threads`:
    `GpuImages`' (each a decoder and side stream of its own; their busy share is summed); `steady`: also over a
    fifth of the files after, the whole run less that one as `steady_images_per_s` (what a catalog of millions
    sees: each run's start, the reader processes and the first batches, taken out); `resize`: `GpuImages`' (the
    product's `--gpu-resize`)."""
    from encoder.gpu_images import GpuImages
    from encoder.model import PendingVectors
    from pipelines.direct_embed import embed_files

    images = GpuImages(encoder.preprocess, device, DecodeLimits(draft=True), decoder=decoder,
                       decode_threads=decode_threads, resize=resize)  # fmt: skip
    warm = [str(f) for f in files[: batch * decode_threads]]  # a batch per decoder
    embed_files(warm, encoder, images, out / "warm", batch_size=batch)
    busy = {"decode": 0.0, "resize": 0.0, "encode": 0.0}  # each stage's thread: the busiest sets the pace
    launches = contextlib.ExitStack()
    launch_s = launches.enter_context(_launches())  # before `_busy` takes the bound method
    images.decode, images.finish = _busy(images.decode, busy, "decode"), _busy(images.finish, busy, "resize")
    encoder.launch, take = _busy(encoder.launch, busy, "encode"), PendingVectors.result
    PendingVectors.result = _busy(take, busy, "encode")
    done, seen = {}, {}

    def run() -> None:
        start, cpu = time.perf_counter(), time.thread_time()  # the loop runs in this thread
        done["result"] = embed_files([str(f) for f in files], encoder, images, out / decoder, batch_size=batch,
                                     reader=reader, in_flight=in_flight)  # fmt: skip
        end, done["cpu_s"] = time.perf_counter(), time.thread_time() - cpu
        done["seconds"] = end - start
        seen["launch_ms"], seen["edges"] = _launch_ms(launch_s), _run_edges(launch_s, start, end)

    try:
        if timeline is not None:
            from benchmarks.cuda_timeline import record

            seen["timeline"] = record(run, timeline, device.type == "cuda")
        else:
            with StackSampler() if sample else contextlib.nullcontext() as sampler:
                run()
            if sample:
                seen["threads_pct"] = sampler.top()
    finally:
        del images.decode, images.finish, encoder.launch
        PendingVectors.result = take
        launches.close()
    shutil.rmtree(out, ignore_errors=True)
    result, seconds = done["result"], done["seconds"]
    if steady:
        small = files[: len(files) // 5]
        with _launches() as small_calls:
            start, cpu = time.perf_counter(), time.thread_time()
            embed_files([str(f) for f in small], encoder, images, out / "small", batch_size=batch, reader=reader,
                        in_flight=in_flight)  # fmt: skip
            end, fixed_cpu = time.perf_counter(), time.thread_time() - cpu
        fixed = end - start
        shutil.rmtree(out, ignore_errors=True)
        seen["steady_images_per_s"] = (len(files) - len(small)) / (seconds - fixed) if seconds > fixed else None
        seen["small_run"] = {"images": len(small), "seconds": round(fixed, 2),
                             "edges": _run_edges(small_calls, start, end)}  # fmt: skip
        # the loop's own thread: the serial part of the worker, against (e)'s runner thread
        seen["loop_thread_cpu_us_per_image"] = _cpu_us(done["cpu_s"], len(files), fixed_cpu, len(small))
    return {"images": result.embedded, "images_per_s": result.embedded / seconds, "on_gpu": result.on_gpu,
            "dead_lettered": result.dead_lettered, "decoder": decoder, "reader": reader, "in_flight": in_flight,
            # batches retried in halves or taken in pieces: out of memory, say, which a variant's rate would hide
            "batches_retried": result.batches_retried, "batches_in_pieces": result.batches_in_pieces,
            "ring_page_locked": result.ring_page_locked, "ring_page_lock_s": result.ring_page_lock_s,
            "ring_page_lock_longest_call_s": result.ring_page_lock_longest_s,
            # what the run's end waited for: part of `edges`' after_last_launch_s
            "end_s": {name: None if value is None else round(value, 3) for name, value in (
                ("reader_close", result.reader_close_s), ("ring_page_unlock", result.ring_page_unlock_s),
                ("shards_close", result.shards_close_s))},
            "decode_threads": decode_threads, "resize": resize, "busy_pct": {k: round(100 * v / seconds) for k, v in busy.items()},
            **seen}  # fmt: skip


def _busy(fn, totals: dict, name: str):
    """`fn`, adding its wall time to `totals[name]` (decode: route + decoders; resize: its launches + CPU
    fallback; encode: launching the model and waiting for the vectors on the host), and named `name` in a
    profiler's trace (which names each thread after the stage it runs: `benchmarks.cuda_timeline`)."""

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            with torch.profiler.record_function(name):
                return fn(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - start

    return timed


@contextlib.contextmanager
def _launches():
    """Every `ImageEncoder.launch` while inside: when each call began (`time.perf_counter`) and its wall time,
    seconds, appended to the list it yields. A launch is the model's host calls and the waits for the interpreter
    lock between them (beside a thread that runs pure Python each call into torch may wait a switch interval:
    `model_gil.py`): (d)'s against (e)'s tell a GPU fed late because the model's thread waited for the lock from one
    held up elsewhere."""
    calls, launch = [], model_module.ImageEncoder.launch

    @functools.wraps(launch)
    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return launch(self, *args, **kwargs)
        finally:
            calls.append((start, time.perf_counter() - start))

    model_module.ImageEncoder.launch = timed
    try:
        yield calls
    finally:
        model_module.ImageEncoder.launch = launch


def _run_edges(calls: list[tuple[float, float]], start: float, end: float, after: float = 0.0) -> dict:
    """Where a run's fixed cost lies, from its launches (`_launches`) and its start and end (`time.perf_counter`):
    from `after` seconds into it to its first launch (the first batch at the GPU: the readers' and decoders' start,
    the first reads; (e) counts from its pipeline's start, past the load and its compile on zeros), and from its
    last launch's return to its end (the last batches on the GPU, the shards' close, the readers' and decoders'
    stop)."""
    began = [at for at, _ in calls if start + after <= at <= end]
    if not began:
        return {}
    last = max(at + seconds for at, seconds in calls if at <= end)
    return {"to_first_launch_s": round(min(began) - start - after, 3), "after_last_launch_s": round(end - last, 3)}


def _launch_ms(calls: list[tuple[float, float]]) -> dict:
    """The launches' wall time per batch, ms: mean, median and 90th percentile."""
    if not calls:
        return {}
    ms = 1000 * np.asarray([seconds for _, seconds in calls])
    return {"launches": len(ms), "mean": round(float(ms.mean()), 2), "p50": round(float(np.median(ms)), 2),
            "p90": round(float(np.percentile(ms, 90)), 2)}  # fmt: skip


def _cpu_us(whole_s: float, whole_n: int, small_s: float, small_n: int) -> dict:
    """A thread's CPU time per image, µs: over the whole run, and in steady state (the whole run less the small)."""
    steady = (whole_s - small_s) / (whole_n - small_n) if whole_n > small_n else None
    return {"whole": round(1e6 * whole_s / whole_n, 1), "steady": None if steady is None else round(1e6 * steady, 1)}


def stages(files: list[Path], encoder, device: torch.device, decoder: str, batch: int) -> dict:
    """Each stage of (d) alone, so the slowest is visible: read + hash (plain threads, and both file readers with
    routing), the GPU decoder alone (from bytes, and from page-locked memory), routing + decode, resize alone (on
    images decoded before, and on a batch of one size), decode + resize in one thread; then 1,000 progressive JPEGs
    decoded + resized as routed and forced onto the GPU decoder."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    from encoder.gpu_images import DECODERS, GpuImages
    from pipelines.file_reader import ProcessReader, ThreadReader

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return len(files) / (time.perf_counter() - start)

    with ThreadPoolExecutor(8) as pool:
        read = timed(lambda: list(pool.map(lambda f: hashlib.sha256(f.read_bytes()).digest(), files)))
    read_routed = {name: _read_rate(kind, [str(f) for f in files], batch) for name, kind in
                   (("threads", ThreadReader), ("processes", ProcessReader))}  # fmt: skip
    datas = [f.read_bytes() for f in files]
    batches = [datas[i : i + batch] for i in range(0, len(datas), batch)]
    locked = _page_locked(batches, device)  # the same bytes in page-locked memory, as the readers' ring is
    decode = DECODERS[decoder](device)
    decode(batches[0], device)  # warm-up
    images = GpuImages(encoder.preprocess, device, DecodeLimits(draft=True), decoder=decoder)
    images.prepare(batches[0])
    decoded = []
    uniform = [torch.full((3, 480, 640), 128, dtype=torch.uint8, device=device)] * batch  # a catalog of one size
    rates = {"read_and_hash_per_s": read, **{f"read_hash_route_{k}_per_s": v for k, v in read_routed.items()},
             "decode_per_s": timed(lambda: [decode(b, device) for b in batches]),
             "decode_page_locked_per_s": timed(lambda: [decode(b, device) for b in locked]),
             "route_and_decode_per_s": timed(lambda: decoded.extend(images.decode(b) for b in batches)),
             "resize_per_s": timed(lambda: [images.finish(d) for d in decoded]),
             "resize_uniform_480x640_per_s": timed(lambda: [resize_like_pil(uniform, images.preprocess)
                                                             for _ in batches]),
             "decode_and_resize_per_s": timed(lambda: [images.prepare(b) for b in batches])}  # fmt: skip
    with ThreadPoolExecutor(8) as pool:
        progressive = list(pool.map(_progressive, datas[:1000]))
    rates.update(_progressive_rates(progressive, encoder.preprocess, device, decoder, batch))
    return {**rates, "images": len(files), "decoder": decoder, "images_per_s": None}


def _page_locked(batches: list[list[bytes]], device: torch.device) -> list[list[np.ndarray]]:
    """Each batch's images as views of one page-locked buffer (on a CUDA device; plain memory elsewhere)."""
    from encoder.page_lock import host_copies

    views = iter(host_copies([data for batch in batches for data in batch], device.type == "cuda"))
    return [[next(views) for _ in batch] for batch in batches]


def _progressive(data: bytes) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buffer, "JPEG", quality=90, progressive=True)
    return buffer.getvalue()


def _progressive_rates(datas: list[bytes], preprocess, device: torch.device, decoder: str, batch: int) -> dict:
    """Progressive JPEGs decoded and resized as routed (torchvision's nvJPEG: on the CPU threads, 8 as
    `GpuImages` has by default and 16), and forced onto the GPU decoder: what decides their route
    (`encoder.gpu_images.batches_progressive`) and how many CPU threads it needs."""
    from encoder.gpu_images import DECODERS, GpuImages

    batches = [datas[i : i + batch] for i in range(0, len(datas), batch)]
    rates = {}
    ways = (
        ("as_routed", decoder, 8),
        ("as_routed_16_cpu_threads", decoder, 16),
        ("forced_onto_gpu", DECODERS[decoder](device), 8),  # a callable decoder has no routing exception
    )
    for name, how, threads in ways:
        images = GpuImages(preprocess, device, DecodeLimits(draft=True), decoder=how, cpu_threads=threads)
        images.prepare(batches[0])  # warm-up
        start = time.perf_counter()
        on_gpu = sum(images.prepare(b).on_gpu for b in batches)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates[f"progressive_{name}_per_s"] = len(datas) / (time.perf_counter() - start)
        rates[f"progressive_{name}_on_gpu"] = on_gpu
    return rates


def _read_rate(kind, paths: list[str], batch: int) -> float:
    """Files/s through a file reader (read, sha256, route), started and warmed before the clock."""
    from pipelines.file_reader import ReadLimits

    with kind(ReadLimits.of(DecodeLimits())) as reader:
        for _ in reader.read(paths[: 2 * batch], batch):  # each batch dropped as the next comes: its slots free
            pass
        start = time.perf_counter()
        for _ in reader.read(paths, batch):
            pass
        return len(paths) / (time.perf_counter() - start)


def cold_end_to_end(files, ckpt: Path, device: torch.device, decoder: str, out: Path, batch: int, compile_: bool):
    from encoder.gpu_images import GpuImages
    from pipelines.direct_embed import embed_files

    start = time.perf_counter()
    encoder = load_encoder(EncoderConfig(model=str(ckpt), device=device.type, batch_size=batch, compile=compile_))
    images = GpuImages(encoder.preprocess, device, DecodeLimits(draft=True), decoder=decoder)
    result = embed_files([str(f) for f in files], encoder, images, out, batch_size=batch)
    seconds = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return {"images": result.embedded, "images_per_s": result.embedded / seconds, "decoder": decoder}


def beam(folder: Path, ckpt: Path, device: torch.device, out: Path, batch: int, compile_: bool, count: int,
         sample: bool = False, decoder: str = "nvjpeg", cuda_graph: bool = False, workers: int = 1,
         missing_every: int = 0) -> dict:  # fmt: skip
    """The whole run, then steady state: the whole run less a run over 1% of the files (mostly start-up).
    Also the whole run less its model load (`time_s`), the compile included: (d) is measured without either.
    `missing_every`: the whole run's catalog is a manifest of the files with an item whose image is missing after
    every so many, dead letters in the fetch step: its chunks reach the embed step short of a batch, so most images
    wait there for the next chunk, copied off the file readers' ring (page-locked on a GPU), as wherever a catalog
    has dead letters or reuses vectors.

    The small run goes second, so it finds the compile cache the first one warmed: its fixed cost is if
    anything under-stated, and so is the steady rate.
    """
    from pipelines.embed import EmbedConfig, run_embed

    gpu = "on" if device.type == "cuda" else "off"

    def timed(pattern: str, expected: int) -> tuple[float, dict]:
        cfg = EmbedConfig(catalog=pattern, model=str(ckpt), out=str(out), batch_size=batch, device=device.type,
                          compile=compile_, cuda_graph=cuda_graph, gpu_decode=gpu, gpu_decoder=decoder,
                          incremental=False, workers=workers)  # fmt: skip
        stages: list[tuple[str, float]] = []
        with _launches() as calls, bundles_timed(stages):
            start, cpu = time.perf_counter(), time.thread_time()  # the local runner runs bundles in this thread
            result = run_embed(cfg)
            end, cpu = time.perf_counter(), time.thread_time() - cpu
        shutil.rmtree(out, ignore_errors=True)
        assert result.counts["embedded"] == expected, result.counts
        split = dict(result.manifest["time_s"])  # where it went: prepare (model load), pipeline, accounting
        # the first batch at the GPU counted from the pipeline's start (past the load's compile on zeros)
        split.update(_run_edges(calls, start, end, after=split.get("prepare") or 0.0))
        # the pipeline's stages in the order the local runner ran them: the embedding one and Beam's others
        split["stages_s"] = [[("embedding: " if "Embed-images" in name else "") + stage_label(name), round(s, 3)]
                             for name, s in stages]  # fmt: skip
        return end - start, split, cpu, calls

    if sample:  # a profiled whole run alone: where the pipeline's threads spend it
        with StackSampler() as sampler:
            seconds, *_ = timed(str(folder / "*" / "*.jpg"), count)
        return {"images": count, "images_per_s": count / seconds, "threads_pct": sampler.top(8)}
    whole, whole_split, whole_cpu, launch_s = timed(_with_missing(folder, missing_every) if missing_every
                                                    else str(folder / "*" / "*.jpg"), count)  # fmt: skip
    small = sorted(folder.glob("*/*.jpg"))[: max(1, count // 100)]
    (folder.parent / "small").mkdir(exist_ok=True)
    for f in small:
        shutil.copy(f, folder.parent / "small")
    fixed, fixed_split, fixed_cpu, _ = timed(str(folder.parent / "small" / "*.jpg"), len(small))
    load = whole_split.get("model_load")  # with the compile, which (d) is measured without, as the issue asks
    return {"images": count, "images_per_s": count / whole, "whole_s": round(whole, 1), "whole_time_s": whole_split,
            # the model's launches in the whole run (the load's compile on zeros included: one of many), and the
            # runner's thread: its CPU per image is the pipeline's serial part, against (d)'s loop thread
            "launch_ms": _launch_ms(launch_s),
            "runner_thread_cpu_us_per_image": _cpu_us(whole_cpu, count, fixed_cpu, len(small)),
            "less_model_load_images_per_s": count / (whole - load) if load is not None and whole > load else None,
            "steady_images_per_s": (count - len(small)) / (whole - fixed) if whole > fixed else None,
            "small_run": {"images": len(small), "seconds": round(fixed, 1), "time_s": fixed_split}, "gpu_decode": gpu,
            "decoder": decoder, "cuda_graph": cuda_graph, "workers": workers,
            "missing": count // missing_every if missing_every else 0}  # fmt: skip


def _with_missing(folder: Path, every: int) -> str:
    """A Parquet manifest of the JPEGs under `folder` (item id: the file's stem) with an item whose image does not
    exist after every `every` of them; its path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids, uris = [], []
    for k, f in enumerate(sorted(folder.glob("*/*.jpg")), 1):
        ids.append(f.stem)
        uris.append(str(f))
        if k % every == 0:
            ids.append(f"missing-{k}")
            uris.append(str(folder / "missing" / f"{k}.jpg"))
    manifest = folder.parent / f"with-missing-{every}.parquet"
    pq.write_table(pa.table({"item_id": ids, "image_uri": uris}), manifest)
    return str(manifest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--naive-images", type=int, default=500)  # (a) runs ~100 images/s: 5 s
    parser.add_argument("--so400m-images", type=int, default=5_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--timeline-images", type=int, default=4096)
    parser.add_argument("--large-images", type=int, default=512, help="the `large` path's 12-MP photos")
    parser.add_argument("--paths", default="c,d,backends,decode-sms,unpinned,damaged,all-extensions,d-again,decoder-life,b,a,e,e-before,e-reads-before,e-missing,"
                        "timeline,"
                        "streams,decode-threads,prealloc,nomodel,freezing,"
                        "patch-conv,gelu-separate,hf-tower,resize-channels,resize-kernel,pixels,so400m,profile,graph,mfu,stages,switch,e2,large",
                        help="which paths, in order")  # fmt: skip
    parser.add_argument("--trace-dir", help="keep the `timeline` path's traces here (.json.gz, for Perfetto)")
    parser.add_argument("--json", help="write results here as they land")
    parser.add_argument("--smoke", action="store_true", help="tiny model, few small files, CPU")
    args = parser.parse_args()
    smoke = args.smoke
    if smoke:  # Triton's kernels through its interpreter (`resize-kernel`: the path's wiring, not its speed), set
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports `triton.language`
    if not smoke and not torch.cuda.is_available():
        sys.exit("error: needs CUDA (or pass --smoke)")
    device = torch.device("cpu" if smoke else "cuda")
    count, width = (64, 160) if smoke else (args.images, 640)
    batch, seconds, compile_ = (16, 1.0, False) if smoke else (args.batch_size, args.seconds, True)
    # nvimgcodec-python: the package's own binding, to measure ours (encoder/nvimgcodec.py) against
    decoders = ["pil"] if smoke else ["nvjpeg"] + (["nvimgcodec", "nvimgcodec-python"] if _has_nvimgcodec() else [])
    auto_decoder = "nvimgcodec" if "nvimgcodec" in decoders else "nvjpeg"  # what `--gpu-decoder auto` takes
    work = Path(tempfile.mkdtemp(prefix="lookalike-gpu-embed-"))
    run = Run(args.json)
    try:
        start = time.perf_counter()
        files = _make_images(work / "jpegs", count, width)
        mean_kb = np.mean([f.stat().st_size for f in files]) / 1024
        gpu_name = torch.cuda.get_device_name() if device.type == "cuda" else "none"
        print(f"machine: {machine()}; GPU: {gpu_name}; torch {torch.__version__}")
        print(f"{len(files):,} JPEGs, {width} px wide, quality 90, mean {mean_kb:.0f} KB, "
              f"made in {time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip
        base = "smoke" if smoke else "base16-224"
        ckpt = _checkpoint(work / base, SHAPES[base])
        encoder = None
        uses_c = ("stages", "d", "streams", "decode-threads", "switch", "profile", "timeline", "prealloc", "large",
                  "unpinned", "damaged", "backends", "all-extensions", "decode-sms", "d-again", "resize-kernel")  # fmt: skip
        for path in args.paths.split(","):
            if path in uses_c and encoder is None:  # these use (c)'s encoder
                encoder = encoder_alone(ckpt, SHAPES[base], device, batch, seconds, compile_)[1]
            if path == "c":
                encoder = run.path(ENCODER_ALONE, encoder_alone, ckpt,
                                   SHAPES[base], device, batch, seconds, compile_)  # fmt: skip
            elif path == "d":
                for decoder in decoders:
                    run.path(END_TO_END.format(decoder=decoder), end_to_end, files, encoder,
                             device, decoder, work / "d", batch, False, "processes", 2, None, 1, True)  # fmt: skip
                run.path(f"(d) the same, reading in threads (before: no reader processes), {decoders[0]}",
                         end_to_end, files, encoder, device, decoders[0], work / "d", batch, False, "threads")  # fmt: skip
                run.path(f"(d) the same, one batch at a time on the model (before: none in flight), {decoders[0]}",
                         end_to_end, files, encoder, device, decoders[0], work / "d", batch, False, "processes", 1)  # fmt: skip
                run.path(f"(d, cold) the same with model load + compile, {decoders[0]}", cold_end_to_end, files,
                         ckpt, device, decoders[0], work / "dc", batch, compile_)  # fmt: skip
            elif path == "prealloc" and _has_nvimgcodec():  # nvImageCodec's hardware decoder, its memory set aside
                from encoder.gpu_images import DECODERS, nvimgcodec_decoder

                options = (f":fancy_upsampling=0 nvjpeg_hw_decoder:preallocate_batch_size={batch} "
                           f"nvjpeg_hw_decoder:preallocate_width_hint={width} "
                           f"nvjpeg_hw_decoder:preallocate_height_hint={width * 3 // 2}")  # fmt: skip
                with mock.patch.dict(DECODERS, {"nvimgcodec": functools.partial(nvimgcodec_decoder, options=options)}):
                    run.path("(d) nvImageCodec's hardware decoder with memory for a batch set aside up front, "
                             "nvimgcodec", end_to_end, files, encoder, device, "nvimgcodec", work / "d", batch)  # fmt: skip
            elif path == "d-again":  # the product's (d) once more, after the variants: how far the run has drifted
                for decoder in decoders[:2]:  # (run E: the product's first rows ran up to 14% below later twins)
                    run.path(f"(d) again, after the variants (the run's drift), {decoder}", end_to_end, files,
                             encoder, device, decoder, work / "d", batch, False, "processes", 2, None, 1, True)  # fmt: skip
            elif path == "decoder-life":  # what (e) pays per run that (d)'s warmed decoders do not: their start and end
                life = decoders[0] if smoke else auto_decoder  # Pillow's stand-in in --smoke
                run.path(f"a fresh GpuImages: made, its first batch cold and warmed up, closed, {life}", decoder_life,
                         files, encoder, device, life, work / "life", batch)  # fmt: skip
            elif path == "unpinned":  # (d) with the reader processes' ring left pageable, as before it was page-locked
                from pipelines import direct_embed

                with mock.patch.object(direct_embed, "page_locker", lambda device: None):
                    for decoder in decoders[:2]:
                        run.path(f"(d) the file readers' ring pageable (before), {decoder}", end_to_end, files,
                                 encoder, device, decoder, work / "d", batch)  # fmt: skip
            elif path == "damaged":  # (d) with a few JPEGs damaged past the route: what one costs its batch
                every = 16 if smoke else DAMAGED_EVERY
                mixed, damaged = _damaged(files, work / "damaged", every)
                for decoder in decoders[:2]:
                    run.path(f"(d) one file in {every} damaged past the route ({damaged} files), {decoder}",
                             end_to_end, mixed, encoder, device, decoder, work / "d", batch)  # fmt: skip
            elif path == "backends" and (smoke or "nvimgcodec" in decoders):  # nvImageCodec's decoders by kind
                from encoder.gpu_images import DECODERS, nvimgcodec_decoder

                kinds = {"all": None, "cpu": ("cpu",)} if smoke else DECODER_KINDS  # its CPU backend in smoke
                every = 16 if smoke else DAMAGED_EVERY
                mixed, damaged = _damaged(files, work / "damaged", every)
                part = min(len(files), 5000)  # in page-locked memory, as the ring is
                some = sum(m != f for m, f in zip(mixed[:part], files[:part], strict=True))
                run.path(f"nvImageCodec's decode alone, by kind of decoder; clean, and one file in {every} damaged "
                         f"({some} files)", decode_kinds, files[:part], mixed[:part], device, batch, kinds)  # fmt: skip
                traces = Path(args.trace_dir) if args.trace_dir else work / "traces"
                for name, backends in list(kinds.items())[1:]:  # in --smoke its CPU backend, as (d) on the CPU
                    kind = {"nvimgcodec": functools.partial(nvimgcodec_decoder, backends=backends)}
                    with mock.patch.dict(DECODERS, kind):
                        for what, these in (("", files), (f", one file in {every} damaged", mixed)):
                            run.path(f"(d) nvImageCodec's {name} alone{what}, nvimgcodec", end_to_end, these,
                                     encoder, device, "nvimgcodec", work / "d", batch)  # fmt: skip
                        # Its streams and kernels as the GPU sees them, beside the product's in the `timeline` path
                        run.path(f"(d) timeline (under the profiler), nvImageCodec's {name} alone, nvimgcodec",
                                 end_to_end, files[: args.timeline_images], encoder, device, "nvimgcodec", work / "d",
                                 batch, False, "processes", 2,
                                 traces / f"d-nvimgcodec-{'-'.join(backends)}.json.gz")  # fmt: skip
            elif path == "decode-sms":  # the model kept off some SMs: the decode and resize kernels need not wait
                decoder, traces = decoders[:2][-1], Path(args.trace_dir) if args.trace_dir else work / "traces"
                for spare in DECODE_SMS:
                    run.path(f"(c) the model kept off {spare} SMs (--decode-sms {spare}), batch {batch}", on_sm_share,
                             spare, encoder, encoder_steps, encoder, SHAPES[base], device, seconds / 2)  # fmt: skip
                    run.path(f"(d) the model kept off {spare} SMs for decode and resize (--decode-sms {spare}), "
                             f"{decoder}", on_sm_share, spare, encoder, end_to_end, files, encoder, device, decoder,
                             work / "d", batch)  # fmt: skip
                run.path(f"(d) timeline (under the profiler), the model kept off {DECODE_SMS[1]} SMs, {decoder}",
                         on_sm_share, DECODE_SMS[1], encoder, end_to_end, files[: args.timeline_images], encoder,
                         device, decoder, work / "d", batch, False, "processes", 2,
                         traces / f"d-{decoder}-decode-sms-{DECODE_SMS[1]}.json.gz")  # fmt: skip
            elif path == "all-extensions" and "nvimgcodec" in decoders:  # nvImageCodec with every extension, as before
                import encoder.nvimgcodec as nvic

                run.path("nvImageCodec's decoder made: JPEG decoders only (now) against every extension (before)",
                         codec_setup, device)  # fmt: skip
                with mock.patch.object(nvic, "default_extensions", lambda device, extensions: None):
                    run.path("(d) every nvImageCodec extension loaded (before), nvimgcodec", end_to_end, files,
                             encoder, device, "nvimgcodec", work / "d", batch)  # fmt: skip
                    mixed, damaged = _damaged(files, work / "damaged", DAMAGED_EVERY)
                    run.path(f"(d) one file in {DAMAGED_EVERY} damaged past the route ({damaged} files), every "
                             "nvImageCodec extension loaded (before), nvimgcodec", end_to_end, mixed, encoder, device,
                             "nvimgcodec", work / "d", batch)  # fmt: skip
            elif path == "nomodel":  # (d) with a constant for the tower: what decode + resize reach beside threads
                stand_in = _without_model(ckpt, device, batch)
                for decoder in decoders[:2]:
                    run.path(f"(d) the model stood in by a constant, {decoder}", end_to_end, files, stand_in, device,
                             decoder, work / "d", batch)  # fmt: skip
                stand_in = None
            elif path == "streams":  # (d) with other CUDA streams than the product's (encoder.gpu_stream)
                for what, factories in STREAM_VARIANTS:
                    for decoder in decoders[:2]:
                        with mock.patch.multiple(gpu_stream, **factories):
                            run.path(f"(d) {what}, {decoder}", end_to_end, files, encoder, device, decoder,
                                     work / "d", batch)  # fmt: skip
            elif path == "decode-threads":  # (d) with several decode threads, a decoder and side stream each
                for threads in (2, 3):
                    for decoder in decoders[:2]:
                        run.path(f"(d) {threads} decode threads, a decoder and stream each, {decoder}",
                                 functools.partial(end_to_end, decode_threads=threads), files, encoder, device,
                                 decoder, work / "d", batch)  # fmt: skip
                with mock.patch.multiple(gpu_stream, resize_stream=_own_stream):
                    run.path(f"(d) 2 decode threads and the resize on a stream of its own, {decoders[:2][-1]}",
                             functools.partial(end_to_end, decode_threads=2), files, encoder, device,
                             decoders[:2][-1], work / "d", batch)  # fmt: skip
            elif path == "timeline":  # (c), and (d) on part of the files, recording the GPU's timeline and calls
                traces = Path(args.trace_dir) if args.trace_dir else work / "traces"
                run.path("(c) timeline (under the profiler): the model's kernels", encoder_timeline, encoder,
                         SHAPES[base], device, 8, traces / "c.json.gz")  # fmt: skip
                part = files[: args.timeline_images]
                for what, factories in [("the product's streams", {}), *STREAM_VARIANTS]:
                    for decoder in decoders[:2] if not factories else decoders[:2][-1:]:  # the default one
                        name = f"{decoder}-{'-'.join(sorted(factories)) or 'product'}".replace("_", "-")
                        with mock.patch.multiple(gpu_stream, **factories) if factories else contextlib.nullcontext():
                            run.path(f"(d) timeline (under the profiler), {what}, {decoder}", end_to_end, part,
                                     encoder, device, decoder, work / "d", batch, False, "processes", 2,
                                     traces / f"d-{name}.json.gz")  # fmt: skip
                run.path(f"(d) timeline (under the profiler), 2 decode threads, {decoders[:2][-1]}", end_to_end,
                         part, encoder, device, decoders[:2][-1], work / "d", batch, False, "processes", 2,
                         traces / f"d-{decoders[:2][-1]}-2-decode-threads.json.gz", 2)  # fmt: skip
            elif path == "freezing" and compile_:  # weights as constants: Q, K and V (one input) in one GEMM
                torch.compiler.reset()
                run.path(f"(c) MFU: batch {batch}, compiled frozen (--compile-frozen)", encoder_alone, ckpt,
                         SHAPES[base], device, batch, seconds, compile_, None, False, True)  # fmt: skip
            elif path in BEFORE_MODEL_CHANGES:  # (c) and (d) with a change to the tower switched off, as before it
                switch, what = BEFORE_MODEL_CHANGES[path]
                torch.compiler.reset()
                with mock.patch.object(model_module, switch, False):
                    before = run.path(f"(c) {what} (before), batch {batch}", encoder_alone, ckpt, SHAPES[base],
                                      device, batch, seconds, compile_)  # fmt: skip
                if before is not None:
                    run.path(f"(d) {what} (before), {decoders[:2][-1]}", end_to_end, files, before, device,
                             decoders[:2][-1], work / "d", batch)  # fmt: skip
                before = None
            elif path == "resize-channels":  # nvImageCodec's batches resized channel by channel, as before
                before = functools.partial(resize_like_pil, interleaved=False)
                with mock.patch.object(gpu_images, "resize_like_pil", before):
                    run.path(f"(d) the resize channel by channel (before), {decoders[:2][-1]}", end_to_end, files,
                             encoder, device, decoders[:2][-1], work / "d", batch)  # fmt: skip
            elif path == "resize-kernel":  # `--gpu-resize kernel`: two Triton kernels gathering the taps
                # In --smoke a short batch of 4: Triton's interpreter takes ~3 s per image here (the wiring is what
                # counts; a short batch is the padded case, and 4 keeps the kernels' arrays as a full batch's)
                some = files[:4] if smoke else files
                for decoder in decoders[:2]:  # nvJPEG's planes and nvImageCodec's interleaved pixels
                    run.path(KERNEL_RESIZE.format(decoder=decoder),
                             functools.partial(end_to_end, resize="kernel"), some, encoder, device, decoder,
                             work / "d", batch)  # fmt: skip
            elif path == "pixels":  # what compiling the normalisation into the step saves per batch
                run.path(f"(c) the step's pixel normalisation alone, batch {batch}, compiled (eager beside it)",
                         pixel_normalisation, ckpt, SHAPES[base], device, batch, seconds / 4)  # fmt: skip
            elif path == "mfu":  # (c) at twice the batch, and under the autotuning compile modes
                variants = [(2 * batch, None)]
                if compile_:
                    variants += [(batch, "max-autotune-no-cudagraphs"), (batch, "max-autotune")]
                for size, mode in variants:
                    torch.compiler.reset()
                    run.path(f"(c) MFU: batch {size}, compile mode {mode or 'default'}", encoder_alone, ckpt,
                             SHAPES[base], device, size, seconds, compile_, mode)  # fmt: skip
                # Attention through cuDNN's kernels instead of those SDPA picks (on the CPU: its reference kernel).
                backend = "CUDNN_ATTENTION" if device.type == "cuda" else "MATH"
                torch.compiler.reset()
                run.path(f"(c) MFU: batch {batch}, attention through {backend}", _under_sdpa_backend, backend,
                         encoder_alone, ckpt, SHAPES[base], device, batch, seconds, compile_)  # fmt: skip
            elif path == "graph":  # (c) and (d) with the model's step replayed as one CUDA graph per batch
                graphed = run.path("(c) encoder alone, one CUDA graph per batch", encoder_alone, ckpt, SHAPES[base],
                                   device, batch, seconds, compile_, None, True)  # fmt: skip
                for decoder in decoders[:2] if graphed is not None else []:
                    run.path(f"(d) end to end, one CUDA graph per batch, {decoder}", end_to_end, files, graphed,
                             device, decoder, work / "d", batch)  # fmt: skip
                graphed = None
                # Beam's runner thread runs Python beside the model's: where fewer handovers should count most.
                run.path(f"(e) Beam embed pipeline, local runner, one CUDA graph per batch, {auto_decoder}", beam,
                         work / "jpegs", ckpt, device, work / "e", batch, compile_, len(files), False, auto_decoder,
                         device.type == "cuda")  # fmt: skip
            elif path == "stages":
                for decoder in decoders:
                    run.path(f"stages of (d) alone, {decoder}", stages, files[:5000], encoder, device, decoder, batch)
            elif path == "b":
                workers = 2 if smoke else os.cpu_count() or 1
                run.path(f"(b) DataLoader, {workers} workers PIL + draft, bf16 SDPA", dataloader, files, ckpt,
                         device, batch, workers)  # fmt: skip
            elif path == "a":
                run.path("(a) naive: HF image processor + fp32 eager, one process", naive,
                         files[: args.naive_images], ckpt, device)  # fmt: skip
            elif path == "e":
                for decoder in ["nvjpeg", "nvimgcodec"] if "nvimgcodec" in decoders else ["nvjpeg"]:
                    run.path(f"(e) Beam embed pipeline, local runner, {decoder}", beam, work / "jpegs", ckpt,
                             device, work / "e", batch, compile_, len(files), False, decoder)  # fmt: skip
            elif path == "e-before":  # (e) with its tables of vectors as before (benchmarks.beam_before)
                from benchmarks.beam_before import tables_as_before

                with tables_as_before():
                    run.path(f"(e) Beam, tables encoded in the runner's thread and pickled to be sized (before), "
                             f"{auto_decoder}", beam, work / "jpegs", ckpt, device, work / "e", batch, compile_,
                             len(files), False, auto_decoder)  # fmt: skip
            elif path == "e-reads-before":  # (e) with each chunk's reads waited for (benchmarks.beam_before)
                from benchmarks.beam_before import reads_as_before

                with reads_as_before():
                    run.path(f"(e) Beam, each chunk of files read while the runner's thread waits (before), "
                             f"{auto_decoder}", beam, work / "jpegs", ckpt, device, work / "e", batch, compile_,
                             len(files), False, auto_decoder)  # fmt: skip
            elif path == "e-missing":  # (e) with a few images missing: most images wait, copied off the ring
                every = 16 if smoke else 100
                run.path(f"(e) Beam, one item in {every + 1} with its image missing, {auto_decoder}", beam,
                         work / "jpegs", ckpt, device, work / "e", batch, compile_, len(files), False, auto_decoder,
                         False, 1, every)  # fmt: skip
            elif path == "e2":  # a second worker process on the same GPU: is one interpreter lock what caps (e)?
                run.path("(e) Beam, 2 worker processes on the one GPU (two model copies, two interpreter locks), "
                         f"{auto_decoder}", beam, work / "jpegs", ckpt, device, work / "e", batch, compile_, len(files),
                         False, auto_decoder, False, 2)  # fmt: skip
            elif path == "switch":  # (d) and (e) with threads handing over the GIL every 0.5 ms instead of 5
                interval = sys.getswitchinterval()
                sys.setswitchinterval(0.0005)
                try:
                    for decoder in decoders:
                        run.path(f"(d) GIL switch interval 0.5 ms, {decoder}", end_to_end, files, encoder, device,
                                 decoder, work / "d", batch)  # fmt: skip
                    # (e)'s steady rate stayed at run D's (6,215 against 6,293) while (d)'s grew: is it Beam's Python
                    # beside the model's launches (`model_gil.py`: a pure-Python thread starves them)?
                    run.path(f"(e) Beam, GIL switch interval 0.5 ms, {auto_decoder}", beam, work / "jpegs", ckpt,
                             device, work / "e", batch, compile_, len(files), False, auto_decoder)  # fmt: skip
                finally:
                    sys.setswitchinterval(interval)
            elif path == "profile":  # (d) and (e) again, sampling their threads' stacks (costs them ~1-2%)
                for decoder in decoders[:2]:
                    run.path(f"(d) profiled, {decoder}", end_to_end, files, encoder, device, decoder, work / "d",
                             batch, True)  # fmt: skip
                run.path(f"(e) profiled, {auto_decoder}", beam, work / "jpegs", ckpt, device, work / "e", batch,
                         compile_, len(files), True, auto_decoder)  # fmt: skip
            elif path == "large":  # phone photos of 12 MP: what one decode call's limit sends to the CPU threads
                large_width = 640 if smoke else 4000
                large = _make_images(work / "large", 2 * batch if smoke else args.large_images, large_width,
                                     per_process=16, grain=4.0)  # fmt: skip
                for what, limit in LARGE_VARIANTS:  # with the default decoder (Pillow's stand-in in --smoke)
                    with mock.patch.object(gpu_images, "DECODE_MAX_BYTES", limit):
                        run.path(f"(d) {large_width}-px photos, {what}, {decoders[:2][-1]}", end_to_end, large,
                                 encoder, device, decoders[:2][-1], work / "d", batch)  # fmt: skip
            elif path == "so400m" and not smoke:
                encoder = None
                torch.cuda.empty_cache()
                big = _checkpoint(work / "so400m", SHAPES["so400m14-384"])
                big_encoder = run.path("so400m/14-384 (c) encoder alone", encoder_alone, big, SHAPES["so400m14-384"],
                                       device, 128, seconds, True)  # fmt: skip
                if big_encoder is not None:
                    run.path(f"so400m/14-384 (d) end to end, {auto_decoder}", end_to_end,  # the default decoder
                             files[: args.so400m_images], big_encoder, device, auto_decoder, work / "d4", 128)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _print_table(run.results)
    print(
        "\nThe targets (one H100's), each row against them:\n"
        + "\n".join(f"- {line}" for line in verdicts(run.results))
    )


def _under_sdpa_backend(backend: str, fn, *args):
    """`fn(*args)` with attention (`scaled_dot_product_attention`) held to one of torch's `SDPBackend`s."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(getattr(SDPBackend, backend)):
        return fn(*args)


def _without_model(ckpt: Path, device: torch.device, batch: int):
    """An encoder whose tower returns a constant: the stream's threads, readers and writer as in (d), with the
    model's share of the GPU and its launches taken out."""
    from benchmarks.worker_overhead import ConstantModel

    encoder = load_encoder(EncoderConfig(model=str(ckpt), device=device.type, batch_size=batch))
    encoder.vision_model = ConstantModel(encoder.vision_model.config).to(device)
    return encoder


def _own_stream(device: torch.device, *_) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def _high_priority_stream(device: torch.device, *_) -> torch.cuda.Stream:
    return torch.cuda.Stream(device, priority=-1)


# The `large` path's variants: (what, `gpu_images.DECODE_MAX_BYTES`: the decoded bytes one GPU decode call takes at
# most; None: the product's limit, by the GPU's memory, `decode_max_bytes`).
LARGE_VARIANTS = [
    ("a sixteenth of the GPU's memory per GPU decode call (the default), the rest on the CPU threads", None),
    ("1 GiB per GPU decode call (the default before), the rest on the CPU threads", 1 << 30),
    ("all on the GPU decoder (no limit)", 1 << 62),
    ("all on the CPU threads (draft)", 0),
]


# The `streams` path's variants: (what, {an `encoder.gpu_stream` factory it replaces: the replacement}).
# A stream of the pool does not wait for the legacy default stream the model runs on, nor the reverse; one at high
# priority gets the SMs' free blocks before the model's queued ones; the resize on a stream of its own lets the
# decoder's next batch start without waiting for the resize of the one before.
STREAM_VARIANTS = [
    ("the model on a stream of its own", {"model_stream": _own_stream}),
    ("decode and resize at high stream priority", {"side_stream": _high_priority_stream}),
    ("the resize on a stream of its own", {"resize_stream": _own_stream}),
    ("all three: model, decode and resize on streams of their own, decode and resize at high priority",
     {"model_stream": _own_stream, "side_stream": _high_priority_stream, "resize_stream": _high_priority_stream}),
]  # fmt: skip


def _has_nvimgcodec() -> bool:
    try:
        from nvidia import nvimgcodec  # noqa: F401
    except ImportError:
        return False
    return True


def baseline(name: str) -> str | None:
    """The path a row is a variant of, measured in the same run: (c) for (c)'s, and for (d)'s and (e)'s the
    product's (d) with the same decoder (the one its name ends with); None for the others."""
    if name.startswith("(c)"):
        return ENCODER_ALONE if name != ENCODER_ALONE else None
    if name.startswith(("(d)", "(e)")):
        base = END_TO_END.format(decoder=name.rsplit(", ", 1)[-1])
        return base if name != base else None
    return None


# The targets: (c) and so400m's (c) in images/s, MFU in %; (d) in images/s, of (c), of (b); (e) of its (d).
TARGETS = {"c": 10_500, "mfu": 45.0, "so400m_c": 600, "d": 8_500, "d_of_c": 0.8, "d_of_b": 3.0, "e_of_d": 0.8}
KERNEL_RESIZE = "(d) the resize as two gathering kernels (Triton), {decoder}"


def verdicts(results: dict[str, dict]) -> list[str]:
    """Each row that a target applies to, against it, whole run and steady state: (c); the product's (d) and (d)
    with the Triton resize, per decoder; (e) and its variants against the product's (d) with the same decoder;
    so400m's (c). A row that failed or was not run is left out."""

    def rate(name: str, key: str = "images_per_s") -> float | None:
        return (results.get(name) or {}).get(key)

    def held(value: float, target: float, text: str) -> str:
        return f"{text} (≥ {target:,g}: {'met' if value >= target else 'missed'})"

    lines = []
    c, b = rate(ENCODER_ALONE), next((v.get("images_per_s") for k, v in results.items() if k.startswith("(b)")), None)
    if c:
        mfu = rate(ENCODER_ALONE, "mfu_pct")
        lines.append(f"{ENCODER_ALONE}: " + held(c, TARGETS["c"], f"{c:,.0f} images/s")
                     + ("" if mfu is None else ", " + held(mfu, TARGETS["mfu"], f"MFU {mfu:.1f}%")))  # fmt: skip
    steady = (("images_per_s", "whole run"), ("steady_images_per_s", "steady"))
    for name in results:
        decoder = name.rsplit(", ", 1)[-1]
        if name in (END_TO_END.format(decoder=decoder), KERNEL_RESIZE.format(decoder=decoder)):
            for key, label in steady:
                if d := rate(name, key):
                    parts = [held(d, TARGETS["d"], f"{d:,.0f} images/s")]
                    parts += [held(d / c, TARGETS["d_of_c"], f"{d / c:.2f} of (c)")] if c else []
                    parts += [held(d / b, TARGETS["d_of_b"], f"{d / b:.2f}× (b)")] if b else []
                    lines.append(f"{name}, {label}: " + ", ".join(parts))
        elif name.startswith("(e)"):
            for key, label in steady:
                e, d = rate(name, key), rate(END_TO_END.format(decoder=decoder), key)
                if e and d:
                    lines.append(f"{name}, {label}: " + held(e / d, TARGETS["e_of_d"], f"{e:,.0f} images/s, "
                                                               f"{e / d:.2f} of its (d)"))  # fmt: skip
    if so400m := rate("so400m/14-384 (c) encoder alone"):
        lines.append("so400m/14-384 (c) encoder alone: " + held(so400m, TARGETS["so400m_c"], f"{so400m:,.0f} images/s"))
    return lines


def _print_table(results: dict[str, dict]) -> None:
    rates = {k: v.get("images_per_s") for k, v in results.items()}
    b = next((r for k, r in rates.items() if k.startswith("(b)") and r), None)
    print(
        "\n| path | images/s | × (b) | × its (c) or (d) | GPU util | notes |\n| --- | ---: | ---: | ---: | ---: | --- |"
    )
    for name, result in results.items():
        rate, base = rates[name], rates.get(baseline(name) or "")
        notes = {k: v for k, v in result.items() if k not in ("images_per_s", "gpu_util_pct")}
        util = result.get("gpu_util_pct")
        print(f"| {name} | {rate or 0:,.0f} | {rate / b if rate and b else 0:.2f} | "
              f"{f'{rate / base:.2f}' if rate and base else ''} | "
              f"{'' if util is None else f'{util:.0f}%'} | {json.dumps(notes)} |")  # fmt: skip


if __name__ == "__main__":
    main()
