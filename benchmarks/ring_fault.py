"""What making the file readers' ring resident costs: the work that page-locking a fresh ring starts with.

    python benchmarks/ring_fault.py [--sizes-mib 640,896] [--rounds 3]

A GPU worker page-locks its readers' ring (`pipelines.file_reader.ProcessReader`, `encoder.page_lock`): 640 MiB
for the standalone loop, 896 MiB for a Beam worker process. A registration that finds the pages not yet in memory
faults them in inside the driver's call, holding a lock that the process's other CUDA calls wait on; `page_lock`
now faults them in first (`populate`) and the ring is locked in pieces (`PAGE_LOCK_PIECE`). For each size, a fresh
ring made as the reader makes it (a memfd, mapped shared) is faulted in, alternated, rounds:
  whole: one `populate` over the ring (the part of a single registration's call that is not the pinning);
  pieces: `populate` a piece at a time, the longest piece reported (what one call can now wait on, at most);
  touched: a byte written to each page from Python (page faults one by one: the readers' way, without populate).
The pinning itself needs a GPU: the next GPU run's (d) rows report it (`ring_page_lock_s`,
`ring_page_lock_longest_call_s`). Results go in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine  # noqa: E402
from encoder.page_lock import populate  # noqa: E402
from pipelines.file_reader import PAGE_LOCK_PIECE  # noqa: E402


def _fresh_ring(size: int) -> tuple[int, mmap.mmap, int]:
    fd = os.memfd_create("ring-fault-bench", 0)
    os.ftruncate(fd, size)
    ring = mmap.mmap(fd, size)
    anchor = ctypes.c_char.from_buffer(ring)
    address = ctypes.addressof(anchor)
    del anchor
    return fd, ring, address


def fault(kind: str, size: int) -> tuple[float, float | None]:
    """Seconds to make a fresh ring of `size` bytes resident by `kind`, and its longest piece (pieces only)."""
    fd, ring, address = _fresh_ring(size)
    try:
        start, longest = time.perf_counter(), None
        if kind == "whole":
            if not populate(address, size):
                raise SystemExit("this kernel cannot populate (MADV_POPULATE_WRITE needs Linux 5.14)")
        elif kind == "pieces":
            longest = 0.0
            for offset in range(0, size, PAGE_LOCK_PIECE):
                piece = time.perf_counter()
                populate(address + offset, min(PAGE_LOCK_PIECE, size - offset))
                longest = max(longest, time.perf_counter() - piece)
        else:
            for offset in range(0, size, mmap.PAGESIZE):
                ring[offset] = 0
        return time.perf_counter() - start, longest
    finally:
        ring.close()
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mib", default="640,896")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sizes = [int(s) << 20 for s in args.sizes_mib.split(",")]
    kinds = ("whole", "pieces", "touched")
    runs: dict[tuple[int, str], list[tuple[float, float | None]]] = {}
    for _ in range(args.rounds):
        for size in sizes:
            for kind in kinds:
                runs.setdefault((size, kind), []).append(fault(kind, size))
    print(f"machine: {machine()}; pieces of {PAGE_LOCK_PIECE >> 20} MiB; {args.rounds} rounds, alternated\n")
    print("| ring | faulted in | seconds, each run | GB/s, each run | longest piece, ms |")
    print("| --- | --- | ---: | ---: | ---: |")
    for (size, kind), results in runs.items():
        seconds = " / ".join(f"{s:.3f}" for s, _ in results)
        rates = " / ".join(f"{size / s / 1e9:.1f}" for s, _ in results)
        longest = " / ".join(f"{1000 * p:.0f}" for _, p in results) if kind == "pieces" else ""
        print(f"| {size >> 20} MiB | {kind} | {seconds} | {rates} | {longest} |")


if __name__ == "__main__":
    main()
