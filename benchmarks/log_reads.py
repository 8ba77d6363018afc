"""What reading a marketplace's interaction logs costs `evaluate` (`evaluation.logs.read_judgments`): seconds and
the process's peak memory, for logs as a warehouse exports them, partitioned by day (`clicks/dt=2026-11-29/`) with
more columns than evaluation reads, and the nightly's `since_days` window over them.

    python benchmarks/log_reads.py                      # 90 days of 100,000 rows, 11 columns, the last 14 days
    python benchmarks/log_reads.py --days 30 --rows-per-day 20000 --since-days 7

Each measurement runs in a fresh process (peak RSS: `VmHWM`), two rounds, best of each.
`--ways` names the code to measure: `now` imports this checkout's; any other is a folder holding another checkout
(the same code before a change), put first on the measuring process's path. `now@100000` reads with
`max_queries=100000`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import best_of_checkouts, machine, process_memory_mib, scratch_dir  # noqa: E402 - none of ours

sys.path.insert(0, os.environ.get("LOG_READS_CODE", str(ROOT)))  # the child's: the checkout it measures

LAST_DAY = datetime(2026, 11, 29, tzinfo=UTC)


def write_logs(folder: Path, days: int, rows_per_day: int, items: int = 1_000_000, seed: int = 0) -> int:
    """Parquet logs in `folder/dt=YYYY-MM-DD/part-0.parquet`, one file a day, with columns evaluation does not read."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    for day in range(days):
        start = LAST_DAY - timedelta(days=days - 1 - day)
        query = rng.integers(0, items, rows_per_day)
        clicked = (query + rng.integers(1, 50, rows_per_day)) % items  # a near item, as a shopper's next page
        seconds = np.sort(rng.integers(0, 86_400, rows_per_day))
        table = pa.table({
            "query_item_id": pa.array([f"sku-{i:09d}" for i in query]),
            "clicked_item_id": pa.array([f"sku-{i:09d}" for i in clicked]),
            "weight": rng.choice([1.0, 2.0, 3.0], rows_per_day),
            "timestamp": pa.array(start.timestamp() * 1e6 + seconds * 1e6, pa.int64()).cast(pa.timestamp("us", "UTC")),
            "session_id": pa.array([f"s-{i:012x}" for i in rng.integers(0, 2**48, rows_per_day)]),
            "user_id": pa.array([f"u-{i:010d}" for i in rng.integers(0, 10**9, rows_per_day)]),
            "page": rng.choice(["pdp", "search", "home", "cart"], rows_per_day),
            "position": rng.integers(0, 60, rows_per_day),
            "device": rng.choice(["ios", "android", "web"], rows_per_day),
            "price": rng.random(rows_per_day) * 100,
            "country": rng.choice(["DE", "FR", "PL", "ES", "IT", "NL"], rows_per_day),
        })  # fmt: skip
        part = folder / f"dt={start:%Y-%m-%d}"
        part.mkdir(parents=True)
        pq.write_table(table, part / "part-0.parquet")
    return days * rows_per_day


def measure(logs: str, since_days: int, max_queries: int | None) -> dict:
    from evaluation.logs import read_judgments

    since = LAST_DAY + timedelta(days=1) - timedelta(days=since_days)
    start = time.perf_counter()
    judgments = read_judgments(logs, since, max_queries) if max_queries else read_judgments(logs, since)
    seconds = time.perf_counter() - start
    peak_mib = process_memory_mib()
    return {"seconds": seconds, "peak_mib": peak_mib, "queries": judgments.counts["queries"],
            "pairs": judgments.counts["pairs"], "before_since": judgments.counts.get("before_since")}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--rows-per-day", type=int, default=100_000)
    parser.add_argument("--since-days", type=int, default=14)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ways", default="now", help="comma-separated: now, or folders of other checkouts")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # the child process: the logs' folder
    parser.add_argument("--max-queries", type=int, help=argparse.SUPPRESS)  # the child's, from its way
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.since_days, args.max_queries)))
        return

    logs = scratch_dir("log-reads") / "clicks"
    rows = write_logs(logs, args.days, args.rows_per_day)
    size = sum(f.stat().st_size for f in logs.rglob("*.parquet"))
    print(f"machine: {machine()}\n{rows:,} rows in {args.days} daily partitions ({size / 2**20:.0f} MiB of Parquet, "
          f"11 columns), the last {args.since_days} days read, {args.rounds} rounds\n")  # fmt: skip

    def command(way: str) -> list[str]:
        max_queries = way.partition("@")[2]
        return [sys.executable, __file__, "--measure", str(logs), "--since-days", str(args.since_days),
                *(["--max-queries", max_queries] if max_queries else [])]  # fmt: skip

    best = best_of_checkouts(args.ways.split(","), args.rounds, "LOG_READS_CODE", command)
    print("| code | seconds | peak MiB | queries | pairs |\n| --- | ---: | ---: | ---: | ---: |")
    for way, b in best.items():
        print(f"| {way} | {b['seconds']:.2f} | {b['peak_mib']:,.0f} | {b['queries']:,} | {b['pairs']:,} |")
    print(json.dumps(best))


if __name__ == "__main__":
    main()
