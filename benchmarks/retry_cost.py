"""What a failed batch costs to retry: one culprit in a batch, the model's step padded to a static batch (as
`--compile` runs it), retried image by image (each image padded back to the batch, as the worker did) against in
halves at the pieces' own size, eagerly (`encoder.gpu_stream.embed_checked`), both against the batch alone.

The culprit stands in for an image the model fails on (a RuntimeError at launch); the model has random weights of
a SigLIP shape (`benchmarks/gpu_embed.py`'s SHAPES). One process, every case timed `--rounds` times (the median).

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
from encoder.gpu_stream import embed_checked  # noqa: E402


class Poisoned:
    """The encoder, failing at launch on any batch that holds an all-255 image (the culprit)."""

    def __init__(self, encoder) -> None:
        self._encoder, self.dim = encoder, encoder.dim

    def launch(self, pixels, eager: bool = False):
        if (pixels.flatten(1).amin(1) == 255).any():
            raise RuntimeError("the culprit")
        return self._encoder.launch(pixels, eager)


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
    result = {"machine": machine(), "device": str(encoder.device), "shape": args.shape, "batch": args.batch_size,
              "compiled": args.compile, "batch_alone_s": round(batch, 4), "in_halves_s": round(halves, 4),
              "one_by_one_padded_s": round(padded, 4), "in_halves_x_batch": round(halves / batch, 2),
              "one_by_one_x_batch": round(padded / batch, 1), "one_by_one_x_halves": round(padded / halves, 1)}  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
