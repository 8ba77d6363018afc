"""Does an embed worker's memory stay flat over a long run? RSS of `lookalike embed` sampled while it works.

    python benchmarks/embed_memory.py [--items 100000] [--catalog MANIFEST --model DIR]

Without `--catalog`, makes a synthetic catalog of real-photo JPEGs (256 px) and the demo's
tiny model, as benchmarks/nightly_bench.py does. Runs `lookalike embed --no-incremental`
(one in-process Beam worker) and samples the process's resident set every 0.5 s; prints
the RSS when 10%, 25%, 50%, 75% and 100% of the run's time had passed, the peak, and the
growth between the first and the last quarter (a leak grows with items; a flat line is
working memory). Results go in RELIABILITY.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, run_sampling_memory, scratch_dir  # noqa: E402


def measure(catalog: str, model: str, out: str) -> tuple[float, list[tuple[float, float]]]:
    """Seconds, and (seconds since start, RSS MiB) samples, of one embed run."""
    exe = Path(sys.executable).with_name("lookalike")
    seconds, samples, _ = run_sampling_memory([str(exe), "embed", "--catalog", catalog, "--model", model,
                                               "--out", out, "--no-incremental"], interval=0.5)  # fmt: skip
    return seconds, [(t, sizes["VmRSS"] / 2**20) for t, sizes in samples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--catalog", help="An existing manifest (skips making one).")
    parser.add_argument("--model", help="The encoder to use with --catalog.")
    args = parser.parse_args()
    work = scratch_dir("lookalike-embed-memory-")
    catalog, model = args.catalog, args.model
    if catalog is None:
        from benchmarks.nightly_bench import DEMO_SHAPE, _catalog
        from encoder.tiny import init_tiny_model

        manifest, _ = _catalog(work / "catalog", args.items, 256)
        catalog, model = str(manifest), str(init_tiny_model(["red mug", "blue lamp"], work / "model", DEMO_SHAPE))
    seconds, samples = measure(catalog, model, str(work / "out"))
    at = {share: next(rss for t, rss in samples if t >= share * seconds * 0.999) for share in (0.1, 0.25, 0.5, 0.75)}
    at[1.0] = samples[-1][1]
    first = [rss for t, rss in samples if 0.25 * seconds <= t < 0.5 * seconds]
    last = [rss for t, rss in samples if 0.75 * seconds <= t]
    print(f"machine: {machine()}; catalog {catalog}; {seconds:.0f} s, {len(samples)} samples\n")
    print("| 10% | 25% | 50% | 75% | end | peak | mean 25–50% → mean 75–100% |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(" | ".join(["", *(f"{at[s]:,.0f} MiB" for s in sorted(at)), f"{max(r for _, r in samples):,.0f} MiB",
                     f"{sum(first) / len(first):,.0f} → {sum(last) / len(last):,.0f} MiB", ""]).strip())  # fmt: skip


if __name__ == "__main__":
    main()
