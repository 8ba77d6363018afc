"""Does `lookalike index --memory-budget` keep the build process under its budget?

    python benchmarks/index_memory.py [--rows 1000000] [--dim 256] [--budgets 256MiB,512MiB,1GiB]

Writes an embed run of clustered vectors, then runs `lookalike index` as its own process
once without a budget and once per budget, sampling the process's anonymous and
file-backed resident memory every 20 ms. Prints peak RssAnon against the budget, peak
RssFile (memory-mapped parts and lists, which the kernel can drop), wall time, the index
chosen and its measured recall. Results go in BENCHMARKS.md ("Memory of an index build").
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import clustered, machine, run_watching_memory, write_run  # noqa: E402
from indexing.spec import parse_size  # noqa: E402


def build(run: str, out: Path, budget: str | None) -> dict:
    exe = str(Path(sys.executable).with_name("lookalike"))
    cmd = [exe, "index", "--embeddings", run, "--out", str(out)] + (["--memory-budget", budget] if budget else [])
    seconds, anon, file, _ = run_watching_memory(cmd)
    (snapshot,) = [p for p in out.iterdir() if not p.name.startswith(".")]
    manifest = json.loads((snapshot / "manifest.json").read_text())
    shutil.rmtree(out)
    return {"seconds": seconds, "anon": anon, "file": file, "manifest": manifest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--budgets", default="256MiB,512MiB,1GiB")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lookalike-index-memory-"))
    try:
        vectors = clustered(args.rows, args.dim, clusters=max(50, args.rows // 100), spread=0.5)
        run = write_run(work / "run", vectors, shards=8)
        print(f"machine: {machine()}\n{args.rows:,} × {args.dim} vectors ({vectors.nbytes / 2**30:.2f} GiB float32)\n")
        del vectors
        print(
            "| --memory-budget | index (parts) | peak RssAnon | under budget | peak RssFile | wall | recall@10 | queries/s |"
        )
        print("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |")
        for budget in [None, *args.budgets.split(",")]:
            try:
                r = build(run, work / "snapshots", budget)
            except RuntimeError as err:  # a budget below what the build needs is refused up front
                print(f"| {budget} | refused: {str(err).rsplit('error: ', 1)[-1].strip()} | | | | | | |", flush=True)
                continue
            ix, q = r["manifest"]["index"], r["manifest"]["quality"]
            limit = parse_size(budget) if budget else None
            verdict = (
                "—" if limit is None else ("yes" if r["anon"] <= limit else f"NO (+{(r['anon'] - limit) >> 20} MiB)")
            )
            print(f"| {budget or 'none'} | {ix['factory']} ({ix['parts']}) | {r['anon'] / 2**20:,.0f} MiB | {verdict} | "
                  f"{r['file'] / 2**20:,.0f} MiB | {r['seconds']:.0f} s | {q['recall_at_10']:.3f} | {q['batch_queries_per_s']:,.0f} |", flush=True)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
