"""nvImageCodec's two bindings decoding batches of photos while other threads want the interpreter lock.

In the GPU worker the decode thread shares one interpreter lock with the resize, the model's loop,
the writer and the file readers' consumer. The package's own binding (`nvidia.nvimgcodec`) releases
and retakes the lock once per image of a batch; lookalike's (`encoder.nvimgcodec`) once per batch.
This measures each binding's decode rate alone and with one busy thread beside it: pure Python
(holds the lock until the interpreter makes it switch, every 5 ms) or small torch ops (each
releases and retakes the lock, as the resize's and the model's launches do). One process, the
bindings alternated, every case run `--rounds` times. Both are the GPU worker's own decoders
(`encoder.gpu_images.DECODERS`), so ours hands back its batch packed in one buffer.

    python benchmarks/decode_gil.py --device cpu    # the library's libjpeg-turbo backend, host memory
    python benchmarks/decode_gil.py --device cuda   # the GPU's hardware JPEG engines where it has them
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import BUSY_CASES, beside, machine, realistic_jpegs  # noqa: E402
from encoder.gpu_images import DECODERS  # noqa: E402


def decode_rate(decode, batches: list[list[bytes]], device: torch.device, busy) -> float:
    with beside(busy):
        start = time.perf_counter()
        for batch in batches:
            result = decode(batch, device)  # images, or (packed images, positions decoded)
            assert len(result[1] if isinstance(result, tuple) else result) == len(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return sum(map(len, batches)) / (time.perf_counter() - start)


def _reuse_host_memory() -> None:
    """Serve large host allocations from the reused heap, not a fresh mapping each: our binding's one output
    buffer per batch (~50 MB) would otherwise page-fault in every batch (measured alone: 0.65× the package's
    rate, 1.0× with this), while the package's per-image outputs get reused memory. On a GPU both come from
    reused device memory (torch's caching allocator and the library's own)."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameters
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, (1 << 31) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(1)
    if device.type == "cpu":
        _reuse_host_memory()
    start = time.perf_counter()

    def progress(what: str) -> None:  # as it happens, so a run cut short still says how far it got
        print(f"[{time.perf_counter() - start:6.1f} s] {what}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        datas = [p.read_bytes() for p in realistic_jpegs(Path(tmp), args.images)]
    progress(f"{len(datas)} JPEGs made")
    batches = [datas[i : i + args.batch_size] for i in range(0, len(datas), args.batch_size)]
    # The GPU worker's decoders themselves (`encoder.gpu_images.DECODERS`), on this device.
    bindings = {"package's binding (nvidia.nvimgcodec)": DECODERS["nvimgcodec-python"](device),
                "lookalike's (encoder.nvimgcodec)": DECODERS["nvimgcodec"](device)}  # fmt: skip
    progress("decoders made")
    for decode in bindings.values():
        for batch in batches:  # warm-up: handles, buffers, the library's threads, the heap
            decode(batch, device)
    progress("warmed up")
    rates: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for case, busy in BUSY_CASES.items():
            for name, decode in bindings.items():
                rates.setdefault((case, name), []).append(decode_rate(decode, batches, device, busy))
                progress(f"{case}, {name}: {rates[(case, name)][-1]:,.0f} images/s")
    print(f"{machine()}, device {device}, {args.images} JPEGs of 640 px ({sum(map(len, datas)) / len(datas) / 1024:.0f} KB),"
          f" batches of {args.batch_size}, {args.rounds} rounds alternated; images/s")  # fmt: skip
    print("| case | package's binding | lookalike's | ratio |\n| --- | ---: | ---: | ---: |")
    package_name, ours_name = bindings
    for case in BUSY_CASES:
        theirs, mine = rates[(case, package_name)], rates[(case, ours_name)]
        ratio = (sum(mine) / len(mine)) / (sum(theirs) / len(theirs))
        print(f"| {case} | {' / '.join(f'{r:,.0f}' for r in theirs)} | {' / '.join(f'{r:,.0f}' for r in mine)} "
              f"| {ratio:.2f}× |")  # fmt: skip


if __name__ == "__main__":
    main()
