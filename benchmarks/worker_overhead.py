"""The GPU worker's host-side ceiling, measured on the CPU: images/s when decoding and the model cost ~nothing.

    python benchmarks/worker_overhead.py [--images 6000] [--batch-size 256]

On a GPU, decode and model run asynchronously; what the host still does per image (read
and hash the file, route it by its header, batch, launch the resize, write Parquet and,
in the Beam pipeline, move elements between steps and threads) is Python that caps the
worker whatever the GPU. This measures that cap on real JPEG files (scikit-image photos,
640 px, quality 90) with the GPU decoder replaced by a stand-in that returns blank
16 × 16 images and the model by one that returns a constant vector:
  read + sha256 alone, 8 threads, a chunk of files per task;
  the standalone loop (`pipelines.direct_embed`) reading in threads, the baseline, and
  reading in reader processes (two runs of each, alternated), with the embedding
  process's own CPU time per image;
  the Beam pipeline on the local runner (its GPU worker's wiring, reader processes
  included): whole run, and steady state (the whole run less a run over 1% of the files,
  which is mostly start-up), with the same CPU-time column; and the same with each chunk of
  local files read while the runner's thread waits for it, as before reads were sent to the
  reader processes ahead (`benchmarks/beam_before.py`; two runs of each, alternated).
Every path's CPU time leaves out the reader processes': on a many-core host it is the
embedding process's own time, under one interpreter lock, that caps the worker.
Results go in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import encoder.gpu_images as gpu_images  # noqa: E402
import pipelines.embed as embed  # noqa: E402
import pipelines.embed_dofns as embed_dofns  # noqa: E402
from benchmarks.beam_before import reads_as_before  # noqa: E402
from benchmarks.common import machine  # noqa: E402
from benchmarks.gpu_embed import SHAPES, _checkpoint, _make_images  # noqa: E402
from encoder import DecodeLimits, EncoderConfig  # noqa: E402
from pipelines.direct_embed import embed_files  # noqa: E402

SIZE = 16
READS_BEFORE = ", each chunk's reads waited for (before)"


class ConstantModel(torch.nn.Module):
    """Stands in for the image tower: one cheap op, the tower's output shape."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)  # device and dtype for ImageEncoder

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        n = pixel_values.shape[0]
        shape = (n, self.config.hidden_size)
        return SimpleNamespace(pooler_output=torch.ones(shape, dtype=pixel_values.dtype, device=pixel_values.device))


def blank_decoder(device=None):
    """Stands in for nvJPEG: a blank image per input, no decoding."""
    blank = torch.zeros((3, SIZE, SIZE), dtype=torch.uint8)
    return lambda datas, device: [blank] * len(datas)


def _stub(load):
    def load_stubbed(cfg, limits=DecodeLimits()):
        encoder = load(cfg, limits)
        encoder.vision_model = ConstantModel(encoder.vision_model.config)
        return encoder

    return load_stubbed


def read_and_hash(files: list[str]) -> float:
    def chunk(paths: list[str]) -> list[str]:
        return [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths]

    with ThreadPoolExecutor(8) as pool:
        start = time.perf_counter()
        list(pool.map(chunk, [files[i : i + 16] for i in range(0, len(files), 16)]))
        return len(files) / (time.perf_counter() - start)


def direct(files: list[str], ckpt: Path, out: Path, batch: int, reader: str) -> tuple[float, float]:
    """Images/s, and this process's CPU time per image (the reader processes' time is theirs)."""
    encoder = embed.load_encoder(EncoderConfig(model=str(ckpt), device="cpu", batch_size=batch))
    images = gpu_images.GpuImages(encoder.preprocess, "cpu", DecodeLimits(), decoder="nvjpeg")
    embed_files(files[:batch], encoder, images, out / "warm", batch_size=batch, reader=reader)
    start, cpu = time.perf_counter(), time.process_time()
    result = embed_files(files, encoder, images, out / "direct", batch_size=batch, reader=reader)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert result.embedded == len(files), result
    return result.embedded / seconds, cpu / result.embedded


def beam(catalog: str, ckpt: Path, out: Path, batch: int) -> tuple[int, float, float]:
    """Images embedded, seconds, and this process's CPU seconds (the local runner runs in it; reader
    processes' time is theirs)."""
    cfg = embed.EmbedConfig(catalog=catalog, model=str(ckpt), out=str(out), batch_size=batch, device="cpu",
                            incremental=False, gpu_decoder="nvjpeg")  # the stand-ins' name  # fmt: skip
    start, cpu = time.perf_counter(), time.process_time()
    result = embed.run_embed(cfg)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    shutil.rmtree(out, ignore_errors=True)
    assert result.counts["dead_lettered"] == 0, result.counts
    return result.counts["embedded"], seconds, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    # The stand-ins, everywhere the worker looks them up.
    gpu_images.DECODERS["nvjpeg"] = blank_decoder
    for module in (embed, embed_dofns):  # the launcher's checks and load, and the workers'
        module.gpu_decoding = lambda cfg, preprocess: True
        module.load_encoder = _stub(module.load_encoder)
    work = Path(tempfile.mkdtemp(prefix="lookalike-overhead-"))
    try:
        files = sorted(str(p) for p in _make_images(work / "jpegs", args.images, 640))
        mean_kb = np.mean([os.path.getsize(f) for f in files]) / 1024
        ckpt = _checkpoint(work / "ckpt", dict(SHAPES["smoke"], image_size=SIZE, patch_size=SIZE))
        print(f"machine: {machine()}; {len(files):,} JPEGs, mean {mean_kb:.0f} KB; batch {args.batch_size}")
        results, cpu = {"read + sha256 alone, 8 threads": read_and_hash(files)}, {}
        for reader in ("threads", "processes", "threads", "processes"):  # alternated: two runs of each
            name = f"standalone loop (direct_embed), reading in {reader}"
            rate, cpu_s = direct(files, ckpt, work / "d", args.batch_size, reader)
            results.setdefault(name, []).append(rate)
            cpu.setdefault(name, []).append(cpu_s)
        (work / "small").mkdir()
        for f in files[: max(1, len(files) // 100)]:
            shutil.copy(f, work / "small")
        variants = (("", contextlib.nullcontext), (READS_BEFORE, reads_as_before))
        for variant, context in variants * 2:  # alternated: two runs of each, so neither gains from going second
            with context():
                n, whole, whole_cpu = beam(str(work / "jpegs" / "*" / "*.jpg"), ckpt, work / "e", args.batch_size)
                n_small, fixed, fixed_cpu = beam(str(work / "small" / "*.jpg"), ckpt, work / "e1", args.batch_size)
            for name, rate, cpu_s in (
                (f"Beam pipeline{variant}, local runner, whole run", n / whole, whole_cpu / n),
                (f"Beam pipeline{variant}, steady state (less a {n_small}-image run)", (n - n_small) / (whole - fixed),
                 (whole_cpu - fixed_cpu) / (n - n_small)),
            ):  # fmt: skip
                results.setdefault(name, []).append(rate)
                cpu.setdefault(name, []).append(cpu_s)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = np.mean(results["standalone loop (direct_embed), reading in threads"])
    print("\n| path | images/s, each run | µs per image | × standalone, threads | this process's CPU µs per image |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, value in results.items():
        runs = value if isinstance(value, list) else [value]
        mean, used = np.mean(runs), " / ".join(f"{1e6 * c:.0f}" for c in cpu.get(name, []))
        print(f"| {name} | {' / '.join(f'{r:,.0f}' for r in runs)} | {1e6 / mean:.0f} | {mean / base:.2f} | {used} |")


if __name__ == "__main__":
    main()
