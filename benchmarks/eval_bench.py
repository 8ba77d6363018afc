"""Evaluation speed: 100k queries from interaction logs against a 1M-item snapshot, candidate vs baseline.

    python benchmarks/eval_bench.py [--items 1000000] [--queries 100000] [--dim 256]

Builds two snapshots of the same clustered vectors (faiss auto, and a PCA to a quarter of the dimensions
as the baseline), writes click logs whose clicked items are noisy near neighbours of
the query, then times `run_evaluation` (logs → relevance, batched search of both
snapshots, metrics, 1,000-resample paired bootstrap). Results go in BENCHMARKS.md.
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

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from benchmarks.common import clustered, machine, write_run  # noqa: E402
from evaluation.run import EvaluateConfig, run_evaluation  # noqa: E402
from indexing import IndexConfig, build_snapshot  # noqa: E402


def _logs(vectors: np.ndarray, queries: int, path: Path, seed: int = 0) -> int:
    """Clicks on random near neighbours (top 50 by a noisy score) of random query items."""
    import faiss

    rng = np.random.default_rng(seed)
    query_rows = rng.choice(len(vectors), size=queries, replace=False)
    nlist = max(1, int(np.sqrt(len(vectors))))
    index = faiss.index_factory(vectors.shape[1], f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(vectors[rng.choice(len(vectors), size=min(len(vectors), 50 * nlist), replace=False)])
    index.add(vectors)
    index.nprobe = 8  # approximate neighbours are fine for making synthetic clicks
    _, near = index.search(vectors[query_rows], 51)
    picks = near[np.arange(queries)[:, None], rng.integers(1, 51, size=(queries, 3))]
    q = np.repeat(query_rows, 3)
    table = pa.table({
        "query_item_id": pa.array([f"item-{i:06d}" for i in q]),
        "clicked_item_id": pa.array([f"item-{i:06d}" for i in picks.reshape(-1)]),
        "weight": pa.array(rng.choice([1.0, 2.0, 3.0], size=len(q), p=[0.8, 0.15, 0.05])),
    })  # fmt: skip
    pq.write_table(table, path)
    return table.num_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=256)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="lookalike-eval-bench-"))
    print(f"machine: {machine()}")
    vectors = clustered(args.items, args.dim, clusters=max(50, args.items // 100), spread=0.5)
    run = write_run(work / "run", vectors, shards=8)
    start = time.perf_counter()
    rows = _logs(vectors, args.queries, work / "logs.parquet")
    print(f"{args.items:,} × {args.dim} vectors; {rows:,} log rows over {args.queries:,} query items "
          f"({time.perf_counter() - start:.0f} s to make)")  # fmt: skip
    del vectors
    root = work / "snapshots"
    candidate = build_snapshot(run, str(root), IndexConfig(queries=200))["snapshot_id"]
    baseline = build_snapshot(run, str(root), IndexConfig(queries=200, reduce=f"pca:{args.dim // 4}", min_recall=0.1))[
        "snapshot_id"
    ]
    start = time.perf_counter()
    doc = run_evaluation(EvaluateConfig(snapshot=str(root / candidate), interactions=str(work / "logs.parquet"),
                                        baseline=str(root / baseline)))  # fmt: skip
    seconds = time.perf_counter() - start
    ndcg = next(c for c in doc["comparisons"] if c["metric"] == "ndcg@5")
    print(
        f"evaluated {doc['counts']['evaluated_queries']:,} queries against 2 snapshots of {args.items:,} items "
        f"in {seconds:.1f} s ({doc['counts']['evaluated_queries'] / seconds:,.0f} queries/s, both snapshots)"
    )
    print(f"nDCG@5 candidate {ndcg['candidate']:.4f} vs PCA-{args.dim // 4} baseline {ndcg['baseline']:.4f}: "
          f"{ndcg['relative'] * 100:+.1f}% (95% CI {ndcg['relative_ci'][0] * 100:+.1f}% to "
          f"{ndcg['relative_ci'][1] * 100:+.1f}%)")  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
