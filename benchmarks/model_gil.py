"""The model's step per batch while other threads want the interpreter lock: eager, compiled, one CUDA graph.

In the GPU worker the model's thread shares one interpreter lock with the decode and resize threads, the
writer and, in Beam, the runner's own thread. Every torch op it calls from Python (and every matmul a
compiled model calls) releases the lock and takes it back, and beside a thread running pure Python each
retake can wait up to a switch interval (5 ms). This counts the host calls one batch makes (top-level
ops in the torch profiler) and times batches alone and beside a busy thread, launched as the worker
launches them (the next batch before the vectors of the one before are taken), for each way of running
the model: eager; on CUDA also replayed as one CUDA graph (`--cuda-graph`), and with `--compile` both
compiled. One process, the variants alternated, every case run `--rounds` times.

    python benchmarks/model_gil.py --device cpu --batch-size 2     # eager only: the hazard itself
    python benchmarks/model_gil.py --device cuda --compile          # the four ways, SigLIP base at batch 256
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import BUSY_CASES, beside, machine  # noqa: E402
from benchmarks.gpu_embed import SHAPES, _checkpoint, _two_in_flight  # noqa: E402
from encoder import EncoderConfig, load_encoder  # noqa: E402


def host_calls(encoder, pixels: torch.Tensor) -> int:
    """Top-level ops (calls from Python into torch) one launch makes. For a compiled model only its calls to
    torch's own ops (matmuls, attention) count here, not the kernels its generated wrapper launches."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        encoder.launch(pixels).result()
    return sum(1 for event in prof.events() if event.cpu_parent is None)


def batches_per_s(encoder, pixels: torch.Tensor, batches: int, busy) -> float:
    step = _two_in_flight(encoder, pixels)  # as (c) runs it: each step launches a batch, takes the one before
    with beside(busy):
        start = time.perf_counter()
        for _ in range(batches):
            step()
        if encoder.device.type == "cuda":
            torch.cuda.synchronize(encoder.device)
        return batches / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default="base16-224", choices=sorted(SHAPES))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also the compiled model, with and without a graph")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    cuda = device.type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _checkpoint(Path(tmp) / args.shape, SHAPES[args.shape])
        variants = {}
        for compiled in (False, True) if args.compile else (False,):
            for graph in (False, True) if cuda else (False,):
                name = f"{'compiled' if compiled else 'eager'}{', one CUDA graph' if graph else ''}"
                variants[name] = load_encoder(EncoderConfig(model=str(ckpt), device=device.type, batch_size=args.batch_size,
                                                            compile=compiled, cuda_graph=graph))  # fmt: skip
    some = next(iter(variants.values()))
    size = (some.batch_size, some.preprocess.height, some.preprocess.width, 3)
    pixels = torch.randint(0, 256, size, dtype=torch.uint8, device=device)
    calls = {}
    for name, encoder in variants.items():
        encoder.launch(pixels).result()  # warm-up: compiles, allocator, library handles
        calls[name] = host_calls(encoder, pixels)
    rates: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for case, busy in BUSY_CASES.items():
            for name, encoder in variants.items():
                rates.setdefault((case, name), []).append(batches_per_s(encoder, pixels, args.batches, busy))
    print(f"{machine()}, device {device}, SigLIP {args.shape} at batch {some.batch_size}, {args.batches} batches "
          f"two in flight, {args.rounds} rounds alternated; images/s")  # fmt: skip
    print("| case | " + " | ".join(variants) + " |\n| --- |" + " ---: |" * len(variants))
    print("| host calls per batch | " + " | ".join(f"{calls[name]:,}" for name in variants) + " |")
    for case in BUSY_CASES:
        cells = [" / ".join(_number(r * some.batch_size) for r in rates[(case, name)]) for name in variants]
        print(f"| {case} | " + " | ".join(cells) + " |")


def _number(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


if __name__ == "__main__":
    main()
