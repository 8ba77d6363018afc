"""The GPU image path's resize (`encoder.resize.resize_like_pil`) by layout, on the GPU if there is one.

    python benchmarks/resize_layouts.py [--images 256] [--rounds 5] [--json F]

A batch of realistic 640-px photos (scikit-image's, quality 90), decoded at full size and packed
in one buffer as the GPU decoders hand them over: interleaved (h, w, 3) as nvImageCodec's, planar
(3, h, w) as nvJPEG's once packed. Timed in one process, each against its baseline:

- the whole resize of the interleaved batch channel by channel (`interleaved=False`),
  as the pixels lie (the default), and as they lie in draft mode (the reduction folded into the
  filters: the same products); the planar batch (channel by channel, its only way);
- on CUDA, the whole resize as two Triton kernels that gather each output's taps (`encoder.resize_kernel`),
  interleaved in draft mode and planar;
- the whole resize of a batch of photos of one size (640 × 480), its canvas gathered as for
  mixed sizes (before) against a view of the buffer (`encoder.resize._in_place`);
- the two products alone: of the interleaved path, with the horizontal filter made
  block-diagonal over the channels (the first version of resizing as the pixels lie) against the
  vertical pass made transposed (`encoder.resize._as_they_lie`); of the channel-by-channel path
  (`encoder.resize._plane_by_plane`), with both filters broadcast over the channels (what CUDA
  runs) against the horizontal pass made transposed (what the CPU runs).

float16 on CUDA (what the GPU worker runs), float32 on the CPU. Milliseconds per batch, medians
of `--rounds`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import encoder.resize as resize  # noqa: E402
from benchmarks.common import machine, packed_interleaved, realistic_jpegs  # noqa: E402
from encoder.preprocess import PreprocessConfig  # noqa: E402
from encoder.resize import (  # noqa: E402
    _as_they_lie,
    _plane_by_plane,
    dense_weights,
    pack_images,
    pil_taps,
    resize_like_pil,
)


def block_diagonal(cols: torch.Tensor) -> torch.Tensor:
    """(n, w, width) → (n, 3 w, 3 width): the horizontal filter spread over the interleaved channels."""
    n, w, width = cols.shape
    eye = torch.eye(3, dtype=cols.dtype, device=cols.device)
    return (cols[:, :, None, :, None] * eye[:, None, :]).reshape(n, 3 * w, 3 * width)


def timed_ms(fn, device: torch.device, rounds: int) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()  # warm: kernels, workspaces, the allocator's blocks
    times = []
    for _ in range(rounds):
        sync()
        started = time.perf_counter()
        fn()
        sync()
        times.append(1e3 * (time.perf_counter() - started))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=None, help="photos per batch (256 on CUDA, 64 on the CPU)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    count = args.images or (256 if device.type == "cuda" else 64)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        photos = [np.asarray(Image.open(io.BytesIO(p.read_bytes())).convert("RGB"))
                  for p in realistic_jpegs(Path(tmp), count)]  # fmt: skip
    cfg = PreprocessConfig()
    packed = packed_interleaved(photos, device)
    planar = pack_images([torch.from_numpy(p.copy()).permute(2, 0, 1).to(device) for p in photos])
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else machine()
    results: dict = {"device": gpu, "dtype": str(dtype).removeprefix("torch."),
                     "photos": f"{count} JPEGs of 640 px, {len({p.shape for p in photos})} sizes", "whole_ms": {}}  # fmt: skip
    whole = {
        "interleaved, channel by channel": lambda: resize_like_pil(packed, cfg, interleaved=False),
        "interleaved, as the pixels lie (the default)": lambda: resize_like_pil(packed, cfg),
        "interleaved, as the pixels lie, draft mode": lambda: resize_like_pil(packed, cfg, draft=True),
        "planar (nvJPEG's, packed), plane by plane": lambda: resize_like_pil(planar, cfg),
    }
    if device.type == "cuda":  # on a CPU Triton runs only through its interpreter: nothing to time
        whole |= {
            "interleaved, two gathering kernels (Triton), draft mode": lambda: resize_like_pil(packed, cfg, draft=True,
                                                                                               kernel=True),
            "planar, two gathering kernels (Triton)": lambda: resize_like_pil(planar, cfg, kernel=True),
        }  # fmt: skip
    for name, fn in whole.items():
        results["whole_ms"][name] = round(timed_ms(fn, device, args.rounds), 2)

    # Photos of one size (a catalog whose uploads are normalised): the canvas a view of the decoder's buffer, or
    # gathered as for mixed sizes.
    uniform = packed_interleaved([np.asarray(Image.fromarray(p).resize((640, 480))) for p in photos], device)
    one_size = {"one size (640 × 480), gathered (before)": True, "one size, a view of the buffer (now)": False}
    results["one_size_ms"] = {}
    for name, gathered in one_size.items():
        with mock.patch.object(resize, "_in_place", lambda *args: None) if gathered else contextlib.nullcontext():
            results["one_size_ms"][name] = round(timed_ms(lambda: resize_like_pil(uniform, cfg), device,
                                                          args.rounds), 2)  # fmt: skip

    # The two products alone, on one chunk's canvas (all of the batch; 640-px photos stay under the canvas limit).
    n, h_max, w_max = count, max(p.shape[0] for p in photos), max(p.shape[1] for p in photos)
    sizes = torch.tensor([p.shape[0] for p in photos] + [p.shape[1] for p in photos], device=device)
    rows = dense_weights(*pil_taps(sizes[:n], cfg.height, cfg.resample, h_max), h_max).to(dtype)
    cols = dense_weights(*pil_taps(sizes[n:], cfg.width, cfg.resample, w_max), w_max).to(dtype).transpose(1, 2)
    canvas = torch.randint(0, 256, (n, h_max, 3 * w_max), device=device).to(dtype)
    planes = torch.randint(0, 256, (n, 3, h_max, w_max), device=device).to(dtype)
    products = {
        "interleaved: block-diagonal horizontal filter (first version)": lambda: (rows @ canvas) @ block_diagonal(cols),
        "interleaved: vertical pass transposed (now)": lambda: _as_they_lie(rows, canvas, cols),
        "planes: filters broadcast over the channels (CUDA's)": lambda: _plane_by_plane(rows, planes, cols, True),
        "planes: horizontal pass transposed (the CPU's)": lambda: _plane_by_plane(rows, planes, cols, False),
    }
    results["products_ms"] = {name: round(timed_ms(fn, device, args.rounds), 2) for name, fn in products.items()}
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"\n{results['device']}, {results['dtype']}; {results['photos']}; medians of {args.rounds}")
    print("| resize | ms per batch | × its baseline |\n| --- | ---: | ---: |")
    tables = (("whole_ms", ["channel by channel"]), ("one_size_ms", ["before"]),
              ("products_ms", ["first version", "CUDA's"]))  # fmt: skip
    for table, baselines in tables:
        base = None
        for name, ms in results[table].items():
            base = ms if any(b in name for b in baselines) else base
            print(f"| {name} | {ms:.2f} | {ms / base:.2f} |")


if __name__ == "__main__":
    main()
