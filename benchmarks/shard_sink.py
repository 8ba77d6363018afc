"""Local embed runs writing their shards through `pipelines.shard_sink` (each bundle's file renamed into place after one
shuffle for both sinks) against Beam's `iobase.Write` (four stages of its own per sink, `benchmarks/beam_before.py`).

    python benchmarks/shard_sink.py [--images 200,2000] [--rounds 5]

A glob of small photos (160 px, from `realistic_jpegs`) and a tiny random SigLIP on this machine's CPU, the
local runner in this process: what the runs differ by is Beam's fixed cost per run, not the model's work. Each round
runs the two ways on each catalog size, alternated; also the stages (bundles) each run executed, their seconds
outside the stage that embeds, and Beam's construction of the graph (`time_s.build`). Both ways' shards must hold
the same rows. Results go in BENCHMARKS.md.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow.dataset as ds  # noqa: E402

from benchmarks.beam_before import sinks_as_before  # noqa: E402
from benchmarks.common import bundles_timed, print_ways  # noqa: E402
from benchmarks.local_runs import photo_runs, size_args  # noqa: E402

WAYS = {"before: Beam's Write, four stages per sink": sinks_as_before,
        "now: each bundle's file placed after one shuffle": contextlib.nullcontext}  # fmt: skip


def main() -> None:
    args, sizes = size_args(__doc__)
    work = Path(tempfile.mkdtemp(prefix="lookalike-shard-sink-"))
    seconds: dict[tuple[int, str], list[float]] = {}
    stages: dict[tuple[int, str], list[tuple[int, float, float]]] = {}  # (bundles, s outside embedding, build s)
    try:
        run = photo_runs(work, sizes, args.rounds)

        def timed(n: int, out: Path, spent: list) -> tuple[float, dict]:
            with bundles_timed(spent):
                took, result = run(n, out)
            rows = ds.dataset(result.run_dir, format="parquet").to_table(columns=["item_id"]).column("item_id")
            assert sorted(rows.to_pylist()) == sorted(p.stem for p in (work / str(n)).glob("*.jpg")), "rows differ"
            return took, result.manifest["time_s"]

        for way in WAYS.values():  # imports, caches: untimed
            with way():
                timed(sizes[0], work / f"warm-{id(way)}", [])
        for r in range(args.rounds):
            for n in sizes:
                for k, (name, way) in enumerate(WAYS.items()):
                    spent: list[tuple[str, float]] = []
                    with way():
                        took, time_s = timed(n, work / f"out-{r}-{n}-{k}", spent)
                    seconds.setdefault((n, name), []).append(took)
                    outside = sum(s for stage, s in spent if "Embed-images" not in stage)
                    stages.setdefault((n, name), []).append((len(spent), outside, time_s["build"]))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def stage_cells(n: int, name: str) -> list[str]:
        counts = "/".join(map(str, sorted({c for c, _, _ in stages[n, name]})))
        outside = float(np.median([o for _, o, _ in stages[n, name]]))
        build = float(np.median([b for _, _, b in stages[n, name]]))
        return [counts, f"{outside:.3f}", f"{build:.3f}"]

    print_ways(seconds, sizes, WAYS, ("stages", "outside embedding, s", "build, s"), stage_cells)


if __name__ == "__main__":
    main()
