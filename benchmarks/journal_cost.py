"""What the GPU decoder's journal (`encoder.decode_journal`) costs a GPU worker per batch: `begin` as a batch goes to
the GPU decoder and `end` as its vectors are taken, with `--in-flight` batches listed (the stream's steady state),
against the same batches' digests only gathered (the work every batch does anyway), in one process. Also what
routing costs a batch, its digests gathered, when the directory holds suspects and none is in the batch (`reasons`).

    python benchmarks/journal_cost.py                 # batches of 256, 4 in flight
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine  # noqa: E402
from encoder.decode_journal import DecodeJournal  # noqa: E402

RUN_C_BATCH_MS = 42.7  # (d)'s time per batch of 256 on one H100 (BENCHMARKS.md, run C)


def per_batch_us(fn, batches: int) -> float:
    start = time.perf_counter()
    for k in range(batches):
        fn(k)
    return 1e6 * (time.perf_counter() - start) / batches


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--in-flight", type=int, default=4)
    parser.add_argument("--batches", type=int, default=3000)
    args = parser.parse_args()
    keys = [[(f"item-{b}-{i}", hashlib.sha256(f"{b}-{i}".encode()).hexdigest()) for i in range(args.batch_size)]
            for b in range(8)]  # fmt: skip
    with tempfile.TemporaryDirectory() as work:
        journal = DecodeJournal(work, digest_of=lambda key: key[1])

        def digests_only(k: int) -> list[str]:
            return [journal.digest_of(key) for key in keys[k % 8]]

        for k in range(args.in_flight):
            journal.begin(-1 - k, digests_only(k))

        def journaled(k: int) -> None:  # as `embed_stream` does: the digests gathered once, then begin and end
            journal.begin(k, digests_only(k))
            journal.end(k - args.in_flight if k >= args.in_flight else -1 - k)

        base = min(per_batch_us(digests_only, args.batches) for _ in range(3))
        cost = min(per_batch_us(journaled, args.batches) for _ in range(3))
        journal.close()
        other = Path(work) / "with-suspects"  # one suspect, not in these batches
        other.mkdir()
        (other / "suspects.txt").write_text("0" * 64 + "\n")
        routing = DecodeJournal(other, digest_of=lambda key: key[1])
        nothing, digests = [None] * args.batch_size, [[key[1] for key in batch] for batch in keys]
        route_us = min(per_batch_us(lambda k: routing.reasons(digests[k % 8], nothing), args.batches) for _ in range(3))
        routing.close()
    result = {"machine": machine(), "batch": args.batch_size, "in_flight": args.in_flight,
              "digests_only_us_per_batch": round(base, 1), "begin_and_end_us_per_batch": round(cost, 1),
              "x_digests_only": round(cost / base, 2), "routing_with_suspects_us_per_batch": round(route_us, 1),
              "share_of_run_c_batch_pct": round(100 * cost / (1000 * RUN_C_BATCH_MS), 3)}  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
