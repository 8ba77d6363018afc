"""Index builds on clustered vectors: lookalike's faiss auto and ScaNN auto vs HNSW32 tuned to recall 0.95.

    python benchmarks/index_bench.py [--sizes 100000,1000000] [--dim 256]

Every contender goes through the same `build_snapshot` on the same embed run in
one process: build time (train + add), recall@10 against exact search on 1,000
sampled queries, batch queries/s, p50 single-query latency and index bytes.
The baseline is what a user picks today (autofaiss-style): HNSW32 with efSearch
raised until recall@10 ≥ 0.95. Results go in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import clustered, machine, write_run  # noqa: E402
from indexing import IndexConfig, build_snapshot  # noqa: E402

CONTENDERS = {
    "baseline: faiss HNSW32, efSearch tuned to 0.95": IndexConfig(index="hnsw"),
    "lookalike faiss auto": IndexConfig(),
    "lookalike ScaNN auto": IndexConfig(backend="scann"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--spread", type=float, default=0.5, help="noise relative to the cluster centres' scale")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"machine: {machine()}")
    for n in (int(s) for s in args.sizes.split(",")):
        work = Path(tempfile.mkdtemp(prefix="lookalike-index-bench-"))
        start = time.perf_counter()
        run = write_run(work / "run", clustered(n, args.dim, clusters=max(50, n // 100), spread=args.spread), shards=8)
        print(
            f"\n{n:,} × {args.dim} clustered vectors ({n // 100:,} clusters, spread {args.spread}), "
            f"written in {time.perf_counter() - start:.0f} s"
        )
        print("| index | kind / search params | build s | recall@10 | batch queries/s | p50 ms | index MiB |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
        for name, cfg in CONTENDERS.items():
            m = build_snapshot(run, str(work / "snapshots"), cfg)
            q, ix = m["quality"], m["index"]
            params = ", ".join(f"{k}={v}" for k, v in ix["search_params"].items())
            label = f"{ix['kind']} {ix['factory'] or ''} {params}".replace("  ", " ").strip()
            print(f"| {name} | {label} | {q['build_s']:.1f} | {q['recall_at_10']:.3f} | "
                  f"{q['batch_queries_per_s']:,.0f} | {q['latency_ms_p50']:.3f} | {m['bytes']['index'] / 2**20:.0f} |",
                  flush=True)  # fmt: skip
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
