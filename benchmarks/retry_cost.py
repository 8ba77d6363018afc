"""What a failed batch costs to retry: one culprit in a batch, the model's step padded to a static batch (as
`--compile` runs it), retried image by image (each image padded back to the batch, as the worker did) against in
halves at the pieces' own size, eagerly (`encoder.gpu_stream.embed_checked`), both against the batch alone.

The culprit stands in for an image the model fails on (a RuntimeError at launch); the model has random weights of
a SigLIP shape (`benchmarks/gpu_embed.py`'s SHAPES). One process, every case timed `--rounds` times (the median).

Then a run of `--memory-batches` batches after the memory left stops fitting a whole batch: each batch tried whole
first and retried in halves (without `encoder.failures.MemoryBackoff`) against straight to the pieces that fit (with
it), both per batch and against the batch when it fits. On CUDA the memory is really taken: a tensor holds all but
90% of what a whole batch's step needs, so the allocator runs out as it would beside another process. On the CPU a
stand-in raises CUDA's out-of-memory error at launch for more than half a batch: there the failed attempt costs
only the exception, so the two are level by construction; what the backoff saves is the GPU's own work.

    python benchmarks/retry_cost.py                                      # CPU, the smoke shape, batch 256
    python benchmarks/retry_cost.py --device cuda --shape base16-224 --compile
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import machine  # noqa: E402
from benchmarks.gpu_embed import SHAPES, _checkpoint  # noqa: E402
from encoder import EncoderConfig, load_encoder  # noqa: E402
from encoder.failures import MemoryBackoff  # noqa: E402
from encoder.gpu_stream import _launch, embed_checked  # noqa: E402


class Poisoned:
    """The encoder, failing at launch on any batch that holds an all-255 image (the culprit)."""

    def __init__(self, encoder) -> None:
        self._encoder, self.dim = encoder, encoder.dim

    def launch(self, pixels, eager: bool = False):
        if (pixels.flatten(1).amin(1) == 255).any():
            raise RuntimeError("the culprit")
        return self._encoder.launch(pixels, eager)


class Cramped:
    """The encoder as on a GPU whose memory holds `fits` images at once (the CPU's stand-in for `hog_memory`)."""

    def __init__(self, encoder, fits: int) -> None:
        self._encoder, self.dim, self.fits = encoder, encoder.dim, fits

    def launch(self, pixels, eager: bool = False):
        if len(pixels) > self.fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (stand-in)")
        return self._encoder.launch(pixels, eager)


def hog_memory(encoder, pixels: torch.Tensor) -> torch.Tensor:
    """A tensor that leaves free 90% of what the step of `pixels` (a whole batch) needs on their CUDA device."""
    encoder.launch(pixels).result()  # warm
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    encoder.launch(pixels).result()
    need = torch.cuda.max_memory_allocated() - base
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    return torch.empty(max(0, free - int(0.9 * need)), dtype=torch.uint8, device=pixels.device)


def run_cramped(encoder, pixels: torch.Tensor, batches: int, backoff: MemoryBackoff | None) -> tuple[float, int]:
    """Seconds per batch over `batches` batches, and how many images were not embedded (an image alone that does
    not fit is dead-lettered); `backoff` None: each batch tried whole."""
    start, lost = time.perf_counter(), 0
    for _ in range(batches):
        checked = embed_checked(encoder, pixels, _launch(encoder, pixels, backoff), backoff)
        lost += len(pixels) - len(checked.rows)
    return (time.perf_counter() - start) / batches, lost


def memory_no_longer_fits(encoder, pixels: torch.Tensor, batches: int, batch_s: float) -> dict:
    """`batches` batches tried whole first against with the backoff, the memory taken (CUDA) or a stand-in (CPU)."""
    cuda = encoder.device.type == "cuda"
    hog = hog_memory(encoder, pixels) if cuda else None
    try:
        cramped = encoder if cuda else Cramped(encoder, len(pixels) // 2)
        run_cramped(cramped, pixels, 1, None)  # warm: the eager pieces' shapes
        whole_first, lost_whole_first = run_cramped(cramped, pixels, batches, None)
        backoff = MemoryBackoff()
        with_backoff, lost_backoff = run_cramped(cramped, pixels, batches, backoff)
    finally:
        del hog
    return {"batches": batches, "memory_taken": "a tensor (real)" if cuda else "stand-in", "piece": backoff.piece,
            "whole_first_s_per_batch": round(whole_first, 4), "backoff_s_per_batch": round(with_backoff, 4),
            "whole_first_x_backoff": round(whole_first / with_backoff, 2),
            "backoff_x_batch_fitting": round(with_backoff / batch_s, 2),
            "images_lost": {"whole_first": lost_whole_first, "backoff": lost_backoff}}  # fmt: skip


def one_by_one_padded(encoder, pixels: torch.Tensor) -> int:
    """The worker's retry before halves: each image alone through the static step, padded back to the batch."""
    embedded = 0
    for row in range(len(pixels)):
        try:
            encoder.launch(pixels[row : row + 1]).result()
            embedded += 1
        except RuntimeError:
            pass
    return embedded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smoke")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--compile", action="store_true", help="torch.compile the step (else: padded, eager)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory-batches", type=int, default=32, help="batches run while memory does not fit one")
    args = parser.parse_args()

    shape = SHAPES[args.shape]
    with tempfile.TemporaryDirectory() as tmp:
        model = _checkpoint(Path(tmp), shape)
        encoder = load_encoder(EncoderConfig(model=str(model), device=args.device, batch_size=args.batch_size,
                                             compile=args.compile))  # fmt: skip
    encoder.static_batch = True  # as `compile` sets it: short chunks are padded to the batch
    size = (args.batch_size, shape["image_size"], shape["image_size"], 3)
    pixels = torch.randint(0, 200, size, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pixels = pixels.to(encoder.device)
    poisoned = pixels.clone()
    poisoned[args.batch_size // 7] = 255
    culprit = Poisoned(encoder)

    def timed(fn) -> float:
        fn()  # warm: compiles, allocates
        times = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    batch = timed(lambda: encoder.launch(pixels).result())
    halves = timed(lambda: embed_checked(culprit, poisoned))
    padded = timed(lambda: one_by_one_padded(culprit, poisoned))
    rows, _, failed, _ = embed_checked(culprit, poisoned)
    assert len(rows) == args.batch_size - 1 and len(failed) == 1, (len(rows), failed)

    try:
        memory = memory_no_longer_fits(encoder, pixels, args.memory_batches, batch)
    except Exception as err:  # noqa: BLE001 - keep the numbers above
        memory = {"error": f"{type(err).__name__}: {err}"}
    result = {"machine": machine(), "device": str(encoder.device), "shape": args.shape, "batch": args.batch_size,
              "compiled": args.compile, "batch_alone_s": round(batch, 4), "in_halves_s": round(halves, 4),
              "one_by_one_padded_s": round(padded, 4), "in_halves_x_batch": round(halves / batch, 2),
              "one_by_one_x_batch": round(padded / batch, 1), "one_by_one_x_halves": round(padded / halves, 1),
              "memory_no_longer_fits": memory}  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
