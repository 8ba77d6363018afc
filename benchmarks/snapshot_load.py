"""What loading a snapshot costs a process (`SnapshotClient`: a service's start or restart, `lookalike similar`,
`evaluate`, the publish step): seconds, then its first search (a mapped index's pages come in as it reads them),
the process's peak resident memory (the page cache's pages it mapped and read included) and its own (anonymous:
what no other process shares), and the bytes it read to check the files' sha256; with the check done in every
process, as before, done once and remembered by the files' stamps (`now@first`: a machine's first load of the
snapshot), and remembered by an earlier process (`now@later`).

    python benchmarks/snapshot_load.py                      # 1,000,000 × 768, an exact (flat) index: ~6 GB of files
    python benchmarks/snapshot_load.py --ways /path/to/an/older/checkout,now@first,now@later

Each measurement runs in a fresh process, alternated, best of `--rounds`. `--ways`: `now` imports this checkout's
code, any other is a folder holding another checkout, put first on the measuring process's path. The files are in
the page cache for every way (a load right after a machine's start reads them from disk, slower still).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import best_of_checkouts, clustered, machine, process_memory_mib, scratch_dir, write_run  # noqa: E402

sys.path.insert(0, os.environ.get("SNAPSHOT_LOAD_CODE", str(ROOT)))  # the child's: the checkout it measures


def measure(root: str, cache: str, searches: int) -> dict:
    import numpy as np

    from encoder import storage
    from indexing import SnapshotClient

    hashed, real = [], storage.sha256_file
    storage.sha256_file = lambda path: hashed.append(os.path.getsize(path)) or real(path)
    start = time.perf_counter()
    client = SnapshotClient(root, cache_dir=cache)
    seconds = time.perf_counter() - start
    queries = np.random.default_rng(0).standard_normal((searches, client.manifest["dim"])).astype(np.float32)
    start = time.perf_counter()
    for query in queries:  # one at a time, as requests come: a mapped index's pages fault in as they are read
        client.search(vectors=query[None], k=10)
    return {"seconds": seconds, "first_search_s": time.perf_counter() - start, "peak_mib": process_memory_mib(),
            "own_mib": process_memory_mib("RssAnon"), "hashed_gb": sum(hashed) / 1e9,
            "items": len(client)}  # fmt: skip


def evict(folder: Path) -> None:
    """The folder's files out of the page cache, as after a machine's start (clean pages: no privileges needed)."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ways", default="now@first,now@later", help="comma-separated: now@first, now@later, or "
                        "folders of other checkouts")  # fmt: skip
    parser.add_argument("--index", default="flat", help="the snapshot's index (`lookalike index --index`)")
    parser.add_argument("--searches", type=int, default=1, help="single-vector searches timed after the load")
    parser.add_argument("--cold", action="store_true", help="the snapshot's files evicted from the page cache first")
    parser.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)  # the child: the root, the cache, searches
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure[:2], int(args.measure[2]))))
        return

    from indexing import IndexConfig, build_snapshot, publish

    work = scratch_dir("snapshot-load")
    start = time.perf_counter()
    run = write_run(work / "run", clustered(args.items, args.dim, clusters=max(50, args.items // 100)), shards=8)
    root = str(work / "snapshots")
    built = build_snapshot(run, root, IndexConfig(index=args.index, queries=100))
    publish(root, built["snapshot_id"])
    size = sum(f["bytes"] for f in built["files"].values())
    print(f"machine: {machine()}\n{args.items:,} × {args.dim}, a {built['index']['kind']} index: {size / 1e9:.2f} GB "
          f"of files (built in {time.perf_counter() - start:.0f} s), {args.rounds} rounds"
          f"{'; the files evicted from the page cache before each' if args.cold else ''}\n")  # fmt: skip
    time.sleep(2.1)  # the files settled (`indexing.snapshot._SETTLED_S`), as a night's are by the time they load
    later = str(work / "cache-later")

    def command(way: str) -> list[str]:
        cache = later if way.endswith("@later") else str(work / f"cache-{uuid.uuid4().hex}")
        if args.cold:
            evict(Path(root))
        return [sys.executable, __file__, "--measure", root, cache, str(args.searches)]

    subprocess.run(command("now@later"), check=True, capture_output=True)  # an earlier process on the machine
    best = best_of_checkouts(args.ways.split(","), args.rounds, "SNAPSHOT_LOAD_CODE", command,
                             ("seconds", "first_search_s", "peak_mib", "own_mib"))  # fmt: skip
    print(f"| code | load s | first {args.searches} search(es) s | peak resident MiB | its own MiB | "
          "GB read for sha256 |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: |")  # fmt: skip
    for way, b in best.items():
        print(f"| {way} | {b['seconds']:.2f} | {b['first_search_s']:.2f} | {b['peak_mib']:,.0f} | "
              f"{b['own_mib']:,.0f} | {b['hashed_gb']:.2f} |")  # fmt: skip
    print(json.dumps(best))


if __name__ == "__main__":
    main()
