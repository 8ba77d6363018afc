"""What a training set's image URIs cost each data-loading process: the private memory a forked loader process
comes to hold after reading every pair's URI once (an epoch), two ways, in the same process:

    python_list   the URIs as a list of Python strings (the dataset before): reading a string writes its reference
                  count, so the page it lies on is copied into the reading process
    arrow         `training.data.PairDataset` now: one Arrow string array, read without touching a Python object

    python benchmarks/loader_memory.py                  # 1,000,000 pairs, 4 loader processes

Each way: the dataset is made here, `--workers` processes are forked from this one (as a DataLoader forks its
workers), each reads `image_uri(row)` for every row, and reports how much its private memory (Private_Dirty, from
/proc/self/smaps_rollup) grew. Nothing is decoded: this measures only what holding the URIs costs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine  # noqa: E402

WAYS = ("python_list", "arrow")


def private_dirty_mib() -> float:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Private_Dirty:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no Private_Dirty in /proc/self/smaps_rollup")


def dataset(way: str, uris: list[str]):
    import numpy as np

    from encoder import PreprocessConfig
    from training.data import PairDataset

    class PythonList(PairDataset):
        """The dataset before: its URIs a list of Python strings."""

        def __init__(self, *args) -> None:
            super().__init__(*args)
            self._list = list(uris)
            self._image_uris = None

        def __len__(self) -> int:
            return len(self._list)

        def image_uri(self, row: int) -> str:
            return self._list[row]

    kind = PythonList if way == "python_list" else PairDataset
    return kind(uris, np.zeros((len(uris), 1), np.int64), PreprocessConfig(height=32, width=32))


def _epoch(data, row_count: int, out) -> None:
    before = private_dirty_mib()
    for row in range(row_count):
        data.image_uri(row)
    out.put(private_dirty_mib() - before)


def measure(way: str, items: int, workers: int) -> dict:
    uris = [f"gs://shop-images/p/{i % 997}/{i:012d}.jpg" for i in range(items)]
    data = dataset(way, uris)
    del uris
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    processes = [context.Process(target=_epoch, args=(data, items, out)) for _ in range(workers)]
    for process in processes:
        process.start()
    grown = [out.get() for _ in processes]
    for process in processes:
        process.join()
    return {"per_process_mib": sum(grown) / len(grown), "all_processes_mib": sum(grown)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    print(f"machine: {machine()}\n{args.items:,} image URIs of ~40 characters, {args.workers} loader processes\n")
    results = {way: measure(way, args.items, args.workers) for way in WAYS}
    print("| way | private memory grown per loader process, MiB | all loader processes, MiB |\n| --- | ---: | ---: |")
    for way, r in results.items():
        print(f"| {way} | {r['per_process_mib']:,.1f} | {r['all_processes_mib']:,.1f} |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
