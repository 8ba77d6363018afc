"""Evaluation at a marketplace's scale: a night's interaction logs against two 1M-item snapshots, candidate vs
baseline, as `lookalike evaluate` runs it (`evaluation.run.run_evaluation`: logs → relevance, each snapshot's
neighbours of every query, metrics, the 1,000-resample paired bootstrap).

    python benchmarks/eval_bench.py                          # 1M × 256, 1M query items with 6 clicks each
    python benchmarks/eval_bench.py --queries 100000 --clicks 3 --ways /path/to/an/older/checkout,now
    python benchmarks/eval_bench.py --ways now@next,now@next-searched   # the next night, against tonight's

Two snapshots of the same clustered vectors (faiss auto, and a PCA to a quarter of the dimensions as the
baseline), and click logs whose clicked items are noisy near neighbours of the query. Each way runs in a fresh
process, alternated, best of `--rounds` (seconds and peak resident memory, `VmHWM`); each step's seconds are
taken where `run_evaluation` calls it. `--ways`: `now` imports this checkout's code, any other is a folder
holding another checkout (the code before a change), put first on the measuring process's path. Each snapshot
is loaded once before the rounds, so no way's time holds a first load's check of its files.

`@next` measures the next night: the baseline evaluated as the candidate against the faiss snapshot, which a gated
evaluation (run once before the rounds) kept its rankings of; `@next-searched` the same with those rankings not
taken, searched again as before they were kept.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import best_of_checkouts, clustered, machine, process_memory_mib, scratch_dir, write_run  # noqa: E402

sys.path.insert(0, os.environ.get("EVAL_BENCH_CODE", str(ROOT)))  # the child's: the checkout it measures

STEPS = ("read_judgments", "open_snapshot", "evaluate")  # `run_evaluation`'s calls, timed where it makes them


def _logs(vectors, queries: int, clicks: int, path: Path, seed: int = 0) -> int:
    """`clicks` clicks on random near neighbours (among the top 50 of an approximate search) of each of `queries`
    random query items, weights 1/2/3."""
    import faiss
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    query_rows = rng.choice(len(vectors), size=queries, replace=False)
    nlist = max(1, int(np.sqrt(len(vectors))))
    index = faiss.index_factory(vectors.shape[1], f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(vectors[rng.choice(len(vectors), size=min(len(vectors), 50 * nlist), replace=False)])
    index.add(vectors)
    index.nprobe = 8  # approximate neighbours are fine for making synthetic clicks
    _, near = index.search(vectors[query_rows], 51)
    picks = near[np.arange(queries)[:, None], rng.integers(1, 51, size=(queries, clicks))]
    ids = pa.array([f"item-{i:06d}" for i in range(len(vectors))])
    table = pa.table({
        "query_item_id": ids.take(pa.array(np.repeat(query_rows, clicks))),
        "clicked_item_id": ids.take(pa.array(np.maximum(picks.reshape(-1), 0))),
        "weight": pa.array(rng.choice([1.0, 2.0, 3.0], size=queries * clicks, p=[0.8, 0.15, 0.05])),
    })  # fmt: skip
    pq.write_table(table, path)
    return table.num_rows


def measure(candidate: str, baseline: str, logs: str, kept: bool = True) -> dict:
    """One evaluation in this process, each step's seconds where `run_evaluation` calls it; without `kept`, no
    rankings an earlier evaluation kept are taken."""
    from evaluation import run

    if not kept:
        run.load_rankings = lambda *args: None

    spent = dict.fromkeys(STEPS, 0.0)

    def timed(name, fn):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start

        return call

    for name in STEPS:
        setattr(run, name, timed(name, getattr(run, name)))
    start = time.perf_counter()
    doc = run.run_evaluation(run.EvaluateConfig(snapshot=candidate, interactions=logs, baseline=baseline))
    seconds = time.perf_counter() - start
    ndcg = next(c for c in doc["comparisons"] if c["metric"] == "ndcg@5")
    return {"seconds": seconds, "peak_mib": process_memory_mib(), **{f"{n}_s": s for n, s in spent.items()},
            "queries": doc["counts"]["evaluated_queries"], "ndcg": [ndcg["candidate"], ndcg["baseline"]],
            "relative_ci": ndcg["relative_ci"], "reused": doc.get("rankings_reused")}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1_000_000, help="query items in the logs")
    parser.add_argument("--clicks", type=int, default=6, help="clicks logged per query item")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--ways", default="now", help="comma-separated: now, or folders of other checkouts")
    parser.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)  # the child: candidate, baseline, logs
    parser.add_argument("--searched", action="store_true", help=argparse.SUPPRESS)  # the child: no kept rankings
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure, kept=not args.searched)))
        return
    logging.basicConfig(level=logging.WARNING)
    from indexing import IndexConfig, SnapshotClient, build_snapshot

    work = scratch_dir("lookalike-eval-bench-")
    print(f"machine: {machine()}")
    vectors = clustered(args.items, args.dim, clusters=max(50, args.items // 100), spread=0.5)
    run = write_run(work / "run", vectors, shards=8)
    start = time.perf_counter()
    rows = _logs(vectors, args.queries, args.clicks, work / "logs.parquet")
    print(f"{args.items:,} × {args.dim} vectors; {rows:,} log rows over {args.queries:,} query items "
          f"({time.perf_counter() - start:.0f} s to make)")  # fmt: skip
    del vectors
    root = work / "snapshots"
    candidate = build_snapshot(run, str(root), IndexConfig(queries=200))["snapshot_id"]
    reduced = IndexConfig(queries=200, reduce=f"pca:{args.dim // 4}", min_recall=0.1)
    baseline = build_snapshot(run, str(root), reduced)["snapshot_id"]
    for snapshot_id in (candidate, baseline):  # each file's check done once, as the night's first load does it
        SnapshotClient(str(root), snapshot_id=snapshot_id).close()

    ways = args.ways.split(",")
    if any("@next" in way for way in ways):  # tonight: the faiss snapshot judged, gated, its rankings kept
        from evaluation.run import EvaluateConfig, run_evaluation

        run_evaluation(EvaluateConfig(snapshot=str(root / candidate), interactions=str(work / "logs.parquet"),
                                      baseline=str(root / baseline), gates=("ndcg@5>=0",)))  # fmt: skip

    def command(way: str) -> list[str]:
        night = way.partition("@")[2]
        pair = (baseline, candidate) if night.startswith("next") else (candidate, baseline)
        return [sys.executable, __file__, "--measure", str(root / pair[0]), str(root / pair[1]),
                str(work / "logs.parquet"), *(["--searched"] if night == "next-searched" else [])]  # fmt: skip

    best = best_of_checkouts(ways, args.rounds, "EVAL_BENCH_CODE", command,
                             lowest=("seconds", "peak_mib", *(f"{n}_s" for n in STEPS)))  # fmt: skip
    print("| code | seconds | logs s | snapshots' load s | evaluate s | peak MiB | queries/s | nDCG@5 candidate / "
          "baseline | relative 95% CI |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")  # fmt: skip
    for way, b in best.items():
        low, high = b["relative_ci"]
        print(
            f"| {way} | {b['seconds']:.1f} | {b['read_judgments_s']:.1f} | {b['open_snapshot_s']:.1f} | "
            f"{b['evaluate_s']:.1f} | {b['peak_mib']:,.0f} | {b['queries'] / b['seconds']:,.0f} | "
            f"{b['ndcg'][0]:.4f} / {b['ndcg'][1]:.4f} | {low * 100:+.1f}% to {high * 100:+.1f}% |"
        )
    for way, b in best.items():
        print(f"{way}: evaluated {b['queries']:,} queries against 2 snapshots of {args.items:,} items")
    print(json.dumps(best))


if __name__ == "__main__":
    main()
