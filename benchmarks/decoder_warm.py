"""What the GPU decoders' warm-up hides of their first use, in a local Beam run, on the CPU with stand-ins.

    python benchmarks/decoder_warm.py [--first-use-s 0.5] [--images 200,2000] [--rounds 3]

A fresh nvImageCodec decoder does much of its setting up at its first decode (its decoders, their state per
library thread, the hardware decoder's memory pool); run E's 200-image Beam run spent 0.52 s more in its pipeline
with nvImageCodec than with nvJPEG, whose state torchvision keeps for the process. Here the decoder is a stand-in
whose first call waits `--first-use-s` with the interpreter lock released, as the library's C calls do, and then
hands back blank images; its `close` waits `--close-s` likewise. The model is a constant (`worker_overhead.py`'s
stand-ins). Three ways, alternated, `--rounds` runs each, for each catalog size:
  before: no warm-up: the first real batch pays the first use; the decoders are never closed (before, they went at
    a collection, whenever that came: not in these timings);
  warm-up in the step's setup only: as a Dataflow worker does it, beside its first reads;
  the product: a local run makes the decoders and starts their warm-up before Beam builds the pipeline, and closes
    them in a thread of its own at the end.
What a GPU's first use really costs is what the `decoder-life` path of `gpu_embed.py` measures. Results go in
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import encoder.gpu_images as gpu_images  # noqa: E402
import pipelines.embed as embed  # noqa: E402
import pipelines.embed_dofns as embed_dofns  # noqa: E402
from benchmarks.common import machine, print_ways  # noqa: E402
from benchmarks.gpu_embed import SHAPES, _checkpoint, _make_images  # noqa: E402
from benchmarks.worker_overhead import SIZE, _stub, beam, blank_decoder  # noqa: E402


def first_use_decoder(first_s: float, close_s: float):
    """A factory of stand-in decoders: each one's first call waits `first_s` before its blank images, and its
    `close` waits `close_s`, the interpreter lock released (`time.sleep`), as a native library's calls."""

    def factory(device=None):
        blank, used = blank_decoder(device), []

        def decode(datas, device):
            if not used:
                used.append(True)
                time.sleep(first_s)
            return blank(datas, device)

        return gpu_images.ClosingDecoder(decode, lambda: time.sleep(close_s))

    return factory


@contextlib.contextmanager
def before():
    """No warm-up and no close: the first real batch pays the first use."""
    with (mock.patch.object(gpu_images.GpuImages, "start_warming", lambda self, count: None),
          mock.patch.object(gpu_images.GpuImages, "close", lambda self, in_background=False: None),
          mock.patch.object(embed, "start_embed_images", lambda cfg, encoder: False)):  # fmt: skip
        yield


@contextlib.contextmanager
def in_setup_only():
    """The warm-up started by the embed step's setup, as on Dataflow: no decoders made before the pipeline."""
    with mock.patch.object(embed, "start_embed_images", lambda cfg, encoder: False):
        yield


WAYS = {"before: no warm-up": before, "warm-up in the step's setup only": in_setup_only,
        "the product: made and warming before Beam builds the pipeline": contextlib.nullcontext}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--first-use-s", type=float, default=0.5)
    parser.add_argument("--close-s", type=float, default=0.1)
    parser.add_argument("--images", default="200,2000", help="catalog sizes, comma-separated")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    gpu_images.DECODERS["nvjpeg"] = first_use_decoder(args.first_use_s, args.close_s)
    for module in (embed, embed_dofns):  # the launcher's checks and load, and the workers'
        module.gpu_decoding = lambda cfg, preprocess: True
        module.load_encoder = _stub(module.load_encoder)
    sizes = [int(n) for n in args.images.split(",")]
    work = Path(tempfile.mkdtemp(prefix="lookalike-decoder-warm-"))
    seconds: dict[tuple[int, str], list[float]] = {}
    try:
        files = sorted(_make_images(work / "jpegs", max(sizes), 640))
        ckpt = _checkpoint(work / "ckpt", dict(SHAPES["smoke"], image_size=SIZE, patch_size=SIZE))
        for n in sizes:
            (work / str(n)).mkdir()
            for f in files[:n]:
                shutil.copy(f, work / str(n))
        print(f"machine: {machine()}; decoder's first use {args.first_use_s:g} s, its close {args.close_s:g} s; "
              f"batch {args.batch_size}; {args.rounds} rounds")  # fmt: skip
        beam(str(work / str(sizes[0]) / "*.jpg"), ckpt, work / "out", args.batch_size)  # imports, caches: untimed
        for _ in range(args.rounds):
            for n in sizes:
                for way, context in WAYS.items():
                    with context():
                        done, s, _ = beam(str(work / str(n) / "*.jpg"), ckpt, work / "out", args.batch_size)
                    assert done == n, (done, n)
                    seconds.setdefault((n, way), []).append(s)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_ways(seconds, sizes, WAYS)


if __name__ == "__main__":
    main()
