"""A standalone run's start and end (`direct_embed.embed_files`) as they were and as they are, on the CPU with
`lock_ceiling.py`'s stand-ins.

    python benchmarks/run_edges.py [--images 1024] [--rounds 6]

The start: the first batch waited for eight reader processes to start (a fresh interpreter each, importing the
reader); now it is read in the embedding process until one of them has started. The end: `close` waited for the
processes to exit; now they are reaped in a thread of their own. The decoder releases the interpreter lock for as
long as nvImageCodec's hardware decoder takes (14,000 images/s) and hands back blank images packed in one buffer; the
model makes 250 calls into torch per batch (a compiled SigLIP base) and queues it on a simulated device (10,600
images/s). Each round runs the three ways, alternated: the run's seconds, from its start to its first launch and
from its last launch to its end (`edges`), and the readers' close (`DirectResult.reader_close_s`). No ring is
page-locked on a CPU: the unlock's share is `gpu_embed.py`'s (`end_s`). Results go in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import encoder.gpu_images as gpu_images  # noqa: E402
import pipelines.file_reader as file_reader  # noqa: E402
from benchmarks.common import machine  # noqa: E402
from benchmarks.gpu_embed import SHAPES, _checkpoint, _launches, _make_images, _run_edges  # noqa: E402
from benchmarks.lock_ceiling import SimulatedDevice, calling_launch, timed_decoder  # noqa: E402
from benchmarks.worker_overhead import SIZE  # noqa: E402
from encoder import DecodeLimits, EncoderConfig, load_encoder  # noqa: E402
from encoder.model import ImageEncoder  # noqa: E402
from pipelines.direct_embed import embed_files  # noqa: E402


def started_at_once(self, alive) -> bool:
    """Before: every chunk went to the reader processes, started or not."""
    return True


REAPED_ASIDE, STARTED = file_reader._reap_elsewhere, file_reader.ProcessReader._started
# way → (how stopped readers are reaped, whether a reader process has started)
# before, `ProcessReader.close` reaped them itself (`file_reader._reap`)
WAYS = {"before: the first batch read by the processes, which are reaped in line": (file_reader._reap, started_at_once),
        "the processes reaped in a thread of their own": (REAPED_ASIDE, started_at_once),
        "now: also the first batch read here until a process has started": (REAPED_ASIDE, STARTED)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="lookalike-run-end-"))
    seen: dict[str, list[tuple[float, ...]]] = {}
    try:
        files = sorted(str(p) for p in _make_images(work / "jpegs", args.images, 640))
        ckpt = _checkpoint(work / "ckpt", dict(SHAPES["smoke"], image_size=SIZE, patch_size=SIZE, hidden_size=768))
        ImageEncoder.launch = calling_launch(250, SimulatedDevice(10_600))
        gpu_images.DECODERS["nvjpeg"] = timed_decoder(14_000, packed=True)
        encoder = load_encoder(EncoderConfig(model=str(ckpt), device="cpu", batch_size=args.batch_size))
        images = gpu_images.GpuImages(encoder.preprocess, "cpu", DecodeLimits(), decoder="nvjpeg")
        embed_files(files[: args.batch_size], encoder, images, work / "warm", batch_size=args.batch_size)
        print(f"machine: {machine()}; {len(files):,} JPEGs; batch {args.batch_size}; {args.rounds} rounds")
        for k in range(args.rounds):
            for way, (reap, started) in WAYS.items():
                file_reader._reap_elsewhere, file_reader.ProcessReader._started = reap, started
                with _launches() as calls:
                    start = time.perf_counter()
                    result = embed_files(files, encoder, images, work / f"{k}", batch_size=args.batch_size)
                    end = time.perf_counter()
                assert result.embedded == len(files), result
                edges = _run_edges(calls, start, end)
                seen.setdefault(way, []).append((end - start, edges["to_first_launch_s"], edges["after_last_launch_s"],
                                                 result.reader_close_s))  # fmt: skip
                shutil.rmtree(work / f"{k}", ignore_errors=True)
                time.sleep(0.3)  # the last round's processes gone, whichever way they were reaped
    finally:
        file_reader._reap_elsewhere, file_reader.ProcessReader._started = REAPED_ASIDE, STARTED
        shutil.rmtree(work, ignore_errors=True)
    print("\n| way | run, s, each | median | start → first launch, median s | last launch → end, median s "
          "| readers' close, median s |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for way, runs in seen.items():
        values = np.asarray(runs)
        medians = " | ".join(f"{np.median(values[:, k]):.3f}" for k in range(1, 4))
        print(f"| {way} | {' / '.join(f'{s:.3f}' for s in values[:, 0])} | {np.median(values[:, 0]):.3f} "
              f"| {medians} |")  # fmt: skip


if __name__ == "__main__":
    main()
