"""What reading the catalog costs the embed step's launcher (`pipelines.catalog.read_catalog`, as `run_embed` calls
it: validated, image URIs resolved, `updated_at` kept for `--since`): seconds and the process's peak memory, for a
manifest with the columns a marketplace's export has beside the two the embed step reads.

    python benchmarks/catalog_read.py                   # 2,000,000 items, 7 columns (one a 200-character description)
    python benchmarks/catalog_read.py --items 5000000 --ways /path/to/an/older/checkout,now
    python benchmarks/catalog_read.py --reader evaluate  # `evaluate --catalog`'s read: titles, categories, images

`--reader evaluate` measures `evaluation.catalog.read_catalog_info` instead, and the memory the process holds
after it (`RssAnon`: its own, the interpreter and imports included).

Each measurement runs in a fresh process (peak RSS: `VmHWM`), alternated, best of `--rounds`. `--ways` names the
code to measure: `now` imports this checkout's, any other is a folder holding another checkout, put first on the
measuring process's path (code without `read_catalog`'s `columns` reads every column, as it did).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import best_of_checkouts, machine, process_memory_mib, scratch_dir  # noqa: E402 - none of ours

sys.path.insert(0, os.environ.get("CATALOG_READ_CODE", str(ROOT)))  # the child's: the checkout it measures


def write_manifest(path: Path, items: int, seed: int = 0) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    pq.write_table(pa.table({
        "item_id": [f"sku-{i:012d}" for i in range(items)],
        "image_uri": [f"gs://shop-images/p/{i % 997}/{i:012d}.jpg" for i in range(items)],
        "title": [f"Product number {i} in a long title of words" for i in range(items)],
        "description": ["A description of a product that goes on for a while, as they do. " * 3] * items,
        "category": rng.choice(["shoes", "bags", "dresses"], items),
        "price": rng.random(items),
        "updated_at": pa.array(rng.integers(1.7e15, 1.76e15, items), pa.int64()).cast(pa.timestamp("us", "UTC")),
    }), path)  # fmt: skip


def measure_evaluate(path: str) -> dict:
    from evaluation.catalog import read_catalog_info

    start = time.perf_counter()
    catalog = read_catalog_info(path)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mib": process_memory_mib(), "held_mib": process_memory_mib("RssAnon"),
            "held_by": type(catalog).__name__}  # fmt: skip


def measure(path: str) -> dict:
    from pipelines.catalog import read_catalog

    projected = "columns" in inspect.signature(read_catalog).parameters
    start = time.perf_counter()
    table = read_catalog(path, columns=("updated_at",)) if projected else read_catalog(path)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mib": process_memory_mib(),
            "rows": table.num_rows, "columns": table.num_columns}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=2_000_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ways", default="now", help="comma-separated: now, or folders of other checkouts")
    parser.add_argument("--reader", choices=("embed", "evaluate"), default="embed")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # the child process: the manifest
    args = parser.parse_args()
    if args.measure:
        print(json.dumps((measure_evaluate if args.reader == "evaluate" else measure)(args.measure)))
        return

    manifest = scratch_dir("catalog-read") / "manifest.parquet"
    write_manifest(manifest, args.items)
    print(f"machine: {machine()}\n{args.items:,} items, 7 columns ({manifest.stat().st_size / 2**20:.0f} MiB of "
          f"Parquet), {args.rounds} rounds\n")  # fmt: skip
    best = best_of_checkouts(args.ways.split(","), args.rounds, "CATALOG_READ_CODE",
                             lambda way: [sys.executable, __file__, "--measure", str(manifest), "--reader", args.reader],
                             lowest=("seconds", "peak_mib", "held_mib") if args.reader == "evaluate" else
                             ("seconds", "peak_mib"))  # fmt: skip
    if args.reader == "evaluate":
        print("| code | seconds | peak MiB | held MiB |\n| --- | ---: | ---: | ---: |")
        for way, b in best.items():
            print(f"| {way} | {b['seconds']:.2f} | {b['peak_mib']:,.0f} | {b['held_mib']:,.0f} |")
        print(json.dumps(best))
        return
    print("| code | seconds | peak MiB | rows | columns kept |\n| --- | ---: | ---: | ---: | ---: |")
    for way, b in best.items():
        print(f"| {way} | {b['seconds']:.2f} | {b['peak_mib']:,.0f} | {b['rows']:,} | {b['columns']} |")
    print(json.dumps(best))


if __name__ == "__main__":
    main()
