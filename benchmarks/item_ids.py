"""What holding a snapshot's item ids costs a serving process, two ways, each in a fresh process, alternated:

    python_dict   the ids as a list of Python strings and a dict id → row (the client before)
    item_ids      `indexing.item_ids.ItemIds`: one Arrow string array, sorted 64-bit FNV-1a hashes and their rows

For each: the seconds to load `ids.parquet` into it, the memory it then holds (the process's anonymous memory,
RssAnon, after against before), and the time to find rows and ids as a service does: one id (`GET /similar`),
a batch of 256 (`POST /similar`), and the ten neighbours' ids of each.

    python benchmarks/item_ids.py                       # 5,000,000 ids like "sku-000001234567-m" (18 characters)
    python benchmarks/item_ids.py --items 20000000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import best_of_checkouts, machine, process_memory_mib, scratch_dir  # noqa: E402

sys.path.insert(0, os.environ.get("ITEM_IDS_CODE", str(ROOT)))  # the child's: the checkout whose ItemIds it measures

WAYS = ("python_dict", "item_ids")


class PythonDict:
    """The client before: `to_pylist()` and a dict."""

    def __init__(self, path: Path) -> None:
        import pyarrow.parquet as pq

        self.item_ids = pq.read_table(path).column("item_id").to_pylist()
        self._rows = {item_id: row for row, item_id in enumerate(self.item_ids)}

    def rows(self, item_ids):
        return [self._rows.get(i) for i in item_ids]

    def ids(self, rows):
        return [self.item_ids[r] for r in rows]


def measure(way: str, path: Path, items: int) -> dict:
    """In this process: load `path` one way, then time its lookups."""
    import numpy as np

    from indexing.item_ids import ItemIds

    before = process_memory_mib("RssAnon")
    start = time.perf_counter()
    held = PythonDict(path) if way == "python_dict" else ItemIds.read(path)
    load_s = time.perf_counter() - start
    held_mib = process_memory_mib("RssAnon") - before
    rng = np.random.default_rng(0)
    asked = [f"sku-{i:012d}-m" for i in rng.integers(0, items, 20_000)]
    neighbours = rng.integers(0, items, (256, 10))

    def per_call_us(fn, calls: int) -> float:
        start = time.perf_counter()
        for c in range(calls):
            fn(c)
        return (time.perf_counter() - start) / calls * 1e6

    return {
        "load_s": load_s,
        "held_mib": held_mib,
        "one_us": per_call_us(lambda c: held.rows(asked[c : c + 1]), 20_000),
        "batch_256_us": per_call_us(lambda c: held.rows(asked[(c % 78) * 256 : (c % 78 + 1) * 256]), 200),
        "ids_10_us": per_call_us(lambda c: held.ids(neighbours[c % 256].tolist()), 20_000),
        "ids_2560_us": per_call_us(lambda c: held.ids(neighbours.ravel().tolist()), 200),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=5_000_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--measure", choices=WAYS, help=argparse.SUPPRESS)  # the child process's one way
    parser.add_argument("--ids", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.ids, args.items)))
        return

    import pyarrow as pa
    import pyarrow.parquet as pq

    path = scratch_dir("item-ids") / "ids.parquet"
    pq.write_table(pa.table({"item_id": [f"sku-{i:012d}-m" for i in range(args.items)]}), path)
    print(f"machine: {machine()}\n{args.items:,} item ids of 18 characters, {args.rounds} rounds, each way in its "
          f"own process\n")  # fmt: skip
    columns = ("load_s", "held_mib", "one_us", "batch_256_us", "ids_10_us", "ids_2560_us")
    found = best_of_checkouts([f"now@{way}" for way in WAYS], args.rounds, "ITEM_IDS_CODE", lambda way: [
        sys.executable, __file__, "--measure", way.partition("@")[2], "--ids", str(path), "--items", str(args.items)],
        lowest=columns)  # fmt: skip
    best = {way: found[f"now@{way}"] for way in WAYS}
    print("| way | " + " | ".join(columns) + " |\n| --- |" + " ---: |" * len(columns))
    for way in WAYS:
        print(f"| {way} | " + " | ".join(f"{best[way][c]:,.2f}" for c in columns) + " |")
    ratios = " | ".join(f"{best['python_dict'][c] / best['item_ids'][c]:.2f}×" for c in columns)
    print(f"| python_dict ÷ item_ids | {ratios} |")
    print(f"\nbytes held per item: {best['python_dict']['held_mib'] * 2**20 / args.items:.0f} before, "
          f"{best['item_ids']['held_mib'] * 2**20 / args.items:.0f} now")  # fmt: skip
    print(json.dumps(best))


if __name__ == "__main__":
    main()
